"""Files replaced whole or not at all: written beside their final name, synced, renamed. A reader (a resumed run, a
series, the next pack, a user's script) never finds one empty or cut short, after a kill or a power loss alike."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)`, then tmp synced and renamed to path. A write that fails leaves path as it was, and no tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        # Renamed unsynced, a file can stand under its final name empty or cut short after a power loss.
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    # UTF-8 whatever the locale; a file name that is not UTF-8 (os.fsdecode's surrogates) keeps its own bytes.
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8", errors="surrogateescape"))


def strict(value: Any) -> Any:
    """value with every NaN and infinity as None: strict JSON has no NaN (JavaScript's JSON.parse, jq and many
    dashboards refuse Python's bare NaN), so an undefined metric (SRCC of constant scores) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json_atomic(path: Path, value: Any, default: Callable[[Any], Any] | None = None) -> None:
    """value as strict, indented JSON (see `strict`)."""
    write_text_atomic(path, json.dumps(strict(value), indent=2, allow_nan=False, default=default) + "\n")
