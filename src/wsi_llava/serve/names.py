"""Slides named the way users name them: a bare file stem or a TCGA barcode, not only the path under the root.

:func:`~.security.resolve_slide` takes a path relative to the slides root (TRIDENT / CLAM output folders
included: ``job/20x_256px_0px_overlap/features_gigapath/TCGA-…``). When that finds no file,
:class:`SlideNames` asks the package's one slide-name resolver
(:class:`~wsi_llava.data.resolve.SlideResolver`) over the files the server lists
(:func:`~.security.list_slides`, so the same confinement rules hold): relative path, file stem, TCGA
slide barcode, TCGA patient barcode. Several matches are a 400 ``ambiguous_slide`` listing them; none is
the usual 404 with close names. The index is built on the first miss; a name it does not know makes it
rebuild once when it is older than ``ttl`` seconds (files added to the root are found without a restart).
"""

from __future__ import annotations

import os
import threading
import time

from ..data.resolve import AmbiguousSlideError, SlideNotFoundError, SlideResolver
from .errors import ApiError
from .security import SERVED_SUFFIXES, SlideRef, list_slides, resolve_slide


class SlideNames:
    """``resolve(ref)``: :func:`~.security.resolve_slide`, then the name resolver (module doc)."""

    def __init__(self, root: str, ttl: float = 1.0):
        self.root = root
        self.ttl = ttl
        self._resolver: SlideResolver | None = None
        self._built = 0.0
        self._lock = threading.Lock()

    def index(self, refresh: bool = False) -> SlideResolver:
        """The name index (built now if there is none; rebuilt with ``refresh`` when older than ``ttl``)."""
        with self._lock:
            if self._resolver is None or (refresh and time.monotonic() - self._built > self.ttl):
                refs, _ = list_slides(self.root)
                names = [r.id if r.id.lower().endswith(SERVED_SUFFIXES) else r.id + os.path.splitext(r.path)[1]
                         for r in refs]
                self._resolver = SlideResolver(names, SERVED_SUFFIXES, what="slide file")
                self._built = time.monotonic()
            return self._resolver

    def resolve(self, ref: object) -> SlideRef:
        """The slide ``ref`` names (blocking: call it off the event loop)."""
        try:
            return resolve_slide(self.root, ref)
        except ApiError as e:
            if e.status != 404:
                raise
            missed = e
        try:
            try:
                name = self.index().resolve(str(ref), suggest=False)
            except SlideNotFoundError:  # maybe a file added since: a fresh index, close names only now
                name = self.index(refresh=True).resolve(str(ref))
        except AmbiguousSlideError as e:
            raise ApiError(400, str(e), code="ambiguous_slide", param="slide") from None
        except SlideNotFoundError as e:
            hint = f"; did you mean {', '.join(repr(c) for c in e.suggestions)}?" if e.suggestions else ""
            raise ApiError(404, missed.message + hint, code=missed.code, param="slide") from None
        return resolve_slide(self.root, name.as_posix())
