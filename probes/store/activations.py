"""On-disk activation store: memory-mappable fp16 arrays plus a manifest, committed per sample.

Layout of a store folder::

    manifest.json          what was generated and how (model, revision, sampler, layers, steps,
                           timesteps, prompts, seeds, shapes, dtype, code version); written last
    images.npy             [N, H, W, 3] uint8
    acts/<layer>.npy       [N, S, halves, tokens, channels], fp16 by default
    commits/<index>.json   one marker per committed sample (its prompt, seed, timesteps)
    labels/                the label cache (probes.labels.cache)

Every array is preallocated (sparse) at creation, so a sample is written in place with
``pwrite`` and read back as a slice of a ``np.memmap``: no pickles, no per-sample files to open.
A sample becomes valid only when its marker exists, and markers are written after the data is
synced to disk: a crash mid-batch leaves samples without markers, which a rerun regenerates.
Ranks write disjoint samples into the same files, so shards never race.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class InsufficientDisk(RuntimeError):
    pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def check_disk(path: Path, needed: int, what: str) -> None:
    """Refuse to start work that would fill the disk halfway through."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise InsufficientDisk(
            f"{what} needs {human_bytes(needed)} at {path} but only {human_bytes(free)} is free. "
            f"Capture fewer layers/steps (data.capture.layers / data.capture.steps), use "
            f"data.probe_mode=streaming (no activation cache), or point data.store_dir at a bigger disk.")


class PreallocatedArray:
    """A ``.npy`` file of fixed shape, written row by row in place and read as a memmap."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mm: np.memmap | None = None
        self._fd: int | None = None
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(f)
            self.offset = f.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...], dtype: Any) -> PreallocatedArray:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)  # sparse file
        del mm
        return cls(path)

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]

    def array(self) -> np.memmap:
        """Read-only memmap of the whole array (opened lazily, once per process)."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._mm

    def write_row(self, index: int, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if value.shape != tuple(self.shape[1:]):
            raise ValueError(f"{self.path.name}: row shape {value.shape} != expected {tuple(self.shape[1:])}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        view = memoryview(value).cast("B")
        pos, done = self.offset + index * self.row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], pos + done)

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mm = None

    def __getstate__(self) -> dict:  # DataLoader workers reopen their own map
        state = self.__dict__.copy()
        state["_mm"], state["_fd"] = None, None
        return state


