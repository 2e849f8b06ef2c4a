"""Checksums: one implementation for files (downloads, shipped weights) and for text (fingerprints)."""
from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, fix: str) -> None:
    """Refuse a file whose sha256 is not ``expected``; ``fix`` tells the user what to do about it."""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"{path} has sha256 {got}, expected {expected}; {fix}")


def sha256_text(text: str, length: int | None = None) -> str:
    """Hex sha256 of a string (optionally truncated: fingerprints that name folders)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return digest[:length] if length else digest
