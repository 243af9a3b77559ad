"""Deep Zoom views of the raw slide behind a slide id, for the web viewer: the DZI descriptor and JPEG tiles.

Which raw image belongs to a slide id (:meth:`SlideImages.find`), first match wins:

1. the id itself when it names a raw slide file under the slides root (a
   :data:`~wsi_llava.data.wsi_reader.SLIDE_SUFFIXES` suffix, given in the id or appended to it);
2. for an H5 slide, the raw slide named by its ``source_slide`` attribute (``wsi-llava extract``
   writes the absolute path; a relative path is taken from the H5's folder);
3. a raw slide beside the H5, with its name and a raw suffix (``a/b.h5`` → ``a/b.svs``, ``a/b.tif`` …).

Every candidate passes the rules of :mod:`.security` (real path inside the slides root, a regular
file); an H5 without a raw slide is 404 ``slide_image_not_found`` (the viewer then draws the tile grid).
Pixels are level-0 aligned (:class:`~wsi_llava.data.wsi_reader.DeepZoom`), so the tile coordinates of
the slide routes and of ``explain`` place directly on them.

Tiles: ``GET …/deepzoom_files/{level}/{col}_{row}.jpeg``; a level, column or row the pyramid lacks
(or that is not a number) is 404 ``tile_not_found``. Encoded tiles are kept in an LRU cache (bounded
by count and bytes) keyed by the raw file's path, mtime and size, so a replaced file is never served
stale; open slides are kept in a small LRU too. Every lookup, attribute read and tile render runs in
a thread pool off the event loop, at most ``workers`` at a time, bounded by ``timeout`` seconds like
the slide reads of :mod:`.slide_reader` (OpenSlide releases the GIL while it reads, so threads
suffice; a timed-out render keeps its thread until it returns, the request is answered 504 anyway).
The ``source_slide`` attribute is read with h5py in that pool too (once per H5 version, cached): one
small read of a file the slide reader has already read for ``/tiles``; special files are refused
before opening (:func:`~wsi_llava.data.slides.open_slide`).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ..data.slides import SlideError, open_slide
from ..data.wsi_reader import SLIDE_SUFFIXES as IMAGE_SUFFIXES
from ..data.wsi_reader import DeepZoom, TileAddressError, WsiError
from ..errors import MissingFileError, WsiLlavaError
from .caches import LRUCache
from .errors import ApiError
from .security import SlideRef, check_ref_syntax, resolve_file, resolve_slide

T = TypeVar("T")

#: the H5 attribute naming the raw slide the features came from (written by ``wsi-llava extract``)
SOURCE_ATTR = "source_slide"
#: Deep Zoom tiles: side in px (without overlap), overlap px, JPEG quality
TILE_SIZE, OVERLAP, JPEG_QUALITY = 254, 1, 75
_TILE_NAME = re.compile(r"(\d{1,9})_(\d{1,9})\.jpe?g")


@dataclass(frozen=True)
class SlideImage:
    """The raw slide image found for a slide id."""

    id: str
    """The slide id asked for (canonical: as :func:`~.security.resolve_slide` names it when it is an H5)."""
    image: SlideRef
    """The raw slide file (its id: its path relative to the root, suffix kept)."""
    key: tuple
    """Cache key: (real path, mtime_ns, size) of the raw file."""


def _tile_not_found(ref: str, level: str, name: str) -> ApiError:
    return ApiError(404, f"slide {ref[:200]!r} has no Deep Zoom tile {level[:20]}/{name[:40]}", code="tile_not_found")


def parse_tile(ref: str, level: str, name: str) -> tuple[int, int, int]:
    """``(level, col, row)`` of a tile URL's ``{level}/{col}_{row}.jpeg``; 404 ``tile_not_found`` when malformed."""
    m = _TILE_NAME.fullmatch(name)
    if not m or not level.isdigit() or len(level) > 3:
        raise _tile_not_found(ref, level, name)
    return int(level), int(m.group(1)), int(m.group(2))


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


