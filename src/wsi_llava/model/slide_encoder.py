"""The Prov-GigaPath slide encoder (``gigapath_slide_enc12l768d``), re-implemented in plain PyTorch.

Tile features [B, N, Din] and their level-0 coordinates become slide tokens [B, 1+N, D] (CLS first)
through a patch projection, 2-D sin-cos positions computed on the fly, and pre-LN LongNet blocks with
dilated attention (:mod:`wsi_llava.model.dilated_attention`). Parameter names equal the original's,
so the published ``slide_encoder.pth`` loads 1:1 (:func:`load_slide_encoder`). The module is the
``vision_mode: wsi`` tower of WSI-LLaVA: ``tower(features, coords, mask)`` →
:class:`TowerOutput` with ``tokens``, ``cls_attention``, ``keys`` and ``hidden_states``.

Deviations from the original, all on purpose (details in ``docs/slide_encoder.md``): positions are
computed from the coordinates instead of looked up in a 3 GB table (same values in the table's range;
no wrap-around or index errors outside it); a key padding mask removes padded tiles from attention;
no flash-attn or GPU is needed.

Shapes: B batch, N tiles, L = 1 + N tokens, D embed width, Din tile-feature width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tower_output import TowerOutput
from .configuration import SlideEncoderConfig
from .dilated_attention import dilated_attention
from .weights import mismatch_report, read_state_dict

__all__ = [
    "SlideEncoder",
    "SlideEncoderConfig",
    "load_slide_encoder",
    "sincos_position_rows",
]


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------
def _grid(coords: torch.Tensor, tile_size: int) -> torch.Tensor:
    """coords [..., 2] (x, y) level-0 px → integer grid cells [..., 2] (as float64)."""
    return torch.floor(coords.to(torch.float64) / float(tile_size))


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos [M] float64 → [M, dim] float64 = [sin(p*w_k) | cos(p*w_k)], w_k = 10000^(-k/(dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / (10000.0 ** omega)
    angle = pos[:, None] * omega[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def sincos_position_rows(coords: torch.Tensor, embed_dim: int, tile_size: int = 256) -> torch.Tensor:
    """2-D sin-cos position of every tile: coords [B, N, 2] (x, y) → [B, N, D] float32.

    Row = ``[sincos_{D/2}(floor(y/ts)) | sincos_{D/2}(floor(x/ts))]`` computed in float64 and rounded
    once, which equals the original table row ``floor(x/256)*G + floor(y/256) + 1`` wherever that
    table is valid (0 <= y/256 < G) and is a true, distinct position anywhere else. Each distinct grid
    value is evaluated once.
    """
    if coords.shape[-1] != 2:
        raise ValueError(f"coords must be [..., 2] (x, y); got {tuple(coords.shape)}")
    g = _grid(coords, tile_size)
    values, inverse = torch.unique(g, return_inverse=True)
    table = _sincos_1d(values, embed_dim // 2)  # [U, D/2]
    rows = torch.cat([table[inverse[..., 1]], table[inverse[..., 0]]], dim=-1)
    return rows.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# blocks (names mirror the original's state-dict keys)
# ---------------------------------------------------------------------------------------------
def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: x [B, ...]."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class PatchEmbed(nn.Module):
    """``patch_embed.proj``: Linear(Din → D)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DilatedSelfAttention(nn.Module):
    """``self_attn``: q/k/v projections → dilated attention → ``inner_attn_ln`` → ``out_proj``."""

    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.segment_lengths = cfg.segment_lengths
        self.dilations = cfg.dilations
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.layernorm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_qk: bool = False):
        """x [B, L, D], mask [B, L] → out [B, L, D]; with ``return_qk`` also (q_cls [B, D], k [B, L, D])."""
        b, length, d = x.shape
        h = self.num_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attn = dilated_attention(q.view(b, length, h, d // h), k.view(b, length, h, d // h),
                                 v.view(b, length, h, d // h), self.segment_lengths, self.dilations, mask)
        out = self.out_proj(self.inner_attn_ln(attn.reshape(b, length, d)))
        if return_qk:
            return out, q[:, 0], k
        return out


class FeedForwardNetwork(nn.Module):
    """``ffn``: fc1 → exact GELU (float32) → ``ffn_layernorm`` → fc2 → dropout."""

    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.chunk = int(cfg.ffn_chunk_tokens)

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        y = F.gelu(y.float()).type_as(y)
        return self.fc2(self.ffn_layernorm(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] → [B, L, D]; token-chunked when autograd is off and L*B > ``ffn_chunk_tokens``."""
        flat = x.reshape(-1, x.shape[-1])
        if self.chunk > 0 and flat.shape[0] > self.chunk and not (torch.is_grad_enabled() and x.requires_grad):
            out = torch.empty(flat.shape[0], self.fc2.out_features, dtype=x.dtype, device=x.device)
            for i in range(0, flat.shape[0], self.chunk):
                out[i:i + self.chunk] = self._core(flat[i:i + self.chunk])
        else:
            out = self._core(flat)
        return self.dropout(out.view(*x.shape[:-1], -1))


class EncoderLayer(nn.Module):
    """Pre-LN LongNet block: ``x += drop_path(dropout(self_attn(self_attn_layer_norm(x))))``;
    ``x += drop_path(ffn(final_layer_norm(x)))``."""

    def __init__(self, cfg: SlideEncoderConfig, drop_path: float):
        super().__init__()
        self.self_attn = DilatedSelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = float(drop_path)
        self.ffn = FeedForwardNetwork(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_qk: bool = False):
        """x [B, L, D] → [B, L, D] (and q_cls [B, D], k [B, L, D] with ``return_qk``)."""
        attn = self.self_attn(self.self_attn_layer_norm(x), mask, return_qk=return_qk)
        if return_qk:
            attn, q_cls, k = attn
        x = x + _drop_path(self.dropout(attn), self.drop_path, self.training)
        x = x + _drop_path(self.ffn(self.final_layer_norm(x)), self.drop_path, self.training)
        return (x, q_cls, k) if return_qk else x


class Encoder(nn.Module):
    """``encoder``: ``layers`` and the final ``layer_norm``."""

    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        rate, depth = cfg.drop_path_rate, cfg.depth
        rates = [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # np.linspace(0, rate, depth)
        self.layers = nn.ModuleList(EncoderLayer(cfg, rates[i]) for i in range(depth))
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)


# ---------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------
class SlideEncoder(nn.Module):
    """Prov-GigaPath LongNet slide encoder.

    ``forward(features [B, N, Din], coords [B, N, 2] (x, y) level-0 px, mask [B, N] bool or None,
    output_hidden_states=False) -> TowerOutput``.
    """

    has_cls = True

    def __init__(self, config: SlideEncoderConfig | None = None, **overrides):
        super().__init__()
        config = config or SlideEncoderConfig()
        if overrides:
            config = SlideEncoderConfig.from_fields(config.architecture(), **overrides)
        self.config = config
        self.patch_embed = PatchEmbed(config.in_dim, config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.encoder = Encoder(config)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.input_dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # -- setup -------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """The original's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms,
        CLS ~ N(0, 0.02). (Loading a checkpoint afterwards replaces all of it.)"""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in backward instead of storing its activations (training only)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    # -- forward -----------------------------------------------------------------------------
    def _check(self, features, coords, mask):
        if features.dim() != 3 or features.shape[-1] != self.config.in_dim:
            raise ValueError(f"features must be [B, N, {self.config.in_dim}]; got {tuple(features.shape)}")
        if coords.shape != (*features.shape[:2], 2):
            raise ValueError(f"coords must be [B, N, 2] = {(*features.shape[:2], 2)} (x, y); "
                             f"got {tuple(coords.shape)}")
        if mask is not None and mask.shape != features.shape[:2]:
            raise ValueError(f"mask must be [B, N] = {tuple(features.shape[:2])}; got {tuple(mask.shape)}")

    def embed(self, features: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input tokens [B, 1+N, D]: patch projection + sin-cos position, CLS prepended (no dropout)."""
        self._check(features, coords, mask)
        w = self.patch_embed.proj.weight
        if mask is not None:  # padded tiles may hold anything; they must not become NaN downstream
            features = features.masked_fill(~mask.unsqueeze(-1), 0)
            coords = coords.masked_fill(~mask.unsqueeze(-1), 0)
        x = self.patch_embed(features.to(w.dtype))
        pos = sincos_position_rows(coords, self.config.embed_dim, self.config.tile_size).to(x.device)
        x = x + pos.to(x.dtype)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)  # CLS position row is zeros
        return torch.cat([cls, x], dim=1)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> TowerOutput:
        """features [B, N, Din], coords [B, N, 2] (x, y), mask [B, N] (True = real) → TowerOutput:
        tokens [B, 1+N, D] after ``encoder.layer_norm`` (CLS first); cls_attention [B, N] (last block,
        full-width CLS query, PruMerge's definition); keys [B, N, D] (last-block ``k_proj``); with
        ``output_hidden_states`` the input tokens and each block's output *without* the final norm; the
        mask as given. Padded tiles are 0 in every field."""
        if mask is not None:
            mask = mask.to(device=features.device, dtype=torch.bool)
        x = self.input_dropout(self.embed(features, coords, mask))
        b = x.shape[0]
        full_mask = None
        if mask is not None:
            full_mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        states = [x] if output_hidden_states else None
        layers = self.encoder.layers
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        q_cls = k = None
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            if use_ckpt:
                res = checkpoint(layer, x, full_mask, last, use_reentrant=False)
            else:
                res = layer(x, full_mask, return_qk=last)
            if last:
                x, q_cls, k = res
            else:
                x = res
            if states is not None:
                states.append(x)
        tokens = self.encoder.layer_norm(x)
        cls_attention = self._cls_attention(q_cls, k, full_mask)
        keys = k[:, 1:]
        if mask is not None:
            keep = full_mask.unsqueeze(-1)
            tokens = tokens.masked_fill(~keep, 0)
            keys = keys.masked_fill(~mask.unsqueeze(-1), 0)
            if states is not None:
                states = [s.masked_fill(~keep, 0) for s in states]
        return TowerOutput(tokens=tokens, cls_attention=cls_attention, keys=keys,
                                  hidden_states=tuple(states) if states is not None else None, mask=mask)

    @staticmethod
    def _cls_attention(q_cls: torch.Tensor, k: torch.Tensor, full_mask: torch.Tensor | None) -> torch.Tensor:
        """q_cls [B, D], k [B, L, D] → [B, L-1]: softmax over CLS + real tiles at full width, patch columns."""
        scores = torch.einsum("bd,bld->bl", q_cls.float(), k.float()) / math.sqrt(k.shape[-1])
        if full_mask is not None:
            scores = scores.masked_fill(~full_mask, float("-inf"))
        return torch.softmax(scores, dim=-1)[:, 1:].to(k.dtype)

    def embed_slide(self, output: TowerOutput, pool: str = "cls") -> torch.Tensor:
        """Slide embedding [B, D]: ``norm`` of the CLS token (``pool="cls"``) or of the mean of the real
        patch tokens (``pool="mean"``), both taken from ``output.tokens`` (after ``encoder.layer_norm``),
        as the original's ``global_pool`` False / True."""
        tokens = output.tokens
        if pool == "cls":
            return self.norm(tokens[:, 0])
        if pool == "mean":
            patches = tokens[:, 1:]
            if output.mask is None:
                return self.norm(patches.mean(dim=1))
            m = output.mask.to(patches.dtype).unsqueeze(-1)
            return self.norm((patches * m).sum(1) / m.sum(1).clamp_min(1.0))
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
IGNORED_KEYS = ("pos_embed",)


def _read_state_dict(source) -> dict[str, torch.Tensor]:
    sd, _ = read_state_dict(source, "slide encoder")
    return {k: v for k, v in sd.items() if k not in IGNORED_KEYS}


def _infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    found = {}
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 2:
        found["embed_dim"], found["in_dim"] = int(w.shape[0]), int(w.shape[1])
    ids = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.") and k.split(".")[2].isdigit()}
    if ids:
        found["depth"] = max(ids) + 1
    fc1 = sd.get("encoder.layers.0.ffn.fc1.weight")
    if fc1 is not None and "embed_dim" in found:
        found["mlp_ratio"] = fc1.shape[0] / found["embed_dim"]
    return found


def load_slide_encoder(path_or_state_dict, **config_overrides) -> SlideEncoder:
    """Build a :class:`SlideEncoder` and load weights into it, strictly.

    ``path_or_state_dict``: the published ``slide_encoder.pth`` (``{"model": state_dict}``, read with
    ``torch.load(weights_only=True)``), any ``.pth``/``.pt``/``.bin`` state dict, a ``.safetensors``
    file, or a state dict. ``in_dim``, ``embed_dim``, ``depth`` and ``mlp_ratio`` are read from the
    weights; ``config_overrides`` (``SlideEncoderConfig`` fields) win over them. ``pos_embed`` is
    ignored. Any missing or unexpected key or shape mismatch raises ``ValueError`` listing them all.
    The model is returned in eval mode.
    """
    where = "state dict" if isinstance(path_or_state_dict, Mapping) else str(path_or_state_dict)
    sd = _read_state_dict(path_or_state_dict)
    cfg = SlideEncoderConfig.from_fields(_infer_config(sd), **config_overrides)
    model = SlideEncoder(cfg)
    problem = mismatch_report(model.state_dict(), sd, where, "the slide encoder")
    if problem:
        raise ValueError(problem)
    model.load_state_dict(sd, strict=True)
    return model.eval()
