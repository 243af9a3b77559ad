"""ROI pipeline (issue #15): a manifest of ROI images → `encode-roi` (slide H5 files + manifest) → stage-2
training with ``vision_mode: roi`` → `predict`, on the encoded manifest and on the images themselves
(``--tile-weights``, encoded in the run): the same answers."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from wsi_llava.cli import main as cli
from wsi_llava.data.manifest import load_manifest
from wsi_llava.model.tile_encoder import build_tile_encoder, save_tile_weights

pytestmark = pytest.mark.timeout(300)

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="module")
def rois(tmp_path_factory):
    """Six 64 × 96 ROI images (2 × 3 tiles of 32 px), two per colour class, a manifest of them and tile weights."""
    root = tmp_path_factory.mktemp("rois")
    torch.manual_seed(0)
    enc = build_tile_encoder("vit", img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, init_values=1e-5)
    save_tile_weights(enc, root / "tile.safetensors")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows = ["image_path,caption,question,answer,slide_id,dataset,choices"]
    choices = json.dumps(list(COLOURS)).replace('"', '""')
    for i in range(6):
        name = list(COLOURS)[i % 3]
        arr = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, (64, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"roi{i}.png")
        rows.append(f'img/roi{i}.png,,What colour is this region?,{name},roi{i},rois,"{choices}"')
        rows.append(f"img/roi{i}.png,A {name} region.,,,roi{i},rois,")
    (root / "rois.csv").write_text("\n".join(rows) + "\n")
    return root


def test_encode_roi_trains_and_predicts_like_the_images(rois, tiny_llm, tmp_path, capsys):
    weights, manifest = rois / "tile.safetensors", rois / "rois.csv"
    out = tmp_path / "encoded"
    assert cli(["encode-roi", "--data", str(manifest), "--tile-weights", str(weights), "--out", str(out)]) == 0
    files = sorted(out.glob("*.h5"))
    assert len(files) == 6 and not list(out.glob("*.tmp"))
    with h5py.File(files[0]) as f:
        assert f["features"].shape == (6, 16) and f["coords"].shape == (6, 2)
    encoded = load_manifest(out / "manifest.csv")
    assert len(encoded) == 12 and all(r.h5_path.startswith(str(out)) and not r.image_path for r in encoded)
    stamps = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert cli(["encode-roi", "--data", str(manifest), "--tile-weights", str(weights), "--out", str(out)]) == 0
    assert "encoded 0 ROI image(s), skipped 6" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps  # resumed: complete files are not rewritten

    cfg = dict(llm_name_or_path=str(tiny_llm), dataset=str(out / "manifest.csv"), vision_mode="roi",
               image_seq_length=4, patches_per_wsi=8, cutoff_len=256, stage="sft", output_dir=str(tmp_path / "run"),
               finetuning_type="full", freeze_language_model=True, per_device_train_batch_size=4, max_steps=2,
               learning_rate=5e-3, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0,
               disable_tqdm=True)
    (tmp_path / "roi.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(tmp_path / "roi.yaml")]) == 0
    # training on the images themselves is refused, naming encode-roi
    (tmp_path / "img.yaml").write_text(yaml.safe_dump({**cfg, "dataset": str(manifest),
                                                       "output_dir": str(tmp_path / "run2")}))
    assert cli(["train", str(tmp_path / "img.yaml")]) == 2
    assert "encode-roi" in capsys.readouterr().err

    run = str(tmp_path / "run")
    common = ["--model", run, "--max-new-tokens", "4", "--batch-size", "4"]
    assert cli(["predict", *common, "--data", str(out / "manifest.csv"), "--out", str(tmp_path / "h5.jsonl")]) == 0
    assert cli(["predict", *common, "--data", str(manifest), "--tile-weights", str(weights),
                "--out", str(tmp_path / "img.jsonl")]) == 0
    read = lambda p: {d["key"]: d["prediction"] for d in map(json.loads, p.read_text().splitlines())}
    from_h5, from_images = read(tmp_path / "h5.jsonl"), read(tmp_path / "img.jsonl")
    assert len(from_h5) == 12 and from_images == from_h5
    # without --tile-weights each image-only row is an error saying what to do
    assert cli(["predict", *common, "--data", str(manifest), "--out", str(tmp_path / "none.jsonl")]) == 1
    errors = [json.loads(line) for line in (tmp_path / "none.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 12 and all("encode-roi" in e["error"] and "--tile-weights" in e["error"] for e in errors)
