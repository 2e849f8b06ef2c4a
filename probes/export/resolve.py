"""Where an export comes from: a local folder, or a W&B artifact downloaded into the cache.

One place for both, so that every stage that reads probes (evaluation, the intervention) accepts
the same references.
"""
from __future__ import annotations

import re
from pathlib import Path

from probes.export.probeset import META
from probes.prompts.sets import default_cache_dir

ARTIFACT_REF = re.compile(r"^(wandb:|wandb-artifact://)?[\w.-]+/[\w.-]+/[\w.-]+:[\w.-]+$")


def resolve_probes(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local export folder, or a W&B artifact reference (``entity/project/name:version``)
    downloaded into the cache."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / META).exists():
            raise FileNotFoundError(f"{path} is not a probe export ({META} missing); pass the run's probes/ folder")
        return path
    ref = str(ref)
    if not ARTIFACT_REF.match(ref):
        raise FileNotFoundError(f"--probes {ref!r} is neither a folder nor a W&B artifact reference "
                                f"(entity/project/name:version)")
    import wandb

    name = re.sub(r"^(wandb:|wandb-artifact://)", "", ref)
    artifact = wandb.Api().artifact(name, type="probes")
    root = Path(cache_dir or default_cache_dir() / "artifacts") / name.replace("/", "_").replace(":", "_")
    return Path(artifact.download(root=str(root)))