class CommitLog:
    """One marker file per committed row: creation is atomic, and ranks never share a file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.root / f"{index:07d}.json"

    def mark(self, index: int, record: Mapping[str, Any] | None = None) -> None:
        atomic_write_text(self._path(index), json.dumps(dict(record or {}), default=str))

    def done(self) -> set[int]:
        return {int(p.name[:7]) for p in self.root.glob("*.json") if p.name[:7].isdigit()}

    def record(self, index: int) -> dict:
        return json.loads(self._path(index).read_text())


class ActivationStore:
    """Images and per-layer activations of N samples, plus a manifest. See the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no activation store at {self.root} (manifest.json missing)")
        self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"store {self.root} has format {self.manifest.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}; regenerate it into a new store_dir")
        self.images = PreallocatedArray(self.root / "images.npy")
        x0 = self.root / "x0_images.npy"
        #: decoded predicted-x0 images per captured step (``generation.decode_x0``)
        self.x0_images = PreallocatedArray(x0) if x0.exists() else None
        cap = self.manifest["capture"]
        self.acts = {layer["name"]: PreallocatedArray(self.root / "acts" / f"{layer['name']}.npy")
                     for layer in (cap["layers"] if cap.get("store_activations", True) else [])}
        self.commits = CommitLog(self.root / "commits")

    # -- creation --------------------------------------------------------------------------
    @staticmethod
    def layout(manifest: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every array a manifest implies (used for the disk budget too)."""
        n = manifest["num_samples"]
        h, w = manifest["generation"]["height"], manifest["generation"]["width"]
        cap = manifest["capture"]
        out = {"images": ((n, h, w, 3), "uint8")}
        if manifest["generation"].get("decode_x0"):
            out["x0_images"] = ((n, len(manifest["capture"]["steps"]), h, w, 3), "uint8")
        for layer in cap["layers"] if cap.get("store_activations", True) else []:
            t = layer["grid"][0] * layer["grid"][1]
            out[f"acts/{layer['name']}"] = ((n, len(cap["steps"]), len(cap["halves"]), t, layer["channels"]),
                                            cap["dtype"])
        return out

    @classmethod
    def required_bytes(cls, manifest: Mapping[str, Any], num_samples: int | None = None) -> int:
        n = manifest["num_samples"]
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in cls.layout(manifest).values())
        return total if num_samples is None else total * num_samples // max(n, 1)

    @classmethod
    def create(cls, root: str | Path, manifest: dict[str, Any]) -> ActivationStore:
        """Preallocate all arrays; the manifest is written last, so a crash here leaves no store."""
        root = Path(root)
        if (root / "manifest.json").exists():
            raise FileExistsError(f"a store already exists at {root}")
        check_disk(root, cls.required_bytes(manifest), f"the activation store ({manifest['num_samples']} samples)")
        for name, (shape, dtype) in cls.layout(manifest).items():
            PreallocatedArray.create(root / f"{name}.npy", shape, dtype)
        (root / "commits").mkdir(parents=True, exist_ok=True)
        manifest = dict(manifest, format_version=FORMAT_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1, default=str))
        return cls(root)

    # -- state -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def layer_names(self) -> list[str]:
        """Layers whose activations are stored (none in an images-only store of a streaming run)."""
        return list(self.acts)

    def committed(self) -> np.ndarray:
        mask = np.zeros(self.num_samples, bool)
        done = sorted(self.commits.done())
        mask[done] = True
        return mask

    def missing(self, indices: Iterable[int] | None = None) -> list[int]:
        mask = self.committed()
        idx = range(self.num_samples) if indices is None else indices
        return [int(i) for i in idx if not mask[i]]

    # -- writing ---------------------------------------------------------------------------
    def write_batch(self, indices: list[int], images: np.ndarray, acts: Mapping[str, np.ndarray],
                    records: list[dict[str, Any]], x0_images: np.ndarray | None = None) -> None:
        """Write a batch of samples in place, sync, then commit each (markers last)."""
        unknown = set(acts) - set(self.acts)
        if unknown or len(acts) != len(self.acts):
            raise KeyError(f"activations for layers {sorted(acts)} do not match the store's {self.layer_names}")
        if (x0_images is None) != (self.x0_images is None):
            raise ValueError("decoded x0 images must be written exactly when the store has them (generation.decode_x0)")
        for k, i in enumerate(indices):
            self.images.write_row(i, images[k])
            if self.x0_images is not None:
                self.x0_images.write_row(i, x0_images[k])
            for name, arr in acts.items():
                self.acts[name].write_row(i, arr[k])
        self.images.sync()
        if self.x0_images is not None:
            self.x0_images.sync()
        for arr in self.acts.values():
            arr.sync()
        for i, rec in zip(indices, records):
            self.commits.mark(i, rec)

    def close(self) -> None:
        self.images.close()
        if self.x0_images is not None:
            self.x0_images.close()
        for a in self.acts.values():
            a.close()

    # -- reading ---------------------------------------------------------------------------
    def guided_calls(self) -> int:
        """Per-image guided U-Net calls spent on the committed samples (from their commit records)."""
        return sum(int(self.commits.record(i).get("guided_calls", 0)) for i in sorted(self.commits.done()))

    def image(self, index: int) -> np.ndarray:
        return self.images.array()[index]

    def activation(self, layer: str, index: int) -> np.ndarray:
        """``[steps, halves, tokens, channels]`` of one sample: a memmap slice, no copy."""
        if layer not in self.acts:
            raise KeyError(f"layer {layer!r} is not in the store {self.root}; stored: {', '.join(self.layer_names)}")
        return self.acts[layer].array()[index]

    def layer_info(self) -> list[dict[str, Any]]:
        return list(self.manifest["capture"]["layers"])
