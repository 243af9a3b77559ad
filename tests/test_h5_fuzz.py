"""Issue 13: fuzzing the slide reader. Valid slide files (contiguous, CLAM-style (32, D) chunks, TRIDENT-style
(1, D) chunks, float16, gzip, a newer chunk index, (y, x) coordinates) are mutated — truncated at random offsets, random bytes flipped, or rewritten
by h5py with random dataset properties (layouts, chunk shapes, filters, dtypes, fill values, allocation
times, partial writes, links, virtual/external storage, duplicate coordinates, zero rows) — and each file
goes through ``load_slide`` (seeded and deterministic samples, and all tiles) and ``scan_slide``.

For every file and call the outcome must be either a :class:`SlideError` whose message names the file, or
values equal to what h5py itself reads from that file at those rows, with no all-zero or all-fill-value
row among them; for files rewritten with known contents the values must also be the rows that were
really written (never fill values). Never a hang (a watchdog per file), never a crash (the loop runs in
a child process, so a segfault is reported with the case that caused it), never another exception type.

The loop is this file run as a script; ``WSI_LLAVA_FUZZ_SEED`` / ``WSI_LLAVA_FUZZ_CASES`` change the
seed and the number of files (default: seed 13, 520 files, ≈ 10-20 s).
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import traceback

import h5py
import numpy as np

N, D = 64, 8
PER_CASE_TIMEOUT_S = 10


# --------------------------------------------------------------------------- building files


def truth(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((N, D)).astype(np.float32)
    cells = rng.permutation(4 * N)[:N]  # unique tiles, file order != spatial order
    coords = np.stack([cells % 16, cells // 16], 1).astype(np.int64) * 256
    return feats, coords


BASES = {
    "contiguous": dict(),
    "clam_chunks32": dict(chunks=(32, D), cchunks=(32, 2), maxshape=True),
    "trident_chunks1": dict(chunks=(1, D), cchunks=(1, 2), maxshape=True),
    "float16": dict(dtype="f2"),
    "gzip": dict(chunks=(16, D), cchunks=(16, 2), compression="gzip"),
    "latest_index": dict(chunks=(1, D), cchunks=(4, 2), maxshape=True, libver="latest"),
    "coords_yx": dict(chunks=(32, D), cchunks=(32, 2), yx=True),
}


def write_base(path, kind: str) -> None:
    feats, coords = truth()
    kw = BASES[kind]
    with h5py.File(path, "w", **({"libver": kw["libver"]} if "libver" in kw else {})) as f:
        f.create_dataset("features", data=feats.astype(kw.get("dtype", "f4")), chunks=kw.get("chunks"),
                         maxshape=(None, D) if kw.get("maxshape") else None, compression=kw.get("compression"))
        name, data = ("coords_yx", coords[:, ::-1]) if kw.get("yx") else ("coords", coords)
        f.create_dataset(name, data=data, chunks=kw.get("cchunks"),
                         maxshape=(None, 2) if kw.get("maxshape") else None,
                         compression=kw.get("compression") if kw.get("cchunks") else None)


def rewrite_random(path, rng: np.random.Generator) -> dict:
    """A file with random dataset properties; returns what was really written (``written`` row mask,
    the values, whether something must be refused regardless of rows)."""
    feats, coords = truth(int(rng.integers(1000)))
    dtype = str(rng.choice(["f4", "f2", ">f4", "<f8"]))
    layout = str(rng.choice(["contiguous", "chunked", "chunked", "compact"]))
    chunks = None
    if layout == "chunked":
        chunks = (int(rng.integers(1, N + 1)), int(rng.choice([D, D, rng.integers(1, D + 1)])))
    compression = None
    if layout == "chunked" and rng.random() < 0.4:
        compression = str(rng.choice(["gzip", "lzf"]))
    fill = rng.choice([None, 0.0, 0.5, -1.25])
    alloc = str(rng.choice(["default", "early", "late", "incr"])) if layout != "compact" else "default"
    if layout == "contiguous" and alloc == "incr":
        alloc = "default"
    write = str(rng.choice(["all", "all", "all", "prefix", "chunk_rows", "none"]))
    coords_kind = str(rng.choice(["coords", "coords", "coords_yx", "float", "duplicate", "unwritten"]))
    special = str(rng.choice(["none"] * 10 + ["soft", "external_link", "virtual", "external_storage", "group",
                                              "zero_row", "fill_row", "nan_row"]))
    feats_store = feats.astype(dtype)
    values = feats_store.astype(np.float32)

    kw = {}
    if rng.random() < 0.3:
        kw["libver"] = "latest"
    if rng.random() < 0.1:
        kw["userblock_size"] = 512
    must_refuse = special in ("external_link", "virtual", "external_storage", "group")
    written = np.zeros(N, bool)
    with h5py.File(path, "w", **kw) as f:
        name = "data/feats" if special == "soft" else "features"
        if special == "group":
            f.create_group("features")
        elif special in ("external_link", "virtual", "external_storage"):
            src = str(path) + ".src"
            if special == "external_storage":
                with open(src, "wb") as g:
                    g.write(feats_store.astype(feats_store.dtype.newbyteorder("=")).tobytes()[: int(rng.integers(0, feats_store.nbytes + 1))])
                f.create_dataset("features", shape=(N, D), dtype=feats_store.dtype.newbyteorder("="),
                                 external=[(src, 0, feats_store.nbytes)])
            else:
                with h5py.File(src, "w") as g:
                    g["x"] = feats_store
                if special == "external_link":
                    f["features"] = h5py.ExternalLink(src, "/x")
                else:
                    lay = h5py.VirtualLayout(shape=(N, D), dtype=feats_store.dtype)
                    lay[:] = h5py.VirtualSource(src, "x", shape=(N, D))
                    f.create_virtual_dataset("features", lay, fillvalue=0)
            written[:] = True
        else:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            if layout == "chunked":
                dcpl.set_chunk(chunks)
                if compression == "gzip":
                    dcpl.set_deflate(4)
                elif compression == "lzf":
                    dcpl.set_filter(h5py.h5z.FILTER_LZF, h5py.h5z.FLAG_OPTIONAL)
            elif layout == "compact":
                dcpl.set_layout(h5py.h5d.COMPACT)
            if fill is not None:
                dcpl.set_fill_value(np.array(fill, dtype=feats_store.dtype))
            if alloc != "default":
                dcpl.set_alloc_time({"early": h5py.h5d.ALLOC_TIME_EARLY, "late": h5py.h5d.ALLOC_TIME_LATE,
                                     "incr": h5py.h5d.ALLOC_TIME_INCR}[alloc])
            maxshape = (h5py.h5s.UNLIMITED, D) if layout == "chunked" and rng.random() < 0.5 else (N, D)
            space = h5py.h5s.create_simple((N, D), maxshape)
            tid = h5py.h5t.py_create(feats_store.dtype)
            if "/" in name:
                f.create_group(name.split("/")[0])
            h5py.h5d.create(f.id, name.encode(), tid, space, dcpl=dcpl)
            d = f[name]
            if write == "all":
                d[...] = feats_store
                written[:] = True
            elif write == "prefix":
                k = int(rng.integers(1, N))
                d[:k] = feats_store[:k]
                written[:k] = True
            elif write == "chunk_rows":
                cr = chunks[0] if chunks else 8
                for r0 in range(0, N, cr):
                    if rng.random() < 0.5:
                        d[r0:r0 + cr] = feats_store[r0:r0 + cr]
                        written[r0:r0 + cr] = True
            if special in ("zero_row", "fill_row", "nan_row") and written.any():
                r = int(rng.choice(np.flatnonzero(written)))
                value = {"zero_row": 0.0, "fill_row": 0.0 if fill is None else fill, "nan_row": np.nan}[special]
                row = np.full(D, value, dtype=feats_store.dtype)
                d[r] = row
                values = values.copy()
                values[r] = row.astype(np.float32)
                written[r] = False  # a constant row is never real data: must not be returned
            if special == "soft":
                f["features"] = h5py.SoftLink("/data/feats")
        c = coords.copy()
        ckey = "coords_yx" if coords_kind == "coords_yx" else "coords"
        if coords_kind == "duplicate":
            c[int(rng.integers(1, N))] = c[0]
        stored = c[:, ::-1] if ckey == "coords_yx" else c
        if coords_kind == "float":
            stored = stored.astype("f4")
        if coords_kind == "unwritten":
            cd = f.create_dataset(ckey, shape=(N, 2), dtype="i8", chunks=(8, 2))
            k = int(rng.integers(0, N))
            cd[:k] = stored[:k]
            c = c.copy()
            c[k:] = 0
        else:
            f.create_dataset(ckey, data=stored)
    return {"values": values, "coords": c, "written": written, "must_refuse": must_refuse,
            "dup_coords": len(np.unique(c, axis=0)) < N}


def mutate_bytes(path, base: bytes, rng: np.random.Generator) -> str:
    raw = bytearray(base)
    if rng.random() < 0.35:
        cut = int(rng.integers(0, len(raw)))
        path.write_bytes(bytes(raw[:cut]))
        return f"truncate@{cut}"
    n = int(rng.integers(1, 9))
    where = rng.integers(0, len(raw), n) if rng.random() < 0.5 else rng.integers(0, min(len(raw), 2048), n)
    for i in where:
        raw[int(i)] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(raw))
    return f"flip{sorted(int(i) for i in where)}"


# --------------------------------------------------------------------------- checking one file


def h5py_reference(path: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What h5py reads at rows ``idx``, in the reader's spatial order: (features float32, coords (x, y))."""
    with h5py.File(path, "r") as f:
        feats = f["features"]
        key = "coords_yx" if isinstance(f.get("coords_yx"), h5py.Dataset) else "coords"
        c = np.asarray(f[key][idx]).astype(np.float32)
        if key == "coords_yx":
            c = np.ascontiguousarray(c[:, ::-1])
        order = np.lexsort((c[:, 0], c[:, 1]))
        return np.asarray(feats[idx]).astype(np.float32)[order], c[order]


