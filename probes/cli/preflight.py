"""Pre-flight: every prerequisite of a run, checked at once before any compute.

Offline, the sd14 config used to fail on the prompt download with a 40-line chained socket
traceback, and only a rerun revealed the missing SD weights, then the next rerun the labelers'.
This module asks every stage what it needs (the prompt files, the diffusion weights, each
labeler's weights via :meth:`probes.labels.base.Labeler.prerequisites`, a validation split, the
disk for the store and its labels) and the CLI prints one short list, each item with the exact
config key or command that provides it, and exits non-zero without a traceback.

Nothing here downloads or loads a model. Something the code would fetch by itself on first use
(``Missing.url``) counts as missing only when downloads are off (``HF_HUB_OFFLINE`` /
``DPROBE_OFFLINE``) or its host does not answer.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from probes.common.env import OFFLINE_ENV, env_flag, offline
from probes.common.hub import cached_snapshot, download_command, has_any, hub_cache_dir
from probes.diffusion.families.sizes import real_models
from probes.diffusion.families.spec import get_family
from probes.diffusion.loading import DiffusionSpec, local_model_dir
from probes.labels import build_labeler
from probes.labels.base import Missing
from probes.prompts.replication2024 import LOCAL_DIR_ENV as REPLICATION2024_ENV
from probes.prompts.replication2024 import REPLICATION2024_COMMIT, REPLICATION2024_FILES, REPLICATION2024_URL
from probes.prompts.sets import (
    CHEN2023_COMMIT,
    CHEN2023_FILES,
    CHEN2023_URL,
    PromptSpec,
    default_cache_dir,
    resolve_source,
)
from probes.store.activations import human_bytes
from probes.store.disk import free_bytes, planned_layout, store_bytes

__all__ = ["Missing", "PreflightFailed", "check_prerequisites", "format_missing", "prompt_prerequisites",
           "diffusion_prerequisites"]

CHEN2023_REPO = "github.com/yc015/scene-representation-diffusion-model"


class PreflightFailed(SystemExit):
    """Prerequisites are missing: exits with the short list as its message (no traceback)."""


# -- each stage's prerequisites -----------------------------------------------------------------
def prompt_prerequisites(spec: PromptSpec) -> list[Missing]:
    """The prompt files: the reference split (local folder, cache, or download) or a prompt file."""
    if spec.source == "replication2024":   # the chen2023 CSVs and the replication's two pickles
        return prompt_prerequisites(replace(spec, source="chen2023")) + replication_prerequisites(spec)
    if spec.source != "chen2023":
        try:
            resolve_source(spec.source)
        except FileNotFoundError as err:
            return [Missing(str(err), "set data.prompts.source to a prompt file, a shipped set, or chen2023")]
        return []
    names = [name for name, _ in CHEN2023_FILES.values()]
    local = spec.local_dir or os.environ.get("DPROBE_CHEN2023_DIR")
    if local:
        absent = [n for n in names if not (Path(local).expanduser() / n).is_file()]
        if absent:
            return [Missing(f"reference prompts: {', '.join(absent)} not in {local} (data.prompts.local_dir)",
                            f"copy them there from {CHEN2023_REPO} at commit {CHEN2023_COMMIT[:8]}")]
        return []
    cache = Path(spec.cache_dir or default_cache_dir()) / "chen2023" / CHEN2023_COMMIT
    absent = [n for n in names if not (cache / n).is_file()]
    if not absent:
        return []
    return [Missing(f"reference prompts (data.prompts.source=chen2023): not in {cache}",
                    f"set data.prompts.local_dir to a folder holding {' and '.join(names)} "
                    f"({CHEN2023_REPO} at commit {CHEN2023_COMMIT[:8]})",
                    url=CHEN2023_URL.format(name=absent[0]))]


def replication_prerequisites(spec: PromptSpec) -> list[Missing]:
    """The 2024 replication's shading split pickles (``data.prompts.source=replication2024``)."""
    names = [name for name, _ in REPLICATION2024_FILES.values()]
    local = spec.replication_dir or os.environ.get(REPLICATION2024_ENV)
    folder = Path(local).expanduser() if local else \
        Path(spec.cache_dir or default_cache_dir()) / "replication2024" / REPLICATION2024_COMMIT
    absent = [n for n in names if not (folder / n).is_file()]
    if not absent:
        return []
    where = "data.prompts.replication_dir" if local else "the download cache"
    return [Missing(f"the replication's shading split: {', '.join(absent)} not in {folder} ({where})",
                    f"download {REPLICATION2024_URL.format(name=absent[0])} (and the other pickle) into {folder}, "
                    f"or set data.prompts.replication_dir to a folder holding {' and '.join(names)}",
                    url=None if local else REPLICATION2024_URL.format(name=absent[0]))]


