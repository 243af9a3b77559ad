"""Tile encoders: an RGB tile → one feature vector [D], loaded only from local weight files.

One entry point, :func:`build_tile_encoder`:

- ``"gigapath"`` — the Prov-GigaPath tile encoder (timm ``vit_giant_patch14_dinov2`` with the
  model card's arguments: patch 16, 224 px, 1536-d, 40 blocks, LayerScale 1e-5, packed SwiGLU MLP of
  ratio 5.33334, CLS-token pooling; about 1.13 B parameters), resize 256 (bicubic) → center crop 224
  → ImageNet mean/std.
- ``"uni"`` — UNI (timm ``vit_large_patch16_224`` with ``init_values=1e-5``, ``dynamic_img_size``;
  1024-d, about 0.303 B parameters), resize 224 (bicubic) → ImageNet mean/std (its model card).
- ``"vit"`` — the same ViT family with any sizes given as overrides (tests, small encoders).
- ``"timm:<architecture>"`` — any timm model, built by ``timm.create_model(pretrained=False)``; where
  timm does not import, timm's plain ViTs (``vit_tiny_patch16_224`` … ``vit_huge_patch14_224``, the
  table :data:`~wsi_llava.model.vit.TIMM_VITS`) are built in-house with timm's hyper-parameters, key
  names and default eval preprocessing.

Why the ViT is written here and not taken from timm: timm imports torchvision at import time, and
PyPI's torchvision wheels are linked against the CUDA build of torch, so beside the CPU torch this
project pins (``torch==2.13.0+cpu``) ``import torchvision`` fails ("operator torchvision::nms does
not exist"). The named encoders are therefore a plain-PyTorch re-statement of timm's
``VisionTransformer`` (pre-LN blocks, fused QKV, LayerScale, GELU or packed-SwiGLU MLP, CLS + learned
absolute positions, final LayerNorm, CLS pooling) with timm's parameter names, so the published
``pytorch_model.bin`` / safetensors files load into it unchanged, strictly (the ViT lives in
:mod:`wsi_llava.model.vit`). ``timm:<arch>`` uses timm itself where it imports (a GPU machine with the
matching torchvision), else the in-house ViT for the architectures of the table, and otherwise says why.
Sources of truth for each encoder are listed in ``docs/tile_encoders.md``.

Weights: safetensors, or ``.bin``/``.pth``/``.pt`` read with ``torch.load(weights_only=True)`` (a
pickle that needs any class is refused); every missing, unexpected and mis-shaped key is listed in
one error naming the file. Nothing is ever downloaded. Under ``with torch.device("meta"):`` the
encoder is built without memory, for inspection (parameter count, width, key names).

Shapes: B tiles, 3 channels, S the encoder's input size, D the width.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


from .vit import TIMM_VITS, TileEncoderError, ViT, ViTConfig
from .weights import mismatch_report, read_state_dict

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NAMED", "TIMM_VITS", "Preprocess", "TileEncoder", "TileEncoderError",
           "ViT", "ViTConfig", "build_tile_encoder", "load_tile_encoder", "load_tile_weights",
           "save_tile_weights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """RGB image → normalised tensor [3, crop, crop], the torchvision/timm eval pipeline in plain code.

    ``Resize(resize)`` (the shorter side to ``resize``, the longer one ``int(resize·long/short)``, PIL
    resampling ``interpolation``) → ``CenterCrop(crop)`` (top-left at ``round((size − crop) / 2)``) →
    ``ToTensor`` (÷ 255) → ``Normalize(mean, std)``.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __call__(self, image) -> torch.Tensor:
        """``image``: a PIL image or an RGB uint8 array [H, W, 3] → float32 [3, crop, crop]."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise TileEncoderError(f"expected an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}")
            image = Image.fromarray(image, "RGB")
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if w <= h else (new_long, self.resize)
            resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
                        "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}[self.interpolation]
            image = image.resize(size, resample)
        return self.batch(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())[None])[0]

    def batch(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] tiles already at resize scale → float32 [B, 3, crop, crop].

        The fast path for tiles cut at :attr:`tile_size`: equal to calling the pipeline on each tile.
        """
        _, h, w, _ = tiles.shape
        if h < self.crop or w < self.crop:
            raise TileEncoderError(f"tiles of {h}×{w} px are smaller than the crop {self.crop}")
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        x = tiles[:, top:top + self.crop, left:left + self.crop].permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    @property
    def tile_size(self) -> int:
        """The size an ROI is tiled at: the resize scale, so a tile needs no resampling."""
        return self.resize


# ---------------------------------------------------------------------------------------------
# the named encoders
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSpec:
    vit: ViTConfig
    preprocess: Preprocess
    source: str = ""


