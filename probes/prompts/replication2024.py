"""The 2024 replication's shading split: 500 train / 117 test of the same 617 chen2023 (prompt, seed) pairs.

The replication ("From Pixels to Pictures", UCSD 2024) trained its shading probes on another split
than the 246/371 of foreground and depth. It published the split as two Python pickles of plain
lists of positions (0..616). A position names a (prompt, seed) pair of the chen2023 split through
file names: ``prompt_{prompt_inds}_seed_{seeds}.png`` for all 617 pairs, sorted as strings; the
position is the index in that sorted list (the same rule maps the reference's own
``train_indices.pkl`` / ``test_indices.pkl`` onto the chen2023 CSVs exactly).

The pickles are fetched on first use from their pinned commit and checked against their sha256,
like the chen2023 CSVs, and never copied into this repository. A pickle can run code when it is
loaded, so they are read by an unpickler that resolves no global at all: a list of ints needs
none, and anything else is refused before it can be built.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probes.common.download import download
from probes.common.hashing import verify_sha256

REPLICATION2024_REPO = "karinaechen/diffusion-model-internal-representation"
REPLICATION2024_COMMIT = "aa3dbd360b7ea9b04826a4c0579ea98030039d2f"
REPLICATION2024_URL = (f"https://raw.githubusercontent.com/{REPLICATION2024_REPO}/"
                       f"{REPLICATION2024_COMMIT}/{{name}}")
#: split -> (file name at the repository root, sha256)
REPLICATION2024_FILES = {
    "train": ("train_indices_500.pkl", "e1954c7a1b5139339eeddaffcd139a9e0387bf5e07c3aa959c275a70d6c6becf"),
    "test": ("test_indices_117.pkl", "f5802482f8d5a4ef375f8052e8418fe1142dfc4ee9559e67431ff28eb2cd83fb"),
}
#: environment variable naming a folder that holds the two pickles (no download)
LOCAL_DIR_ENV = "DPROBE_REPLICATION2024_DIR"
#: refuse anything bigger: 617 ints pickle to a few KB, so a large file is not the published one
MAX_PICKLE_BYTES = 1 << 20


class UnsafePickle(pickle.UnpicklingError):
    """A pickle asked for a global (a class or a function): it is not a plain list of ints."""


class NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global: lists, ints, strings and the like only.

    Building any object other than the built-in containers and scalars goes through
    :meth:`find_class` (classes, functions such as ``os.system``, ``copyreg`` reducers), so
    refusing every call there refuses every way a pickle can run code. Persistent ids are
    refused by :class:`pickle.Unpickler` already (no ``persistent_load``).
    """

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickle(f"the pickle refers to the global {module}.{name}; only a plain list of ints is "
                           f"accepted (no globals are ever loaded)")


def load_positions(data: bytes, n: int, what: str = "pickle") -> list[int]:
    """The list of ints in ``data`` (a pickle), each in ``[0, n)`` and none twice; anything else is refused.

    :param what: the file, named in errors.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes, more than a list of positions needs; not the published file")
    try:
        obj = NoGlobalsUnpickler(io.BytesIO(data)).load()
    except UnsafePickle as err:
        raise UnsafePickle(f"{what}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"{what} is not a readable pickle ({type(err).__name__}: {err})") from None
    if type(obj) is not list:
        raise ValueError(f"{what} holds a {type(obj).__name__}, expected a list of ints (positions 0..{n - 1})")
    bad = [x for x in obj if type(x) is not int or not 0 <= x < n]  # bool is an int subclass: refused too
    if bad:
        raise ValueError(f"{what} holds {len(bad)} value(s) that are not positions 0..{n - 1}: {bad[:5]!r}")
    if len(set(obj)) != len(obj):
        raise ValueError(f"{what} names {len(obj) - len(set(obj))} position(s) twice")
    return list(obj)


def position_names(prompt_inds: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """The replication's file name of each pair: ``prompt_{prompt_inds}_seed_{seeds}.png``."""
    return [f"prompt_{p}_seed_{s}.png" for p, s in zip(prompt_inds, seeds)]


