"""Answer questions about slides with a trained WSI-LLaVA (chat, predict, heatmap, ``eval --model``).

Prompts and slides are batched here; the answers come from the one generation engine,
:func:`wsi_llava.infer.generation.generate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data.collate import SlideCollator
from ..data.prompts import Example, PromptBuilder, resolve_system_prompt
from ..data.slides import Slide, load_slide, read_slide_meta
from ..data.tower_cache import CachedSlide
from ..model.wsi_llava import load_wsi_llava
from ..precision import Precision, resolve_precision
from .generation import GenerationSettings, Request, generate

__all__ = ["Answer", "SlideAssistant", "zeros_like_slide"]


@dataclass
class Answer:
    """One generated answer with what the model looked at."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    """``stop`` (end of turn or a stop string), ``length`` (max_new_tokens) or ``cancelled``."""
    tile_indices: list[int] | None = None
    tile_scores: list[float] | None = None
    coords: list[list[float]] | None = None


class SlideAssistant:
    """A loaded model + tokenizer + prompt builder. ``answer`` handles a batch of (slide, question)."""

    def __init__(self, model, tokenizer, patches_per_wsi: int = 2048, system_prompt: str | None = "default",
                 cutoff_len: int = 8192, tower_cache: str | Path | None = None, precision: Precision | None = None):
        """``tower_cache``: a folder written by ``wsi-llava encode`` with the model's tower; slides are then
        read from it by ``slide_id`` (``load(path, slide_id=...)``) and the tower is not run.
        ``precision``: half precision runs the model under autocast (weights stay float32); None = float32.
        ``system_prompt``: ``default`` = the built-in prompt, None or empty = none, else the text."""
        self.model = model.eval()
        self.precision = precision or resolve_precision("fp32")
        self.tokenizer = tokenizer
        self.patches_per_wsi = patches_per_wsi
        self.builder = PromptBuilder(tokenizer, model.config.num_image_tokens, cutoff_len,
                                     resolve_system_prompt(system_prompt))
        self.collator = SlideCollator(tokenizer.pad_token_id, padding_side="left")
        self.tower_cache = None
        if tower_cache:
            from ..data.tower_cache import cache_for_model

            self.tower_cache = cache_for_model(tower_cache, model)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        force_precision: bool = False, **kwargs) -> "SlideAssistant":
        """Load a saved model folder onto ``device`` (auto: cuda if available) to run in ``precision``
        (one of :data:`~wsi_llava.precision.PRECISIONS`, decided by :func:`~wsi_llava.precision.resolve_precision`)."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        kwargs.setdefault("precision", resolve_precision(precision, device, force=force_precision))
        model, tokenizer = load_wsi_llava(path)
        model = model.to(device)
        saved = Path(path) / "train_config.yaml"
        if saved.exists():
            import yaml

            train_cfg = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            kwargs.setdefault("patches_per_wsi", train_cfg.get("patches_per_wsi", 2048))
            kwargs.setdefault("system_prompt", train_cfg.get("system_prompt") or None)
        return cls(model, tokenizer, **kwargs)

    def load(self, path: str | Path, slide_id: str | None = None) -> Slide:
        """Read a slide's tiles (deterministic sampling); with a tower cache, the cached tower outputs of
        ``slide_id`` for the same tiles (a :class:`~wsi_llava.data.tower_cache.CachedSlide`)."""
        if self.tower_cache is not None:
            if not slide_id:
                raise ValueError(f"{path}: with a tower_cache, slides are looked up by slide_id; none was given")
            n = read_slide_meta(path)[0] if Path(path).is_file() else None  # the H5 is optional here
            return self.tower_cache.read(slide_id, self.patches_per_wsi, rng=None, where=str(path), n_tiles=n)
        return load_slide(str(path), self.patches_per_wsi, rng=None,
                          expected_dim=self.model.config.feature_dim)

    @torch.inference_mode()
    def answer(self, slides: list[Slide], questions: list[str], histories: list[list[tuple[str, str]]] | None = None,
               settings: GenerationSettings | None = None, explain: bool = False,
               question_texts: list[str | None] | None = None) -> list[Answer]:
        """Generate one answer per (slide, question [, history]). Batched; left-padded prompts."""
        settings = settings or GenerationSettings()
        histories = histories or [[] for _ in questions]
        question_texts = question_texts or [None] * len(questions)
        examples = [self.builder.build_generation(q, h, question=qt, where=slide.path)
                    for slide, q, h, qt in zip(slides, questions, histories, question_texts)]
        batch = self.batch(slides, examples)
        # the slides are encoded once: the same visual output feeds generation and the explanation
        with self.autocast():
            visual = self.visual(batch)
            results = generate(self.model, self.tokenizer, [Request(ex.input_ids, settings) for ex in examples],
                               visual.embeds)
        selection = visual.selection if explain else None
        answers = []
        for i, res in enumerate(results):
            ans = Answer(res.text, res.prompt_tokens, res.completion_tokens, res.finish_reason)
            if selection is not None:
                idx = selection.indices[i].tolist()
                ans.tile_indices = idx
                ans.coords = batch["coords"][i, idx].tolist()
                if selection.scores is not None:
                    ans.tile_scores = selection.scores[i, idx].tolist()
            answers.append(ans)
        return answers

    def batch(self, slides: list[Slide], examples: list[Example]) -> dict:
        """(slide, generation prompt) pairs → the left-padded batch on the model's device (with
        ``tower_outputs`` for cached slides)."""
        items = []
        for slide, ex in zip(slides, examples):
            items.append({"input_ids": ex.input_ids, "question_mask": ex.question_mask,
                          "features": slide.features, "coords": slide.coords})
            if isinstance(slide, CachedSlide):
                items[-1]["tower_outputs"] = slide.tower_outputs
        device = self.model.device
        return {k: v.to(device) for k, v in self.collator(items).items()}

    def visual(self, batch: dict):
        """The batch's visual output: tokens [B, K', H] and the selection (indices [B, K], scores [B, N] or None)."""
        return self.model.visual_tokens(batch["input_ids"], batch["features"], batch["coords"], batch["tile_mask"],
                                        batch["question_mask"], batch.get("tower_outputs"))

    def autocast(self):
        """The context the model runs in: autocast to the half precision chosen, else nothing."""
        if not self.precision.is_half:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.precision.dtype)

    def explain(self, batch: dict):
        """Which tiles the selector keeps for this batch (indices [B, K], scores [B, N] or None)."""
        with self.autocast():
            return self.visual(batch).selection


def zeros_like_slide(slide: Slide) -> Slide:
    """The same slide with all features zeroed (image-reliance checks); cached tower outputs all zeroed."""
    if isinstance(slide, CachedSlide):
        return replace(slide, features=np.zeros_like(slide.features), tower_outputs=slide.tower_outputs.zeros_like())
    return Slide(features=np.zeros_like(slide.features), coords=slide.coords, path=slide.path, n_total=slide.n_total)
