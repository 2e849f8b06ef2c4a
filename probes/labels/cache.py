"""Label cache beside the activation store: each labeler runs once per image, ever.

``<store>/labels/<task>/<labeler fingerprint>/labels.npy`` holds ``[N, H, W]`` float32 maps,
committed per batch like the store itself, so another task's run, a rerun, or an interrupted
run never recomputes a label. The fingerprint covers the labeler's name, version and arguments.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from probes.common.files import atomic_write_text
from probes.common.progress import progress_bar
from probes.labels.base import Labeler
from probes.store.activations import ActivationStore, CommitLog, PreallocatedArray, check_disk


class LabelCache:
    """Labels of the final images (``source="images"``, ``[N, H, W]``) or of the intermediate
    images decoded at every captured step (``source="decoded"``, ``[N, S, H, W]``).

    Decoded labels are filed under the latent the store decodes (``noisy_labels.npy`` or
    ``x0_labels.npy``), so labels of one kind are never read as the other's.
    """

    def __init__(self, store: ActivationStore, task: str, labeler: Labeler, source: str = "images") -> None:
        if source not in ("images", "decoded"):
            raise ValueError(f"label source must be 'images' or 'decoded', got {source!r}")
        if source == "decoded" and store.decoded_images is None:
            raise ValueError(f"the store at {store.root} has no decoded intermediate images: generate with "
                             f"generation.decode=noisy (the replication's baseline) or x0")
        self.store, self.task, self.labeler, self.source = store, task, labeler, source
        self.root = store.root / "labels" / task / labeler.fingerprint()
        n = store.num_samples
        h, w = store.manifest["generation"]["height"], store.manifest["generation"]["width"]
        self.shape = (n, h, w) if source == "images" else (n, len(store.manifest["capture"]["steps"]), h, w)
        self._prefix = "" if source == "images" else f"{store.decoded}_"
        self._array: PreallocatedArray | None = None
        self._loaded_on: str | None = None
        self.commits = CommitLog(self.root / f"{self._prefix}commits", n) if self.root.exists() else None

    def _open(self, create: bool) -> PreallocatedArray:
        """The label array, created on first use.

        Creation is exclusive: two runs labelling the same store at once may both find no array,
        and the later one must not truncate the labels the earlier one has committed meanwhile.
        """
        if self._array is None:
            path, fix = self.path, f"delete the folder {self.root} and these labels are computed again"
            if not path.exists():
                done = self.commits.done() if self.commits is not None else set()
                if done:   # markers without their array: the array was deleted, so the markers lie
                    raise FileNotFoundError(
                        f"{path} is missing, but {len(done)} commit markers in {self.commits.root} say its labels "
                        f"were computed: the label array was deleted (or moved). Delete the folder {self.root} and "
                        f"rerun: the {self.task} labels are computed again")
                if not create:
                    raise FileNotFoundError(f"labels for task {self.task!r} were never computed at {self.root}: run "
                                            f"the labelling stage (the next train/evaluate run does it)")
                check_disk(self.root, int(np.prod(self.shape)) * 4, f"labels for {self.task}")
                PreallocatedArray.create(path, self.shape, np.float32, exclusive=True)
                atomic_write_text(self.root / "labeler.json", json.dumps(self.labeler.describe(), indent=1))
            array = PreallocatedArray(path, fix=fix)
            if tuple(array.shape) != self.shape:
                raise ValueError(f"{path} holds labels of shape {tuple(array.shape)}, the store needs {self.shape}; {fix}")
            self._array = array
            self.commits = CommitLog(self.root / f"{self._prefix}commits", self.store.num_samples)
        return self._array

    def missing(self, indices: Sequence[int]) -> list[int]:
        done = self.commits.done() if self.commits is not None else set()
        return [int(i) for i in indices if int(i) not in done]

    def ensure(self, indices: Sequence[int], device: str = "cpu", progress: bool = True) -> int:
        """Label the images among ``indices`` that have no cached label yet; returns how many."""
        todo = self.missing(indices)
        if not todo:
            return 0
        arr = self._open(create=True)
        if self._loaded_on != device:  # load weights once, not per batch of a streaming run
            self.labeler.load(device)
            self._loaded_on = device
        self.labeler.bind(self.store)
        images = (self.store.images if self.source == "images" else self.store.decoded_images).array()
        per = 1 if self.source == "images" else self.shape[1]        # labeler images per sample
        bs = max(1, int(getattr(self.labeler, "batch_size", 8)) // per)
        what = "" if self.source == "images" else f" on decoded {self.store.decoded} images"
        bar = progress_bar(len(todo), f"labels: {self.task} ({self.labeler.name}){what}", "img", progress)
        for k in range(0, len(todo), bs):
            idx = np.asarray(todo[k:k + bs])
            self.store.check_rows("images" if self.source == "images" else f"{self.store.decoded}_images", idx)
            batch = np.ascontiguousarray(images[idx]).reshape(-1, *images.shape[-3:])
            labels = np.asarray(self.labeler(batch, np.repeat(idx, per)), dtype=np.float32)
            if per > 1:  # back to [samples, steps, H, W]
                labels = labels.reshape(len(idx), per, *labels.shape[1:])
            if labels.shape != (len(idx), *self.shape[1:]):
                raise ValueError(f"labeler {self.labeler.name!r} returned {labels.shape}; expected "
                                 f"{(len(idx), *self.shape[1:])} (one [H, W] map per image)")
            if not np.isfinite(labels).all():
                raise ValueError(f"labeler {self.labeler.name!r} returned non-finite values for images {idx.tolist()}")
            for i, lab in zip(idx, labels):
                arr.write_row(int(i), lab)
            arr.sync()
            for i in idx:
                self.commits.mark(int(i))  # type: ignore[union-attr]
            bar.update(len(idx))
        bar.close()
        return len(todo)

    def array(self) -> np.memmap:
        return self._open(create=False).array()

    @property
    def path(self) -> Path:
        return self.root / f"{self._prefix}labels.npy"
