"""sha256 of files in chunks (engine files are gigabytes): the one hashing helper."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

CHUNK = 1 << 24


def sha256_files(paths: Iterable[str | Path], progress: Callable[[int], None] | None = None) -> str:
    """One hex digest over the files' bytes in order; progress(n) after each chunk of n bytes."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    return h.hexdigest()


def sha256_file(path: str | Path, progress: Callable[[int], None] | None = None) -> str:
    return sha256_files([path], progress)
