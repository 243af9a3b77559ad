"""The ViT backbone of the tile encoders: timm's ``VisionTransformer`` re-stated in plain PyTorch.

Pre-LN blocks, fused QKV, LayerScale, GELU or packed-SwiGLU MLP, CLS + learned absolute positions,
final LayerNorm, CLS pooling, with timm's parameter names, so published weight files load strictly
(why it is not imported from timm: ``docs/tile_encoders.md``). :data:`TIMM_VITS` holds the
hyper-parameters and eval preprocessing of timm's plain ViT architectures, so ``timm:<arch>`` builds
them without timm.

Shapes: B tiles, 3 channels, S the input size, D the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_llava.errors import WsiLlavaError


class TileEncoderError(WsiLlavaError, ValueError):
    """A tile-encoder name, override or weight file that cannot be used; the message says which."""


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


@dataclass(frozen=True)
class TimmViT:
    """One timm ViT architecture: its ``create_model`` hyper-parameters and its default pretrained
    config's eval preprocessing (``input_size``, ``crop_pct``, ``mean``/``std``, bicubic)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    crop_pct: float = 0.9
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def config(self) -> ViTConfig:
        return ViTConfig(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                         depth=self.depth, num_heads=self.num_heads)


def _timm_vits() -> dict[str, TimmViT]:
    # timm/models/vision_transformer.py: `model_args` of each architecture function and the first (default)
    # pretrained tag of `default_cfgs` (_cfg: 224 px, crop_pct 0.9, Inception mean/std 0.5; the 384-px tags
    # set crop_pct 1.0; vit_small_patch8_224's default tag is `dino`, with ImageNet mean/std).
    sizes = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
             "huge": (1280, 32, 16)}
    archs = ["tiny_patch16_224", "tiny_patch16_384", "small_patch32_224", "small_patch32_384",
             "small_patch16_224", "small_patch16_384", "small_patch8_224", "base_patch32_224", "base_patch32_384",
             "base_patch16_224", "base_patch16_384", "base_patch8_224", "large_patch32_384", "large_patch16_224",
             "large_patch16_384", "large_patch14_224", "huge_patch14_224"]
    table = {}
    for arch in archs:
        size, patch, img = arch.split("_")
        embed_dim, depth, heads = sizes[size]
        img_size = int(img)
        table[f"vit_{arch}"] = TimmViT(int(patch[len("patch"):]), embed_dim, depth, heads, img_size,
                                       crop_pct=1.0 if img_size == 384 else 0.9)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    table["vit_small_patch8_224"] = TimmViT(8, 384, 12, 6, mean=imagenet[0], std=imagenet[1])
    return table


TIMM_VITS: dict[str, TimmViT] = _timm_vits()
"""timm's plain ViT architectures (CLS pooling, no LayerScale, GELU MLP), by timm name."""