def _phase(name: str) -> None:
    """Tell the parent what runs now, so a crash is attributed to the reader or to the h5py oracle."""
    print(json.dumps({"phase": name}), flush=True)


def check_file(path: str, known: dict | None, phase=lambda name: None) -> list[str]:
    """Every problem with how the reader treated ``path``; else the outcomes (``ok`` / ``error``) of
    its calls. See the module doc."""
    from wsi_llava.data.sampling import sample_indices
    from wsi_llava.data.scan import scan_slide
    from wsi_llava.data.slides import SlideError, load_slide

    problems, outcomes = [], []
    fill_values = [0.0]
    for k, seed in ((16, 5), (16, None), (None, None)):
        rng = None if seed is None else np.random.default_rng(seed)
        phase("ours")
        try:
            s = load_slide(path, k, rng)
        except SlideError as e:
            outcomes.append("error")
            if path not in str(e):
                problems.append(f"load k={k}: message does not name the file: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            problems.append(f"load k={k}: {type(e).__name__} instead of SlideError: {e}\n{traceback.format_exc()}")
            continue
        outcomes.append("ok")
        idx = sample_indices(N, k, None if seed is None else np.random.default_rng(seed))
        phase("oracle")  # HDF5 itself may crash on a damaged file; that is not the reader's crash
        try:
            ref_f, ref_c = h5py_reference(path, idx)
        except Exception as e:  # noqa: BLE001
            problems.append(f"load k={k} returned values but h5py cannot read them: {type(e).__name__}: {e}")
            continue
        if not (np.array_equal(s.features, ref_f) and np.array_equal(s.coords, ref_c)):
            problems.append(f"load k={k}: values differ from what h5py reads")
        if (~s.features.any(axis=1)).any():
            problems.append(f"load k={k}: silent all-zero rows")
        try:
            with h5py.File(path, "r") as f:
                fill_values.append(float(np.asarray(f["features"].fillvalue).reshape(-1)[0]))
        except Exception:  # noqa: BLE001 - only an extra value to look for
            pass
        for fv in fill_values:
            if (s.features == np.float32(fv)).all(axis=1).any():
                problems.append(f"load k={k}: silent all-fill-value ({fv}) rows")
        if known is not None:  # contents known: only really written rows, with their values
            c_idx = known["coords"][idx].astype(np.float32)
            order = np.lexsort((c_idx[:, 0], c_idx[:, 1]))
            rows = idx[order]
            if not known["written"][rows].all():
                problems.append(f"load k={k}: returned rows that were never written: {rows[~known['written'][rows]]}")
            elif not np.array_equal(s.features, known["values"][rows]):
                problems.append(f"load k={k}: values differ from the written ones")
            if known["must_refuse"]:
                problems.append(f"load k={k}: accepted a layout that must be refused")
            if k is None and known["dup_coords"]:
                problems.append("load all tiles: duplicate coordinates accepted")
    phase("ours")
    try:
        scan_slide(path)
        outcomes.append("ok")
        if known is not None and (not known["written"].all() or known["must_refuse"] or known["dup_coords"]):
            problems.append("scan_slide accepted a file with unwritten rows, duplicates or a refused layout")
    except SlideError as e:
        outcomes.append("error")
        if path not in str(e):
            problems.append(f"scan: message does not name the file: {e}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"scan: {type(e).__name__} instead of SlideError: {e}\n{traceback.format_exc()}")
    return problems if problems else outcomes


def make_case(path, bases: dict, seed: int, i: int) -> tuple[str, dict | None]:
    """File number ``i`` of the run with ``seed`` (each case has its own generator: reproducible alone)."""
    rng = np.random.default_rng([seed, i])
    if rng.random() < 0.6:
        kind = str(rng.choice(list(bases)))
        return f"{kind}:{mutate_bytes(path, bases[kind], rng)}", None
    return "properties", rewrite_random(path, rng)


def run(folder: str, seed: int, start: int, cases: int) -> None:
    """The fuzz loop (child process) over cases ``start … cases-1``: one JSON line per file."""
    import warnings
    from pathlib import Path

    warnings.simplefilter("ignore")  # the reader's "fast path disagreed, using HDF5" is allowed
    folder = Path(folder)
    bases = {}
    for kind in BASES:
        p = folder / f"base_{kind}.h5"
        write_base(p, kind)
        bases[kind] = p.read_bytes()
        assert check_file(str(p), None) == ["ok"] * 4, (kind, check_file(str(p), None))
    for i in range(start, cases):
        path = folder / f"case{i:04d}.h5"
        what, known = make_case(path, bases, seed, i)
        print(json.dumps({"start": i, "what": what}), flush=True)
        faulthandler.dump_traceback_later(PER_CASE_TIMEOUT_S, exit=True)
        result = check_file(str(path), known, _phase)
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"case": i, "what": what, "result": result}), flush=True)
        for p in folder.glob(f"case{i:04d}.h5*"):
            p.unlink()


