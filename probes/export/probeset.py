"""Export and reload probes: safetensors weights plus JSON metadata, usable without this trainer.

``<dir>/probes.safetensors`` holds one ``[C, out]`` weight per probe under
``<task>/<layer>/step_<k>/weight`` (and ``.../bias`` when present); ``<dir>/probes.json`` holds,
per probe, its task, layer, step, scheduler timestep, channels, token grid, target normalisation
and metrics, plus the model id and revision, the data config and the code version. A later
analysis (evaluation, intervention) loads a probe with :func:`load_probes` and applies it to
activations of the same layer and step.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from probes.common.files import atomic_write_bytes, atomic_write_text, output_dir, read_json_object
from probes.common.version import code_version
from probes.contract import ProbeSpec
from probes.diffusion.layers import LayerInfo
from probes.tasks import get_task
from probes.training.heads import apply_probe, layer_key, to_label_units, token_map

FORMAT = "diffusion-probes/v1"
#: what every probe entry of ``probes.json`` holds
ENTRY_KEYS = ("key", "task", "kind", "layer", "step", "timestep", "channels", "token_grid", "label_size",
              "target_norm", "threshold", "metrics")
KINDS = ("binary", "regression")
#: how binary probes can have been fitted, and how this package's modules fit them
FIT_LOSSES = ("cross_entropy", "squared")
MODULE_FIT_LOSS = {"probes.training.module.ProbeModule": "cross_entropy",
                   "probes.training.ridge.RidgeProbeModule": "squared",
                   "probes.training.mean_difference.MeanDifferenceProbeModule": "squared"}
WEIGHTS, META, CARD = "probes.safetensors", "probes.json", "README.md"
EXPORT_HINT = "a run writes its export to <run>/probes/: `python train.py fit --config <run>/config.yaml` makes it anew"


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def probe_key(task: str, layer: str, step: int) -> str:
    return f"{task}/{layer}/step_{step:02d}"


@dataclass(frozen=True)
class ProbeExport:
    """An export in memory: the tensors of ``probes.safetensors`` and the metadata of ``probes.json``.

    Built by :func:`build_export` (a stage: it reads the trained module) and written by
    :func:`write_export` (the run's outputs callback only writes it)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def module_path(module: Any) -> str:
    """The import path of ``module``'s class (``probes.training.ridge.RidgeProbeModule``): recorded in
    the export, so that :func:`module_from_export` rebuilds the kind of module that trained the probes."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def build_export(module, extra: dict[str, Any] | None = None) -> ProbeExport:
    """Every probe of ``module`` (a trained ``ProbeModule``) with its metadata, in memory."""
    spec: ProbeSpec = module.spec
    metrics: dict[tuple[str, str, int], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for split, rows in module.results.items():
        for r in rows:
            metrics[(r["task"], r["layer"], r["step"])][split][r["metric"]] = r["value"]
    tensors: dict[str, Tensor] = {}
    entries = []
    for t, bank in module.banks.items():
        task = get_task(t)
        for layer in spec.layers:
            w = bank.weight[layer_key(layer.name)].detach().cpu()
            b = bank.bias[layer_key(layer.name)].detach().cpu() if bank.bias is not None else None
            for si, step in enumerate(spec.steps):
                key = probe_key(t, layer.name, step)
                tensors[f"{key}/weight"] = w[si].contiguous()
                if b is not None:
                    tensors[f"{key}/bias"] = b[si].contiguous()
                entries.append({
                    "key": key, "task": t, "kind": task.kind, "layer": layer.name, "module": layer.module,
                    "step": step, "timestep": spec.timesteps[si], "channels": layer.channels,
                    "token_grid": list(layer.grid), "out_dim": task.out_dim, "bias": b is not None,
                    "label_size": list(spec.label_size),
                    "target_norm": spec.target_stats.get(t) if task.kind == "regression" else None,
                    "threshold": module.hparams.threshold if task.kind == "binary" else None,
                    "metrics": {s: dict(v) for s, v in metrics.get((t, layer.name, step), {}).items()},
                })
    meta = {"format": FORMAT, "code_version": code_version(), "model": spec.model,
            "module_class": module_path(module), "hparams": dict(module.hparams), "spec": spec.to_dict(),
            "probes": entries, "binary_fit_loss": getattr(module, "binary_fit_loss", "cross_entropy"), **(extra or {})}
    return ProbeExport(tensors, meta)


def write_export(export: ProbeExport, out_dir: str | Path) -> Path:
    """Write ``export`` as ``probes.safetensors`` + ``probes.json`` into ``out_dir``.

    Each file is written atomically and never through a link (:mod:`probes.common.files`); the
    metadata, written last, records the weights' sha256, so weights that do not belong to it (a
    kill between the two renames, a file swapped or damaged later) are refused when loaded.
    """
    out = output_dir(out_dir)
    weights = save(export.tensors, metadata={"format": FORMAT})
    atomic_write_bytes(out / WEIGHTS, weights)
    meta = dict(export.meta, weights_sha256=hashlib.sha256(weights).hexdigest())
    # the spec's mappings are frozen (MappingProxyType): written as JSON objects, not as their str()
    atomic_write_text(out / META, json.dumps(meta, indent=1,
                                             default=lambda o: dict(o) if isinstance(o, Mapping) else str(o)))
    return out


def export_probes(module, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write every probe of ``module`` (a trained ``ProbeModule``) with its metadata."""
    return write_export(build_export(module, extra), out_dir)


