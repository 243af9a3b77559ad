"""Sharded `extract` (issue #17): launched by torchrun with 2 CPU processes (gloo) it writes exactly the files
and cohort tables one process writes — every slide once, the corrupt one listed once — and a rerun after a
rank was killed redoes only that rank's unfinished slide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("openslide")

from wsi_llava.cli import main as cli  # noqa: E402
from wsi_llava.data.synthetic_wsi import draw_tissue, write_pyramid_tiff  # noqa: E402
from wsi_llava.infer import shard  # noqa: E402
from wsi_llava.infer.extract import merge_tables, table_paths  # noqa: E402
from wsi_llava.model.tile_encoder import build_tile_encoder, save_tile_weights  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TINY = dict(img_size=64, patch_size=16, embed_dim=24, depth=1, num_heads=2)
# 20x slides (0.5 µm/px) of different sizes, tiled at 20x in 64-px tiles: a few dozen tiles each
SLIDES = {"a": (512, 768, [(380, 250, 200, 150)]), "b": (768, 1024, [(300, 300, 220, 200), (750, 500, 180, 200)]),
          "c": (512, 512, [(256, 256, 180, 160)]), "d": (1024, 768, [(384, 500, 250, 300)]),
          "e": (640, 640, [(320, 320, 200, 220)])}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Five slides with tissue, one blank (no tissue tile), one corrupt file, and tiny ViT weights."""
    root = tmp_path_factory.mktemp("raw")
    slides = root / "slides"
    slides.mkdir()
    for i, (name, (h, w, blobs)) in enumerate(SLIDES.items()):
        write_pyramid_tiff(slides / f"{name}.tiff", draw_tissue(h, w, blobs, seed=i)[0], mpp=0.5, levels=2)
    write_pyramid_tiff(slides / "blank.tiff", draw_tissue(512, 512, [], seed=9)[0], mpp=0.5, levels=2)
    (slides / "corrupt.svs").write_bytes(b"not a slide" * 100)
    torch.manual_seed(0)
    weights = root / "tiny.safetensors"
    save_tile_weights(build_tile_encoder("vit", **TINY), weights)
    return slides, weights


def args(raw, out: Path) -> list[str]:
    slides, weights = raw
    return ["extract", str(slides), "--out", str(out), "--weights", str(weights), "--tile-size", "64",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress"]


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "wsi_llava.cli", *argv], check=False, capture_output=True, text=True, env=env,
                          timeout=240)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single(raw, tmp_path_factory):
    """The single-process run, on one thread like each torchrun rank (OMP_NUM_THREADS=1)."""
    out = tmp_path_factory.mktemp("one") / "out"
    out.mkdir()
    shard.part_path(out / "slides.csv", 2, 3).write_text("stale")  # a killed sharded run's: removed
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(args(raw, out)) == 1  # the blank and the corrupt slide failed, the cohort went on
    finally:
        torch.set_num_threads(n)
    return files(out)


def test_slide_areas_weigh_level0_microns_and_split_the_cohort(raw):
    slides, _ = raw
    paths = sorted(p for p in slides.iterdir())
    areas = shard.slide_areas(paths)
    by_name = dict(zip((p.stem for p in paths), areas))
    assert by_name["corrupt"] == 1.0  # unreadable: fails at once wherever it goes
    assert by_name["b"] == pytest.approx(768 * 1024 * 0.25) and by_name["c"] == pytest.approx(512 * 512 * 0.25)
    assert shard.slide_areas([slides / "c.tiff"], {"c": 1.0}) == [pytest.approx(512 * 512)]  # --mpp-csv wins
    plan = shard.balance(areas, 2)
    assert plan[0] and plan[1] and sorted(plan[0] + plan[1]) == list(range(len(paths)))
    loads = sorted(sum(areas[i] for i in p) for p in plan)
    assert loads[1] - loads[0] <= max(areas)


def test_merge_tables_orders_rows_and_errors_as_one_process(tmp_path):
    slides = [tmp_path / f"{s}.tiff" for s in ("z", "y", "x", "w")]
    header = "slide_id,slide_path\n"
    csv0, err0 = (shard.part_path(p, 0, 2) for p in table_paths(tmp_path))
    csv1, err1 = (shard.part_path(p, 1, 2) for p in table_paths(tmp_path))
    error = lambda s: json.dumps({"slide": str(tmp_path / f"{s}.tiff"), "slide_id": s, "error": "bad"}) + "\n"
    csv0.write_text(header + "z,/z\n")
    err0.write_text(error("x"))
    csv1.write_text(header + "w,/w\n")
    err1.write_text(error("y"))
    stale = shard.part_path(tmp_path / "slides.csv", 2, 3)
    stale.write_text(header + "q,/q\n")
    merge_tables(tmp_path, slides, 2)
    lines = (tmp_path / "slides.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["w", "z"]  # by slide_id; the stale part is not read
    assert (tmp_path / "errors.jsonl").read_text() == error("y") + error("x")  # in the order of the slides
    assert not list(tmp_path.glob("*.rank*-of-*"))
    with pytest.raises(RuntimeError, match="rank 1 left no"):
        csv0.write_text(header)
        err0.write_text("")
        merge_tables(tmp_path, slides, 2)


def test_two_processes_write_the_single_process_outputs(raw, single, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(*args(raw, out))
    assert proc.returncode != 0 and "by 2 processes" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "extracted 5 slide(s)" in proc.stdout and "2 failed" in proc.stdout
    two = files(out)
    assert two.keys() == single.keys()  # nothing lost, nothing extra (no part left behind)
    assert sorted(k for k in two if k.startswith("features/")) == [f"features/{s}.h5" for s in sorted(SLIDES)]
    for name in single:
        assert two[name] == single[name], name  # H5, GeoJSON, PNG and both tables byte for byte
    rows = (out / "slides.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == sorted(SLIDES)  # every slide once
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["slide_id"] for e in errors] == ["blank", "corrupt"]  # the corrupt slide listed once, in order

    # a rank killed mid-run: one of its slides unfinished, its stale table parts left. The rerun redoes that
    # slide only, and merges to the same tables
    slides, _ = raw
    paths = sorted(slides.iterdir())
    plan = shard.balance(shard.slide_areas(paths), 2)
    redo = next(paths[i].stem for i in plan[1] if paths[i].stem in SLIDES)
    (out / "features" / f"{redo}.h5").unlink()
    for part in (shard.part_path(p, 1, 2) for p in table_paths(out)):
        part.write_text("torn")
    kept = {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    proc = torchrun(*args(raw, out))
    assert "extracted 1 slide(s)" in proc.stdout and "skipped 4 already done, 2 failed" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-4000:]
    assert files(out) == single
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
