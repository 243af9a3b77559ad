"""Sharded inference (issue #17): `predict`, `encode` and `embed` launched by torchrun with 2 CPU processes
(gloo) write exactly what one process writes; a killed predict run resumes per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_llava.cli import main as cli
from wsi_llava.data.manifest import load_manifest
from wsi_llava.infer import shard
from wsi_llava.infer.predict import row_keys
from wsi_llava.model.export import save_tower
from wsi_llava.model.slide_encoder import SlideEncoder, SlideEncoderConfig
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration

pytestmark = pytest.mark.timeout(300)

ENC = {"embed_dim": 16, "depth": 2, "num_heads": 2, "segment_lengths": [32, 64], "dilations": [1, 2]}
# --explain: the selected tiles and their scores (prompt_topk) tell every row apart, bit for bit
PREDICT = ["--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu", "--explain"]


def one_process(args: list[str]) -> int:
    """The single-process reference run, on one thread like each torchrun rank (OMP_NUM_THREADS=1): float
    reductions then split the same way, so outputs compare bit for bit whatever the machine's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli(args)
    finally:
        torch.set_num_threads(n)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "wsi_llava.cli", *args], check=False, capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def model(tiny_llm, tmp_path_factory):
    """An untrained tiny WSI-LLaVA whose selector scores tiles by the question."""
    torch.manual_seed(5)
    out = tmp_path_factory.mktemp("model")
    m, tok = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, mm_hidden_size=16, image_seq_length=4,
                                                       vision_feature_select_mode="prompt_topk")
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def single_predictions(model, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "preds.jsonl"
    assert one_process(["predict", "--model", str(model), "--data", str(cohort.all_csv), "--out", str(out), *PREDICT]) == 0
    return out.read_text()


def test_balance_is_greedy_deterministic_and_complete():
    w = [5, 1, 9, 3, 3, 7, 2]
    parts = shard.balance(w, 3)
    assert parts == shard.balance(w, 3) and sorted(i for p in parts for i in p) == list(range(7))
    assert all(p == sorted(p) for p in parts)
    assert sorted(sum(w[i] for i in p) for p in parts) == [10, 10, 10]
    assert shard.balance(w, 1) == [list(range(7))] and shard.balance([], 2) == [[], []]
    assert shard.batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_merge_keeps_existing_lines_then_adds_in_order_once(tmp_path):
    out = tmp_path / "p.jsonl"
    line = lambda k, v="x": json.dumps({"key": k, "v": v}) + "\n"
    out.write_text(line("b", "old") + line("z"))
    a, b = shard.part_path(out, 0, 2), shard.part_path(out, 1, 2)
    a.write_text(line("d") + line("b", "new") + '{"key": "torn')
    b.write_text(line("c") + line("a") + line("d", "dup"))
    assert shard.find_parts(out) == [a, b]
    assert shard.merge_jsonl(out, ["a", "b", "c", "d"], [a, b]) == 3
    assert out.read_text() == line("b", "old") + line("z") + line("a") + line("c") + line("d")
    assert not a.exists() and not b.exists()


def test_predict_two_processes_writes_the_single_process_file(model, cohort, single_predictions, tmp_path):
    rows = [json.loads(x) for x in single_predictions.splitlines()]
    records = load_manifest(cohort.all_csv)
    assert [r["key"] for r in rows] == row_keys(records)  # every row, in manifest order
    assert len({json.dumps(r["tile_scores"]) for r in rows}) == len(rows)  # the rows are told apart
    out = tmp_path / "preds.jsonl"
    proc = torchrun("predict", "--model", str(model), "--data", str(cohort.all_csv), "--out", str(out), *PREDICT)
    assert out.read_text() == single_predictions
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout and "merged from 2 processes" in proc.stdout
    assert shard.find_parts(out) == [] and not list(tmp_path.glob("*.errors.jsonl"))


def test_predict_resumes_each_rank_from_its_part(model, cohort, single_predictions, tmp_path):
    """A killed 2-process run left both parts: rank 0 complete, rank 1 after its first batch with the next
    line torn. The rerun answers only what is missing (rank 0's lines are kept as they are) and merges to
    the single-process file. (The kill falls between batches here: a batch cut inside is rerun with fewer
    rows, which may change its floats in the last bits.)"""
    records = load_manifest(cohort.all_csv)
    lines = single_predictions.splitlines(keepends=True)
    groups = shard.batches(len(records), 3)
    n = shard.tile_counts([r.h5_path for r in records], 2048)
    plan = shard.balance([sum(n[i] for i in g) for g in groups], 2)
    assert plan[0] and plan[1]
    out = tmp_path / "preds.jsonl"
    mine = [[i for b in p for i in groups[b]] for p in plan]
    marked = json.loads(lines[mine[0][0]])
    marked["prediction"] = "KEPT FROM THE PART"
    part0 = [json.dumps(marked) + "\n"] + [lines[i] for i in mine[0][1:]]
    shard.part_path(out, 0, 2).write_text("".join(part0))
    shard.part_path(out, 1, 2).write_text("".join(lines[i] for i in mine[1][:3]) + lines[mine[1][3]][:20])
    proc = torchrun("predict", "--model", str(model), "--data", str(cohort.all_csv), "--out", str(out), *PREDICT)
    expected = list(lines)
    expected[mine[0][0]] = json.dumps(marked) + "\n"
    assert out.read_text() == "".join(expected)
    assert f"0 answered, {len(mine[0])} already done" in proc.stdout
    assert f"{len(mine[1]) - 3} answered, 3 already done" in proc.stdout
    assert shard.find_parts(out) == []


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    torch.manual_seed(11)
    return save_tower(SlideEncoder(SlideEncoderConfig(in_dim=16, **ENC)),
                      tmp_path_factory.mktemp("tower") / "tower.safetensors")


def h5_contents(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


def test_encode_two_processes_writes_the_single_process_cache(tower, cohort, tmp_path):
    args = ["encode", "--vision-tower", str(tower), "--data", str(cohort.all_csv), "--device", "cpu", "--no-progress"]
    assert one_process([*args, "--out", str(tmp_path / "one")]) == 0
    proc = torchrun(*args, "--out", str(tmp_path / "two"))
    one, two = sorted(p.name for p in (tmp_path / "one").iterdir()), sorted(p.name for p in (tmp_path / "two").iterdir())
    assert one == two and len(one) == 16
    for name in one:
        (a, a_attrs), (b, b_attrs) = h5_contents(tmp_path / "one" / name), h5_contents(tmp_path / "two" / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
        assert {k: str(v) for k, v in a_attrs.items()} == {k: str(v) for k, v in b_attrs.items()}
    assert "16 encoded, 0 already cached, 0 replaced" in proc.stdout and "by 2 processes" in proc.stdout


def test_embed_two_processes_writes_the_single_process_file(tower, cohort, tmp_path):
    args = ["embed", "--vision-tower", str(tower), "--data", str(cohort.all_csv), "--device", "cpu", "--no-progress",
            "--batch-size", "3", "--patches-per-wsi", "64"]
    assert one_process([*args, "--out", str(tmp_path / "one.h5")]) == 0
    proc = torchrun(*args, "--out", str(tmp_path / "two.h5"))
    (a, a_attrs), (b, b_attrs) = h5_contents(tmp_path / "one.h5"), h5_contents(tmp_path / "two.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert {k: str(v) for k, v in a_attrs.items()} == {k: str(v) for k, v in b_attrs.items()}
    assert "merged from 2 processes" in proc.stdout and shard.find_parts(tmp_path / "two.h5") == []
