"""Synthetic cohort: H5 slides whose diagnosis is carried by a small, spatially clustered set of tiles.

Each slide is a tissue-like layout (a union of 1–3 ellipses on a 256-px tile grid, N varies). Every
tile's feature is a background tissue prototype plus Gaussian noise; one compact cluster of tiles
(``signal_fraction`` of the tissue) additionally carries the prototype of the slide's diagnosis.
So a model can only answer if the tiles it looks at include the cluster: that is what the demo, the
selection study and the tests rely on. The planted tiles are stored as ``planted`` [N] (bool) in
every H5 so selection recall can be measured.

Writes ``slides/*.h5`` (features [N, D] float32, ``coords`` (x, y) or — for every third slide —
``coords_yx`` (y, x), so both conventions are exercised) and manifests ``train.csv``, ``test.csv``
and ``all.csv`` (with a ``split`` column).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest_writer import write_manifest_csv

DIAGNOSES = ("adenocarcinoma", "squamous cell carcinoma", "small cell carcinoma", "benign tissue")

MORPHOLOGY = {
    "adenocarcinoma": "malignant glands with acinar and papillary architecture and mucin production",
    "squamous cell carcinoma": "sheets of atypical squamous cells with keratin pearls and intercellular bridges",
    "small cell carcinoma": "small round blue cells with scant cytoplasm, nuclear moulding and necrosis",
    "benign tissue": "preserved architecture without atypia, invasion or mitotic activity",
}

MC_QUESTION = "What is the most likely diagnosis for this slide?"
YN_QUESTION = "Is this slide consistent with {dx}?"
OPEN_QUESTION = "Describe the key diagnostic features of this slide."


@dataclass
class SynthConfig:
    """Shape of the synthetic cohort."""

    n_train: int = 120
    """Training slides."""
    n_test: int = 40
    """Held-out slides."""
    feature_dim: int = 64
    """Tile feature width D."""
    min_tiles: int = 200
    """Fewest tissue tiles per slide."""
    max_tiles: int = 1200
    """Most tissue tiles per slide."""
    signal_fraction: float = 0.08
    """Share of a slide's tiles in the diagnostic cluster."""
    signal_strength: float = 3.0
    """Norm of the diagnosis prototype added to cluster tiles (noise has unit variance per dim)."""
    n_background: int = 6
    """Background tissue prototypes shared by all diagnoses."""
    stain_strength: float = 0.0
    """Per-slide offset added to every tile (a stain or scanner batch effect), drawn along the
    diagnosis prototypes' directions with this standard deviation per direction. It moves the
    slide-level mean of the features along the very directions that separate the diagnoses, so
    mean-pooling all tiles no longer reveals the diagnosis, while each cluster tile still stands
    out from its own slide by ``signal_strength``."""
    question_kinds: tuple[str, ...] = ("mc", "yn", "open", "report")
    """Rows written per slide: multiple-choice diagnosis, yes/no, open question, report caption."""
    shuffle_choices: bool = False
    """Shuffle the order of the diagnosis options per slide (harder: the model must read the options)."""
    seed: int = 0
    """Seed for everything in the cohort."""
    diagnoses: tuple[str, ...] = field(default=DIAGNOSES)
    """Diagnosis classes."""


@dataclass
class Cohort:
    """Where a written cohort lies."""

    root: Path
    train_csv: Path
    test_csv: Path
    all_csv: Path
    slides: list[Path]


