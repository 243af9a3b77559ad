"""Prompt building: chat template, <image> expansion, label masks, question mask, truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from wsi_llava.data.manifest import Record
from wsi_llava.data.prompts import (IGNORE_INDEX, IMAGE_TOKEN, REPORT_PROMPTS, PromptBuilder, PromptError,
                                    record_turn, stable_index)


def rec(**kw) -> Record:
    base = dict(h5_path="/x.h5", slide_id="S1", dataset="d", question="", answer="", caption="", choices=None,
                split=None, case_id=None, category=None, source="m.csv", row=2)
    base.update(kw)
    return Record(**base)


@pytest.fixture(scope="module")
def tok(tiny_llm):
    return AutoTokenizer.from_pretrained(tiny_llm)


def test_image_tokens_expand_to_exact_count(tok):
    b = PromptBuilder(tok, num_image_tokens=7, cutoff_len=512)
    ex = b.build_record(rec(question="What is the diagnosis?", answer="adenocarcinoma"))
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ex.input_ids.count(img) == 7
    # all image tokens are contiguous and unsupervised
    pos = [i for i, t in enumerate(ex.input_ids) if t == img]
    assert pos == list(range(pos[0], pos[0] + 7))
    assert all(ex.labels[i] == IGNORE_INDEX for i in pos)


def test_labels_cover_answer_and_end_of_turn_only(tok):
    b = PromptBuilder(tok, num_image_tokens=3, cutoff_len=512)
    ex = b.build_record(rec(question="Grade?", answer="grade 2"))
    supervised = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "grade 2<|eot_id|>"
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert tok.decode(ex.input_ids[:first]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert len(ex.input_ids) == len(ex.labels) == len(ex.question_mask)


def test_multiple_choice_rows_get_option_lines_and_letter_target(tok):
    r = rec(question="Which diagnosis?", answer="squamous cell carcinoma",
            choices=("adenocarcinoma", "squamous cell carcinoma", "lymphoma"))
    user, target, question = record_turn(r)
    assert target == "B"
    assert "A) adenocarcinoma\nB) squamous cell carcinoma\nC) lymphoma" in user
    assert question == "Which diagnosis?"
    with pytest.raises(PromptError, match="row 2.*answer"):
        record_turn(rec(question="Q?", answer="melanoma", choices=("a", "b")))


def test_report_rows_use_stable_prompt_per_slide():
    r = rec(caption="Diagnosis: benign.", slide_id="TCGA-XYZ")
    user, target, _ = record_turn(r)
    assert target == "Diagnosis: benign."
    assert user == REPORT_PROMPTS[stable_index("TCGA-XYZ", len(REPORT_PROMPTS))]
    assert stable_index("TCGA-XYZ", 1000) == stable_index("TCGA-XYZ", 1000)  # md5, not salted hash()
    assert stable_index("TCGA-XYZ", 3) == int.from_bytes(__import__("hashlib").md5(b"TCGA-XYZ").digest()[:8], "big") % 3


def test_question_mask_marks_question_tokens_only(tok):
    b = PromptBuilder(tok, num_image_tokens=4, cutoff_len=512)
    ex = b.build_record(rec(question="Is there necrosis?", answer="yes"))
    marked = [t for t, m in zip(ex.input_ids, ex.question_mask) if m]
    assert tok.decode(marked).strip() == "Is there necrosis?"
    assert not any(m and t == tok.convert_tokens_to_ids(IMAGE_TOKEN) for t, m in zip(ex.input_ids, ex.question_mask))


def test_truncation_cuts_answer_never_prompt(tok):
    b = PromptBuilder(tok, num_image_tokens=4, cutoff_len=80)
    long_answer = "the slide shows " * 40
    ex = b.build_record(rec(question="Describe.", answer=long_answer))
    assert len(ex.input_ids) == 80
    assert ex.input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 4
    tight = PromptBuilder(tok, num_image_tokens=200, cutoff_len=60)
    with pytest.raises(PromptError, match="m.csv, row 2.*cutoff_len=60"):
        tight.build_record(rec(question="Describe.", answer="x"))


def test_literal_image_token_in_text_is_not_double_counted(tok):
    b = PromptBuilder(tok, num_image_tokens=5, cutoff_len=512)
    ex = b.build_record(rec(question="<image>\nWhat is shown?", answer="tumour"))
    assert ex.input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 5


def test_generation_prompt_with_history(tok):
    b = PromptBuilder(tok, num_image_tokens=2, cutoff_len=512)
    ex = b.build_generation("And the grade?", history=[("What is it?", "adenocarcinoma")])
    text = tok.decode(ex.input_ids)
    assert text.count(IMAGE_TOKEN) == 2
    assert text.index("What is it?") < text.index("adenocarcinoma") < text.index("And the grade?")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert all(label == IGNORE_INDEX for label in ex.labels)
    marked = [t for t, m in zip(ex.input_ids, ex.question_mask) if m]
    assert tok.decode(marked).strip() == "And the grade?"


def test_the_builder_takes_the_system_prompt_literally(tok):
    """The ``default`` sentinel is a config value, resolved where configs are read (training, the engine);
    a serve client's system message that says "default" stays that text."""
    from wsi_llava.data.prompts import DEFAULT_SYSTEM_PROMPT

    assert PromptBuilder(tok, 4, 512, "default").system_prompt == "default"
    assert PromptBuilder(tok, 4, 512, "").system_prompt is None
    assert PromptBuilder(tok, 4, 512).system_prompt == DEFAULT_SYSTEM_PROMPT
