"""Tile encoders: an RGB tile → one feature vector [D], loaded only from local weight files.

One entry point, :func:`build_tile_encoder`:

- ``"gigapath"`` — the Prov-GigaPath tile encoder (timm ``vit_giant_patch14_dinov2`` with the
  model card's arguments: patch 16, 224 px, 1536-d, 40 blocks, LayerScale 1e-5, packed SwiGLU MLP of
  ratio 5.33334, CLS-token pooling; about 1.13 B parameters), resize 256 (bicubic) → center crop 224
  → ImageNet mean/std.
- ``"uni"`` — UNI (timm ``vit_large_patch16_224`` with ``init_values=1e-5``, ``dynamic_img_size``;
  1024-d, about 0.303 B parameters), resize 224 (bicubic) → ImageNet mean/std (its model card).
- ``"vit"`` — the same ViT family with any sizes given as overrides (tests, small encoders).
- ``"timm:<architecture>"`` — any timm model, built by ``timm.create_model(pretrained=False)``.

Why the ViT is written here and not taken from timm: timm imports torchvision at import time, and
PyPI's torchvision wheels are linked against the CUDA build of torch, so beside the CPU torch this
project pins (``torch==2.13.0+cpu``) ``import torchvision`` fails ("operator torchvision::nms does
not exist"). The named encoders are therefore a plain-PyTorch re-statement of timm's
``VisionTransformer`` (pre-LN blocks, fused QKV, LayerScale, GELU or packed-SwiGLU MLP, CLS + learned
absolute positions, final LayerNorm, CLS pooling) with timm's parameter names, so the published
``pytorch_model.bin`` / safetensors files load into it unchanged, strictly. ``timm:<arch>`` uses timm
itself where it imports (a GPU machine with the matching torchvision) and says why otherwise.
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
import torch.nn.functional as F

from wsi_llava.errors import MissingFileError, WsiLlavaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TileEncoderError(WsiLlavaError, ValueError):
    """A tile-encoder name, override or weight file that cannot be used; the message says which."""


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
# the ViT (timm's VisionTransformer, parameter names included)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a timm-style ViT with CLS-token pooling and no head."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    init_values: float | None = None
    """LayerScale initial value (``ls1.gamma``/``ls2.gamma`` exist only when set)."""
    swiglu: bool = False
    """timm's ``SwiGLUPacked`` MLP (fc1 → [x1, x2] → SiLU(x1)·x2 → fc2 of half width) instead of GELU."""
    dynamic_img_size: bool = False
    """Accept other input sizes: the position table is resampled (bicubic) to the patch grid."""
    eps: float = 1e-6


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if swiglu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.swiglu:
            x1, x2 = x.chunk(2, dim=-1)
            x = F.silu(x1) * x2
        else:
            x = F.gelu(x)
        return self.fc2(x)


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.attn = _Attention(d, cfg.num_heads)
        self.ls1 = _LayerScale(d, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = _Mlp(d, int(d * cfg.mlp_ratio), cfg.swiglu)
        self.ls2 = _LayerScale(d, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, D, gh, gw]


class ViT(nn.Module):
    """pixels [B, 3, S, S] → CLS feature [B, D], with timm's ``VisionTransformer`` key names."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise TileEncoderError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.img_size % cfg.patch_size:
            raise TileEncoderError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)
        if not any(p.is_meta for p in self.parameters()):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        if not self.cfg.dynamic_img_size:
            raise TileEncoderError(f"input of {gh}×{gw} patches, the encoder takes {self.grid}×{self.grid} "
                                   "(dynamic_img_size is off)")
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid.shape[-1]
        grid = grid.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(self.pos_embed.dtype)
        return torch.cat([cls, grid], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self._positions(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


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
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError beside a CPU torch
        raise TileEncoderError(
            "timm:<architecture> needs the timm package, which could not be imported "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); timm imports torchvision, whose PyPI "
            "wheels need the CUDA build of torch. Use 'gigapath', 'uni' or 'vit' (built without timm), or install "
            "timm with the torchvision build matching your torch") from e
    return timm


def _build_timm(arch: str, overrides: dict) -> tuple[nn.Module, int, Preprocess, dict]:
    timm = _timm()
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


def build_tile_encoder(name: str, weights: str | os.PathLike | Mapping | None = None, **overrides) -> TileEncoder:
    """Build the tile encoder ``name`` and, with ``weights``, load them strictly.

    ``name``: ``gigapath``, ``uni``, ``vit`` or ``timm:<architecture>``. ``overrides``: architecture
    fields (:class:`ViTConfig`: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_ratio``, ``init_values``, ``swiglu``, ``dynamic_img_size``; for ``timm:`` any
    ``create_model`` argument) and preprocessing fields (``resize``, ``crop``, ``mean``, ``std``,
    ``interpolation``). Changing ``img_size`` without ``crop``/``resize`` sets both to it.
    ``weights``: a ``.safetensors`` file, a ``.bin``/``.pth``/``.pt`` state dict, or a state dict.
    The encoder comes back in eval mode with ``requires_grad`` off (frozen); build it inside
    ``with torch.device("meta"):`` to inspect it without memory.
    """
    overrides = dict(overrides)
    if name.startswith("timm:"):
        backbone, dim, preprocess, config = _build_timm(name[len("timm:"):], overrides)
    elif name in NAMED:
        spec = NAMED[name]
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
        backbone, dim, config = ViT(vit), vit.embed_dim, {"architecture": name, **vit.__dict__}
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
def read_state_dict(source) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a file (safetensors, or torch.load with weights_only=True) or a mapping."""
    if isinstance(source, Mapping):
        sd, where = dict(source), "the given state dict"
    else:
        path = Path(os.fspath(source))
        where = str(path)
        if not path.is_file():
            raise MissingFileError(f"tile encoder weights not found: {path}; check the path")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                sd = load_file(str(path))
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise TileEncoderError(f"{path}: cannot read safetensors weights ({type(e).__name__}: {e})") from e
        else:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a pickle needing a class is refused here
                first = str(e).splitlines()[0] if str(e) else ""
                raise TileEncoderError(f"{path}: refused or unreadable tile encoder weights (read with "
                                       f"weights_only=True: {type(e).__name__}: {first})") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise TileEncoderError(f"{where}: not a state dict (a {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TileEncoderError(f"{where}: not a state dict of tensors (non-tensor entries: {bad[:5]})")
    return dict(sd), where


def load_tile_weights(encoder: TileEncoder, source) -> None:
    """Load ``source`` into ``encoder.backbone`` strictly; every bad key is listed in one error."""
    sd, where = read_state_dict(source)
    own = encoder.backbone.state_dict()
    # a head saved with num_classes=0 is absent; a bare `head.*` from a classifier is unexpected, as it should be
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def block(title, items):
            if not items:
                return ""
            shown = "\n".join(f"    {k}" for k in items[:40])
            more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
            return f"\n  {title} ({len(items)}):\n{shown}{more}"

        raise TileEncoderError(f"{where} does not match tile encoder {encoder.name!r}:"
                               + block("missing keys", missing) + block("unexpected keys", unexpected)
                               + block("shape mismatches", shapes))
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
    """A tile encoder from a weights file; without ``name``, the name and architecture written into
    the file's safetensors metadata by :func:`save_tile_weights` (``overrides`` win)."""
    import json

    path = Path(os.fspath(weights))
    if name is None:
        meta = {}
        if path.suffix == ".safetensors" and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        if "tile_encoder" not in meta:
            raise TileEncoderError(f"{path}: the file does not say which tile encoder it holds; "
                                   f"name one ({sorted(NAMED)} or timm:<architecture>)")
        name = meta["tile_encoder"]
        saved = json.loads(meta.get("config", "{}"))
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        overrides = {**saved, **overrides}
    return build_tile_encoder(name, weights=path, **overrides)