def positions_to_rows(prompt_inds: Sequence[str], seeds: Sequence[int]) -> list[int]:
    """``order[k]`` = the row (in the given order) of the pair at position ``k``.

    The mapping rule: position ``k`` is the ``k``-th file name when all names are sorted as strings
    (so ``prompt_10_…`` comes before ``prompt_9_…``).
    """
    names = position_names(prompt_inds, seeds)
    if len(set(names)) != len(names):
        raise ValueError("two (prompt_inds, seed) pairs give the same file name; positions would be ambiguous")
    return sorted(range(len(names)), key=names.__getitem__)


def split_of_rows(prompt_inds: Sequence[str], seeds: Sequence[int], train: Sequence[int],
                  test: Sequence[int]) -> list[str]:
    """Per row, ``train`` or ``test`` from the positions of the two pickles (which must cover every pair once)."""
    n = len(prompt_inds)
    both = set(train) & set(test)
    if both:
        raise ValueError(f"{len(both)} position(s) are in both the train and the test pickle, e.g. {sorted(both)[:5]}")
    missing = set(range(n)) - set(train) - set(test)
    if missing:
        raise ValueError(f"{len(missing)} of the {n} pairs are in neither pickle, e.g. positions {sorted(missing)[:5]}")
    order = positions_to_rows(prompt_inds, seeds)
    out = [""] * n
    for split, positions in (("train", train), ("test", test)):
        for k in positions:
            out[order[k]] = split
    return out


def fetch_replication2024(cache_dir: str | Path, local_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the two pickles, downloading (pinned commit) and checking their sha256 if needed.

    :param cache_dir: the download cache's root (the pickles go to ``<it>/replication2024/<commit>/``).
    :param local_dir: a folder holding both pickles (no download); ``$DPROBE_REPLICATION2024_DIR``
        does the same.
    """
    local_dir = local_dir or os.environ.get(LOCAL_DIR_ENV)
    if local_dir:   # every absent file named at once, before any checksum
        absent = [n for n, _ in REPLICATION2024_FILES.values() if not (Path(local_dir).expanduser() / n).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{', '.join(absent)} not in {Path(local_dir).expanduser()}: data.prompts.replication_dir (or "
                f"${LOCAL_DIR_ENV}) must hold both pickles; download them from "
                + " and ".join(REPLICATION2024_URL.format(name=n) for n in absent))
    out: dict[str, Path] = {}
    for split, (name, sha) in REPLICATION2024_FILES.items():
        url = REPLICATION2024_URL.format(name=name)
        if local_dir:
            path = Path(local_dir).expanduser() / name
        else:
            path = Path(cache_dir) / "replication2024" / REPLICATION2024_COMMIT / name
            if not path.exists():
                try:
                    download(url, path, "")
                except RuntimeError as err:
                    raise RuntimeError(
                        f"could not download the replication's shading split file {url}: {err.__cause__}\n"
                        f"Offline: download {url} elsewhere and copy it to {path}, or put both "
                        f"{' and '.join(n for n, _ in REPLICATION2024_FILES.values())} in a folder and set "
                        f"data.prompts.replication_dir (or ${LOCAL_DIR_ENV}) to it.") from err
        verify_sha256(path, sha, f"the file at {url}: delete it to re-download, or point "
                                 f"data.prompts.replication_dir at a correct copy")
        out[split] = path
    return out


def replication_splits(rows: Sequence[dict[str, Any]], files: dict[str, Path]) -> list[str]:
    """Per chen2023 row (``source_id`` = ``prompt_inds``, ``seed``), its split in the 500/117 shading split."""
    n = len(rows)
    train = load_positions(files["train"].read_bytes(), n, str(files["train"]))
    test = load_positions(files["test"].read_bytes(), n, str(files["test"]))
    return split_of_rows([str(r["source_id"]) for r in rows], [int(r["seed"]) for r in rows], train, test)