def _tissue_grid(rng: np.random.Generator, n_target: int) -> np.ndarray:
    """Grid cells [N, 2] (gx, gy) of a union of ellipses holding about ``n_target`` cells."""
    side = int(np.ceil(np.sqrt(n_target * 2.2))) + 4
    gy, gx = np.mgrid[0:side, 0:side]
    inside = np.zeros((side, side), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.3, 0.7, size=2) * side
        rx, ry = rng.uniform(0.25, 0.45, size=2) * side
        inside |= ((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2 <= 1.0
    cells = np.stack([gx[inside], gy[inside]], axis=1)
    if len(cells) > n_target:
        keep = np.sort(rng.choice(len(cells), size=n_target, replace=False))
        cells = cells[keep]
    return cells


def make_slide(rng: np.random.Generator, dx_index: int, prototypes: np.ndarray, background: np.ndarray,
               cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slide: features [N, D] float32, coords [N, 2] (x, y) level-0 px, planted [N] bool.

    ``prototypes`` [K, D] (norm ``signal_strength``), ``background`` [n_background, D]."""
    n_target = int(rng.integers(cfg.min_tiles, cfg.max_tiles + 1))
    cells = _tissue_grid(rng, n_target)
    n = len(cells)
    order = np.lexsort((cells[:, 0], cells[:, 1]))  # row-major: y then x
    cells = cells[order]
    tissue = rng.integers(0, len(background), size=n)
    features = background[tissue] + rng.standard_normal((n, cfg.feature_dim))
    if cfg.stain_strength:
        unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
        features += cfg.stain_strength * (rng.standard_normal(len(unit)) @ unit)
    # The diagnostic cluster: the tiles nearest to a random centre tile.
    n_signal = max(1, int(round(cfg.signal_fraction * n)))
    centre = cells[rng.integers(0, n)]
    dist = np.linalg.norm(cells - centre, axis=1) + rng.uniform(0, 0.5, size=n)
    planted = np.zeros(n, dtype=bool)
    planted[np.argsort(dist)[:n_signal]] = True
    features[planted] += prototypes[dx_index]
    coords = cells * 256 + rng.integers(0, 2, size=(1, 2)) * 128  # level-0 top-left, small global shift
    return features.astype(np.float32), coords.astype(np.int64), planted


def _write_h5(path: Path, features: np.ndarray, coords: np.ndarray, planted: np.ndarray, yx: bool) -> None:
    import h5py

    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        if yx:
            f.create_dataset("coords_yx", data=coords[:, ::-1].copy())
        else:
            f.create_dataset("coords", data=coords)
        f.create_dataset("planted", data=planted)
        f.attrs["patch_size"] = 256
        f.attrs["magnification"] = 20
        f.attrs["encoder"] = "synthetic"
    tmp.replace(path)


def slide_rows(slide_id: str, h5_rel: str, dx: str, cfg: SynthConfig, rng: np.random.Generator, split: str) -> list[dict]:
    """Manifest rows for one slide (one per entry of ``cfg.question_kinds``)."""
    base = {"h5_path": h5_rel, "slide_id": slide_id, "dataset": "synthetic", "split": split,
            "case_id": slide_id.rsplit("-", 1)[0], "caption": "", "choices": ""}
    rows = []
    for kind in cfg.question_kinds:
        row = dict(base)
        if kind == "mc":
            options = list(cfg.diagnoses)
            if cfg.shuffle_choices:
                options = [options[i] for i in rng.permutation(len(options))]
            row.update(question=MC_QUESTION, answer="ABCDEFGH"[options.index(dx)],
                       choices=json.dumps(options), category="diagnosis_choice")
        elif kind == "yn":
            asked = dx if rng.random() < 0.5 else cfg.diagnoses[int(rng.integers(len(cfg.diagnoses)))]
            row.update(question=YN_QUESTION.format(dx=asked), answer="Yes" if asked == dx else "No",
                       category="diagnosis_yes_no")
        elif kind == "open":
            row.update(question=OPEN_QUESTION, answer=f"The slide shows {MORPHOLOGY[dx]}, consistent with {dx}.",
                       category="morphology_open")
        elif kind == "report":
            row.update(question="", answer="", category="report",
                       caption=f"Diagnosis: {dx}. Microscopy shows {MORPHOLOGY[dx]}.")
        else:
            raise ValueError(f"unknown question kind {kind!r}; expected one of mc, yn, open, report")
        rows.append(row)
    return rows


def make_cohort(out_dir: str | Path, cfg: SynthConfig | None = None) -> Cohort:
    """Write a synthetic cohort to ``out_dir`` and return its paths. Deterministic for ``cfg.seed``."""
    cfg = cfg or SynthConfig()
    root = Path(out_dir)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    k = len(cfg.diagnoses)
    protos = rng.standard_normal((k, cfg.feature_dim))
    protos *= cfg.signal_strength / np.linalg.norm(protos, axis=1, keepdims=True)
    background = rng.standard_normal((cfg.n_background, cfg.feature_dim)) * 0.7
    rows = {"train": [], "test": []}
    slides = []
    for i in range(cfg.n_train + cfg.n_test):
        split = "train" if i < cfg.n_train else "test"
        dx_index = i % k
        slide_id = f"SYN-{i // 2:04d}-{i:04d}"
        features, coords, planted = make_slide(rng, dx_index, protos, background, cfg)
        path = root / "slides" / f"{slide_id}.h5"
        _write_h5(path, features, coords, planted, yx=(i % 3 == 2))
        slides.append(path)
        rows[split] += slide_rows(slide_id, f"slides/{path.name}", cfg.diagnoses[dx_index], cfg, rng, split)
    write_manifest_csv(root / "train.csv", rows["train"])
    write_manifest_csv(root / "test.csv", rows["test"])
    write_manifest_csv(root / "all.csv", rows["train"] + rows["test"])
    return Cohort(root, root / "train.csv", root / "test.csv", root / "all.csv", slides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write slides/ and the manifests into")
    parser.add_argument("--n-train", type=int, default=SynthConfig.n_train, help="training slides")
    parser.add_argument("--n-test", type=int, default=SynthConfig.n_test, help="held-out slides")
    parser.add_argument("--feature-dim", type=int, default=SynthConfig.feature_dim, help="tile feature width D")
    parser.add_argument("--min-tiles", type=int, default=SynthConfig.min_tiles, help="fewest tiles per slide")
    parser.add_argument("--max-tiles", type=int, default=SynthConfig.max_tiles, help="most tiles per slide")
    parser.add_argument("--signal-fraction", type=float, default=SynthConfig.signal_fraction,
                        help="share of tiles carrying the diagnosis")
    parser.add_argument("--signal-strength", type=float, default=SynthConfig.signal_strength,
                        help="norm of the diagnosis prototype")
    parser.add_argument("--stain-strength", type=float, default=SynthConfig.stain_strength,
                        help="per-slide offset along the diagnosis directions (defeats mean pooling)")
    parser.add_argument("--kinds", default=",".join(SynthConfig.question_kinds),
                        help="rows per slide, comma-separated: mc (multiple choice), yn, open, report "
                             "(default: %(default)s)")
    parser.add_argument("--shuffle-choices", action="store_true", help="shuffle diagnosis options per slide")
    parser.add_argument("--seed", type=int, default=0, help="seed")


def main(args: argparse.Namespace) -> int:
    cfg = SynthConfig(n_train=args.n_train, n_test=args.n_test, feature_dim=args.feature_dim,
                      min_tiles=args.min_tiles, max_tiles=args.max_tiles, signal_fraction=args.signal_fraction,
                      signal_strength=args.signal_strength, stain_strength=args.stain_strength,
                      question_kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                      shuffle_choices=args.shuffle_choices, seed=args.seed)
    cohort = make_cohort(args.out, cfg)
    print(f"wrote {len(cohort.slides)} slides to {cohort.root / 'slides'}")
    print(f"manifests: {cohort.train_csv}, {cohort.test_csv}, {cohort.all_csv}")
    return 0
