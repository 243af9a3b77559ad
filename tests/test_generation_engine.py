"""The one generation engine (infer/generation.py): it is the only caller of a ``generate``; streamed deltas,
stop strings, per-row limits, cancellation and seeded sampling; the assistant and the server agree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wsi_llava
from wsi_llava.infer.engine import SlideAssistant
from wsi_llava.infer.generation import GenerationSettings, Request, generate
from wsi_llava.serve.caches import LRUCache
from wsi_llava.serve.generation import Row, VisualEncoder, generate_rows
from serve_helpers import tiny_serving_cached

SRC = Path(wsi_llava.__file__).resolve().parent
QUESTION = "What is the diagnosis?"


def test_only_the_engine_calls_generate():
    callers = set()
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                callers.add(path.relative_to(SRC).as_posix())
    assert callers == {"infer/generation.py"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_serving_cached(tmp_path_factory.getbasetemp() / "serve_tiny")


@pytest.fixture(scope="module")
def assistant(tiny):
    return SlideAssistant.from_pretrained(tiny.model_dir)


@pytest.fixture(scope="module")
def prompt(tiny, assistant):
    """(generation prompt ids, visual tokens [1, K', H]) of the first slide and QUESTION."""
    slide = assistant.load(tiny.slides_root / f"{tiny.slide_ids[0]}.h5")
    ex = assistant.builder.build_generation(QUESTION, [], where=slide.path)
    visual = assistant.visual(assistant.batch([slide], [ex])).embeds
    return ex.input_ids, visual


def _run(assistant, prompt, *settings: GenerationSettings, **row):
    ids, visual = prompt
    requests = [Request(ids, s, **row) for s in settings]
    return generate(assistant.model, assistant.tokenizer, requests, visual.expand(len(settings), -1, -1))


def test_streamed_deltas_add_up_to_the_text(assistant, prompt):
    for stop in ([], ["sheets"], ["zzz never"]):
        deltas = []
        res, = _run(assistant, prompt, GenerationSettings(max_new_tokens=40, stop=stop), on_delta=deltas.append)
        assert len(deltas) >= 3 and all(deltas)
        assert "".join(deltas) == res.text


def test_a_stop_string_cuts_the_answer_and_ends_the_row(assistant, prompt):
    full, = _run(assistant, prompt, GenerationSettings(max_new_tokens=40))
    assert full.text.startswith("the slide shows") and "sheets" in full.text
    cut, = _run(assistant, prompt, GenerationSettings(max_new_tokens=40, stop=["sheets"]))
    assert cut.text == full.text[: full.text.index("sheets")].rstrip()
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens


def test_per_row_max_tokens_end_rows_independently_in_one_batch(assistant, prompt, monkeypatch):
    calls = []
    lm = assistant.model.language_model
    real = lm.generate
    monkeypatch.setattr(lm, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    short, long_, cut = _run(assistant, prompt, GenerationSettings(max_new_tokens=3),
                             GenerationSettings(max_new_tokens=40), GenerationSettings(max_new_tokens=40, stop=["shows"]))
    assert len(calls) == 1
    alone, = _run(assistant, prompt, GenerationSettings(max_new_tokens=40))
    assert long_.text == alone.text and long_.completion_tokens == alone.completion_tokens > 3
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert long_.text.startswith(short.text) and len(short.text) < len(long_.text)
    assert cut.finish_reason == "stop" and cut.text == "the slide"
    assert short.prompt_tokens == long_.prompt_tokens == len(prompt[0])


def test_cancelling_ends_a_row(assistant, prompt):
    deltas = []
    res, = _run(assistant, prompt, GenerationSettings(max_new_tokens=40), on_delta=deltas.append,
                cancelled=lambda: len(deltas) >= 2)
    assert res.finish_reason == "cancelled" and 2 <= res.completion_tokens < 40
    assert "".join(deltas) == res.text


def test_seeded_sampling_is_reproducible(assistant, prompt):
    def sample(seed):
        return _run(assistant, prompt, GenerationSettings(max_new_tokens=12, temperature=1.5, seed=seed))[0].text

    runs = [sample(s) for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1] and len(set(runs)) > 1


def test_the_assistant_and_the_server_give_the_same_greedy_answer(tiny, assistant):
    path = tiny.slides_root / f"{tiny.slide_ids[1]}.h5"
    slide = assistant.load(path)
    settings = GenerationSettings(max_new_tokens=30)
    ref = assistant.answer([slide], [QUESTION], settings=settings)[0]
    ex = assistant.builder.build_generation(QUESTION, [], where=str(path))
    row = Row(ex, slide, ("slide", 1), settings)
    encoder = VisualEncoder(assistant.model, LRUCache(4, 1 << 30, lambda v: v.nbytes()))
    res, = generate_rows(assistant.model, assistant.tokenizer, [row], [encoder.encode(row)])
    assert res.text == ref.text and res.text.startswith("the slide shows")
    assert (res.finish_reason, res.prompt_tokens, res.completion_tokens) == \
        (ref.finish_reason, ref.prompt_tokens, ref.completion_tokens)
