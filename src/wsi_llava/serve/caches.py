"""A thread-safe least-recently-used cache bounded by entry count and by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Keeps at most ``max_items`` values whose ``size_of`` sum stays within ``max_bytes``.

    The least recently used entries are evicted first. A single value larger than ``max_bytes`` is
    not stored (``put`` returns False). ``max_items == 0`` disables the cache.
    """

    def __init__(self, max_items: int, max_bytes: int, size_of: Callable[[V], int]):
        if max_items < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        """Lookups that found a value."""
        self.misses = 0
        """Lookups that did not."""

    def get(self, key: Hashable) -> V | None:
        """The value for ``key`` (now most recently used) or None."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store ``value``; evict least recently used entries until within bounds."""
        size = int(self._size_of(value))
        if self.max_items == 0 or size > self.max_bytes:
            return False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > self.max_items or self._bytes > self.max_bytes:
                _, (_, evicted) = self._data.popitem(last=False)
                self._bytes -= evicted
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    @property
    def nbytes(self) -> int:
        """Sum of the stored values' sizes."""
        with self._lock:
            return self._bytes

    def stats(self) -> dict:
        """``{"items", "bytes", "hits", "misses", "max_items", "max_bytes"}``."""
        with self._lock:
            return {"items": len(self._data), "bytes": self._bytes, "hits": self.hits, "misses": self.misses,
                    "max_items": self.max_items, "max_bytes": self.max_bytes}