@dataclass
class ProbeInfo:
    key: str
    task: str
    kind: str
    layer: str
    step: int
    timestep: float
    channels: int
    token_grid: tuple[int, int]
    label_size: tuple[int, int]
    target_norm: dict[str, float] | None
    threshold: float | None
    metrics: dict[str, dict[str, float]]


class LinearProbe(nn.Module):
    """One exported probe: token activations ``[B, T, C]`` of its layer and step -> label map."""

    def __init__(self, info: ProbeInfo, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.info = info
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _check(self, acts: Tensor) -> None:
        t = self.info.token_grid[0] * self.info.token_grid[1]
        if acts.ndim != 3 or acts.shape[1:] != (t, self.info.channels):
            raise ValueError(
                f"probe {self.info.key} expects activations [batch, {t}, {self.info.channels}] "
                f"(layer {self.info.layer}: {self.info.token_grid[0]}x{self.info.token_grid[1]} tokens, "
                f"{self.info.channels} channels), got {tuple(acts.shape)}")

    def forward(self, acts: Tensor) -> Tensor:
        """Raw output upsampled (nearest) to the label size: ``[B, out, H, W]`` (logits or z-units)."""
        self._check(acts)
        return token_map(apply_probe(acts, self.weight, self.bias), self.info.token_grid, self.info.label_size)

    @torch.no_grad()
    def predict(self, acts: Tensor) -> Tensor:
        """The label map in label units: a bool mask (binary tasks) or de-normalised values."""
        return to_label_units(self(acts), self.info.kind, self.info.target_norm)


class ProbeSet:
    """All probes of an export, addressable by (task, layer, step).

    Shared the way models are: :meth:`save_pretrained` writes the export (and a model card) into a
    folder, :meth:`push_to_hub` uploads that folder to a Hugging Face Hub repository, and
    :meth:`from_pretrained` reads a folder or a Hub repository id (through ``huggingface_hub``'s
    cache). The files are the export's own, so :func:`load_probes` reads all three the same way.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / META).exists() or not (self.path / WEIGHTS).exists():
            raise FileNotFoundError(f"{self.path} is not a probe export (needs {META} and {WEIGHTS})")
        self.meta = self._read_meta(self.path / META)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: unknown export format {self.meta.get('format')!r}; expected {FORMAT}")
        self.tensors = self._read_weights(self.path / WEIGHTS, self.meta.get("weights_sha256"))
        entries = self.meta.get("probes")
        if not isinstance(entries, list):
            raise ValueError(f"{self.path / META} has no 'probes' list (it has {sorted(self.meta)}): it is damaged or "
                             f"not a probe export; {EXPORT_HINT}")
        self.infos = {}
        for e in entries:
            info = self._check_entry(e)
            self.infos[(info.task, info.layer, info.step)] = info
        self._check_fit_loss()

    def _check_entry(self, e: Any) -> ProbeInfo:
        """One probe's metadata and tensors, checked before any use: everything that would otherwise fail
        deep inside torch (``mat1 and mat2 shapes``), or silently give wrong maps (NaN weights, a binary
        probe read as a regression), is named here with the file, the probe and the fix."""
        meta, weights = self.path / META, self.path / WEIGHTS
        fix = f"the export is damaged or was edited; copy it again, or re-export it ({EXPORT_HINT})"
        if not isinstance(e, dict) or any(k not in e for k in ENTRY_KEYS):
            missing = [k for k in ENTRY_KEYS if not isinstance(e, dict) or k not in e]
            raise ValueError(f"{meta}: probe entry {str(e)[:60]!r} lacks {missing}; {fix}")
        key, kind = e["key"], e["kind"]
        if kind not in KINDS:
            raise ValueError(f"{meta}: probe {key} has kind {kind!r}; a probe is one of {KINDS}; {fix}")
        try:
            task_kind = get_task(e["task"]).kind
        except KeyError:
            task_kind = None    # a plug-in's task that is not imported: its kind is checked by the shapes below
        if task_kind is not None and task_kind != kind:
            raise ValueError(f"{meta}: probe {key} of task {e['task']!r} says kind {kind!r}, but {e['task']} is a "
                             f"{task_kind} task: its outputs would be read the wrong way; {fix}")
        out_dim = 2 if kind == "binary" else 1
        if int(e.get("out_dim", out_dim)) != out_dim:
            raise ValueError(f"{meta}: probe {key} says kind {kind!r} (out_dim {out_dim}) but out_dim "
                             f"{e.get('out_dim')}; {fix}")
        norm, threshold = e["target_norm"], e["threshold"]
        if kind == "regression" and norm is not None and not (
                isinstance(norm, dict) and all(_finite_number(norm.get(k)) for k in ("mean", "std")) and norm["std"] > 0):
            raise ValueError(f"{meta}: regression probe {key} has target_norm {norm!r}; it needs a finite mean and a "
                             f"std > 0; {fix}")
        if kind == "binary" and (norm is not None or not _finite_number(threshold)):
            raise ValueError(f"{meta}: binary probe {key} has target_norm {norm!r} and threshold {threshold!r}; a "
                             f"binary probe has no target_norm and a finite threshold; {fix}")
        channels = int(e["channels"])
        layer = self._layers().get(e["layer"])
        if layer is not None and (layer.channels, tuple(layer.grid)) != (channels, tuple(e["token_grid"])):
            raise ValueError(f"{meta}: probe {key} says layer {e['layer']} has {channels} channels on a "
                             f"{tuple(e['token_grid'])} grid; the export's spec says {layer.channels} on "
                             f"{tuple(layer.grid)}; {fix}")
        for name, shape in (("weight", (channels, out_dim)), ("bias", (out_dim,))):
            t = self.tensors.get(f"{key}/{name}")
            if t is None:
                if name == "weight" or e.get("bias"):
                    raise ValueError(f"{weights} has no tensor {key}/{name}, which {meta} lists; {fix}")
                continue
            if not t.is_floating_point():
                raise ValueError(f"{weights}: {key}/{name} is {t.dtype}; probe tensors are floating point; {fix}")
            if tuple(t.shape) != shape:
                hint = " (transposed)" if tuple(t.shape) == shape[::-1] and len(shape) == 2 else ""
                raise ValueError(f"{weights}: {key}/{name} has shape {tuple(t.shape)}{hint}; layer {e['layer']} has "
                                 f"{channels} channels and a {kind} probe {out_dim} output(s), so it must be {shape}; "
                                 f"{fix}")
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{weights}: {key}/{name} is not finite ({bad} NaN/inf values): these probes diverged "
                                 f"or the file is damaged, and would give NaN maps and metrics; retrain (or re-export) "
                                 f"them")
        return ProbeInfo(key=key, task=e["task"], kind=kind, layer=e["layer"], step=int(e["step"]),
                         timestep=e["timestep"], channels=channels, token_grid=tuple(e["token_grid"]),
                         label_size=tuple(e["label_size"]), target_norm=norm, threshold=threshold,
                         metrics=e["metrics"])

    def _layers(self) -> dict[str, Any]:
        spec = self.meta.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
            return {}
        try:
            return {d["name"]: LayerInfo.from_dict(d) for d in spec["layers"]}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.path / META}: the spec's layers are damaged ({err}); {EXPORT_HINT}") from err

    def _check_fit_loss(self) -> None:
        """The recorded binary fit loss must be one the editor knows, and the one the recorded module fits with."""
        loss = self.binary_fit_loss
        if loss not in FIT_LOSSES:
            raise ValueError(f"{self.path / META}: binary_fit_loss {loss!r} is not one of {FIT_LOSSES}; {EXPORT_HINT}")
        cls = str(self.meta.get("module_class") or "")
        expected = MODULE_FIT_LOSS.get(cls)
        if expected is not None and loss != expected:
            raise ValueError(f"{self.path / META}: binary_fit_loss {loss!r}, but its module {cls.rsplit('.', 1)[-1]} "
                             f"fits binary probes with {expected!r}: the file was edited; {EXPORT_HINT}")

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        """The export's metadata; a truncated file is named (not a bare ``JSONDecodeError``)."""
        return read_json_object(path, "probe metadata", f"copy the export again, or re-export it ({EXPORT_HINT})")

    @staticmethod
    def _read_weights(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
        """The export's weights; a damaged file is named (not safetensors' bare "header too small"), and
        one whose sha256 is not the one the metadata recorded (exports since it is recorded) is refused."""
        try:
            data = path.read_bytes()
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError(f"{path} has sha256 {hashlib.sha256(data).hexdigest()[:16]}..., but "
                                 f"{path.parent / META} records {str(sha256)[:16]}...: these weights are not the "
                                 f"exported ones (a file swapped, damaged, or a write interrupted); copy the export "
                                 f"again, or re-export it ({EXPORT_HINT})")
            return load(data)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}): it is damaged or truncated; "
                             f"copy the export again, or re-export it ({EXPORT_HINT})") from err

    @property
    def spec(self) -> ProbeSpec:
        return ProbeSpec.from_dict(self.meta["spec"])

    @property
    def binary_fit_loss(self) -> str:
        """How the binary probes were fitted: ``cross_entropy`` (SGD, the reference) or ``squared``
        (least squares on ±1: ridge, mean difference). Exports older than this field are told
        apart by their module class."""
        if "binary_fit_loss" in self.meta:
            return str(self.meta["binary_fit_loss"])
        path = str(self.meta.get("hparams", {}).get("_class_path", ""))
        return "squared" if path.endswith(("RidgeProbeModule", "MeanDifferenceProbeModule")) else "cross_entropy"

    def get(self, task: str, layer: str, step: int) -> LinearProbe:
        key = (task, layer, int(step))
        if key not in self.infos:
            tasks = sorted({k[0] for k in self.infos})
            layers = sorted({k[1] for k in self.infos})
            steps = sorted({k[2] for k in self.infos})
            raise KeyError(f"no probe for task={task!r}, layer={layer!r}, step={step}; this export has tasks "
                           f"{tasks}, layers {layers}, steps {steps}")
        info = self.infos[key]
        return LinearProbe(info, self.tensors[f"{info.key}/weight"], self.tensors.get(f"{info.key}/bias"))

    @property
    def tasks(self) -> list[str]:
        return sorted({k[0] for k in self.infos})

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(k[1] for k in self.infos))

    @property
    def steps(self) -> list[int]:
        return sorted({k[2] for k in self.infos})

    def __repr__(self) -> str:
        return f"ProbeSet(tasks={self.tasks}, layers={len(self.layers)}, steps={len(self.steps)})"

    # -- sharing ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write this export into ``save_directory`` (``probes.safetensors``, ``probes.json`` and a
        ``README.md`` model card, kept if one is there), readable by :meth:`from_pretrained` and
        :func:`load_probes`."""
        meta = {k: v for k, v in self.meta.items() if k != "weights_sha256"}
        out = write_export(ProbeExport(dict(self.tensors), meta), save_directory)
        if not (out / CARD).exists():
            atomic_write_text(out / CARD, self._model_card())
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None,
                        cache_dir: str | Path | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> ProbeSet:
        """A local export folder, or a Hub repository id (``user/probes``) fetched with
        ``huggingface_hub.snapshot_download`` into its cache (offline: ``HF_HUB_OFFLINE=1`` or
        ``local_files_only`` read that cache only)."""
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return cls(path)
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError

        name = str(name_or_path)
        try:
            folder = huggingface_hub.snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                                       local_files_only=local_files_only,
                                                       allow_patterns=[META, WEIGHTS, CARD])
        except HFValidationError as err:
            raise FileNotFoundError(f"probes {name!r}: no such folder, and not a Hub repository id (user/name): "
                                    f"{err}") from err
        except Exception as err:     # network, missing repo or revision, nothing cached offline: all say so
            raise FileNotFoundError(f"probes {name!r}: no such folder, and the Hub repository could not be read "
                                    f"({type(err).__name__}: {err}); check the id and revision, or log in "
                                    f"(`hf auth login`) for a private one") from err
        return cls(folder)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, revision: str | None = None) -> Any:
        """Create ``repo_id`` on the Hub if needed and upload :meth:`save_pretrained`'s files in one
        commit; returns ``huggingface_hub``'s ``CommitInfo``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "probes")
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     commit_message=commit_message or f"Upload {self!r}")

    def _model_card(self) -> str:
        model = self.meta.get("model") or {}
        base = model.get("model_id") if isinstance(model, dict) else None
        lines = ["---", "library_name: diffusion-probes", "tags:", "- linear-probes", "- diffusion"]
        if base and not (isinstance(model, dict) and model.get("is_random")):
            lines.append(f"base_model: {base}")
        lines += ["---", "", "# Linear probes of a diffusion model's activations", "",
                  f"`{self!r}`: tasks {', '.join(self.tasks)}; layers {', '.join(self.layers)}; steps "
                  f"{', '.join(map(str, self.steps))}.", "",
                  "```python", "from probes.export.probeset import ProbeSet",
                  "probes = ProbeSet.from_pretrained(\"<this repository>\")",
                  "probe = probes.get(task, layer, step)   # .predict(acts) -> label map", "```", ""]
        return "\n".join(lines)

    def __iter__(self) -> Iterator[LinearProbe]:
        for task, layer, step in self.infos:
            yield self.get(task, layer, step)

    def __len__(self) -> int:
        return len(self.infos)


def load_probes(path: str | Path) -> ProbeSet:
    """Reload an export (see module docstring)."""
    return ProbeSet(path)
