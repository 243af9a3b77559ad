"""Generated README sections: ``python -m wsi_llava.docs README.md`` rewrites the text between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers from the code (a test checks it is current)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .config import config_reference


def sections() -> dict[str, str]:
    """Marker name → generated Markdown."""
    return {"config-reference": "## Config reference\n\nGenerated from the dataclasses in `wsi_llava/arguments.py` "
                                "(`python -m wsi_llava.docs README.md`). Every other key is passed to "
                                "`transformers.TrainingArguments`.\n\n" + config_reference()}


def render(text: str) -> str:
    """``text`` with every generated section replaced by its current content."""
    for name, body in sections().items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"marker {start} … {end} not found")
        text = pattern.sub(lambda m: f"{start}\n{body.rstrip()}\n{end}", text)
    return text


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
