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


def shipped_or_local(path: str | os.PathLike) -> Path:
    """A path as a config or a user writes it: the user's file, relative to the working folder, when
    it exists; else a ``data/...`` path names the shipped data (``data/toy/model``,
    ``data/prompts/demo.txt``), found wherever the command runs; else the path as given, for the
    error that names it."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute() or not given.parts or given.parts[0] != "data":
        return given
    shipped = data_dir().joinpath(*given.parts[1:])
    return shipped if shipped.exists() else given
