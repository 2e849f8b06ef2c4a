"""The 2024 replication's 500/117 shading split: pinned pickles read with no globals, positions mapped
onto the chen2023 pairs through sorted file names."""
from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import pytest

from probes.common.hashing import sha256_file
from probes.prompts.replication2024 import (
    REPLICATION2024_COMMIT,
    REPLICATION2024_FILES,
    UnsafePickle,
    fetch_replication2024,
    load_positions,
    positions_to_rows,
    split_of_rows,
)
from probes.prompts.sets import PromptSpec, load_prompts, split_indices
from tests.conftest import reference_dir, serve_downloads

TRAIN_PKL, TEST_PKL = (REPLICATION2024_FILES[s][0] for s in ("train", "test"))


class Payload:
    """An instance of a class: unpickling it needs the global ``Payload``."""


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_plain_list_of_ints_is_read():
    assert load_positions(pickle.dumps([3, 0, 2], protocol=4), 4) == [3, 0, 2]
    assert load_positions(pickle.dumps([1, 0], protocol=2), 2) == [1, 0]


@pytest.mark.parametrize("obj", [RunsCode(), Payload(), [1, Payload()], [os.system]],
                         ids=["reduce-os.system", "instance", "instance-in-list", "function"])
def test_no_global_is_ever_resolved(obj):
    data = pickle.dumps(obj)                             # pickle.loads(data) would call os.system / build objects
    with pytest.raises(UnsafePickle, match=r"evil\.pkl.*global"):
        load_positions(data, 10, "evil.pkl")


@pytest.mark.parametrize("obj, match", [
    ((1, 2), "tuple"), ({1: 2}, "dict"), ([1, 10], "not positions"), ([-1], "not positions"),
    ([True, 0], "not positions"), ([1.0], "not positions"), (["1"], "not positions"), ([2, 2], "twice"),
])
def test_anything_but_distinct_positions_is_refused(obj, match):
    with pytest.raises(ValueError, match=match):
        load_positions(pickle.dumps(obj), 10, "x.pkl")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_positions(b"not a pickle", 10)


def test_mapping_rule_sorts_file_names_as_strings():
    # rows in CSV order; names: prompt_9_seed_1, prompt_10_seed_5, prompt_10_seed_40, prompt_100_seed_2
    inds, seeds = ["9", "10", "10", "100"], [1, 5, 40, 2]
    # as strings: prompt_100_seed_2 < prompt_10_seed_40 < prompt_10_seed_5 < prompt_9_seed_1
    assert positions_to_rows(inds, seeds) == [3, 2, 1, 0]
    assert split_of_rows(inds, seeds, train=[0, 3], test=[2, 1]) == ["train", "test", "test", "train"]
    with pytest.raises(ValueError, match="both"):
        split_of_rows(inds, seeds, train=[0, 1], test=[1, 2, 3])
    with pytest.raises(ValueError, match="neither"):
        split_of_rows(inds, seeds, train=[0], test=[1, 2])


def test_offline_error_names_the_url_and_where_to_put_the_files(tmp_path, monkeypatch):
    serve_downloads(monkeypatch, None)
    monkeypatch.delenv("DPROBE_REPLICATION2024_DIR", raising=False)
    with pytest.raises(RuntimeError) as err:
        fetch_replication2024(tmp_path)
    msg = str(err.value)
    url = (f"https://raw.githubusercontent.com/karinaechen/diffusion-model-internal-representation/"
           f"{REPLICATION2024_COMMIT}/{TRAIN_PKL}")
    assert url in msg and str(tmp_path / "replication2024" / REPLICATION2024_COMMIT / TRAIN_PKL) in msg
    assert "data.prompts.replication_dir" in msg and "DPROBE_REPLICATION2024_DIR" in msg
    assert not list(tmp_path.rglob("*.pkl"))              # nothing half-written
    with pytest.raises(FileNotFoundError, match=f"{TEST_PKL}.*{REPLICATION2024_COMMIT}"):
        fetch_replication2024(tmp_path, local_dir=_write(tmp_path / "one", {TRAIN_PKL: [0]}))


