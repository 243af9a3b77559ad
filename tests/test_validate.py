"""Bad-input suite (issue 6 part 3): every case is reported with row, file, field and a clear
message by `wsi-llava validate`, and slide-file cases also make `load_slide` raise (never zeros)."""

from __future__ import annotations

import re
import struct

import h5py
import numpy as np
import pytest

from wsi_llava import cli
from wsi_llava.data import validate as V
from wsi_llava.data.manifest import load_manifest
from wsi_llava.data.slides import SlideError, load_slide
from wsi_llava.data.validate import Problem, format_problems, validate_manifests, validate_records

D = 24
HEADER = "h5_path,caption,question,answer,slide_id,dataset,choices\n"


def good_h5(path, n=64, d=D, **kw):
    rng = np.random.default_rng(0)
    feats = kw.pop("feats", rng.standard_normal((n, d)).astype(np.float32))
    coords = kw.pop("coords", np.stack([np.arange(n) % 8, np.arange(n) // 8], 1).astype(np.int64) * 256)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, **kw)
        f.create_dataset("coords", data=coords)
    return str(path)


def manifest(tmp_path, rows: list[str], header: str = HEADER, name="m.csv", encoding="utf-8") -> str:
    p = tmp_path / name
    p.write_bytes((header + "\n".join(rows) + "\n").encode(encoding))
    return str(p)


def one_file_case(make):
    """A case whose slide file is broken by ``make(path)``; one manifest row uses it."""

    def build(tmp_path):
        path = tmp_path / "s.h5"
        make(path)
        return manifest(tmp_path, ["s.h5,,What is it?,Tumour,s1,d,"]), str(path)

    return build


def _features_only(path, data, **kw):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=data, **kw)


def _truncated(path):
    good_h5(path, n=200)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _bad_filter(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((64, D), "f4"), chunks=(8, D), compression="lzf")
        f.create_dataset("coords", data=np.zeros((64, 2), "i8"))
    raw = bytearray(path.read_bytes())
    name = raw.find(b"lzf\x00")
    at = raw.rfind(struct.pack("<H", 32000), 0, name)
    assert name - at == 8  # filter pipeline message: id, name length, flags, n values, name
    raw[at : at + 2] = struct.pack("<H", 32001)  # an id no plugin provides here
    path.write_bytes(bytes(raw))


def _with(feats=None, coords=None, coords_key="coords", n=64):
    def make(path):
        rng = np.random.default_rng(0)
        f_ = rng.standard_normal((n, D)).astype(np.float32) if feats is None else feats
        c_ = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1).astype(np.int64) * 256 if coords is None else coords
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=f_)
            f.create_dataset(coords_key, data=c_)

    return make


def _nan():
    x = np.random.default_rng(0).standard_normal((64, D)).astype(np.float32)
    x[37, 5] = np.nan
    return x


def _inf():
    x = np.random.default_rng(0).standard_normal((64, D)).astype(np.float32)
    x[12, 0] = -np.inf
    return x


def _unwritten(path):
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", shape=(64, D), chunks=(8, D), dtype="f4")
        d[:32] = 1.0
        f.create_dataset("coords", data=np.zeros((64, 2), "i8"))


#: (case id, builder, expected_dim, expected message regex) — slide-file problems
FILE_CASES = [
    ("missing_file", one_file_case(lambda p: None), None, r"file not found"),
    ("zero_byte", one_file_case(lambda p: p.write_bytes(b"")), None, r"zero-byte file"),
    ("not_hdf5", one_file_case(lambda p: p.write_text("slide_id,features\n1,2\n")), None, r"not an HDF5 file"),
    ("truncated", one_file_case(_truncated), None, r"truncated HDF5 file"),
    ("no_features", one_file_case(lambda p: h5py.File(p, "w").create_dataset("coords", data=np.zeros((4, 2))).file.close()),
     None, r"no `features` dataset \(file has: coords\)"),
    ("no_coords", one_file_case(lambda p: _features_only(p, np.ones((4, D), "f4"))), None,
     r"no coordinates: expected `coords_yx` \[N, 2\] \(y, x\) or `coords` \[N, 2\] \(x, y\) \(file has: features\)"),
    ("wrong_width", one_file_case(_with()), 32, r"feature width D = 24, expected 32"),
    ("features_1d", one_file_case(_with(feats=np.ones(D, "f4"), coords=np.zeros((1, 2)))), None,
     r"`features` is 1-D with shape \(24,\); expected \[N, D\]"),
    ("n_zero_trident_empty", one_file_case(_with(feats=np.zeros((0, D), "f4"), coords=np.zeros((0, 2), "i8"))), None,
     r"no tiles \(N = 0"),
    ("length_mismatch", one_file_case(_with(coords=np.zeros((63, 2), "i8"))), None,
     r"length mismatch: `features` has 64 rows but `coords` has 63"),
    ("nan", one_file_case(_with(feats=_nan())), None, r"`features` contains NaN \(file row 37"),
    ("inf", one_file_case(_with(feats=_inf())), None, r"`features` contains Inf \(file row 12"),
    ("negative_coords", one_file_case(_with(coords=np.full((64, 2), -256, "i8"))), None,
     r"`coords` has negative coordinates \(file row 0: \[-256, -256\]"),
    ("huge_coords", one_file_case(_with(coords=np.full((64, 2), 10**9, "i8"), coords_key="coords_yx")), None,
     r"`coords_yx` has implausibly large coordinates"),
    ("nan_coords", one_file_case(_with(coords=np.full((64, 2), np.nan, "f4"))), None, r"`coords` has NaN/Inf coordinates"),
    ("float64_features", one_file_case(_with(feats=np.ones((64, D), "f8"))), None,
     r"dtype is float64; expected float16 or float32 \(rewrite with `wsi-llava convert-h5`"),
    ("int_features", one_file_case(_with(feats=np.ones((64, D), "i4"))), None,
     r"dtype is int32; expected float16 or float32"),
    ("unavailable_filter", one_file_case(_bad_filter), None,
     r"compression filter 32001 \(lzf\) that this HDF5/h5py build cannot decode"),
    ("unwritten_chunks", one_file_case(_unwritten), None, r"never written"),
]


