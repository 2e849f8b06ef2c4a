"""Checksums: one implementation for files (downloads, shipped weights), text and data (fingerprints),
and a fast one for the bytes of data that is read often (a stored sample, checked when it is read)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any


def _hex(h: Any, length: int | None) -> str:
    digest = h.hexdigest()
    return digest[:length] if length else digest


def sha256_file(path: str | os.PathLike, length: int | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return _hex(h, length)


def verify_sha256(path: str | os.PathLike, expected: str, fix: str) -> None:
    """Refuse a file whose sha256 is not ``expected``; ``fix`` tells the user what to do about it."""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"{path} has sha256 {got}, expected {expected}; {fix}")


def sha256_text(text: str, length: int | None = None) -> str:
    """Hex sha256 of a string (optionally truncated: fingerprints that name folders)."""
    return _hex(hashlib.sha256(text.encode()), length)


def sha256_json(data: Any, length: int | None = None) -> str:
    """Hex sha256 of ``data`` as canonical JSON (sorted keys; anything else by its ``str``): the
    fingerprint of a settings mapping (a store request, a labeler's arguments)."""
    return sha256_text(json.dumps(data, sort_keys=True, default=str), length)


#: the fast checksum's name, recorded beside its digests (so another algorithm can be told apart later)
FAST_DIGEST = "xxh3_128"


def fast_digest(data: Any) -> str:
    """Hex XXH3-128 of a bytes-like object (e.g. a numpy row's buffer): a checksum against damage, not an
    adversary, at memory speed (~10 GB/s), so every stored sample can be checked each time it is read."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(memoryview(data).cast("B"))


def sha256_chunks(chunks: Iterable[bytes], length: int | None = None) -> str:
    """Hex sha256 of the concatenation of ``chunks``, streamed (e.g. a network's tensors)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return _hex(h, length)