def diffusion_prerequisites(spec: DiffusionSpec) -> list[Missing]:
    """The diffusion pipeline's files in the Hugging Face cache (or the local folder ``model_id``), and
    for a gated Hub repo (:mod:`probes.diffusion.families.sizes`' table says which) the login it needs."""
    if spec.is_random:
        return []
    family = get_family(spec.family_name)
    weights = (f"{family.denoiser}/diffusion_pytorch_model*.safetensors", f"{family.denoiser}/diffusion_pytorch_model*.bin")
    local = local_model_dir(spec.model_id)        # a folder (``data/toy/model`` from any working folder)
    snap = cached_snapshot(str(local or spec.model_id), "model_index.json", spec.cache_dir, spec.revision)
    if snap is not None and has_any(snap, weights):
        return []
    if local is not None:
        return [Missing(f"diffusion model {spec.model_id} (data.diffusion.model_id): not a diffusers pipeline folder "
                        f"(model_index.json and {family.denoiser} weights)", "point data.diffusion.model_id at one")]
    rev = f" (revision {spec.revision})" if spec.revision else ""
    entry = real_models().get(spec.model_id, {})
    what = "SD" if family.name == "sd1" else f"{family.name} ({family.pipeline})"
    found = [Missing(f"{what} weights {spec.model_id}{rev} (data.diffusion.model_id): not in the Hugging Face cache "
                     f"{hub_cache_dir(spec.cache_dir)}",
                     download_command(spec.model_id, spec.revision, spec.cache_dir)
                     + "  (on another machine: copy its cache and point HF_HOME or data.diffusion.cache_dir at it)",
                     url=None if spec.local_files_only or entry.get("gated") else f"https://huggingface.co/{spec.model_id}")]
    if entry.get("gated") and not _hub_token():
        found.append(Missing(f"licence: {spec.model_id} is gated on the Hub ({entry.get('licence', 'see its page')}): "
                             f"downloading it needs a login with an account that accepted its conditions",
                             f"accept them at https://huggingface.co/{spec.model_id}, then `hf auth login` (or set "
                             f"HF_TOKEN) before the download"))
    return found


def _hub_token() -> bool:
    """Whether a Hugging Face token is configured (``HF_TOKEN`` or a saved login)."""
    from huggingface_hub import get_token

    return bool(get_token())


def store_estimate(dm: Any) -> str | None:
    """What the store of ``dm``'s run weighs per image at the model's size (its layers, steps and
    halves: what ``diffusion-probes sizes`` lists for every default layer), or None if unknown; a
    streamed run also says what caching its activations would take."""
    cached = planned_layout(dm.diffusion, dm.generation, dm.capture, 1, True)
    if cached is None:
        return None
    cap, gen = cached["capture"], cached["generation"]
    test = [0] if gen.get("decode", "none") != "none" else []
    shape = f"{len(cap['layers'])} layers x {len(cap['steps'])} steps x {len(cap['halves'])} half, {cap['dtype']}"
    size = f"at {gen['height']}x{gen['width']}"
    if not dm.streaming:
        return f"{human_bytes(store_bytes(cached, [0], test))} per image {size} ({shape})"
    images = planned_layout(dm.diffusion, dm.generation, dm.capture, 1, False)
    return (f"{human_bytes(store_bytes(images, [0], test))} per image {size} (streaming: images only; cached, its "
            f"{shape} would take {human_bytes(store_bytes(cached, [0], test))} per image)")


