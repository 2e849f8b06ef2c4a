"""The one download routine for pinned files: to a temporary name, then renamed.

An interrupted download never looks complete; the caller checks the file's sha256 afterwards
(:func:`probes.common.hashing.verify_sha256`).
"""
from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path


def download(url: str, path: Path, offline_fix: str) -> None:
    """Fetch ``url`` into ``path``; on failure, the error says ``offline_fix`` (how to do without)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
            f.write(r.read())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} to {path}: {err}\n{offline_fix}") from err
