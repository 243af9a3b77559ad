"""Sharded inference: ``predict``, ``encode``, ``embed`` and ``extract`` launched by ``torchrun`` /
``accelerate launch``.

One rule for the four commands:

- **Who runs.** :func:`sharded` reads the variables the launcher sets (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins a gloo process group (used only for
  barriers and a few small broadcasts; the model never communicates). ``WORLD_SIZE`` unset or 1: no
  process group, the command runs exactly as a single process.
- **Who does what.** The work is cut into units (a batch of rows for ``predict`` and ``embed``, a slide
  for ``encode`` and ``extract``); each unit weighs its tile count, read cheaply from the slide file's header
  (:func:`~wsi_llava.data.slides.read_slide_meta`), or for a raw slide of ``extract`` its level-0 area in
  µm² (:func:`slide_areas`), by rank 0 and broadcast. :func:`balance` puts the units
  largest first onto the least-loaded rank (ties: the lower unit index, the lower rank), so the plan is
  the same on every rank and in every rerun. Whole batches are sharded, so every row is generated in the
  same batch as in a single-process run.
- **Outputs.** Each rank writes its own file beside the output (:meth:`Shard.part_path`:
  ``OUT.rank{r}-of-{w}.jsonl`` / ``.h5``) — appended per batch (``predict``, resumable per rank) or
  written atomically (``embed``, and ``extract``'s ``slides.csv`` / ``errors.jsonl``); ``encode`` and
  ``extract`` write one file per slide as always. After a barrier rank 0 merges the parts into the output
  in the order a single process writes it and removes them.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: how long a rank waits at a barrier for the slowest rank (a crashed rank makes the launcher stop all)
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    """This process's place among the launched processes."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part_path(self, out: str | os.PathLike, rank: int | None = None) -> Path:
        """``OUT.rank{r}-of-{w}{suffix}``: the part of ``out`` written by rank ``r`` (default: this rank)."""
        return part_path(out, self.rank if rank is None else rank, self.world)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def from_main(self, compute: Callable[[], object]) -> object:
        """``compute()`` on rank 0, its (picklable) result on every rank."""
        import torch.distributed as dist

        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum of ``values`` over the ranks."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t)
        return t.tolist()

    def device(self, device: str) -> str:
        """``auto`` → this rank's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
        import torch

        if device != "auto":
            return device
        return f"cuda:{self.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from the launcher's variables; ``(0, 1, 0)`` without a launcher."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    rank = int(os.environ.get("RANK") or 0)
    return rank, world, int(os.environ.get("LOCAL_RANK") or rank)


@contextlib.contextmanager
def sharded() -> Iterator[Shard | None]:
    """The process group of a launched run for the ``with`` block, or None for a single process."""
    rank, world, local_rank = world_from_env()
    if world <= 1:
        yield None
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield Shard(rank, world, local_rank)
    finally:
        if own:
            dist.destroy_process_group()


def device_for(device: str, shard: Shard | None) -> str:
    """The device a command runs on: as given, or per rank for ``auto`` in a sharded run."""
    if shard is not None:
        return shard.device(device)
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def balance(weights: Sequence[float], world: int) -> list[list[int]]:
    """Unit indices per rank: largest weight first onto the least-loaded rank (deterministic), each
    rank's indices in ascending order."""
    parts: list[list[int]] = [[] for _ in range(world)]
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + weights[i], r))
    return [sorted(p) for p in parts]


def batches(n: int, batch_size: int) -> list[list[int]]:
    """Item indices of the consecutive batches of ``n`` items, as a single process forms them."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def tile_counts(paths: Sequence[str | os.PathLike], cap: int | None = None) -> list[int]:
    """Tiles per slide file from its header (``min(N, cap)``); 1 for a file that cannot be read (its
    error is reported by the rank that processes it)."""
    from ..data.slides import SlideError, read_slide_meta

    seen: dict[str, int] = {}
    out = []
    for p in paths:
        key = os.fspath(p)
        if key not in seen:
            try:
                n = read_slide_meta(key)[0]
                seen[key] = max(1, min(n, cap) if cap else n)
            except (SlideError, OSError, ValueError):
                seen[key] = 1
        out.append(seen[key])
    return out


def slide_areas(paths: Sequence[str | os.PathLike], mpp_table: dict[str, float] | None = None) -> list[float]:
    """Level-0 area in µm² (width × height × mpp², from OpenSlide's header) of each raw slide: proportional
    to its tile grid and its segmentation thumbnail at any magnification. 1.0 for a slide that cannot be
    opened or has no pixel size (it fails at once; its error is reported by the rank that processes it)."""
    from ..data.wsi_reader import open_wsi
    from ..errors import WsiLlavaError

    out = []
    for p in paths:
        try:
            with open_wsi(p, mpp_table) as reader:
                out.append(max(1.0, reader.width * reader.height * reader.mpp ** 2))
        except (WsiLlavaError, OSError, ValueError):
            out.append(1.0)
    return out


def part_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def find_parts(out: str | os.PathLike, world: int | None = None) -> list[Path]:
    """Part files of ``out`` present on disk (of any world size, or of ``world``), by (world, rank)."""
    out = Path(out)
    pattern = re.compile(rf"{re.escape(out.stem)}\.rank(\d+)-of-(\d+){re.escape(out.suffix)}")
    found = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) < int(m.group(2)) and (world is None or int(m.group(2)) == world):
                found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def _jsonl_lines(path: Path) -> list[tuple[str, str]]:
    """``(key, line)`` of the complete JSON lines of a file (a torn or foreign line is skipped)."""
    out = []
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue
                try:
                    out.append((str(json.loads(line)["key"]), line))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return out


def merge_jsonl(out: str | os.PathLike, order: Sequence[str], parts: Sequence[Path]) -> int:
    """Fold keyed JSON lines of ``parts`` into ``out``: the lines already in ``out`` first, as they are,
    then each key not yet there once, in ``order`` (keys outside ``order`` last, by part and line) —
    the file a single process appending in that order would hold. Written atomically; then the parts
    are removed. Returns the number of lines added."""
    out = Path(out)
    lines = _jsonl_lines(out)
    have = {k for k, _ in lines}
    new: dict[str, str] = {}
    for p in parts:
        for k, line in _jsonl_lines(p):
            if k not in have:
                new.setdefault(k, line)
    rank_of = {k: i for i, k in enumerate(order)}
    added = sorted(new, key=lambda k: (0, rank_of[k]) if k in rank_of else (1, 0))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line for _, line in lines)
            f.writelines(new[k] for k in added)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    for p in parts:
        p.unlink(missing_ok=True)
    return len(added)