class SlideImages:
    """Finds the raw slide behind slide ids and serves its Deep Zoom descriptor and tiles (see the module doc).

    ``root``: the real slides root (:func:`~.security.real_root`); ``workers`` renders at a time, each
    bounded by ``timeout`` seconds (waiting for a free worker included); ``tile_cache_*``: bounds of
    the encoded-tile cache; ``open_slides``: slides kept open."""

    def __init__(self, root: str, workers: int = 4, timeout: float = 30.0, tile_cache_items: int = 4096,
                 tile_cache_bytes: int = 128 * 2**20, open_slides: int = 16,
                 resolve: Callable[[str], SlideRef] | None = None):
        """``resolve``: slide reference → :class:`SlideRef` (the server's :class:`~.names.SlideNames`, so
        stems and barcodes work here too); default :func:`~.security.resolve_slide` under ``root``."""
        self.root, self.workers, self.timeout = root, int(workers), float(timeout)
        self.resolve = resolve or (lambda ref: resolve_slide(root, ref))
        self.tiles: LRUCache[bytes] = LRUCache(tile_cache_items, tile_cache_bytes, len)
        self._open: LRUCache[DeepZoom] = LRUCache(open_slides, open_slides, lambda _: 1)
        self._sources: LRUCache[str] = LRUCache(4096, 4096, lambda _: 1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="wsi-llava-deepzoom")
        self._slots: asyncio.Semaphore | None = None
        self.timeouts = 0
        """Requests answered 504 because a render took longer than the timeout."""

    # -- which image -----------------------------------------------------------------------------
    def find(self, ref: str) -> SlideImage:
        """Blocking: the raw slide image of slide id ``ref`` (see the module doc); ApiError 400 for a
        malformed id, 404 ``slide_not_found`` / ``slide_image_not_found``."""
        h5 = self.resolve(check_ref_syntax(ref))
        if h5.raw:  # the id is the raw slide itself (with or without its suffix)
            return self._image(h5.id, h5)
        named = self._named_source(h5)
        if named is not None:
            return self._image(h5.id, named)
        try:
            return self._image(h5.id, resolve_file(self.root, h5.id, IMAGE_SUFFIXES))
        except ApiError:
            raise ApiError(404, f"slide {h5.id!r} has no raw slide image under the slides root (neither its "
                           f"{SOURCE_ATTR!r} attribute nor a slide file beside it with a suffix "
                           f"{', '.join(IMAGE_SUFFIXES)}); the viewer shows its tile grid",
                           code="slide_image_not_found", param="slide") from None

    def _image(self, ref: str, image: SlideRef) -> SlideImage:
        try:
            return SlideImage(ref, image, _stat_key(image.path))
        except OSError:
            raise ApiError(404, f"slide {ref!r} not found", code="slide_not_found", param="slide") from None

    def _named_source(self, h5: SlideRef) -> SlideRef | None:
        """The raw slide named by the H5's :data:`SOURCE_ATTR`, when that resolves inside the root."""
        try:
            key = _stat_key(h5.path)
        except OSError:
            return None
        value = self._sources.get(key)
        if value is None:
            value = _read_source_attr(h5.path)
            self._sources.put(key, value)
        if not value:
            return None
        target = os.path.realpath(os.path.join(os.path.dirname(h5.path), value))  # an absolute value stays absolute
        if os.path.commonpath([self.root, target]) != self.root:
            return None
        try:
            return resolve_file(self.root, os.path.relpath(target, self.root).replace(os.sep, "/"), IMAGE_SUFFIXES)
        except ApiError:
            return None

    # -- pixels ----------------------------------------------------------------------------------
    def _deepzoom(self, image: SlideImage) -> DeepZoom:
        dz = self._open.get(image.key)
        if dz is None:  # two threads may open the same slide at once: harmless, one handle is dropped
            dz = DeepZoom(image.image.path, TILE_SIZE, OVERLAP)
            self._open.put(image.key, dz)  # an evicted slide closes when its last render drops it
        return dz

    def _public(self, message: str, image: SlideImage) -> str:
        return message.replace(image.image.path, image.image.id).replace(self.root, "<slides-root>")

    def _pixels(self, image: SlideImage, read: Callable[[DeepZoom], T]) -> T:
        try:
            return read(self._deepzoom(image))
        except TileAddressError:
            raise
        except MissingFileError:
            raise ApiError(404, f"slide {image.id!r} not found", code="slide_not_found", param="slide") from None
        except WsiError as e:
            raise ApiError(400, f"the raw slide of {image.id!r} cannot be read: {self._public(str(e), image)}",
                           code="invalid_slide_file", param="slide") from None
        except WsiLlavaError as e:  # OpenSlide is not installed
            raise ApiError(503, f"this server cannot show raw slides: {e}", code="openslide_unavailable") from None

    def dzi_sync(self, ref: str) -> str:
        """Blocking: the DZI descriptor (XML) of slide id ``ref``'s raw image."""
        image = self.find(ref)
        return self._pixels(image, lambda dz: dz.dzi("jpeg"))

    def tile_sync(self, ref: str, level: int, col: int, row: int) -> bytes:
        """Blocking: one JPEG tile of slide id ``ref``'s raw image (cached)."""
        image = self.find(ref)
        key = (*image.key, level, col, row)
        data = self.tiles.get(key)
        if data is None:
            try:
                data = self._pixels(image, lambda dz: dz.tile_jpeg(level, col, row, JPEG_QUALITY))
            except TileAddressError:
                raise _tile_not_found(ref, str(level), f"{col}_{row}.jpeg") from None
            self.tiles.put(key, data)
        return data

    # -- off the event loop ----------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in the pool, at most :attr:`workers` at a time, within :attr:`timeout` seconds
        (the wait for a free worker included); ApiError 504 ``slide_timeout`` after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        finally:
            self._slots.release()

    def _timed_out(self) -> ApiError:
        self.timeouts += 1
        return ApiError(504, f"reading the slide image took longer than {self.timeout:g} s", code="slide_timeout",
                        param="slide")

    async def image_of(self, ref: str) -> str | None:
        """The id of slide id ``ref``'s raw image (its path under the root), or None when it has none
        (or the lookup failed: the viewer then draws the tile grid)."""
        try:
            return (await self.run(self.find, ref)).image.id
        except ApiError:
            return None

    async def dzi(self, ref: str) -> str:
        return await self.run(self.dzi_sync, ref)

    async def tile(self, ref: str, level: str, name: str) -> bytes:
        """The JPEG of URL part ``{level}/{name}`` (``{col}_{row}.jpeg``)."""
        return await self.run(self.tile_sync, ref, *parse_tile(ref, level, name))

    def stats(self) -> dict:
        """``{"tile_cache": …, "open_slides", "timeouts"}``."""
        return {"tile_cache": self.tiles.stats(), "open_slides": len(self._open), "timeouts": self.timeouts}

    def close(self) -> None:
        """Stop the pool (without waiting for renders in flight)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_source_attr(path: str) -> str:
    """The H5 file's :data:`SOURCE_ATTR` as text ("" when absent or unreadable: the other rules apply)."""
    try:
        with open_slide(path) as f:
            value = f.attrs.get(SOURCE_ATTR)
    except (SlideError, OSError):
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and "\x00" not in value else ""