# -- network ------------------------------------------------------------------------------------
_REACHABLE: dict[str, bool] = {}


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` s (cached per host).

    Run in a thread with a deadline: name resolution has no timeout of its own, and a machine
    whose firewall drops packets would otherwise stall the check.
    """
    host = urlparse(url).hostname or ""
    if host not in _REACHABLE:
        result = [False]

        def probe() -> None:
            try:
                with socket.create_connection((host, 443), timeout=timeout):
                    result[0] = True
            except OSError:
                pass

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout + 1)
        _REACHABLE[host] = result[0]
    return _REACHABLE[host]


def _still_missing(m: Missing) -> Missing | None:
    """``m`` unless the code will fetch it by itself (a URL, downloads on, the host answering)."""
    if m.url is None or offline():
        return m
    if reachable(m.url):
        return None
    return Missing(f"{m.what} (and {urlparse(m.url).hostname} is unreachable)", m.fix, m.url)


# -- the whole check ----------------------------------------------------------------------------
def check_prerequisites(dm: Any, model: Any = None, stage: str | None = "fit",
                        consumers: Sequence[Any] = ()) -> list[Missing]:
    """Everything ``dm`` (an ``ActivationDataModule``) needs before it can compute, that is missing.

    :param model: the probe module: a fit needs a validation split only if it selects on it.
    :param stage: the CLI subcommand; only ``fit`` can need a validation split.
    :param consumers: the run's other stages (callbacks such as the classifier experiment): what
        their ``prerequisites()`` lack, and what their ``check_data(dm)`` refuses, is listed too.
    """
    found: list[Missing] = []
    prompts = prompt_prerequisites(dm.prompts)
    found += prompts
    weights = diffusion_prerequisites(dm.diffusion)
    if weights:              # the weights are missing: say what their store will weigh, before the download
        estimate = store_estimate(dm)
        if estimate is not None:
            weights[0] = replace(weights[0], what=f"{weights[0].what}; this run's store: {estimate}")
    found += weights
    decode = getattr(getattr(dm, "generation", None), "decode", "none")
    for key, labels in (("data.labels", dm.labels),
                        ("data.decoded_labels", getattr(dm, "decoded_labels", {}) if decode != "none" else {})):
        for task, cfg in labels.items():
            cfg = dict(cfg)
            found += build_labeler(cfg.pop("name"), **cfg).prerequisites(f"{key}.{task}")
    for consumer in consumers:
        found += list(getattr(consumer, "prerequisites", list)())
    found = [m for m in (_still_missing(m) for m in found) if m is not None]
    if prompts:              # the prompt count decides the splits and the disk: not known yet
        return found
    try:
        dm.check_splits(stage, model)
        dm.check_consumers(consumers)
    except ValueError as err:
        found.append(Missing(str(err), ""))
        return found
    needs = dm.disk_needs()   # None while the model's config is not cached (reported above)
    if needs is not None:
        total, where = sum(b for _, b in needs), dm.resolved_store_dir()
        free = free_bytes(where)
        if total > free:
            parts = ", ".join(f"{w} {human_bytes(b)}" for w, b in needs if b)
            found.append(Missing(f"disk: this run still writes {human_bytes(total)} at {where} ({parts}); "
                                 f"{human_bytes(free)} is free",
                                 "capture fewer layers/steps (data.capture.layers, data.capture.steps), use "
                                 "data.mode=streaming, or set data.store_root to a bigger disk"))
    return found


def format_missing(missing: Sequence[Missing]) -> str:
    """The short list the CLI prints: one line per item, then its fix."""
    n = len(missing)
    lines = [f"Cannot start: {n} prerequisite{'s are' if n != 1 else ' is'} missing "
             f"(checked before any compute; nothing was generated):"]
    for m in missing:
        lines.append(f"  - {m.what}")
        if m.fix:
            lines.append(f"      fix: {m.fix}")
    flags = [k for k in OFFLINE_ENV if env_flag(k)]
    if flags and any(m.url for m in missing):
        lines.append(f"Downloads are off ({', '.join(f'{k}=1' for k in flags)}): fetch these on a machine with "
                     f"network access, then point HF_HOME / TORCH_HOME / DPROBE_CACHE at the copies.")
    return "\n".join(lines)
