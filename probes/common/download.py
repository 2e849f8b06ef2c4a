"""The one download routine for pinned files: to a temporary name, then renamed.

An interrupted download never looks complete; the caller checks the file's sha256 afterwards
(:func:`probes.common.hashing.verify_sha256`).
"""
from __future__ import annotations

import urllib.request
from pathlib import Path

from probes.common.files import atomic_write


def download(url: str, path: Path, offline_fix: str) -> None:
    """Fetch ``url`` into ``path``; on failure, the error says ``offline_fix`` (how to do without)."""
    try:
        with atomic_write(path, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
            f.write(r.read())
    except OSError as err:
        raise RuntimeError(f"could not download {url} to {path}: {err}\n{offline_fix}") from err
