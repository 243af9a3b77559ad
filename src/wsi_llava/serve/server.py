"""What a running server holds (:class:`SlideServer`): the model, the slide/image/visual caches, the
slide reader, the optional tile encoder for ROI images and raw slides (with the on-disk cache of raw
slides' tile features), the request queue and its worker thread."""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path

import torch

from ..data.prompts import PromptBuilder
from ..data.slides import Slide, SlideError, load_slide
from ..data.tile_size import TileSizeError, read_tile_size
from ..errors import WsiLlavaError
from ..infer.engine import SlideAssistant
from ..infer.slide_features import feature_cache
from .batching import BatchQueue, BatchWorker, Job
from .caches import LRUCache
from .config import ServeConfig
from .errors import ApiError, internal_error
from .generation import VisualEncoder, generate_rows
from .images import ImageSlides, image_bytes, image_digest
from .schema import ChatRequest
from .names import SlideNames
from .security import SlideRef, real_root
from .slide_reader import SlideReader, SlideReaderCrashed, SlideReadTimeout

log = logging.getLogger("wsi_llava.serve")


def batch_key(req: ChatRequest, job_id: str) -> tuple:
    """Requests with equal keys can share a ``generate`` call: all greedy ones; sampled ones with the
    same temperature and top_p; a sampled request with its own seed always runs alone."""
    s = req.settings
    if s.temperature == 0:
        return ("greedy",)
    if req.seeded:
        return ("seeded", job_id)
    return ("sample", s.temperature, s.top_p)


def file_loader(assistant: SlideAssistant):
    """``path -> Slide`` as :meth:`SlideAssistant.load` reads slide files, picklable (for worker processes)."""
    return functools.partial(load_slide, patches_per_wsi=assistant.patches_per_wsi, rng=None,
                             expected_dim=_tile_dim(assistant))


def _tile_dim(assistant: SlideAssistant) -> int:
    cfg = assistant.model.config
    return cfg.feature_dim


def _slide_bytes(s: Slide) -> int:
    return s.features.nbytes + s.coords.nbytes


