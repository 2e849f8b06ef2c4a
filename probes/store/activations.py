"""On-disk activation store: memory-mappable fp16 arrays plus a manifest, committed per sample.

Layout of a store folder::

    manifest.json          what was generated and how (model, revision, sampler, layers, steps,
                           timesteps, prompts, seeds, shapes, dtype, code version); written last
    images.npy             [N, H, W, 3] uint8
    noisy_images.npy       [N, S, H, W, 3] uint8, generation.decode=noisy: the noisy latent x_{t-1}
                           decoded at every captured step (test rows only; x0_images.npy for decode=x0)
    acts/<layer>.npy       [N, S, halves, tokens, channels], fp16 by default
    inputs/latents.npy     [N, S, C, h, w] float32, capture.record_inputs: the U-Net's latent input x_t per step
    inputs/text.npy        [N, halves, L, D] float32, capture.record_inputs: its text embeddings (uncond, cond)
    commits/<index>.json   one marker per committed sample (its prompt, seed, timesteps)
    labels/                the label cache (probes.labels.cache)
    .lock                  taken by a run creating or filling the store (probes.store.locks)

Every array is preallocated (sparse) at creation, so a sample is written in place with
``pwrite`` and read back as a slice of a ``np.memmap``: no pickles, no per-sample files to open.
A sample becomes valid only when its marker exists, and markers are written after the data is
synced to disk: a crash mid-batch leaves samples without markers, which a rerun regenerates.
Ranks write disjoint samples into the same files, so shards never race.

Opening a store validates it (manifest, every array's shape and size, every marker's sample and
prompt), so a damaged or foreign file is named with its fix before any work starts; and a folder
that still holds markers or labels but lost its manifest is never recreated over.

A store whose manifest names ``images_from`` (a replay store, :mod:`probes.replay`: another U-Net run
on this store's recorded inputs) holds activations only: its images, decoded images and labels are
those of the store it names.
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

from probes.common.files import TMP_INFIX, atomic_write_text
from probes.common.hashing import FAST_DIGEST, fast_digest, sha256_json
from probes.diffusion.layers import LayerInfo

FORMAT_VERSION = 1


def decoded_latent(generation: Mapping[str, Any]) -> str:
    """Which latent a store's intermediate images decode (``none``, ``noisy`` or ``x0``), from the
    manifest's ``generation`` section; stores made before ``generation.decode`` say ``decode_x0``."""
    return str(generation.get("decode") or ("x0" if generation.get("decode_x0") else "none"))


def _preallocate(path: Path, shape: tuple[int, ...], dtype: Any) -> None:
    """Write a ``.npy`` header and extend the file to its full size without writing the data (sparse).

    Made under a temporary name (created exclusively) and renamed, so a link planted at ``path``
    is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + TMP_INFIX)
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        del mm
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _publish_if_absent(tmp: Path, path: Path) -> None:
    """Give the complete file ``tmp`` the name ``path`` unless that name exists already.

    ``os.link`` fails atomically when the name is taken, unlike a check followed by a create
    (two processes can both pass the check; the later create truncates the earlier file).
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: the check-then-rename is the best left
        if not path.exists():
            os.replace(tmp, path)


class InsufficientDisk(RuntimeError):
    pass


