"""Reading JSONL files (records, corpora, QA sets): one JSON object per non-blank line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from .errors import DataError


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line, streamed; a line that is not a
    JSON object is a DataError naming ``file:line``. Callers check that the file exists
    (each with its own hint) and what the objects must hold."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: each line must be a JSON object")
            yield line_no, row
