"""Prompt sets: (prompt, seed, split) records from the reference split, a CSV or a text file.

The reference split of Chen et al. (246 train / 371 test LAION captions, one seed each) is
fetched on first use from its pinned public URL and checked against its sha256; it is never
copied into this repository. A local folder holding the two CSVs can be given instead. The 2024
replication's shading split (``replication2024``: the same 617 pairs split 500/117) is built on
top of it (``probes.prompts.replication2024``).
"""
from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.common.download import download
from probes.common.hashing import sha256_text, verify_sha256
from probes.paths import data_path, shipped_or_local
from probes.prompts.replication2024 import fetch_replication2024, replication_splits

CHEN2023_COMMIT = "788101cc2f81918b9ea87c76b11be0910e4d96bf"
CHEN2023_URL = ("https://raw.githubusercontent.com/yc015/scene-representation-diffusion-model/"
                f"{CHEN2023_COMMIT}/{{name}}")
CHEN2023_FILES = {
    "train": ("train_split_prompts_seeds.csv", "f7d0d001e82bc3e6798e6da86d5b8712ceeb76c8b0622113bf2d68a754f3841e"),
    "test": ("test_split_prompts_seeds.csv", "6e1833810d8aaaed112112acca18d299f44a6963ca20697e4ae51d0fb3f39c7b"),
}
SPLITS = ("train", "val", "test")
#: sources built from the chen2023 CSVs: its own 246/371 split, and the replication's 500/117 shading split
REFERENCE_SOURCES = ("chen2023", "replication2024")


def default_cache_dir() -> Path:
    root = os.environ.get("DPROBE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffusion-probes")
    return Path(root)


@dataclass(frozen=True)
class PromptRecord:
    index: int
    prompt: str
    seed: int
    split: str
    source_id: str = ""
    label: int | None = None   # class index (CSV column ``class_index``) for classifier experiments


@dataclass
class PromptSpec:
    """Where prompts come from and how they are split.

    :param source: ``chen2023`` (the reference 246/371 split), ``replication2024`` (the same 617
        pairs in the 2024 replication's 500/117 shading split, in the same order, so the same
        store), the name of a prompt set shipped in
        ``data/prompts/`` (e.g. ``demo``), or a path to a CSV (columns ``prompt`` or ``prompts``,
        ``seed`` or ``seeds``, optional ``split`` and ``class_index``) or a text file (one prompt per line; seeds
        ``seed_base + line number``).
    :param local_dir: for ``chen2023`` and ``replication2024``: a folder that holds the two chen2023
        CSVs (no download). ``$DPROBE_CHEN2023_DIR`` does the same.
    :param replication_dir: for ``replication2024``: a folder that holds its two pickles,
        ``train_indices_500.pkl`` and ``test_indices_117.pkl`` (no download).
        ``$DPROBE_REPLICATION2024_DIR`` does the same.
    :param cache_dir: where downloads are kept; default ``$DPROBE_CACHE`` or ``~/.cache/diffusion-probes``.
    :param limit: keep only the first ``limit`` prompts of each split (quick runs).
    :param seed_base: first seed for text files.
    :param val_fraction: share of the train prompts held out for validation (model selection).
    :param test_fraction: share of all prompts used as test when the source has no split.
    :param split_seed: seed of those random assignments.
    """

    source: str = "chen2023"
    local_dir: str | None = None
    replication_dir: str | None = None
    cache_dir: str | None = None
    limit: int | None = None
    seed_base: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    split_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"data.prompts.{name} must be in [0, 1), got {v}")
        if not 0 <= self.seed_base <= MAX_SEED:
            raise ValueError(f"data.prompts.seed_base must be a seed from 0 to {MAX_SEED}, got {self.seed_base}")


#: what to do when the reference CSVs cannot be downloaded
CHEN2023_OFFLINE_FIX = ("On an offline machine, copy the file there by hand, or set data.prompts.local_dir "
                        "(or $DPROBE_CHEN2023_DIR) to a folder holding the reference CSVs.")