NAMED: dict[str, EncoderSpec] = {
    # Prov-GigaPath model card / config.json: timm.create_model("vit_giant_patch14_dinov2", img_size=224,
    # in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
    # num_classes=0) — the timm function adds the packed SwiGLU MLP (SiLU); global_pool "token".
    "gigapath": EncoderSpec(
        ViTConfig(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
                  init_values=1e-5, swiglu=True),
        Preprocess(resize=256, crop=224),
        "https://huggingface.co/prov-gigapath/prov-gigapath"),
    # UNI model card: timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
    # init_values=1e-5, num_classes=0, dynamic_img_size=True); transforms Resize(224) + ImageNet norm.
    "uni": EncoderSpec(
        ViTConfig(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                  init_values=1e-5, dynamic_img_size=True),
        Preprocess(resize=224, crop=224),
        "https://huggingface.co/MahmoodLab/UNI"),
    # a generic ViT of timm's layout, sized by overrides
    "vit": EncoderSpec(ViTConfig(), Preprocess(resize=256, crop=224), "timm VisionTransformer layout"),
}

_PREPROCESS_KEYS = {"resize", "crop", "mean", "std", "interpolation"}


class TileEncoder(nn.Module):
    """A frozen-by-default tile encoder: ``forward(pixels [B, 3, S, S]) -> [B, D]``.

    ``embed_dim`` is D; ``preprocess`` turns one RGB image into the input tensor;
    ``tile_size`` is the size an ROI is cut at; ``name`` and ``config`` say what was built.
    """

    def __init__(self, name: str, backbone: nn.Module, embed_dim: int, preprocess: Preprocess, config: dict):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.embed_dim = int(embed_dim)
        self.preprocess = preprocess
        self.config = config

    @property
    def tile_size(self) -> int:
        return self.preprocess.tile_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def state_dict_keys(self) -> list[str]:
        return list(self.backbone.state_dict().keys())


