"""Issue 13, manifest side: duplicates keyed on what makes an item distinct (WSI-Bench's multiple-choice and
open items with the same wording are not duplicates), bounded parsing of user text (nesting depth, size)
with errors naming file and row, a header-only manifest is not "OK", and the error lists of skipped and
unreadable rows do not grow on reruns."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from wsi_llava.data.manifest import MAX_CHOICES_CHARS, Record, read_manifest_rows
from wsi_llava.data.records import MAX_JSON_DEPTH

ROW = dict(dataset="d", question="Q?", answer="A", caption="", choices=None, split=None, case_id=None,
           category=None, source="m.csv")
from wsi_llava.data.slides import SlideError
from wsi_llava.data.validate import format_problems, validate_manifests

HEADER = "h5_path,caption,question,answer,slide_id,dataset,choices\n"


def stub_h5(path: Path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f["features"] = rng.standard_normal((4, 8)).astype("f4")
        f["coords"] = np.array([[0, 0], [256, 0], [0, 256], [256, 256]])
    return str(path)


# --------------------------------------------------------------------------- WSI-Bench duplicates


SLIDE = "TCGA-21-1083-01Z-00-DX1.8288ca92-b611-4acf-986e-0b8a3f620b94"
MORPH_Q = "How would you describe the pattern of tumor infiltration in this slide?"
STAGE_Q = "For a patient with a tumor infiltrating through the basement membrane, what is the TNM staging?"


def _item(question: str, answer: str, slide: str = SLIDE) -> dict:
    return {"id": f"{slide}-1", "image": f"TCGA-LUSC/{slide}.pt",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def test_wsi_bench_choice_and_open_items_with_one_wording_are_not_duplicates(tmp_path):
    """The public test split has 69 such pairs (Morphology_choice vs Regional_Structure_Description,
    Staging_choice vs Staging …); a small file set in the same format with those collisions imports and
    validates clean, while a real duplicate is still flagged."""
    from wsi_llava import cli

    bench = tmp_path / "bench"
    bench.mkdir()
    other = "TCGA-EM-A3OA-01Z-00-DX1.6EDE47B4-8926-4598-AB68-439590DE7CA8"
    files = {
        "Morphology_choice_test.json": [_item(f"{MORPH_Q} A) Perineural only. B) Stromal infiltration. "
                                              "C) Confined. D) Vascular invasion.", "B")],
        "Regional_Structure_Description_test.json": [_item(MORPH_Q, "Tumour cells infiltrate the stroma.")],
        "Staging_choice_test.json": [_item(f"{STAGE_Q} A) T1N0M0 B) T2N0M0 C) T3N1M0 D) T4N2M1", "A"),
                                     _item(f"{STAGE_Q} A) T1N0M0 B) T2N0M0 C) T3N1M0 D) T4N2M1", "A", other)],
        "Staging_test.json": [_item(STAGE_Q, "T1N0M0"), _item(STAGE_Q, "T1N0M0", other)],
    }
    for name, items in files.items():
        (bench / name).write_text(json.dumps(items), encoding="utf-8")
    h5 = tmp_path / "h5"
    h5.mkdir()
    for i, slide in enumerate((SLIDE, other)):
        stub_h5(h5 / f"{slide}.h5", i)
    man = tmp_path / "manifest.csv"
    assert cli.main(["import", "wsi-bench", *map(str, sorted(bench.iterdir())), "--h5-root", str(h5),
                     "--out", str(man)]) == 0
    good, problems = validate_manifests([str(man)])
    assert problems == [] and len(good) == 6
    kinds = sorted(r.kind for r in good)
    assert kinds == ["mc", "mc", "mc", "vqa", "vqa", "vqa"]

    # an exact repeat (same slide, kind, question and options) is still a duplicate
    lines = man.read_text(encoding="utf-8").splitlines()
    man.write_text("\n".join([*lines, lines[1]]) + "\n", encoding="utf-8")
    _, problems = validate_manifests([str(man)])
    assert len(problems) == 1 and "duplicate (slide_id, question)" in problems[0].message
    assert "already at" in problems[0].message and problems[0].row == len(lines) + 1


def test_multiple_choice_items_differ_by_their_options(tmp_path):
    stub_h5(tmp_path / "s.h5")
    man = tmp_path / "m.csv"
    man.write_text(HEADER + "\n".join([
        's.h5,,What grade?,A,s1,d,"[""1"", ""2""]"',
        's.h5,,what  grade?,A,s1,d,"[""low"", ""high""]"',  # other options: another item
        's.h5,,What grade?,2,s1,d,',                          # open item: another item
        's.h5,,What grade?,B,s1,d,"[""1"", ""2""]"',          # same options: a duplicate
    ]) + "\n")
    _, problems = validate_manifests([str(man)])
    assert [(p.row, p.field) for p in problems] == [(5, "question")]
    assert "already at" in problems[0].message and "line 2" in problems[0].message


# --------------------------------------------------------------------------- bounded parsing


def test_deeply_nested_choices_cell_is_a_row_error(tmp_path):
    stub_h5(tmp_path / "s.h5")
    man = tmp_path / "m.csv"
    deep = "[" * 20_000 + "]" * 20_000  # 40,000 characters: under the size bound, far over any nesting
    shallow_but_nested = '"[[""a""], [""b""]]"'
    too_long = '"[' + ", ".join(['""x""'] * (MAX_CHOICES_CHARS // 4)) + ']"'
    man.write_text(HEADER + "\n".join([
        f"s.h5,,Q1?,A,s1,d,{deep}", f"s.h5,,Q2?,A,s1,d,{shallow_but_nested}", f"s.h5,,Q3?,A,s1,d,{too_long}",
        "s.h5,,Q4?,fine,s1,d,",
    ]) + "\n")
    good, problems = validate_manifests([str(man)])
    assert [r.question for r in good] == ["Q4?"]
    by_row = {p.row: p for p in problems}
    assert set(by_row) == {2, 3, 4} and all(p.field == "choices" for p in problems)
    assert "nested" in by_row[2].message and "nested" in by_row[3].message
    assert f"at most {MAX_CHOICES_CHARS:,}" in by_row[4].message
    assert all(line.startswith(f"{man} line") for line in format_problems(problems))


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_sharegpt_json(tmp_path, depth):
    stub_h5(tmp_path / "s.h5")
    ok = {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "A."}],
          "images": ["s.h5"]}
    deep = "[" * depth + "]" * depth
    text = "[" + json.dumps(ok) + ', {"messages": ' + deep + ', "images": ["s.h5"]}]'
    man = tmp_path / "m.json"
    man.write_text(text)
    good, problems, _ = read_manifest_rows(str(man))
    assert len(problems) == 1 and "nested more than" in problems[0].message
    if depth < 1000:  # parsed, then refused per item: the row is named, the other item kept
        assert problems[0].row == 2 and len(good) == 1
    else:  # beyond what the parser can nest: the whole file (row 0 = the file)
        assert problems[0].row == 0 and good == []
    assert str(MAX_JSON_DEPTH) in problems[0].message


def test_deeply_nested_jsonl_line_names_the_line(tmp_path):
    stub_h5(tmp_path / "s.h5")
    ok = json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                     "images": ["s.h5"]})
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join([ok, '{"images": ' + "[" * 100_000 + "]" * 100_000 + "}",
                              '{"images": ["s.h5"], "split": ' + "[" * 60 + "]" * 60 + "}"]) + "\n")
    good, problems, _ = read_manifest_rows(str(man))
    assert len(good) == 1 and [(p.row, p.field) for p in problems] == [(2, "json"), (3, "json")]
    assert all("nested more than" in p.message for p in problems)


def test_header_only_and_empty_manifests_are_not_ok(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text(HEADER)
    empty = tmp_path / "m.json"
    empty.write_text("[]")
    good, problems = validate_manifests([str(csv), str(empty)])
    assert good == [] and [(p.source, p.row, p.field) for p in problems] == [(str(csv), 0, "rows"),
                                                                             (str(empty), 0, "rows")]
    assert all("no rows" in p.message for p in problems)
    stub_h5(tmp_path / "s.h5")
    csv.write_text("h5_path,caption,question,answer,slide_id,dataset,split\ns.h5,,Q?,A,s1,d,train\n")
    _, problems = validate_manifests([str(csv)], split="test")
    assert len(problems) == 1 and "no rows with split='test'" in problems[0].message


def test_validate_cli_fails_on_a_header_only_csv(tmp_path, capsys):
    import argparse

    from wsi_llava.data import validate as V

    csv = tmp_path / "m.csv"
    csv.write_text(HEADER)
    parser = argparse.ArgumentParser()
    V.add_arguments(parser)
    assert V.main(parser.parse_args([str(csv)])) == 1
    assert "no rows" in capsys.readouterr().out


def test_special_file_as_manifest_is_refused_without_opening(tmp_path):
    import os

    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    good, problems, _ = read_manifest_rows(str(fifo))
    assert good == [] and "not a regular file" in problems[0].message


# --------------------------------------------------------------------------- reruns do not repeat lines


class _StubAssistant:
    """Answers every row whose slide file exists; a missing slide file is a SlideError."""

    def load(self, path, slide_id=None):
        if not Path(path).is_file():
            raise SlideError(f"{path}: file not found")
        return SimpleNamespace(path=path)

    def answer(self, slides, users, histories, settings, explain=False, question_texts=None):
        return [SimpleNamespace(text="A") for _ in slides]


def test_predict_errors_file_does_not_grow_on_reruns(tmp_path):
    from wsi_llava.infer.predict import predict

    good_h5 = stub_h5(tmp_path / "good.h5")
    bad_h5 = str(tmp_path / "missing.h5")
    records = [Record(h5_path=good_h5, slide_id="g", row=2, **ROW), Record(h5_path=bad_h5, slide_id="b", row=3, **ROW)]
    out = tmp_path / "p.jsonl"
    errors = tmp_path / "p.errors.jsonl"
    for _ in range(3):
        predict(_StubAssistant(), records, out, progress=False)
    lines = errors.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["row"] == 3
    assert len(out.read_text().splitlines()) == 1
    stub_h5(Path(bad_h5), 1)  # fixed: the rerun answers it and the error is gone
    counts = predict(_StubAssistant(), records, out, progress=False)
    assert counts == {"done": 1, "skipped": 1, "errors": 0}
    assert not errors.exists() and len(out.read_text().splitlines()) == 2


def test_skipped_rows_file_does_not_grow_on_reruns(tmp_path):
    from wsi_llava.train.run import filter_invalid

    good = stub_h5(tmp_path / "good.h5")
    records = [Record(h5_path=good, slide_id="g", row=2, **ROW),
               Record(h5_path=str(tmp_path / "missing.h5"), slide_id="b", row=3, **ROW)]
    out = tmp_path / "run"
    for _ in range(3):
        kept = filter_invalid(records, None, True, out, "cfg.yaml")
        assert [r.row for r in kept] == [2]
    lines = (out / "skipped.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["row"] == 3
