"""The slide encoder of a trained model as a file with the original GigaPath key names (the
``wsi-llava export-tower`` command: :mod:`wsi_llava.model.export_cli`).

CHECKPOINT is a stage-1 output folder or one of its ``checkpoint-N`` folders (keys ``slide_tower.*``),
a WSI-LLaVA folder from stage 2/3 (``vision_tower.*``), or a weights file (``.safetensors``,
``.pth``/``.pt``/``.bin``, also the published ``{"model": state_dict}``). Only the tower's tensors are
read (safetensors files are opened lazily, so a large LM is never loaded). The export is checked by
loading it back with :func:`~wsi_llava.model.slide_encoder.load_slide_encoder` (strict) and written
atomically. A ``.safetensors`` export stores the encoder's architecture in its metadata
(``slide_encoder_config``, JSON) so :func:`load_tower` and ``wsi-llava embed`` need no options; the
file is the ``vision_tower`` of a stage-2 config with ``vision_mode: wsi`` (its ``vision_config`` must
name the same architecture; the command prints it). ``.pth`` exports are ``{"model": state_dict}``
like the published ``slide_encoder.pth``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import MissingFileError
from ..fileio import publishing
from .configuration import SlideEncoderConfig
from .slide_encoder import SlideEncoder, load_slide_encoder

#: Key prefixes under which trained models hold the slide encoder (stage 1, stage 2/3).
TOWER_PREFIXES = ("slide_tower.", "vision_tower.")
#: safetensors metadata key holding the encoder architecture (JSON of ``SlideEncoderConfig``).
CONFIG_METADATA_KEY = "slide_encoder_config"
#: Stage-1 run description written next to the weights (see ``train/contrastive.py``).
STAGE1_CONFIG = "contrastive_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _weight_files(path: Path) -> list[Path]:
    """The weight file(s) of a folder or file."""
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{path}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise MissingFileError(f"slide encoder weights {path} do not exist; give a weights file "
                               f"({', '.join(WEIGHT_SUFFIXES)}) or a saved model folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin", "tower.safetensors"):
        if (path / name).is_file():
            return [path / name]
    raise MissingFileError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in it")


def _tower_prefix(keys, where: str) -> str:
    keys = set(keys)
    for prefix in TOWER_PREFIXES:
        if f"{prefix}patch_embed.proj.weight" in keys:
            return prefix
    if "patch_embed.proj.weight" in keys:
        return ""
    shown = ", ".join(sorted(keys)[:8])
    raise ValueError(f"{where}: holds no slide encoder (no 'patch_embed.proj.weight' under "
                     f"{', '.join(repr(p) for p in TOWER_PREFIXES)} or at the top level); keys start: {shown}")


def read_tower_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The slide encoder's tensors of a checkpoint (see the module docstring), prefix removed. A trained
    folder that refers to its frozen tower's file (:mod:`~wsi_llava.model.saving`) is read from that file."""
    from .saving import is_parts_folder, read_parts, referenced_tower

    path = Path(path)
    if path.is_dir() and is_parts_folder(path) and "vision_tower" in (info := read_parts(path)):
        return read_tower_weights(referenced_tower(path, info["vision_tower"]))
    files = _weight_files(path)
    if all(f.suffix == ".safetensors" for f in files):
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt") for f in files]
        owner = {k: h for h in handles for k in h.keys()}
        prefix = _tower_prefix(owner, str(path))
        return {k[len(prefix):]: owner[k].get_tensor(k) for k in owner if k.startswith(prefix)}
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from e
        if isinstance(part, dict) and isinstance(part.get("model"), dict):
            part = part["model"]
        sd.update(part)
    prefix = _tower_prefix(sd, str(path))
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def saved_tower_config(path: str | os.PathLike) -> dict:
    """Architecture stored with a checkpoint: safetensors metadata, a stage-1 ``contrastive_config.json``
    (in the folder or, for ``checkpoint-N``, its parent) or a WSI-LLaVA ``config.json``'s
    ``vision_config``. Empty dict if none (``load_slide_encoder`` then infers what it can)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if CONFIG_METADATA_KEY in meta:
                return json.loads(meta[CONFIG_METADATA_KEY])
        return {}
    stage1 = path / STAGE1_CONFIG
    if stage1.is_file():
        return dict(json.loads(stage1.read_text(encoding="utf-8"))["slide_encoder"])
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.get("vision_mode") == "wsi":
            return dict(data.get("vision_config") or {})
    tower = path / "tower.safetensors"
    if tower.is_file():
        return saved_tower_config(tower)
    parent = path.parent / STAGE1_CONFIG  # checkpoint-N inside a stage-1 output folder
    if parent.is_file():
        return dict(json.loads(parent.read_text(encoding="utf-8"))["slide_encoder"])
    return {}


def _config_fields(config: dict) -> dict:
    """The encoder fields of a stored config (a saved ``vision_config`` also holds ``model_type`` …)."""
    known = SlideEncoderConfig.field_names()
    return {k: v for k, v in config.items() if k in known}


def load_tower(path: str | os.PathLike, **overrides) -> SlideEncoder:
    """A slide encoder from any checkpoint :func:`read_tower_weights` reads, with its stored
    architecture (``overrides`` win), loaded strictly; eval mode."""
    config = {**_config_fields(saved_tower_config(path)), **overrides}
    return load_slide_encoder(read_tower_weights(path), **config)


def save_tower(encoder: SlideEncoder, out: str | os.PathLike) -> Path:
    """Write the encoder's state dict with GigaPath key names, atomically (temporary file + rename).
    ``.safetensors`` stores the architecture in the metadata; ``.pth``/``.pt``/``.bin`` write
    ``{"model": state_dict}``."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"--out {out}: use a .safetensors (recommended) or .pth file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    with publishing(tmp, out):
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(encoder.config.architecture())}
            save_file(sd, str(tmp), metadata=meta)
        else:
            torch.save({"model": sd}, str(tmp))
        os.replace(tmp, out)
    return out


def export_tower(checkpoint: str | os.PathLike, out: str | os.PathLike, **overrides) -> SlideEncoder:
    """Extract, check, write and re-load the slide encoder of ``checkpoint``; returns the encoder."""
    encoder = load_tower(checkpoint, **overrides)
    save_tower(encoder, out)
    again = load_slide_encoder(out, **encoder.config.architecture())
    for (k, a), b in zip(encoder.state_dict().items(), again.state_dict().values()):
        if not torch.equal(a, b):  # pragma: no cover - a broken file system
            raise RuntimeError(f"{out}: tensor {k} differs after writing")
    return encoder