class CorruptSample(ValueError):
    """A committed sample whose bytes no longer match the checksum recorded when it was written."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def row_digests(row: np.ndarray) -> str | list[str]:
    """The fast checksum of one sample's row: one per captured step for arrays with a step axis (activations
    ``[S, ...]`` and decoded images ``[S, H, W, 3]``), so a damaged row is reported with its step; one for
    the others (the final image ``[H, W, 3]``)."""
    row = np.ascontiguousarray(row)
    if row.ndim >= 4:
        return [fast_digest(step) for step in row]
    return fast_digest(row)


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
            f"data.mode=streaming with ridge probes (no activation cache: configs/sd14/all_streaming.yaml), "
            f"or point data.store_dir at a bigger disk.")


class PreallocatedArray:
    """A ``.npy`` file of fixed shape, written row by row in place and read as a memmap.

    Opening checks the header and the file size, so a truncated file (an interrupted copy, a full
    disk) is reported at once with its name and ``fix``, not as numpy's "mmap length is greater
    than file size" deep inside training.
    """

    def __init__(self, path: Path, fix: str = "restore it from a copy, or delete it and what was made from it") -> None:
        self.path = Path(path)
        self._mm: np.memmap | None = None
        self._fd: int | None = None
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} is missing (deleted, or never written); {fix}")
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                self.shape, _, self.dtype = read(f)
                self.offset = f.tell()
        except ValueError as err:
            raise ValueError(f"{self.path} is not a readable .npy array ({err}): it is damaged or truncated; "
                             f"{fix}") from err
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize
        size, need = self.path.stat().st_size, self.offset + self.nbytes
        if size < need:
            raise ValueError(f"{self.path} is {size} bytes but its header (shape {tuple(self.shape)}, {self.dtype}) "
                             f"needs {need}: the file was truncated (an interrupted copy? a full disk?); {fix}")

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...], dtype: Any, exclusive: bool = False) -> PreallocatedArray:
        """Preallocate a sparse array. ``exclusive``: if another process created ``path`` first, keep
        its file (and what it already wrote) and open that one instead of truncating it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not exclusive:
            _preallocate(path, shape, dtype)
            return cls(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + TMP_INFIX)
        os.close(fd)
        try:
            _preallocate(Path(tmp), shape, dtype)
            _publish_if_absent(Path(tmp), path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return cls(path)

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]

    def array(self) -> np.memmap:
        """Read-only memmap of the whole array (opened lazily, once per process)."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return self._mm

    def write_row(self, index: int, value: np.ndarray) -> str:
        """Write row ``index``; returns the fast checksum of the bytes written (:func:`fast_digest`)."""
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if value.shape != tuple(self.shape[1:]):
            raise ValueError(f"{self.path.name}: row shape {value.shape} != expected {tuple(self.shape[1:])}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        view = memoryview(value).cast("B")
        pos, done = self.offset + index * self.row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], pos + done)
        return row_digests(value)

    def row_digest(self, index: int) -> str | list[str]:
        """The fast checksum(s) of row ``index`` as it is on disk now (:func:`row_digests`)."""
        return row_digests(np.ascontiguousarray(self.array()[index]))

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
    """One marker file per committed row: creation is atomic, and ranks never share a file.

    With ``num_samples`` given, a marker for a row outside ``0..num_samples-1`` (a file copied in
    from a bigger store, a hand-made one) is an error naming it, not an ``IndexError`` later.
    """

    def __init__(self, root: Path, num_samples: int | None = None) -> None:
        self.root = Path(root)
        self.num_samples = num_samples
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.root / f"{index:07d}.json"

    def mark(self, index: int, record: Mapping[str, Any] | None = None) -> None:
        atomic_write_text(self._path(index), json.dumps(dict(record or {}), default=str))

    def done(self) -> set[int]:
        out = {int(p.stem) for p in self.root.glob("*.json") if p.stem.isdigit()}
        bad = sorted(i for i in out if self.num_samples is not None and i >= self.num_samples)
        if bad:
            raise ValueError(f"commit marker {self.root / f'{bad[0]:07d}.json'} is for sample {bad[0]}, but this "
                             f"store holds {self.num_samples} samples (0..{self.num_samples - 1}): the marker does "
                             f"not belong here; delete it" + (f" (and the {len(bad) - 1} others past the end)"
                                                               if len(bad) > 1 else ""))
        return out

    def record(self, index: int) -> dict:
        path = self._path(index)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"commit marker {path} is not valid JSON ({err.msg}); delete it and sample {index} "
                             f"is made again") from err


DAMAGED_MANIFEST_FIX = "restore it from a backup, or delete the store folder {root} to regenerate the store"
MANIFEST_KEYS = ("fingerprint", "request", "generation", "capture", "num_samples")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``; a truncated or edited one is an error naming it and the fix."""
    fix = DAMAGED_MANIFEST_FIX.format(root=path.parent)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): it was "
                         f"truncated or edited; {fix}") from err
    if not isinstance(manifest, dict) or any(k not in manifest for k in MANIFEST_KEYS):
        have = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not a store manifest (needs {', '.join(MANIFEST_KEYS)}; has {have}); {fix}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"store {path.parent} has format {manifest.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}; regenerate it into a new store_dir")
    recorded = manifest.get(MANIFEST_HASH)
    if recorded is not None and recorded != manifest_hash(manifest):
        raise ValueError(f"{path} was edited after the store was made (its content no longer matches the "
                         f"{MANIFEST_HASH} it was written with): an edited manifest relabels the store's rows (e.g. "
                         f"capture.steps) without changing its data; {fix}")
    return manifest


#: the manifest's hash of itself (every other key), written at creation; stores made before it have none
MANIFEST_HASH = "manifest_sha256"


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its own hash, as JSON reads it back (what :func:`read_manifest` checks)."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_HASH}, default=str))
    return sha256_json(body)