@pytest.mark.parametrize("case,build,dim,pattern", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_slide_file(tmp_path, case, build, dim, pattern):
    man, h5 = build(tmp_path)
    good, problems = validate_manifests([man], expected_dim=dim)
    assert good == []
    assert len(problems) == 1, problems
    (p,) = problems
    assert (p.source, p.row, p.field) == (man, 2, "h5_path")
    assert h5 in p.message
    assert p.format().startswith(f"{man} line 2 [h5_path]: {h5}")
    assert re.search(pattern, p.message), p.message
    # the loader refuses the same file the same way (whole file: NaN/Inf anywhere is read)
    with pytest.raises(SlideError, match=pattern):
        load_slide(h5, None, None, dim)


def test_mixed_widths_without_expected_dim(tmp_path):
    for i, d in enumerate([D, D, 16]):
        good_h5(tmp_path / f"s{i}.h5", d=d)
    man = manifest(tmp_path, [f"s{i}.h5,,Q{i}?,A,s{i},d," for i in range(3)])
    _, problems = validate_manifests([man])
    assert [(p.row, p.field) for p in problems] == [(4, "h5_path")]
    assert "D = 16, but 2 other file(s) have D = 24 (mixed feature extractors?)" in problems[0].message


#: (case id, header, rows, encoding, kwargs, [(row, field, message regex)]) — manifest-row problems
ROW_CASES = [
    ("duplicate_slide_question", HEADER, ["s.h5,,What grade?,2,s1,d,", "s.h5,,what  grade?,3,s1,d,",
                                          "s.h5,,What grade?,2,s2,d,"], "utf-8", {},
     [(3, "question", r"duplicate \(slide_id, question\): slide 's1', question 'what  grade\?' already at .* line 2")]),
    ("missing_required_column", "h5_path,caption,question,answer,slide_id\n", ["s.h5,,Q,A,s1"], "utf-8", {},
     [(1, "dataset", r"required column 'dataset' missing \(header has: h5_path, caption, question, answer, slide_id\)")]),
    ("empty_question_and_caption", HEADER, ["s.h5,,,,s1,d,"], "utf-8", {},
     [(2, "question", r"empty question and empty caption; nothing to train on")]),
    ("question_without_answer", HEADER, ["s.h5,,Q?,,s1,d,"], "utf-8", {}, [(2, "answer", r"question has no answer")]),
    ("answer_not_among_choices", HEADER, ['s.h5,,Which?,carcinoma in situ,s1,d,"[""benign"", ""malignant""]"'],
     "utf-8", {}, [(2, "answer", r"'carcinoma in situ' is not among the choices \(A\) benign, B\) malignant\)")]),
    ("unparseable_choices", HEADER, ["s.h5,,Which?,A,s1,d,{a: b}"], "utf-8", {},
     [(2, "choices", r"cannot parse|expected a list")]),
    ("non_utf8_csv", HEADER, ["s.h5,,Qu'est-ce?,Tumeur maligne,s1,données,"], "latin-1", {},
     [(2, "encoding", r"not UTF-8: byte b'\\xe9' at line 2, column \d+; re-save the file as UTF-8")]),
    ("answer_beyond_cutoff_len", HEADER, ["s.h5,,Describe it.," + " ".join(["word"] * 60) + ",s1,d,"], "utf-8",
     dict(cutoff_len=50, image_tokens=10),
     [(2, "answer", r"at least ~62 words \+ 10 visual tokens > cutoff_len 50 \(word-count heuristic\); "
                    r"the answer would be truncated")]),
    ("prompt_beyond_cutoff_len", HEADER, ["s.h5," + " ".join(["w"] * 45) + ",,,s1,d,"], "utf-8",
     dict(cutoff_len=50, image_tokens=10),
     [(2, "caption", r"the caption would be truncated")]),
    ("question_alone_beyond_cutoff_len", HEADER, ["s.h5,," + " ".join(["w"] * 45) + "?,yes,s1,d,"], "utf-8",
     dict(cutoff_len=50, image_tokens=10),
     [(2, "question", r"prompt alone is at least ~45 words \+ 10 visual tokens ≥ cutoff_len 50")]),
]


@pytest.mark.parametrize("case,header,rows,encoding,kwargs,expected", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_manifest_rows(tmp_path, case, header, rows, encoding, kwargs, expected):
    good_h5(tmp_path / "s.h5")
    man = manifest(tmp_path, rows, header=header, encoding=encoding)
    _, problems = validate_manifests([man], **kwargs)
    got = [(p.row, p.field) for p in problems]
    assert got == [(r, f) for r, f, _ in expected], [p.format() for p in problems]
    for p, (_, _, pattern) in zip(problems, expected):
        assert p.source == man and re.search(pattern, p.message), p.message


def test_every_problem_in_one_pass_and_cli_exit_code(tmp_path, capsys):
    good_h5(tmp_path / "ok.h5")
    _with(feats=_nan())(tmp_path / "nan.h5")
    rows = ["ok.h5,,Q1?,A,s1,d,", "nan.h5,,Q2?,A,s2,d,", "nan.h5,,Q3?,A,s2,d,", "gone.h5,,Q4?,A,s3,d,",
            "zero.h5,,,,s1,d,"]
    (tmp_path / "zero.h5").write_bytes(b"")
    man = manifest(tmp_path, rows)
    assert cli.main(["validate", man]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{man} lines 3, 4 [h5_path]: ") and "contains NaN" in out[0]
    assert out[1].startswith(f"{man} line 5 [h5_path]: ") and "file not found" in out[1]
    assert out[2].startswith(f"{man} line 6 [question]: empty question")
    # the file of a row that failed its own checks is still checked
    assert out[3].startswith(f"{man} line 6 [h5_path]: ") and "zero-byte file" in out[3]
    assert len(out) == 4


def test_cli_ok_and_options(tmp_path, capsys):
    good_h5(tmp_path / "a.h5", n=300)
    man = manifest(tmp_path, ["a.h5,,Q1?,A,s1,d,", "a.h5,A report.,,,s1,d,"])
    assert cli.main(["validate", man, "--feature-dim", str(D), "--patches-per-wsi", "100",
                     "--cutoff-len", "2048", "--image-tokens", "64"]) == 0
    assert "OK: 2 row(s), 1 slide file(s) checked." in capsys.readouterr().out
    assert cli.main(["validate", man, "--feature-dim", "1536", "--quick"]) == 1


def test_each_file_opened_once(tmp_path, monkeypatch):
    good_h5(tmp_path / "a.h5")
    good_h5(tmp_path / "b.h5")
    man = manifest(tmp_path, [f"{n}.h5,,Q{i}?,A,s{i},d," for i, n in enumerate("aabba")])
    seen = []
    real = V.scan_slide
    monkeypatch.setattr(V, "scan_slide", lambda path, dim=None: seen.append(path) or real(path, dim))
    good, problems = validate_manifests([man])
    assert problems == [] and len(good) == 5
    assert sorted(seen) == sorted({str(tmp_path / "a.h5"), str(tmp_path / "b.h5")})


def test_validate_records_for_training_skip_invalid(tmp_path):
    """Training validates loaded records and can skip exactly the rows named."""
    good_h5(tmp_path / "a.h5")
    man = manifest(tmp_path, ["a.h5,,Q1?,A,s1,d,", "missing.h5,,Q2?,A,s2,d,", "a.h5,,Q1?,B,s1,d,"])
    records = load_manifest(man)
    problems = validate_records(records, expected_dim=D)
    bad = {(p.source, p.row) for p in problems}
    assert bad == {(man, 3), (man, 4)}
    assert [r.row for r in records if (r.source, r.row) not in bad] == [2]
    assert all(isinstance(p, Problem) and p.format().startswith(man) for p in problems)


def test_format_problems_folds_repeats():
    ps = [Problem("m.csv", r, "h5_path", "x.h5: file not found") for r in (2, 5, 9)] + [Problem("m.csv", 3, "answer", "no")]
    assert format_problems(ps) == ["m.csv lines 2, 5, 9 [h5_path]: x.h5: file not found", "m.csv line 3 [answer]: no"]