def _write(folder: Path, pickles: dict[str, list[int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, positions in pickles.items():
        (folder / name).write_bytes(pickle.dumps(positions, protocol=4))
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def published_pickles(tmp_path_factory):
    """The replication's two pickles rebuilt from the reference CSVs, proven byte-identical to the
    published files by their sha256 (no network here): from then on they are the real input."""
    chen, rep = reference_dir("chen2023"), reference_dir("replication2024")
    pairs = _rows(chen / "train_split_prompts_seeds.csv") + _rows(chen / "test_split_prompts_seeds.csv")
    folder = tmp_path_factory.mktemp("names")
    for r in pairs:                                        # the file names the replication saved its images under
        (folder / f"prompt_{r['prompt_inds']}_seed_{r['seeds']}.png").touch()
    listing = sorted(p.name for p in folder.iterdir())
    out = tmp_path_factory.mktemp("pickles")
    for split, csv_name in (("train", "shading_train_500_prompts_seeds.csv"), ("test", "shading_test_117_prompts_seeds.csv")):
        positions = [listing.index(f"prompt_{r['prompt_inds']}_seed_{r['seeds']}.png") for r in _rows(rep / csv_name)]
        name, sha = REPLICATION2024_FILES[split]
        _write(out, {name: positions})
        assert sha256_file(out / name) == sha, f"{name} rebuilt from {csv_name} is not the published file"
    return chen, rep, out


def test_derived_split_equals_the_replications_csvs(published_pickles, monkeypatch):
    chen, rep, pickles = published_pickles
    monkeypatch.delenv("DPROBE_REPLICATION2024_DIR", raising=False)
    # load_prompts checks the pickles' sha256 against the pinned values: these are the published bytes
    recs = load_prompts(PromptSpec(source="replication2024", local_dir=str(chen), replication_dir=str(pickles),
                                   val_fraction=0.0))
    chen_recs = load_prompts(PromptSpec(source="chen2023", local_dir=str(chen), val_fraction=0.0))
    assert [(r.prompt, r.seed) for r in recs] == [(r.prompt, r.seed) for r in chen_recs]  # same pairs, same store
    got = {s: {(recs[i].source_id, recs[i].seed) for i in idx} for s, idx in split_indices(recs).items()}
    want = {s: {(r["prompt_inds"], int(r["seeds"])) for r in _rows(rep / name)}
            for s, name in (("train", "shading_train_500_prompts_seeds.csv"), ("test", "shading_test_117_prompts_seeds.csv"))}
    assert got["train"] == want["train"] and got["test"] == want["test"] and not got["val"]
    assert len(got["train"]) == 500 and len(got["test"]) == 117
    # the 117 test pairs are chen2023 test pairs; train = chen2023's 246 train + 254 of its test pairs
    chen_split = {(r.source_id, r.seed): r.split for r in chen_recs}
    assert {chen_split[p] for p in got["test"]} == {"test"}
    assert sum(chen_split[p] == "train" for p in got["train"]) == 246
    with_val = load_prompts(PromptSpec(source="replication2024", local_dir=str(chen), replication_dir=str(pickles),
                                       val_fraction=0.1))
    n = {s: len(v) for s, v in split_indices(with_val).items()}
    assert n == {"train": 450, "val": 50, "test": 117}


def test_wrong_pickles_are_refused_by_checksum(published_pickles, tmp_path, monkeypatch):
    chen, _, pickles = published_pickles
    monkeypatch.delenv("DPROBE_REPLICATION2024_DIR", raising=False)
    bad = _write(tmp_path, {TRAIN_PKL: list(range(500)), TEST_PKL: list(range(500, 617))})
    with pytest.raises(ValueError, match="sha256"):
        load_prompts(PromptSpec(source="replication2024", local_dir=str(chen), replication_dir=str(bad)))


def test_download_is_pinned_cached_and_checksummed(published_pickles, tmp_path, monkeypatch):
    _, _, pickles = published_pickles
    urls = serve_downloads(monkeypatch, pickles)
    monkeypatch.delenv("DPROBE_REPLICATION2024_DIR", raising=False)
    files = fetch_replication2024(tmp_path)
    assert len(urls) == 2 and all(REPLICATION2024_COMMIT in u for u in urls)
    fetch_replication2024(tmp_path)
    assert len(urls) == 2                                  # cached
    files["test"].write_bytes(pickle.dumps([0, 1]))
    with pytest.raises(ValueError, match="sha256"):
        fetch_replication2024(tmp_path)


def test_preflight_lists_the_missing_pickles(tmp_path, monkeypatch):
    from probes.cli.preflight import prompt_prerequisites

    chen = reference_dir("chen2023")
    monkeypatch.delenv("DPROBE_REPLICATION2024_DIR", raising=False)
    missing = prompt_prerequisites(PromptSpec(source="replication2024", local_dir=str(chen), cache_dir=str(tmp_path)))
    assert len(missing) == 1 and TRAIN_PKL in missing[0].what and "replication_dir" in missing[0].fix
