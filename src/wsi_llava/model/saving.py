"""Save what trains: a trained WSI-LLaVA folder holds its own parts and a checksummed reference to the base LM.

A *parts* folder (what training writes, checkpoints included) holds::

    config.json                 WsiLlavaConfig (the LM's config as resized for the added tokens)
    model.safetensors           the parts, with the model's key names: the slide tower, the projector (and
                                the prompt top-K query projection), every LM tensor that trains (LoRA A/B,
                                unfrozen layers; unmerged)
    added_tokens.safetensors    rows of the input/output embeddings for the tokens we added (``<image>``,
                                pad): ``input`` [A, H], ``output`` [A, H] (untied heads; A added rows), when
                                there are any
    adapter/                    the LoRA adapter (PEFT ``save_pretrained``), for LoRA runs
    wsi_llava_parts.json        what is where: the base LM folder (as given and resolved), the sha256 of its
                                weight files, the first added row, the part keys; for a frozen slide
                                tower loaded from a file, that file and its sha256 (the tower is then not
                                among the parts)

:func:`load_trained` rebuilds the model from the base LM folder, checks its checksum
(:class:`BaseModelError` naming the folder when it is missing or changed) and applies the parts
strictly. A *full* folder (``model.safetensors`` with every tensor, no ``wsi_llava_parts.json``) is
written instead when no base LM folder is known or the LM itself trains in full; it loads alone, as
does :func:`export_merged`'s output (``wsi-llava export-merged RUN OUT``).

Where the LM's weights came from is ``language_model.config.name_or_path``: the base LM folder after
``from_pretrained``; :func:`load_trained` points it at the WSI-LLaVA folder itself whenever the weights
stop being the base's (a full folder, a merged LoRA), so a later save is full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import WsiLlavaError
from ..fileio import sha256_file
from .weights import mismatch_report

logger = logging.getLogger(__name__)

PARTS_NAME = "wsi_llava_parts.json"
"""The description of a parts folder; its presence makes a folder a parts folder."""
PARTS_FORMAT = "wsi-llava-parts"
PARTS_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
ADDED_NAME = "added_tokens.safetensors"
ADAPTER_DIR = "adapter"
LM_PREFIX = "language_model."
BASE_WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOWER_PREFIX = "vision_tower."
TOWER_SOURCE = "vision_tower_source"
"""Attribute of a model whose slide tower was loaded from a weights file: that file (a ``Path``)."""


class BaseModelError(WsiLlavaError):
    """The base LM folder a trained model refers to is missing or not the one it was trained on."""


# ---------------------------------------------------------------------------------------------
# the base LM
# ---------------------------------------------------------------------------------------------
_checksums: dict[tuple, dict] = {}


def base_checksum(folder: str | os.PathLike) -> dict:
    """``{"sha256": combined, "files": {name: sha256}}`` of the weight files (``*.safetensors``, ``*.bin``
    and their ``.index.json``) of an LM folder; cached per (folder, sizes, modification times)."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file()
                   and (p.name.endswith(BASE_WEIGHT_SUFFIXES) or p.name.endswith(".index.json")))
    if not files:
        raise BaseModelError(f"base LM folder {folder} holds no weight files (*.safetensors, *.bin)")
    key = (str(folder), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _checksums:
        hashes = {p.name: sha256_file(p) for p in files}
        combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in hashes.items()).encode()).hexdigest()
        _checksums[key] = {"sha256": combined, "files": hashes}
    return _checksums[key]


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of one file, cached per (path, size, modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _checksums:
        _checksums[key] = {"sha256": sha256_file(path)}
    return _checksums[key]["sha256"]


def tower_reference(model) -> dict | None:
    """``{"path", "sha256"}`` of the file the slide tower was loaded from, when it did not train (then
    the file, not a copy, is what a save refers to); None when the tower trains or has no file."""
    source = getattr(model, TOWER_SOURCE, None)
    params = list(model.vision_tower.parameters())
    if source is None or not params or any(p.requires_grad for p in params):
        return None
    return {"path": str(source), "sha256": file_checksum(source)}


def plain_lm(model):
    """The LM under a PEFT wrapper (or the LM itself)."""
    lm = model.language_model
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def base_folder(model) -> Path | None:
    """The LM folder the model's LM weights were loaded from, when it is a plain LM folder (not a
    WSI-LLaVA folder); None otherwise."""
    name = plain_lm(model).config.name_or_path
    path = Path(name) if name else None
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
    return None if model_type == model.config.model_type else path


def merge_adapter(model) -> None:
    """Fold a LoRA adapter into the LM weights (in place); a no-op without one."""
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()


def lm_trains_in_full(model) -> bool:
    """Every parameter of the (un-wrapped) LM trains."""
    lm = model.language_model
    return not hasattr(lm, "peft_config") and all(p.requires_grad for p in lm.parameters())


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def part_keys(model, tower_referenced: bool = False) -> list[str]:
    """State-dict keys of the parts: everything outside the LM (the slide tower only when it is not
    referenced by its file), plus the LM parameters that train."""
    own = [k for k in model.state_dict() if not k.startswith(LM_PREFIX)
           and not (tower_referenced and k.startswith(TOWER_PREFIX))]
    lm = [LM_PREFIX + n for n, p in model.language_model.named_parameters() if p.requires_grad]
    return own + lm


def save_trained(model, folder: str | os.PathLike, merge_for_full: bool = False) -> str:
    """Write ``model`` into ``folder`` as parts (see the module doc) or, without a base LM folder or with
    the whole LM training, in full (``merge_for_full``: LoRA merged in first, in place). Returns
    ``"parts"`` or ``"full"``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_folder(model)
    if base is None or lm_trains_in_full(model):
        if merge_for_full:
            merge_adapter(model)
        model.save_pretrained(folder)
        return "full"
    state = model.state_dict()
    tower = tower_reference(model)
    keys = part_keys(model, tower_referenced=tower is not None)
    save_file({k: state[k].detach().cpu().contiguous() for k in keys}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    base_vocab = json.loads((base / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    lm = plain_lm(model)
    rows = lm.get_input_embeddings().weight.shape[0]
    first = int(base_vocab) if base_vocab is not None and base_vocab < rows else rows
    if first < rows:
        in_emb, out_emb = lm.get_input_embeddings(), lm.get_output_embeddings()
        added = {"input": in_emb.weight[first:]}
        if out_emb is not None and out_emb.weight is not in_emb.weight:  # an untied head has its own rows
            added["output"] = out_emb.weight[first:]
        save_file({k: v.detach().cpu().contiguous() for k, v in added.items()}, str(folder / ADDED_NAME))
    if hasattr(model.language_model, "peft_config"):
        # the adapter alone: PEFT would add the whole resized embeddings ("auto"); their added rows are
        # in added_tokens.safetensors, the rest is the base LM's
        model.language_model.save_pretrained(str(folder / ADAPTER_DIR), save_embedding_layers=False)
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    info = {"format": PARTS_FORMAT, "version": PARTS_VERSION,
            "base_lm": {"path": str(base), "resolved": str(base.resolve()), **base_checksum(base)},
            "added_rows_from": first, "lora": hasattr(model.language_model, "peft_config"), "parts": keys}
    if tower is not None:
        info["vision_tower"] = tower
    (folder / PARTS_NAME).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return "parts"


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def is_parts_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / PARTS_NAME).is_file()


def read_parts(folder: str | os.PathLike) -> dict:
    """The ``wsi_llava_parts.json`` of ``folder``; :class:`WsiLlavaError` if unreadable."""
    path = Path(folder) / PARTS_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format") != PARTS_FORMAT or not isinstance(info.get("parts"), list):
            raise ValueError(f"not a {PARTS_FORMAT} file")
        info["base_lm"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WsiLlavaError(f"{path}: unreadable ({e}); the folder was not written by this WSI-LLaVA") from e
    return info


def find_base(folder: str | os.PathLike, info: dict) -> Path:
    """The base LM folder of a parts folder (resolved path, else the path as given), checked against its
    sha256; :class:`BaseModelError` naming the folder when it is missing or changed."""
    ref = info["base_lm"]
    tried = list(dict.fromkeys([ref["resolved"], ref["path"]]))
    base = next((Path(p) for p in tried if (Path(p) / "config.json").is_file()), None)
    if base is None:
        raise BaseModelError(f"{folder} was trained on the base LM folder {ref['resolved']}, which is missing "
                             f"(looked at {', '.join(tried)}); put that LM back there, or use a merged export "
                             "(`wsi-llava export-merged`) that needs no base")
    now = base_checksum(base)
    if now["sha256"] != ref["sha256"]:
        changed = sorted(n for n in set(now["files"]) | set(ref.get("files", {}))
                         if now["files"].get(n) != ref.get("files", {}).get(n))
        raise BaseModelError(f"{folder} was trained on the base LM folder {base}, whose weights have changed since "
                             f"(sha256 differs; file(s) {changed}); restore the original LM there")
    return base


def apply_parts(model, folder: str | os.PathLike) -> None:
    """Load the parts (and added embedding rows) of ``folder`` into ``model``, strictly: exactly the listed
    keys, every tensor outside the LM among them, shapes equal. :class:`WsiLlavaError` otherwise."""
    folder = Path(folder)
    info = read_parts(folder)
    parts = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    if sorted(parts) != sorted(info["parts"]):
        raise WsiLlavaError(f"{folder / WEIGHTS_NAME}: its tensors differ from those {PARTS_NAME} lists")
    referenced = "vision_tower" in info  # loaded from its own file by load_trained
    # what the parts must hold: every tensor outside the LM (but a referenced tower), and the LM tensors listed
    expected = {k: v for k, v in model.state_dict().items()
                if (k in parts or not k.startswith(LM_PREFIX)) and not (referenced and k.startswith(TOWER_PREFIX))}
    problem = mismatch_report(expected, parts, str(folder / WEIGHTS_NAME), "the model (was the config changed?)")
    if problem:
        raise WsiLlavaError(problem)
    model.load_state_dict(parts, strict=False)
    added = folder / ADDED_NAME
    if added.is_file():
        rows = load_file(str(added), device="cpu")
        lm = plain_lm(model)
        first = int(info["added_rows_from"])
        with torch.no_grad():
            for name, emb in (("input", lm.get_input_embeddings()), ("output", lm.get_output_embeddings())):
                if name in rows and emb is not None:
                    if emb.weight.shape[0] != first + rows[name].shape[0]:
                        raise WsiLlavaError(f"{added}: {rows[name].shape[0]} added rows do not fit an embedding "
                                            f"of {emb.weight.shape[0]} rows starting at {first}")
                    emb.weight[first:] = rows[name].to(emb.weight.dtype)


def referenced_tower(folder: str | os.PathLike, ref: dict) -> Path:
    """The frozen slide tower file a parts folder refers to, checked against its sha256
    (:class:`BaseModelError` naming the file when it is missing or changed)."""
    path = Path(ref["path"])
    if not path.is_file():
        raise BaseModelError(f"{folder} uses the frozen slide tower {path}, which is missing; put that file back, "
                             "or use a merged export (`wsi-llava export-merged`) that needs no tower file")
    if file_checksum(path) != ref["sha256"]:
        raise BaseModelError(f"{folder} uses the frozen slide tower {path}, which has changed since (sha256 "
                             "differs); restore the original file")
    return path


def load_referenced_tower(model, folder: Path, ref: dict) -> None:
    """Load the frozen slide tower a parts folder refers to (:func:`referenced_tower`) into the model, strictly."""
    from .export import read_tower_weights
    from .slide_encoder import IGNORED_KEYS

    path = referenced_tower(folder, ref)
    sd = {k: v for k, v in read_tower_weights(path).items() if k not in IGNORED_KEYS}
    problem = mismatch_report(model.vision_tower.state_dict(), sd, str(path), "the model's slide tower")
    if problem:
        raise WsiLlavaError(problem)
    model.vision_tower.load_state_dict(sd, strict=True)
    setattr(model, TOWER_SOURCE, path)


def load_trained(folder: str | os.PathLike, model_cls, dtype: torch.dtype | None = None, merge_lora: bool = True):
    """A saved WSI-LLaVA model (``model_cls``) from a parts or full folder (see the module doc).
    ``merge_lora``: fold a LoRA adapter into the LM (a plain model, as every reader expects)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    dtype = dtype or torch.float32
    if not is_parts_folder(folder):
        model, loading = model_cls.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        missing = loading.get("missing_keys") or []
        if missing:  # e.g. a checkpoint of a LoRA run over a full folder: its LM tensors are PEFT-wrapped
            raise WsiLlavaError(f"{folder}: {len(missing)} tensor(s) of the model are not in its weights (e.g. "
                                f"{sorted(missing)[:3]}); it cannot be loaded as a model (a checkpoint of a LoRA run "
                                "over a full model folder resumes training, but loads only from the run's final "
                                "output)")
        plain_lm(model).config.name_or_path = str(folder)  # the LM's weights are this folder's
        return model
    info = read_parts(folder)
    base = find_base(folder, info)
    config = model_cls.config_class.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if lm.get_input_embeddings().weight.shape[0] != config.text_config.vocab_size:
        lm.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=False)
    model = model_cls(config, language_model=lm).to(dtype)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if info["lora"]:
        from peft import PeftModel

        model.language_model = PeftModel.from_pretrained(lm, str(folder / ADAPTER_DIR))
    if "vision_tower" in info:
        load_referenced_tower(model, folder, info["vision_tower"])
    apply_parts(model, folder)
    if merge_lora and info["lora"]:
        merge_adapter(model)
        plain_lm(model).config.name_or_path = str(folder)  # merged: no longer the base's weights
    return model


# ---------------------------------------------------------------------------------------------
# merged export
# ---------------------------------------------------------------------------------------------
def export_merged(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model of ``run`` (parts or full folder) as one full folder (LoRA merged, tokenizer
    included) that loads without the base LM."""
    import shutil

    from .wsi_llava import load_wsi_llava

    run, out = Path(run), Path(out)
    if out.exists():
        raise WsiLlavaError(f"{out} exists; give a new folder for the merged model")
    model, tokenizer = load_wsi_llava(run)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
