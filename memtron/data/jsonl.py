"""JSON-lines files (raw corpora, fact questions, prompts): one record a line, blank lines
skipped, errors naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded record) of every non-blank line; ValueError on invalid JSON."""
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {e}") from e
