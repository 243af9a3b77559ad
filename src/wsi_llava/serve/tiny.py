"""A tiny served model and a few synthetic slides, for the serving tests, the load benchmark and a
first look at the viewer without a trained model (seconds on a CPU).

The tiny model is a random-init tiny Llama wrapped as WSI-LLaVA with the ``prompt_topk`` selector
(so answers come with per-tile scores for the heatmap), taught for a few optimizer steps to answer
every question with :data:`TINY_ANSWER` — a real sentence rather than the random tokens of an
untrained model. It is not a pathology model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

#: what the tiny model learns to answer (several tokens, so streaming shows several deltas)
TINY_ANSWER = "the slide shows sheets of atypical cells with prominent nucleoli and frequent mitoses."
_QUESTIONS = ("What is the diagnosis?", "Describe this slide.", "Is there a tumor?", "What grade is it?")


@dataclass
class TinyServing:
    """Where :func:`build_tiny_serving` wrote things."""

    model_dir: Path
    """The saved model folder (``--model``)."""
    slides_root: Path
    """Folder of the synthetic slide files (``--slides-root``)."""
    slide_ids: list[str]
    """Ids of the slides (file names without ``.h5``)."""


def build_tiny_serving(out: str | Path, n_slides: int = 4, feature_dim: int = 16, image_seq_length: int = 6,
                       steps: int = 150, seed: int = 0) -> TinyServing:
    """Write ``out/model`` (tiny WSI-LLaVA + tokenizer) and ``out/cohort/slides/*.h5``.

    Trains on one intra-op thread (tiny matrices: faster, and no spinning on a busy machine)."""
    from ..data.prompts import DEFAULT_SYSTEM_PROMPT, PromptBuilder
    from ..data.slides import load_slide
    from ..data.synthetic import SynthConfig, make_cohort
    from ..model.wsi_llava import WsiLlavaForConditionalGeneration
    from ..tiny import build_tiny_llm

    out = Path(out)
    llm = build_tiny_llm(out / "llm")
    torch.manual_seed(seed)
    model, tok = WsiLlavaForConditionalGeneration.from_llm(
        llm, mm_hidden_size=feature_dim, image_seq_length=image_seq_length, vision_feature_select_mode="prompt_topk")
    cohort = make_cohort(out / "cohort", SynthConfig(n_train=n_slides, n_test=0, feature_dim=feature_dim,
                                                     min_tiles=40, max_tiles=120, seed=seed))
    builder = PromptBuilder(tok, model.config.num_image_tokens, 1024, DEFAULT_SYSTEM_PROMPT)
    slides = [load_slide(str(p), 2048) for p in cohort.slides]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _teach(model, builder, slides, opt, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    root = out / "cohort" / "slides"
    return TinyServing(model_dir, root, sorted(p.stem for p in cohort.slides))


def _teach(model, builder, slides, opt, steps: int) -> None:
    for step in range(steps):
        slide = slides[step % len(slides)]
        ex = builder.build_train(_QUESTIONS[step % len(_QUESTIONS)], TINY_ANSWER)
        ids = torch.tensor([ex.input_ids])
        out_ = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([ex.labels]),
                     features=torch.from_numpy(slide.features)[None], coords=torch.from_numpy(slide.coords)[None],
                     tile_mask=torch.ones(1, len(slide.features), dtype=torch.bool),
                     question_mask=torch.tensor([ex.question_mask]))
        opt.zero_grad()
        out_.loss.backward()
        opt.step()


def tiny_serving_cached(folder: str | Path) -> TinyServing:
    """:func:`build_tiny_serving` into ``folder`` once; later calls (other test modules, other
    benchmark runs) reuse it. A ``READY`` marker is written last, so an interrupted build is redone."""
    folder = Path(folder)
    if not (folder / "READY").exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        build_tiny_serving(folder)
        (folder / "READY").write_text("ok\n")
    root = folder / "cohort" / "slides"
    return TinyServing(folder / "model", root, sorted(p.stem for p in root.glob("*.h5")))
