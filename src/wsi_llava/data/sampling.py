"""Which rows of a slide file to read: uniform or whole-chunk samples of ``k`` of ``N`` tiles.

Training passes a generator seeded per (seed, epoch, index) and gets a random sample; evaluation
passes none and gets the same deterministic sample on every call, machine and numpy version. See
docs/data.md for the guarantees.
"""

from __future__ import annotations

import math

import numpy as np

#: uniform ("exact seed distribution") or whole-chunk cluster sampling on compressed files
SAMPLING_MODES = ("uniform", "chunks")

def sample_indices(
    n: int, k: int | None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Row indices to read: sorted, unique, int64.

    ``k`` None or ``n <= k``: all rows. With ``rng``: ``k`` rows uniformly without replacement
    (every ``k``-subset equally likely — the seed's distribution). Without ``rng``: deterministic
    systematic sample ``floor((i + 0.5) · n / k)``, ``i < k`` — evenly spread over the file order and
    identical on every call, machine and numpy version.
    """
    if k is not None and k <= 0:
        raise ValueError(f"patches_per_wsi must be positive, got {k}")
    if k is None or n <= k:
        return np.arange(n, dtype=np.int64)
    if rng is None:
        return ((np.arange(k, dtype=np.float64) + 0.5) * (n / k)).astype(np.int64)
    return np.sort(rng.choice(n, size=k, replace=False, shuffle=False).astype(np.int64))


def sample_chunk_indices(
    n: int, k: int | None, chunk_rows: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Cluster sample: whole storage chunks of ``chunk_rows`` consecutive rows.

    Chunks are drawn uniformly without replacement (evenly spaced without ``rng``) until they hold
    at least ``k`` rows; if they hold more, ``k`` of those rows are kept uniformly (the first ``k``
    in file order without ``rng``). Sorted, unique int64.
    """
    if k is None or n <= k or chunk_rows <= 1:
        return sample_indices(n, k, rng)
    n_chunks = math.ceil(n / chunk_rows)
    if rng is None:
        need = math.ceil(k / chunk_rows)
        spread = ((np.arange(need, dtype=np.float64) + 0.5) * (n_chunks / need)).astype(np.int64)
        rest = np.setdiff1d(np.arange(n_chunks), spread)  # used only if a short tail chunk was picked
        order = np.concatenate([spread, rest])
    else:
        order = rng.permutation(n_chunks)
    sizes = np.minimum(chunk_rows, n - order * chunk_rows)
    take = int(np.searchsorted(np.cumsum(sizes), k)) + 1
    chosen = np.sort(order[:take])
    rows = (chosen[:, None] * chunk_rows + np.arange(chunk_rows)[None, :]).ravel()
    rows = rows[rows < n]
    if len(rows) > k:
        rows = rows[:k] if rng is None else np.sort(rng.choice(rows, size=k, replace=False))
    return rows.astype(np.int64)

