"""LLaMA-Factory sharegpt JSON manifests (``.json`` list or ``.jsonl``, one object per line) → rows.

Each item has ``messages`` (``role``/``content``) or ``conversations`` (``from``/``value``) and
``images`` (one H5 path, or one ROI image: a path ending in an ``ROI_SUFFIXES`` suffix becomes
``image_path``). Every user → assistant pair becomes one :class:`~wsi_llava.data.records.Record`;
``row`` is the item number (``.json``, 1-based, so 0 can mean "the whole file") or the line number
(``.jsonl``). Entry points: :mod:`wsi_llava.data.manifest`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .choices import options_tuple
from .records import (ROI_SUFFIXES, TOO_DEEP, Problem, Record, RowCollector, decode_manifest, depth_ok,
                      optional_text, record_problems, resolve_path)


_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "system": "system", "function_call": "other", "observation": "other", "tool": "other"}


def read_sharegpt(
    raw: bytes, source: str, split: str | None, jsonl: bool
) -> RowCollector:
    text, prob = decode_manifest(raw, source)
    if prob:
        return RowCollector.failed([prob])
    items: list[tuple[int, object]] = []
    rows = RowCollector(split)
    if jsonl:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.add(None, None, [Problem(source, lineno, "json", f"invalid JSON: {e.msg} (column {e.colno})")])
            except RecursionError:
                rows.add(None, None, [Problem(source, lineno, "json", TOO_DEEP)])
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return RowCollector.failed([Problem(source, 0, "json", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")])
        except RecursionError:
            return RowCollector.failed([Problem(source, 0, "json", TOO_DEEP + " somewhere in the file")])
        if not isinstance(data, list):
            return RowCollector.failed([Problem(source, 0, "json", f"expected a list of conversations, got {type(data).__name__}")])
        items = list(enumerate(data, start=1))
    base = Path(source).resolve().parent
    for row, item in items:
        if not depth_ok(item):
            rows.add(None, None, [Problem(source, row, "json", TOO_DEEP)])
            continue
        if not isinstance(item, dict):
            rows.add(None, None, [Problem(source, row, "json", f"expected an object, got {type(item).__name__}")])
            continue
        row_split = optional_text(str(item["split"])) if item.get("split") is not None else None

        def bad(field: str, msg: str) -> None:
            rows.add(row_split, None, [Problem(source, row, field, msg)])

        images = item.get("images")
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            bad("images", f"expected exactly one H5 path in `images`, got {images!r}"[:200])
            continue
        key, role_key, text_key = "messages", "role", "content"
        if key not in item and "conversations" in item:
            key, role_key, text_key = "conversations", "from", "value"
        msgs = item.get(key)
        if not isinstance(msgs, list) or not msgs:
            bad("messages", "missing or empty `messages` (or `conversations`) list")
            continue
        try:
            choices = options_tuple(item.get("choices")) if item.get("choices") else None
        except ValueError as e:
            bad("choices", str(e))
            continue
        h5 = resolve_path(images[0], base)
        image = ""
        if images[0].strip().lower().endswith(ROI_SUFFIXES):
            h5, image = "", h5
        slide_id = str(item.get("slide_id") or Path(images[0]).stem)
        pairs: list[tuple[str, str]] = []
        pending: str | None = None
        ok = True
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get(text_key), str):
                bad(f"{key}[{j}]", f"expected {{{role_key!r}: …, {text_key!r}: text}}")
                ok = False
                break
            role = _ROLE.get(str(m.get(role_key)))
            if role is None:
                bad(f"{key}[{j}]", f"unknown role {m.get(role_key)!r}")
                ok = False
                break
            if role == "user":
                pending = m[text_key].replace("<image>", "").strip()
            elif role == "assistant":
                if pending is None:
                    bad(f"{key}[{j}]", "assistant message without a preceding user message")
                    ok = False
                    break
                pairs.append((pending, m[text_key].strip()))
                pending = None
        if not ok:
            continue
        if not pairs:
            bad(key, "no user → assistant pair")
            continue
        for q, a in pairs:
            rec = Record(
                h5_path=h5, slide_id=slide_id, dataset=str(item.get("dataset") or ""),
                question=q, answer=a, caption=str(item.get("caption") or "").strip(),
                choices=choices, split=row_split,
                case_id=optional_text(str(item["case_id"])) if item.get("case_id") is not None else None,
                category=optional_text(str(item["category"])) if item.get("category") is not None else None,
                source=source, row=row, image_path=image,
            )
            rows.add(row_split, rec, [Problem(source, row, f, msg) for f, msg in record_problems(rec)])
    return rows
