"""Code version recorded in manifests and exports, so results can be traced to the code."""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    try:
        version = metadata.version("diffusion-probes")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{version}+{rev}" if rev else version
