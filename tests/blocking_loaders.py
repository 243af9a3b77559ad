"""Slide loaders for tests that run in the server's reader processes (kept in a module that imports
little, so a freshly spawned reader starts fast)."""

from __future__ import annotations

import h5py


def open_fifo_instead(path: str, fifo: str, real) -> object:
    """``slow.h5`` is read as a FIFO nobody writes to, so h5py blocks inside HDF5's open() while holding
    the GIL (in a thread of the server this would freeze every request, /health too); any other path
    goes to ``real``."""
    if path.endswith("slow.h5"):
        h5py.File(fifo, "r")
    return real(path)
