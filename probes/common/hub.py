"""Is a Hugging Face model in the local cache? Answered without loading it or touching the network.

The pre-flight check asks this for every model a run needs (the diffusion model, MiDaS) before
any compute. The cache folder is resolved from the environment *at call time*:
``huggingface_hub.constants`` is frozen when the hub is first imported, so a later change of
``HF_HOME`` (a test, a notebook) would otherwise be ignored.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, marker: str, cache_dir: str | os.PathLike | None = None,
                    revision: str | None = None) -> Path | None:
    """The snapshot folder holding ``marker`` (e.g. ``model_index.json``) of ``repo_id`` at ``revision``, or None.

    A local folder given as ``repo_id`` is its own snapshot.
    """
    local = Path(repo_id).expanduser()
    if local.is_dir():
        return local if (local / marker).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, marker, cache_dir=str(hub_cache_dir(cache_dir)), revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def has_any(folder: Path, patterns: Iterable[str]) -> bool:
    """Whether ``folder`` holds a file matching any glob pattern (weights in one of several formats)."""
    return any(p.is_file() for pat in patterns for p in folder.glob(pat))


def download_command(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """The ``hf`` command that fetches ``repo_id`` into the cache the code reads."""
    return (f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
            + (f" --cache-dir {cache_dir}" if cache_dir else ""))
