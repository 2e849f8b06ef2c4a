"""Where the project's shipped data lives: architectures, prompt sets and the toy world's weights.

The importable code is the ``probes`` package; ``data/`` beside it holds data only (no package
named ``data`` is installed, so ``import data`` in a user's environment never resolves here).
The framework is installed editable from a clone (``pip install -e .``), so the data folder is
the repository's; ``DIFFUSION_PROBES_DATA`` points elsewhere (e.g. a copy on shared storage).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The folder of shipped data files."""
    return Path(os.environ.get("DIFFUSION_PROBES_DATA") or REPO_ROOT / "data")


def data_path(*parts: str) -> Path:
    return data_dir().joinpath(*parts)