class SlideServer:
    """What a running server holds: the model, the caches, the request queue and its worker."""

    def __init__(self, config: ServeConfig, assistant: SlideAssistant | None = None,
                 slide_loader=None):
        self.config = config
        self.root = real_root(config.slides_root)
        #: slide references → files: the path under the root, else a file stem or TCGA barcode
        self.names = SlideNames(self.root)
        self.assistant = assistant or SlideAssistant.from_pretrained(
            config.model, device=config.device, precision=config.precision, force_precision=config.force_precision)
        self.model_name = config.model_name or Path(config.model).resolve().name
        self.created = int(time.time())
        tok = self.assistant.tokenizer
        self.special_tokens = tuple(t for t in tok.all_special_tokens if t)
        #: prompts are tokenised on the event-loop thread with this copy, while the worker thread
        #: decodes with the original (a fast tokenizer must not be used from two threads at once)
        self.prompt_tokenizer = copy.deepcopy(tok)
        self.slides: LRUCache[Slide] = LRUCache(config.slide_cache_items, config.slide_cache_bytes, _slide_bytes)
        #: (tile size, source) per slide file version (:meth:`tile_size`)
        self.tile_sizes: LRUCache[tuple] = LRUCache(config.slide_cache_items, 1 << 20, lambda _: 128)
        #: reads slide files off the event loop, each bounded by ``slide_timeout``
        self.reader = SlideReader(slide_loader or file_loader(self.assistant), config.slide_readers,
                                  config.slide_timeout, config.slide_reader)
        #: the tile encoder for ``image_url`` parts (None without ``tile_weights``)
        self.images = None if config.tile_weights is None else ImageSlides(
            config.tile_weights, config.tile_encoder, self.assistant.patches_per_wsi, _tile_dim(self.assistant),
            self.assistant.model.device, config.max_image_pixels,
            LRUCache(config.image_cache_items, config.image_cache_bytes, _slide_bytes))
        #: raw slides' tile features, extracted with the same tile encoder on first use and cached on disk
        #: (None without ``tile_weights``); reading workers 0: DataLoader processes are not forked from a server
        self.features = None if self.images is None else feature_cache(
            config.tile_weights, self.images.encoder, _tile_dim(self.assistant), config.feature_cache,
            config.magnification, config.tile_size, config.min_tissue, config.mpp_csv,
            device=str(self.assistant.model.device), workers=0, report=log.info)
        self._loading: dict[Hashable, asyncio.Future] = {}
        self._timed_out: dict[tuple, float] = {}
        self.abandoned = 0
        """Requests whose client disconnected before the answer (their generation was cancelled)."""
        self.rows_cancelled = 0
        """Queued or running rows stopped because their request was cancelled (disconnect, timeout)."""
        self.encoder = VisualEncoder(self.assistant.model,
                                     LRUCache(config.visual_cache_items, config.visual_cache_bytes, lambda v: v.nbytes()))
        self.queue = BatchQueue(config.queue_size)
        self.worker = BatchWorker(self.queue, self.run_batch, config.max_batch, on_start=self._worker_start)
        base = self.assistant.builder
        self._builders: dict[str | None, PromptBuilder] = {
            None: PromptBuilder(self.prompt_tokenizer, base.num_image_tokens, base.cutoff_len, base.system_prompt)}
        self._builders_lock = threading.Lock()

    async def _once(self, key: Hashable, load: Callable[[], Awaitable[Slide]]) -> Slide:
        """``await load()``, shared by concurrent callers with the same ``key`` (one read or encode)."""
        future = self._loading.get(key)
        if future is None:
            future = asyncio.ensure_future(load())
            self._loading[key] = future
            future.add_done_callback(lambda f: (self._loading.pop(key, None), f.cancelled() or f.exception()))
        return await asyncio.shield(future)

    # -- slides ----------------------------------------------------------------------------------
    def _public(self, message: str, ref: SlideRef) -> str:
        message = message.replace(ref.path, ref.id)
        if self.features is not None:
            message = message.replace(str(self.features.dir), "<feature-cache>")
        return message.replace(self.root, "<slides-root>")

    async def open_slide(self, ref_text: str) -> tuple[SlideRef, Slide, tuple]:
        """A client's slide reference → (checked reference, tiles, cache key); see :meth:`load_slide`."""
        ref = await asyncio.to_thread(self.names.resolve, ref_text)
        slide, key = await self.load_slide(ref)
        return ref, slide, key

    async def load_slide(self, ref: SlideRef) -> tuple[Slide, tuple]:
        """The slide's sampled tiles (cached per file version) and its cache key. The file is read by
        :attr:`reader` (off the event loop, bounded by ``slide_timeout``); concurrent requests for the
        same file share one read; a file whose read timed out is refused for ``slide_timeout`` seconds.
        A raw slide's tile features are first extracted (:meth:`_read_raw`)."""
        if ref.raw and self.features is None:
            raise ApiError(400, f"slide {ref.id!r} is a raw slide and this server has no tile encoder to extract "
                           "its tile features: start it with --tile-weights (or run `wsi-llava extract` and serve "
                           "the H5 file)", code="raw_slides_not_enabled", param="slide")
        try:
            st = await asyncio.to_thread(os.stat, ref.path)
        except OSError:
            raise ApiError(404, f"slide {ref.id!r} not found", code="slide_not_found", param="slide") from None
        key = (ref.path, st.st_mtime_ns, st.st_size)
        slide = self.slides.get(key)
        if slide is not None:
            return slide, key
        until = self._timed_out.get(key)
        if until is not None and time.monotonic() < until:
            raise self._timeout_error(ref, again=True)
        if not ref.raw:
            return await self._once(key, lambda: self._read(ref, key)), key
        t = self.config.request_timeout
        try:
            return await asyncio.wait_for(self._once(key, lambda: self._read_raw(ref, key)), t), key
        except asyncio.TimeoutError:
            raise ApiError(504, f"slide {ref.id!r} is a raw slide whose tile features are being extracted (its first "
                           f"use), which took longer than {t:g} s; the extraction goes on: retry later",
                           code="slide_extracting", param="slide") from None

    def _timeout_error(self, ref: SlideRef, again: bool = False) -> ApiError:
        t = self.config.slide_timeout
        return ApiError(504, f"reading slide {ref.id!r} took longer than {t:g} s" +
                        (f" recently; it is not tried again for {t:g} s" if again else "; the read was abandoned"),
                        code="slide_timeout", param="slide")

    async def tile_size(self, ref: SlideRef, slide: Slide, key: tuple) -> tuple[float | None, str]:
        """``(size, source)``: the slide's tile side in level-0 px by the one rule of
        :mod:`wsi_llava.data.tile_size` (H5 attributes, else the coordinate spacing) and where it came from;
        ``(None, why)`` when the rule finds none (a single tile without attributes). Cached per file version;
        ``slide``: as :meth:`load_slide` returned it (its ``path`` is the file read: the H5, or a raw slide's
        cache entry)."""
        found = self.tile_sizes.get(key)
        if found is None:
            def rule() -> tuple[float | None, str]:
                try:
                    size = read_tile_size(slide.path)
                except (TileSizeError, SlideError) as e:
                    return None, self._public(str(e), ref)
                return float(size.size), size.source

            found = await asyncio.to_thread(rule)
            self.tile_sizes.put(key, found)
        return found

    async def _read_raw(self, ref: SlideRef, key: tuple) -> Slide:
        """A raw slide: its cache entry (extracted now, in a thread, if missing), read as any slide file."""
        try:
            entry = await asyncio.to_thread(self.features.entry, ref.path)
        except WsiLlavaError as e:
            raise ApiError(400, f"slide {ref.id!r} cannot be used: {self._public(str(e), ref)}",
                           code="invalid_slide_file", param="slide") from None
        return await self._read(ref, key, str(entry))

    async def _read(self, ref: SlideRef, key: tuple, path: str | None = None) -> Slide:
        """Read the slide file ``path`` (default: the reference's own) into :attr:`slides`."""
        try:
            slide = await self.reader.read(path or ref.path)
        except SlideError as e:
            raise ApiError(400, f"slide {ref.id!r} cannot be used: {self._public(str(e), ref)}",
                           code="invalid_slide_file", param="slide") from None
        except SlideReadTimeout:
            self._timed_out[key] = time.monotonic() + self.config.slide_timeout
            for k in [k for k, until in self._timed_out.items() if until < time.monotonic()]:
                del self._timed_out[k]
            raise self._timeout_error(ref) from None
        except SlideReaderCrashed:
            raise ApiError(400, f"slide {ref.id!r} cannot be used: reading it crashed the reader process (the file is "
                           "probably damaged)", code="invalid_slide_file", param="slide") from None
        self.slides.put(key, slide)
        return slide

    # -- ROI images ------------------------------------------------------------------------------
    async def load_image(self, url: str, param: str) -> tuple[Slide, tuple, str]:
        """An ``image_url``'s tiles (cached by the image's SHA-256), its cache key and its public id
        ``sha256:<hex>``. Reading, decoding and encoding run off the event loop; concurrent requests
        for the same image share one encode."""
        images = self.images
        if images is None:
            raise ApiError(400, "this server has no tile encoder, so it cannot read images: start it with "
                           "--tile-weights (or send a slide reference)", code="images_not_enabled", param=param)
        data = await asyncio.to_thread(image_bytes, url, self.root, self.config.max_image_bytes, param)
        digest = image_digest(data)
        key = ("image", digest)
        slide = images.cache.get(key)
        if slide is None:
            async def encode() -> Slide:
                s = await asyncio.to_thread(images.encode, data, digest, param)
                images.cache.put(key, s)
                return s

            slide = await self._once(key, encode)
        return slide, key, f"sha256:{digest}"

    # -- prompts ---------------------------------------------------------------------------------
    def builder(self, system: str | None) -> PromptBuilder:
        """The prompt builder for a system prompt (None: the model's own)."""
        with self._builders_lock:
            b = self._builders.get(system)
            if b is None:
                base = self.assistant.builder
                b = PromptBuilder(self.prompt_tokenizer, base.num_image_tokens, base.cutoff_len, system)
                if len(self._builders) < 64:
                    self._builders[system] = b
            return b

    # -- the worker ------------------------------------------------------------------------------
    def _worker_start(self) -> None:
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)

    def run_batch(self, jobs: list[Job]) -> None:
        """Worker thread: visual tokens per job (cached), then one ``generate`` for the live jobs."""
        live, visuals = [], []
        for job in jobs:
            if job.cancelled.is_set():
                self.rows_cancelled += 1
                job.emit("error", ApiError(504, "cancelled", code="cancelled"))
                continue
            try:
                with self.assistant.autocast():
                    visuals.append(self.encoder.encode(job.payload))
                live.append(job)
            except Exception:
                log.exception("encoding slide %s failed", job.payload.slide.path)
                job.emit("error", internal_error())
        if not live:
            return
        with self.assistant.autocast():
            results = generate_rows(self.assistant.model, self.assistant.tokenizer, [j.payload for j in live], visuals)
        for job, res in zip(live, results):
            self.rows_cancelled += res.finish_reason == "cancelled"
            job.emit("done", res)

    def stats(self) -> dict:
        out = {"worker": {**self.worker.stats(), "abandoned": self.abandoned, "rows_cancelled": self.rows_cancelled},
               "slide_cache": self.slides.stats(), "visual_cache": self.encoder.cache.stats(),
               "slide_reader": self.reader.stats()}
        if self.images is not None:
            out["image_cache"] = self.images.cache.stats()
        if self.features is not None:
            out["feature_cache"] = {"extractions": self.features.extractions}
        return out