def _timm():
    """timm, or None where it cannot be imported (with the reason)."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError beside a CPU torch
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return timm, ""


def _build_timm(timm, arch: str, overrides: dict) -> tuple[nn.Module, int, Preprocess, dict]:
    pre = {k: overrides.pop(k) for k in list(overrides) if k in _PREPROCESS_KEYS}
    kwargs = {"num_classes": 0, **overrides}
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise TileEncoderError(f"timm cannot build {arch!r} with {kwargs}: {e}") from e
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    preprocess = Preprocess(resize=int(math.floor(size / cfg["crop_pct"])), crop=size, mean=tuple(cfg["mean"]),
                            std=tuple(cfg["std"]), interpolation=cfg["interpolation"])
    if pre:
        preprocess = replace(preprocess, **pre)
    return model, int(model.num_features), preprocess, {"architecture": arch, **kwargs}


def _build_vit(name: str, spec: EncoderSpec, overrides: dict) -> tuple[nn.Module, int, Preprocess, ViTConfig]:
    """The in-house ViT of ``spec`` with architecture and preprocessing ``overrides``."""
    pre = {k: overrides.pop(k) for k in list(overrides) if k in _PREPROCESS_KEYS}
    known = {f for f in ViTConfig.__dataclass_fields__}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TileEncoderError(f"unknown override(s) {unknown} for tile encoder {name!r}; "
                               f"known: {sorted(known | _PREPROCESS_KEYS)}")
    vit = replace(spec.vit, **overrides)
    preprocess = spec.preprocess
    if vit.img_size != spec.vit.img_size:
        preprocess = replace(preprocess, resize=vit.img_size, crop=vit.img_size)
    preprocess = replace(preprocess, **pre)
    return ViT(vit), vit.embed_dim, preprocess, vit


def _timm_vit_spec(arch: str) -> EncoderSpec:
    t = TIMM_VITS[arch]
    return EncoderSpec(t.config(), Preprocess(resize=int(math.floor(t.img_size / t.crop_pct)), crop=t.img_size,
                                              mean=t.mean, std=t.std), "timm " + arch)


def _build_timm_arch(arch: str, overrides: dict) -> tuple[nn.Module, int, Preprocess, dict]:
    """``timm:<arch>``: timm itself where it imports, else the in-house ViT for the plain ViTs of
    :data:`TIMM_VITS` (the same key names, so the same weight files load)."""
    timm, why = _timm()
    if timm is not None:
        return _build_timm(timm, arch, overrides)
    if arch not in TIMM_VITS:
        raise TileEncoderError(
            f"timm:{arch} needs the timm package, which could not be imported ({why}); timm imports torchvision, "
            "whose PyPI wheels need the CUDA build of torch. Without timm, timm:<arch> covers the plain ViTs "
            f"{sorted(TIMM_VITS)}; or use 'gigapath', 'uni' or 'vit', or install timm with the torchvision "
            "build matching your torch")
    if overrides.pop("num_classes", 0) != 0:
        raise TileEncoderError(f"timm:{arch} without timm has no classifier head: num_classes must be 0")
    given = dict(overrides)
    backbone, dim, preprocess, _ = _build_vit(f"timm:{arch}", _timm_vit_spec(arch), overrides)
    return backbone, dim, preprocess, {"architecture": arch, "num_classes": 0, **given}


def build_tile_encoder(name: str, weights: str | os.PathLike | Mapping | None = None, **overrides) -> TileEncoder:
    """Build the tile encoder ``name`` and, with ``weights``, load them strictly.

    ``name``: ``gigapath``, ``uni``, ``vit`` or ``timm:<architecture>`` (timm where it imports; without
    it the plain ViTs of :data:`TIMM_VITS`, e.g. ``timm:vit_tiny_patch16_224``, are built in-house with
    timm's default preprocessing). ``overrides``: architecture fields (:class:`ViTConfig`: ``img_size``,
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``init_values``, ``swiglu``,
    ``dynamic_img_size``; for ``timm:`` with timm any ``create_model`` argument) and preprocessing fields
    (``resize``, ``crop``, ``mean``, ``std``, ``interpolation``). Changing ``img_size`` without
    ``crop``/``resize`` sets both to it.
    ``weights``: a ``.safetensors`` file, a ``.bin``/``.pth``/``.pt`` state dict, or a state dict.
    The encoder comes back in eval mode with ``requires_grad`` off (frozen); build it inside
    ``with torch.device("meta"):`` to inspect it without memory.
    """
    overrides = dict(overrides)
    if name.startswith("timm:"):
        backbone, dim, preprocess, config = _build_timm_arch(name[len("timm:"):], overrides)
    elif name in NAMED:
        backbone, dim, preprocess, vit = _build_vit(name, NAMED[name], overrides)
        config = {"architecture": name, **vit.__dict__}
    else:
        raise TileEncoderError(f"unknown tile encoder {name!r}; use one of {sorted(NAMED)} or timm:<architecture>")
    encoder = TileEncoder(name, backbone, dim, preprocess, config)
    if weights is not None:
        load_tile_weights(encoder, weights)
    encoder.requires_grad_(False)
    return encoder.eval()


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def load_tile_weights(encoder: TileEncoder, source) -> None:
    """Load ``source`` into ``encoder.backbone`` strictly; every bad key is listed in one error."""
    sd, where = read_state_dict(source, "tile encoder", TileEncoderError)
    own = encoder.backbone.state_dict()
    # a head saved with num_classes=0 is absent; a bare `head.*` from a classifier is unexpected, as it should be
    problem = mismatch_report(own, sd, where, f"tile encoder {encoder.name!r}")
    if problem:
        raise TileEncoderError(problem)
    if any(p.is_meta for p in encoder.backbone.parameters()):
        encoder.backbone.load_state_dict(sd, strict=True, assign=True)
    else:
        encoder.backbone.load_state_dict(sd, strict=True)


def save_tile_weights(encoder: TileEncoder, path: str | os.PathLike) -> None:
    """Write the backbone's weights as safetensors (timm key names), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    import json

    arch = {k: v for k, v in encoder.config.items() if k != "architecture"}
    pre = {k: getattr(encoder.preprocess, k) for k in _PREPROCESS_KEYS}
    save_file({k: v.detach().contiguous() for k, v in encoder.backbone.state_dict().items()}, str(tmp),
              metadata={"tile_encoder": encoder.name, "config": json.dumps({**arch, **pre})})
    os.replace(tmp, path)


def load_tile_encoder(weights: str | os.PathLike, name: str | None = None, **overrides) -> TileEncoder:
    """A tile encoder from a weights file. The name and architecture written into the file's safetensors
    metadata by :func:`save_tile_weights` are used when ``name`` is None or the same name (``overrides``
    win); a file without them (a published ``pytorch_model.bin``) needs ``name``."""
    import json

    path = Path(os.fspath(weights))
    meta = {}
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    if name is None and "tile_encoder" not in meta:
        raise TileEncoderError(f"{path}: the file does not say which tile encoder it holds; "
                               f"name one ({sorted(NAMED)} or timm:<architecture>)")
    if name is None or meta.get("tile_encoder") == name:
        name = meta["tile_encoder"]
        saved = json.loads(meta.get("config", "{}"))
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        overrides = {**saved, **overrides}
    return build_tile_encoder(name, weights=path, **overrides)