def fetch_chen2023(cache_dir: str | Path | None = None, local_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the reference train/test CSVs, downloading and checksumming them if needed."""
    local_dir = local_dir or os.environ.get("DPROBE_CHEN2023_DIR")
    out: dict[str, Path] = {}
    for split, (name, sha) in CHEN2023_FILES.items():
        if local_dir:
            path = Path(local_dir).expanduser() / name
            if not path.exists():
                raise FileNotFoundError(f"{path} not found (data.prompts.local_dir={str(local_dir)!r} must hold {name})")
        else:
            path = Path(cache_dir or default_cache_dir()) / "chen2023" / CHEN2023_COMMIT / name
            if not path.exists():
                download(CHEN2023_URL.format(name=name), path, CHEN2023_OFFLINE_FIX)
        verify_sha256(path, sha, "the pinned reference file: delete it to re-download, or point "
                                 "data.prompts.local_dir at a correct copy")
        out[split] = path
    return out


MAX_SEED = 2**64 - 1  # torch.manual_seed's range; a negative seed wraps around onto another one


def _parse_seed(value: str | None, path: Path, line: int, column: str) -> int:
    """A row's seed as an int; anything else is an error naming the file, line, column and value."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_SEED:
        raise ValueError(f"{path}, line {line}: column {column!r} holds {value!r}, which is not a seed; seeds are "
                         f"whole numbers from 0 to {MAX_SEED} (torch.manual_seed): fix that row")
    return int(text)


def _parse_label(value: str | None, path: Path, line: int) -> int | None:
    """A row's ``class_index`` (the class a classifier should find in its image), or None when blank."""
    text = (value or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{path}, line {line}: column 'class_index' holds {value!r}, which is not a class "
                         f"index; use a whole number >= 0 (the classifier's output index), or leave it empty")
    return int(text)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a prompt CSV, each with its seed parsed and its place (``file``, ``line``) for errors."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, r) for r in reader]  # line_num: the line the row ends on
    if not rows:
        raise ValueError(f"{path} holds no rows")
    cols = set(rows[0][1])
    pcol = "prompt" if "prompt" in cols else "prompts" if "prompts" in cols else None
    scol = "seed" if "seed" in cols else "seeds" if "seeds" in cols else None
    if pcol is None or scol is None:
        raise ValueError(f"{path} needs columns 'prompt' (or 'prompts') and 'seed' (or 'seeds'); it has {sorted(cols)}")
    return [{"prompt": r[pcol] or "", "seed": _parse_seed(r[scol], path, line, scol),
             "split": (r.get("split") or "").strip(), "source_id": r.get("prompt_inds", "") or r.get("id", ""),
             "label": _parse_label(r.get("class_index"), path, line),
             "file": str(path), "line": line} for line, r in rows]


def _read_text(path: Path, seed_base: int) -> list[dict[str, Any]]:
    """One prompt per non-empty, non-``#`` line; seeds ``seed_base`` + prompt number."""
    lines = [(n, ln.strip()) for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    return [{"prompt": p, "seed": seed_base + i, "split": "",
             "source_id": str(i), "file": str(path), "line": n} for i, (n, p) in enumerate(lines)]


def _places(rows: list[dict[str, Any]]) -> str:
    """``a.csv, lines 2 and 4; b.csv, line 9``: where rows are, grouped by file."""
    by_file: dict[str, list[int]] = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r["line"])
    out = []
    for file, lines in by_file.items():
        nums = [str(n) for n in lines]
        joined = nums[0] if len(nums) == 1 else ", ".join(nums[:-1]) + " and " + nums[-1]
        out.append(f"{file}, line{'s' if len(nums) > 1 else ''} {joined}")
    return "; ".join(out)


def _reject_duplicates(rows: list[dict[str, Any]]) -> None:
    """Refuse rows that would draw the same image: the same seed and the same prompt up to case and
    spacing (the CLIP tokenizer lowercases and collapses whitespace). Two such rows in different
    splits would put one image in train and in test."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((" ".join(r["prompt"].split()).casefold(), r["seed"]), []).append(r)
    dups = [g for g in groups.values() if len(g) > 1]
    if dups:
        shown = "\n".join(f"  {g[0]['prompt']!r} with seed {g[0]['seed']} at {_places(g)}" for g in dups[:10])
        more = f"\n  ... and {len(dups) - 10} more" if len(dups) > 10 else ""
        raise ValueError(f"{len(dups)} (prompt, seed) pairs occur more than once; each is the same image, which "
                         f"could land in two splits (train and test):\n{shown}{more}\n"
                         f"Remove the repeated rows, or give them different seeds.")


def _assign(n: int, fraction: float, rng: random.Random) -> set[int]:
    k = int(round(n * fraction))
    return set(rng.sample(range(n), k)) if k else set()


def shipped_prompt_sets() -> list[str]:
    """Names of the prompt sets in ``data/prompts/`` (usable as ``data.prompts.source``)."""
    return sorted(p.stem for p in data_path("prompts").glob("*") if p.suffix in (".txt", ".csv"))


def resolve_source(source: str) -> Path:
    """A prompt file: a path (``data/prompts/...`` found from any folder), or the name of a shipped set;
    the error lists what exists."""
    path = shipped_or_local(source)
    if path.exists():
        return path
    for suffix in (".txt", ".csv"):
        shipped = data_path("prompts", source + suffix)
        if shipped.exists():
            return shipped
    raise FileNotFoundError(f"data.prompts.source {source!r} is neither 'chen2023', 'replication2024', a shipped prompt set "
                            f"({', '.join(shipped_prompt_sets())}), nor an existing file")


def load_prompts(spec: PromptSpec) -> list[PromptRecord]:
    """All records of the prompt set, indexed 0..N-1 in a stable order, with their split."""
    rng = random.Random(spec.split_seed)
    rows: list[dict[str, Any]] = []
    if spec.source in REFERENCE_SOURCES:
        files = fetch_chen2023(spec.cache_dir, spec.local_dir)
        for split in ("train", "test"):
            rows += [dict(r, split=split) for r in _read_csv(files[split])]
        if spec.source == "replication2024":   # same pairs, same order: only the split changes
            pickles = fetch_replication2024(spec.cache_dir or default_cache_dir(), spec.replication_dir)
            rows = [dict(r, split=s) for r, s in zip(rows, replication_splits(rows, pickles))]
    else:
        path = resolve_source(spec.source)
        if path.suffix.lower() == ".csv":
            rows = _read_csv(path)
        else:
            rows = _read_text(path, spec.seed_base)
        if not rows:
            raise ValueError(f"prompt source {path} holds no prompts")
        if not all(r["split"] for r in rows):
            test = _assign(len(rows), spec.test_fraction, rng)
            for i, r in enumerate(rows):
                r["split"] = r["split"] or ("test" if i in test else "train")
    _reject_duplicates(rows)
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise ValueError(f"unknown split names {bad} in {spec.source}; use train, val or test")
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    val = _assign(len(train), spec.val_fraction, rng)
    for k, i in enumerate(train):
        if k in val:
            rows[i]["split"] = "val"
    if spec.limit is not None:
        kept: list[dict[str, Any]] = []
        for split in SPLITS:
            kept += [r for r in rows if r["split"] == split][: spec.limit]
        order = {id(r): k for k, r in enumerate(rows)}
        rows = sorted(kept, key=lambda r: order[id(r)])
    return [PromptRecord(index=i, prompt=r["prompt"], seed=r["seed"], split=r["split"],
                         source_id=str(r["source_id"]), label=r.get("label")) for i, r in enumerate(rows)]


def split_indices(records: Iterable[PromptRecord]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for r in records:
        out[r.split].append(r.index)
    return out


def prompts_fingerprint(records: Iterable[PromptRecord]) -> str:
    return sha256_text("".join(f"{r.index}\t{r.prompt}\t{r.seed}\n" for r in records), 16)
