"""Atomic file writes: a reader (a resumed run, a concurrent `compare`, a crashed
process's successor) never sees half a file — the text goes to `<path>.tmp`, then is
renamed over `path` (atomic on POSIX file systems)."""

from __future__ import annotations

import json
import os


def write_text(path: str, text: str, encoding: str = "utf-8") -> str:
    """Write `text` to `path` atomically; returns `path`."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(
    path: str,
    obj,
    *,
    indent: int = 2,
    sort_keys: bool = True,
    allow_nan: bool = True,
    newline: bool = False,
) -> str:
    """`json.dump(obj)` to `path` atomically (allow_nan=False: strict JSON or an error)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
    return write_text(path, text + ("\n" if newline else ""))