def orphaned_data(root: Path) -> list[str]:
    """What of value a store folder holds besides its manifest: commit markers and label caches.

    Preallocated arrays are not listed: without markers none of their rows is valid.
    """
    root = Path(root)
    out = []
    markers = [p for p in (root / "commits").glob("*.json") if p.stem.isdigit()]
    if markers:
        out.append(f"{len(markers)} commit markers ({root / 'commits'})")
    labels = root / "labels"
    if labels.is_dir() and any(p.is_file() for p in labels.rglob("*")):
        out.append(f"label caches ({labels})")
    return out


def refuse_orphaned_data(root: Path) -> None:
    """Refuse to create a store over the markers and labels of one whose manifest was lost.

    A new store there would zero the images and activations while the old markers still say
    "committed", so nothing would be regenerated and every metric would be computed on zeros.
    """
    found = orphaned_data(root)
    if found and not (Path(root) / "manifest.json").exists():
        raise FileExistsError(
            f"{root} holds {' and '.join(found)} but no manifest.json: the store's manifest was deleted or "
            f"lost, and a new store over it would pair the old markers and labels with zeroed data. Restore "
            f"{Path(root) / 'manifest.json'} (from a backup, or wherever it was moved), or delete the folder {root} "
            f"to regenerate the whole store.")


