"""Datasets that feed the probes: cached activations from the store, or a live generation stream."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.generation.source import store_batches
from probes.labels.cache import LabelCache
from probes.prompts.sets import PromptRecord
from probes.store.activations import ActivationStore, CorruptSample
from probes.store.fill import commit_records, decoded_missing, input_rows


class ActivationDataset(Dataset):
    """One item per image: its conditional-half activations of every layer and its raw labels.

    Each sample is checked against the checksums its commit marker recorded when it is first read
    (:meth:`ActivationStore.check_rows`); ``descriptions`` (the data module's words for each sample:
    split, seed, prompt) are put in front of a mismatch's message.
    """

    def __init__(self, store: ActivationStore, indices: Sequence[int], labels: dict[str, LabelCache],
                 descriptions: Mapping[int, str] | None = None) -> None:
        self.store, self.indices, self.labels = store, list(indices), labels
        self.descriptions = dict(descriptions or {})
        self.cond = store.manifest["capture"]["halves"].index("cond")

    def _check(self, name: str, rows: Sequence[int]) -> None:
        try:
            self.store.check_rows(name, rows)
        except CorruptSample as err:
            if err.index not in self.descriptions:
                raise
            raise CorruptSample(f"{self.descriptions[err.index]}: {err}", err.index) from None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        for n in self.store.layer_names:
            self._check(f"acts/{n}", [i])
        acts = {n: torch.from_numpy(np.array(self.store.activation(n, i)[:, self.cond]))
                for n in self.store.layer_names}
        labels = {t: torch.from_numpy(np.array(c.array()[i])) for t, c in self.labels.items()}
        return {"index": i, "acts": acts, "labels": labels}

    def __getitems__(self, ks: list[int]) -> dict[str, Any]:
        """A whole batch with one read per layer (rows in file order), already collated.

        Per-sample reads plus ``default_collate`` copy every byte twice and pay per-sample
        overhead on each of the 16 layers; this reads each layer's rows straight into the batch.
        """
        idx = np.asarray([self.indices[k] for k in ks])
        order = np.argsort(idx, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        rows = idx[order]
        acts = {}
        for n in self.store.layer_names:
            self._check(f"acts/{n}", rows)      # each sample against its checksum, when first read
            arr = self.store.acts[n].array()
            data = arr[rows, :, self.cond] if arr.shape[2] > 1 else arr[rows][:, :, 0]
            acts[n] = torch.from_numpy(data[back] if len(rows) > 1 else data)
        labels = {t: torch.from_numpy(np.asarray(c.array()[rows])[back]) for t, c in self.labels.items()}
        return {"index": torch.as_tensor(idx), "acts": acts, "labels": labels}


def collated(batch: dict[str, Any]) -> dict[str, Any]:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


@dataclass(frozen=True)
class StreamSource:
    """What a streamed split needs, handed over explicitly (no reaching back into the data module).

    :param pipeline: returns the loaded diffusion pipeline (loaded once, on first use).
    :param dist: returns ``(rank, world)`` at iteration time (the trainer's, once it exists).
    :param decoded_label_caches: per task, the labels of decoded intermediate images (test split only).
    """

    pipeline: Callable[[], Any]
    records: Sequence[PromptRecord]
    generation: GenerationSpec
    capture: CaptureSpec
    store: ActivationStore
    label_caches: dict[str, LabelCache]
    decoded_label_caches: dict[str, LabelCache]
    device: Callable[[], str]
    dist: Callable[[], tuple[int, int]]
    progress: bool = True


class StreamingDataset(IterableDataset):
    """Generates its split on the fly and yields batches whose activations never leave the GPU.

    For closed-form (ridge) probes, which need one pass over the data: each image is generated
    once, labelled as soon as it exists (labels and images are cached in an images-only store),
    consumed, and dropped. Batches are already collated (use ``DataLoader(batch_size=None)``).
    ``guided_calls`` counts the U-Net calls this dataset caused.
    """

    def __init__(self, source: StreamSource, split: str, indices: Sequence[int]) -> None:
        self.source, self.split, self.indices = source, split, list(indices)
        self.guided_calls = 0

    def __iter__(self):
        src = self.source
        rank, world = src.dist()
        # deal single images (not whole batches) so that every rank gets work even for a small
        # split: a rank with an empty stream would skip validation and hang the others' all-reduce
        mine = self.indices[rank::world]
        store, cond = src.store, src.store.manifest["capture"]["halves"].index("cond")
        layers = store.layers
        for batch in store_batches(src.pipeline(), src.records, mine, src.generation, layers, src.capture,
                              acts_device=None, progress=src.progress, desc=f"streaming {self.split}",
                              universe=mine, decode=mine if self.split == "test" else ()):  # only test is decoded
            idx = batch.indices
            if store.missing(idx) or (self.split == "test" and decoded_missing(store, idx)):
                recs = commit_records(src.records, batch, rank)
                store.write_batch(idx, batch.images, {}, recs, batch.decoded_images, batch.decoded_indices,
                                  input_rows(batch))
            labels = {}
            for task, cache in src.label_caches.items():
                cache.ensure(idx, device=src.device(), progress=False)
                labels[task] = torch.from_numpy(np.array(cache.array()[idx]))
                if self.split == "test" and task in src.decoded_label_caches:
                    src.decoded_label_caches[task].ensure(idx, device=src.device(), progress=False)
            self.guided_calls += batch.guided_calls
            yield {"index": torch.tensor(idx), "acts": {n: a[:, :, cond] for n, a in batch.acts.items()},
                   "labels": labels}


class ReplayStream(IterableDataset):
    """A streamed same-image control: each batch of a split replayed (``probes.replay``) and consumed, its
    activations never stored; labels come from the source store's label caches (labelled beforehand).

    :param pipeline: returns the pipeline whose U-Net is replayed (loaded once, on first use).
    :param dist: returns ``(rank, world)`` at iteration time.
    """

    def __init__(self, pipeline: Callable[[], Any], source, split: str, indices: Sequence[int], layers, capture,
                 num_steps: int, batch_size: int, label_caches: dict[str, LabelCache],
                 dist: Callable[[], tuple[int, int]], progress: bool = True) -> None:
        self.pipeline, self.source, self.split, self.indices = pipeline, source, split, list(indices)
        self.layers, self.capture, self.num_steps, self.batch_size = list(layers), capture, num_steps, batch_size
        self.label_caches, self.dist, self.progress = label_caches, dist, progress

    def __iter__(self):
        from probes.replay.run import replay

        rank, world = self.dist()
        mine = self.indices[rank::world]
        cond = ["uncond", "cond"].index("cond") if self.capture.halves == "both" else 0
        for idx, acts in replay(self.pipeline(), self.source, mine, self.layers, self.capture, self.num_steps,
                                self.batch_size, acts_device=None, progress=self.progress,
                                desc=f"replaying {self.split}"):
            labels = {t: torch.from_numpy(np.array(c.array()[idx])) for t, c in self.label_caches.items()}
            yield {"index": torch.tensor(idx), "acts": {n: a[:, :, cond] for n, a in acts.items()}, "labels": labels}


class UnpaddedShardSampler(DistributedSampler):
    """Evaluation under DDP: each rank gets a contiguous, disjoint shard and nothing is repeated.

    Lightning's default ``DistributedSampler`` pads the last batches with repeated samples, which
    biases metrics; subclassing ``DistributedSampler`` keeps Lightning from replacing this one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        per = -(-n // num_replicas)
        self.shard = list(range(min(rank * per, n), min((rank + 1) * per, n)))

    def __iter__(self):
        return iter(self.shard)

    def __len__(self) -> int:
        return len(self.shard)