def fuzz(folder, seed: int, cases: int) -> dict:
    """Run the loop in child processes; a child that dies is restarted after the case it died on. A
    death in the reader (or a case over the time limit) is a failure; a death inside the h5py oracle
    is HDF5's own crash on that damaged file, counted separately."""
    counts = {"ok": 0, "error": 0}
    failures, oracle_crashes, done, start = [], [], 0, 0
    while start < cases:
        proc = subprocess.run([sys.executable, __file__, str(folder), str(seed), str(start), str(cases)],
                              capture_output=True, text=True, timeout=600)
        current, phase = None, None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                current, phase = msg, "ours"
            elif "phase" in msg:
                phase = msg["phase"]
            elif "result" in msg:
                done += 1
                current = None
                if msg["result"] and msg["result"][0] in counts:
                    for r in msg["result"]:
                        counts[r] += 1
                else:
                    failures.append({"case": msg["case"], "what": msg["what"], "problems": msg["result"]})
        if proc.returncode == 0:
            break
        if current is None:  # died outside any case (e.g. on the valid base files)
            failures.append({"case": None, "problems": [f"exit {proc.returncode}: {proc.stderr[-3000:]}"]})
            break
        done += 1
        if phase == "oracle" and proc.returncode < 0:
            oracle_crashes.append(current)
        else:
            failures.append({"case": current["start"], "what": current["what"], "problems": [
                f"the reader crashed or hung (exit {proc.returncode}; limit {PER_CASE_TIMEOUT_S} s per file): "
                f"{proc.stderr[-3000:]}"]})
        start = current["start"] + 1
    return {"cases": done, "counts": counts, "failures": failures, "oracle_crashes": oracle_crashes}


# --------------------------------------------------------------------------- the test


def test_fuzz_mutated_slide_files(tmp_path):
    seed = int(os.environ.get("WSI_LLAVA_FUZZ_SEED", "13"))
    cases = int(os.environ.get("WSI_LLAVA_FUZZ_CASES", "520"))
    summary = fuzz(tmp_path, seed, cases)
    assert summary["failures"] == [], json.dumps(summary["failures"][:5], indent=1)
    assert summary["cases"] == cases >= 500
    # both outcomes occur in numbers: the mutations are neither all harmless nor all fatal
    assert summary["counts"]["ok"] > 200 and summary["counts"]["error"] > 200, summary["counts"]
    assert len(summary["oracle_crashes"]) < cases // 20, summary["oracle_crashes"]


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