class ActivationStore:
    """Images and per-layer activations of N samples, plus a manifest. See the module docstring."""

    def __init__(self, root: str | Path) -> None:
        """Open and validate a store: its manifest, every array's shape and size, every commit marker.

        Validating here, once, turns a damaged file into an error that names it and says what to
        do, instead of a numpy or JSON error (or a wrong image) after hours of training.
        """
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no activation store at {self.root} (manifest.json missing)")
        self.manifest: dict[str, Any] = read_manifest(mpath)
        layout = self.layout(self.manifest)
        #: the store whose images (and labels) this one shares, for a replay store; else None
        self.source: ActivationStore | None = None
        if self.manifest.get("images_from"):
            self.source = ActivationStore(self.manifest["images_from"])
            self.images, self.decoded = self.source.images, self.source.decoded
            self.decoded_images = self.source.decoded_images
        else:
            self.images = self._open_array("images", layout)
            #: which latent the intermediate images decode: ``none``, ``noisy`` (x_{t-1}) or ``x0``
            self.decoded = decoded_latent(self.manifest["generation"])
            #: the intermediate images per captured step (``generation.decode``; test rows only)
            name = f"{self.decoded}_images"
            self.decoded_images = self._open_array(name, layout) if name in layout else None
        self.acts = {name[len("acts/"):]: self._open_array(name, layout) for name in layout if name.startswith("acts/")}
        #: the denoiser's recorded inputs (``capture.record_inputs``): ``latents`` and ``text``
        self.inputs = {name[len("inputs/"):]: self._open_array(name, layout) for name in layout
                       if name.startswith("inputs/")}
        self.commits = CommitLog(self.root / "commits", self.num_samples)
        self._check_commits()

    def _open_array(self, name: str, layout: Mapping[str, tuple[tuple[int, ...], str]]) -> PreallocatedArray:
        """One array of the store, checked against the shape and dtype the manifest implies."""
        path, fix = self.root / f"{name}.npy", f"restore it, or delete the store folder {self.root} to regenerate it"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing, but the store's manifest lists it; {fix}")
        arr = PreallocatedArray(path, fix=fix)
        shape, dtype = layout[name]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            raise ValueError(f"{path} holds {tuple(arr.shape)} {np.dtype(arr.dtype)}, but the manifest says "
                             f"{tuple(shape)} {np.dtype(dtype)}: it comes from another store; {fix}")
        return arr

    def _check_commits(self) -> None:
        """Each marker must be for a sample of this store and record that sample's prompt and seed.

        The records are kept (their checksums are what :meth:`check_rows` compares a sample against)."""
        prompts = self.manifest.get("prompts") or []
        self._records: dict[int, dict] = {}
        self._verified: set[tuple[str, int]] = set()
        for i in sorted(self.commits.done()):
            rec = self._records[i] = self.commits.record(i)
            want = prompts[i] if i < len(prompts) else {}
            if any(k in rec and k in want and rec[k] != want[k] for k in ("prompt", "seed")):
                raise ValueError(
                    f"commit marker {self.commits._path(i)} records prompt {rec.get('prompt')!r}, seed "
                    f"{rec.get('seed')}, but the manifest's sample {i} is {want.get('prompt')!r}, seed "
                    f"{want.get('seed')}: the marker (and maybe the data) came from another store; delete the "
                    f"marker and sample {i} is generated again")

    # -- creation --------------------------------------------------------------------------
    @staticmethod
    def layout(manifest: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every array a manifest implies (used for the disk budget too)."""
        n = manifest["num_samples"]
        h, w = manifest["generation"]["height"], manifest["generation"]["width"]
        cap = manifest["capture"]
        out = {}
        if not manifest.get("images_from"):   # a replay store reads its source's images
            out["images"] = ((n, h, w, 3), "uint8")
            decoded = decoded_latent(manifest["generation"])
            if decoded != "none":   # the file is named after its latent: noisy_images.npy, x0_images.npy
                out[f"{decoded}_images"] = ((n, len(manifest["capture"]["steps"]), h, w, 3), "uint8")
            if cap.get("inputs"):
                out["inputs/latents"] = ((n, len(cap["steps"]), *cap["inputs"]["latent_shape"]), "float32")
                out["inputs/text"] = ((n, *cap["inputs"]["text_shape"]), "float32")
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
        """Preallocate all arrays; the manifest is written last, so a crash here leaves no store.

        Refuses a folder that holds commit markers or labels but no manifest (see
        :func:`refuse_orphaned_data`); preallocated arrays alone are a crashed creation and are redone.
        """
        root = Path(root)
        if (root / "manifest.json").exists():
            raise FileExistsError(f"a store already exists at {root}")
        refuse_orphaned_data(root)
        check_disk(root, cls.required_bytes(manifest), f"the activation store ({manifest['num_samples']} samples)")
        for name, (shape, dtype) in cls.layout(manifest).items():
            PreallocatedArray.create(root / f"{name}.npy", shape, dtype)
        (root / "commits").mkdir(parents=True, exist_ok=True)
        manifest = dict(manifest, format_version=FORMAT_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        manifest[MANIFEST_HASH] = manifest_hash(manifest)
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1, default=str))
        return cls(root)

    # -- state -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def layers(self) -> list[LayerInfo]:
        """The captured layers as the manifest resolved them (``probes.store.manifest.resolve_capture``):
        the one list generation, datasets and probes read, also for a streaming store (no arrays)."""
        return [LayerInfo.from_dict(d) for d in self.manifest["capture"]["layers"]]

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
    def write_batch(self, indices: list[int], images: np.ndarray | None, acts: Mapping[str, np.ndarray],
                    records: list[dict[str, Any]], decoded_images: np.ndarray | None = None,
                    decoded_indices: list[int] | None = None, inputs: Mapping[str, np.ndarray] | None = None) -> None:
        """Write a batch of samples in place, sync, then commit each (markers last).

        ``decoded_images`` rows belong to ``decoded_indices`` (default: all of ``indices``): only the
        test split's intermediate images are decoded, the other rows of the array stay unwritten.
        ``inputs`` (``latents``, ``text``) are written exactly when the store records them; a replay
        store (``images_from``) takes no images.
        """
        unknown = set(acts) - set(self.acts)
        if unknown or len(acts) != len(self.acts):
            raise KeyError(f"activations for layers {sorted(acts)} do not match the store's {self.layer_names}")
        if (images is None) != (self.source is not None):
            raise ValueError("images are written exactly when the store holds its own (a replay store reads its "
                             "source's)")
        want = set(self.inputs)
        if set(inputs or {}) - {"timesteps"} != want:
            raise ValueError(f"the store records the denoiser's inputs {sorted(want) or 'not at all'}; the batch "
                             f"brings {sorted(set(inputs or {}) - {'timesteps'}) or 'none'} (data.capture.record_inputs)")
        if (decoded_images is None) != (self.decoded_images is None or self.source is not None):
            raise ValueError(f"decoded intermediate images must be written exactly when the store has them "
                             f"(this store: generation.decode={self.decoded})")
        sums: dict[int, dict[str, str]] = {int(i): {} for i in indices}
        for name in want:
            for k, i in enumerate(indices):
                sums[int(i)][f"inputs/{name}"] = self.inputs[name].write_row(
                    i, np.asarray(inputs[name][k], dtype=np.float32))
        if decoded_images is not None:
            rows = list(indices) if decoded_indices is None else list(decoded_indices)
            if len(decoded_images) != len(rows):
                raise ValueError(f"{len(decoded_images)} decoded {self.decoded} images for {len(rows)} samples")
            for k, i in enumerate(rows):
                sums.setdefault(int(i), {})[f"{self.decoded}_images"] = self.decoded_images.write_row(i, decoded_images[k])
        for k, i in enumerate(indices):
            if images is not None:
                sums[int(i)]["images"] = self.images.write_row(i, images[k])
            for name, arr in acts.items():
                sums[int(i)][f"acts/{name}"] = self.acts[name].write_row(i, arr[k])
        if self.source is None:
            self.images.sync()
            if self.decoded_images is not None:
                self.decoded_images.sync()
        for arr in [*self.acts.values(), *self.inputs.values()]:
            arr.sync()
        for i, rec in zip(indices, records):
            rec = dict(rec, checksums={"algorithm": FAST_DIGEST, **sums[int(i)]})
            self.commits.mark(i, rec)
            self._records[int(i)] = rec
            self._verified -= {(name, int(i)) for name in sums[int(i)]}

    def close(self) -> None:
        if self.source is None:
            self.images.close()
            if self.decoded_images is not None:
                self.decoded_images.close()
        for a in [*self.acts.values(), *self.inputs.values()]:
            a.close()

    # -- reading ---------------------------------------------------------------------------
    def guided_calls(self) -> int:
        """Per-image guided U-Net calls spent on the committed samples (from their commit records)."""
        return sum(int(self.commits.record(i).get("guided_calls", 0)) for i in sorted(self.commits.done()))

    def image(self, index: int) -> np.ndarray:
        self.check_rows("images", [index])
        return self.images.array()[index]

    def activation(self, layer: str, index: int) -> np.ndarray:
        """``[steps, halves, tokens, channels]`` of one sample: a memmap slice, no copy."""
        if layer not in self.acts:
            raise KeyError(f"layer {layer!r} is not in the store {self.root}; stored: {', '.join(self.layer_names)}")
        self.check_rows(f"acts/{layer}", [index])
        return self.acts[layer].array()[index]

    # -- integrity -------------------------------------------------------------------------
    def array_named(self, name: str) -> PreallocatedArray:
        """The array ``images``, ``acts/<layer>`` or ``<latent>_images`` (the names checksums are kept under)."""
        if name == "images":
            return self.images
        if name.startswith("acts/"):
            return self.acts[name[len("acts/"):]]
        if name.startswith("inputs/"):
            return self.inputs[name[len("inputs/"):]]
        if self.decoded_images is not None and name == f"{self.decoded}_images":
            return self.decoded_images
        raise KeyError(f"the store {self.root} has no array {name!r}")

    def check_rows(self, name: str, rows: Iterable[int]) -> None:
        """Compare the committed samples ``rows`` of array ``name`` with the checksums their markers recorded
        (each (array, sample) once per process: a sample is checked when it is first read).

        One flipped byte in an array would otherwise move metrics with no error. Markers written before
        checksums were recorded carry none: those samples are read unchecked. Cost: one XXH3 pass over
        the bytes read (~10 GB/s), once per sample and process.
        """
        arr = None
        for i in (int(r) for r in rows):
            if (name, i) in self._verified:
                continue
            sums = (self._records.get(i) or {}).get("checksums") or {}
            want = sums.get(name) if sums.get("algorithm") == FAST_DIGEST else None
            if want is not None:
                arr = arr or self.array_named(name)
                got = arr.row_digest(i)
                if got != want:
                    at = ""
                    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
                        steps = self.manifest["capture"]["steps"]
                        bad = [steps[s] if s < len(steps) else s for s, (a, b) in enumerate(zip(got, want)) if a != b]
                        at = f" at step {bad[0]}" if len(bad) == 1 else f" at steps {', '.join(map(str, bad))}"
                    raise CorruptSample(
                        f"{arr.path}: sample {i}{at} does not match the checksum its commit marker "
                        f"{self.commits._path(i)} recorded when it was written: the file changed since (a flipped "
                        f"bit on the disk, an interrupted copy, an edit). Restore the file, delete that marker (sample "
                        f"{i} is generated again), or delete the store folder {self.root} to regenerate it all", i)
            self._verified.add((name, i))

    def verify(self) -> int:
        """Check every committed sample of every array against its recorded checksum; returns how many
        (array, sample) pairs carried one. Raises on the first mismatch (:meth:`check_rows`)."""
        checked = 0
        for i, rec in sorted(self._records.items()):
            for name in (rec.get("checksums") or {}):
                if name != "algorithm":
                    self.check_rows(name, [i])
                    checked += 1
        return checked

