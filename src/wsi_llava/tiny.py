"""Tiny offline language models for tests, the `--tiny` demo and benchmarks.

No model hub is reachable here, so tests build a small byte-level BPE tokenizer on the fly (Llama-3
special tokens, a Llama-3 chat template and ``<image>``) and a random-init ``LlamaForCausalLM``
(hidden ≤ 64, 2 layers). Everything is deterministic for a given seed and takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: Llama-3 style chat template (the same layout as Llama-3.2-Instruct without its date header).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<image>",
]

_CORPUS = """
system user assistant you are a pathology assistant answer questions about the whole slide image
please provide a comprehensive pathology report for this whole-slide image
what is the diagnosis of this slide? which of the following best describes the tumor?
answer with the letter of the correct option. yes no the tumor shows invasive growth
adenocarcinoma squamous cell carcinoma lymphoma benign tissue metastatic melanoma necrosis
the slide shows sheets of atypical cells with prominent nucleoli and frequent mitoses
glandular architecture keratin pearls stroma inflammation lymphocytes grade stage margin
A) B) C) D) E) 0 1 2 3 4 5 6 7 8 9 . , ; : ? ! ( ) - the of and in with is are was a an
"""


@dataclass
class TinyLMConfig:
    """Size of the tiny test language model."""

    hidden_size: int = 64
    """Width of the residual stream (H)."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    intermediate_size: int = 128
    """MLP width."""
    vocab_size: int = 512
    """BPE vocabulary size the tokenizer is trained to (special tokens included)."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the output head."""
    seed: int = 0
    """Seed for the random weights."""


def build_tiny_tokenizer(vocab_size: int = 512, extra_text: str = ""):
    """Train a byte-level BPE tokenizer with Llama-3 special tokens and a chat template.

    Returns a ``PreTrainedTokenizerFast`` with ``bos``/``eos``/``pad`` set and ``<image>`` as an
    added special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS, extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<image>"],
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def build_tiny_llm(out_dir: str | Path, config: TinyLMConfig | None = None, extra_text: str = "") -> Path:
    """Write a tiny random-init Llama causal LM and its tokenizer to ``out_dir`` (a local folder that
    ``llm_name_or_path`` can point at). Returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyLMConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(config.vocab_size, extra_text)
    torch.manual_seed(config.seed)
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(lm_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_text_encoder(out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                            seed: int = 0, extra_text: str = "") -> Path:
    """Write a tiny random-init BERT encoder (``AutoModel``, no dropout) and the tiny tokenizer to
    ``out_dir``: the offline text tower of stage-1 tests (``text_model_name_or_path``). Returns the folder."""
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(512, extra_text)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
