"""Prompt sets: the pinned reference split, CSV and text sources, splits, errors."""
from __future__ import annotations

import pytest

from probes.prompts.sets import PromptSpec, fetch_chen2023, load_prompts, split_indices
from tests.conftest import reference_dir, serve_downloads


def test_reference_split_from_local_copy():
    local = reference_dir("chen2023")
    recs = load_prompts(PromptSpec(source="chen2023", local_dir=str(local), val_fraction=0.1))
    splits = split_indices(recs)
    assert len(recs) == 617
    assert len(splits["train"]) + len(splits["val"]) == 246 and len(splits["test"]) == 371
    assert len(splits["val"]) == 25
    assert recs[0].seed == 5107435 and recs[0].prompt.startswith("Elle Fanning")
    assert recs[246].split == "test" and recs[246].seed == 30918977
    assert [r.index for r in recs] == list(range(617))
    again = load_prompts(PromptSpec(source="chen2023", local_dir=str(local), val_fraction=0.1))
    assert split_indices(again) == splits  # seeded, stable


def test_reference_split_is_downloaded_pinned_and_checksummed(tmp_path, monkeypatch):
    local = reference_dir("chen2023")
    urls = serve_downloads(monkeypatch, local)
    monkeypatch.delenv("DPROBE_CHEN2023_DIR", raising=False)
    files = fetch_chen2023(cache_dir=tmp_path)
    assert all("788101cc2f81918b9ea87c76b11be0910e4d96bf" in u for u in urls) and len(urls) == 2
    fetch_chen2023(cache_dir=tmp_path)
    assert len(urls) == 2  # cached
    files["train"].write_text("prompts,seeds\ntampered,1\n")
    with pytest.raises(ValueError, match="sha256"):
        fetch_chen2023(cache_dir=tmp_path)


def test_offline_download_error_names_url_path_and_fix(tmp_path, monkeypatch):
    serve_downloads(monkeypatch, None)
    monkeypatch.delenv("DPROBE_CHEN2023_DIR", raising=False)
    with pytest.raises(RuntimeError) as err:
        fetch_chen2023(cache_dir=tmp_path)
    msg = str(err.value)
    assert "raw.githubusercontent.com/yc015" in msg and str(tmp_path) in msg and "local_dir" in msg
    assert not list(tmp_path.rglob("*.csv"))  # nothing half-written


def test_text_and_csv_sources(tmp_path, prompts_file):
    recs = load_prompts(PromptSpec(source=str(prompts_file), seed_base=7, test_fraction=0.25, val_fraction=0.25))
    assert [r.seed for r in recs] == list(range(7, 19))
    s = split_indices(recs)
    assert (len(s["test"]), len(s["val"]), len(s["train"])) == (3, 2, 7)
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,split\n"a, b",5,train\nc,6,test\nd,7,train\n')
    recs = load_prompts(PromptSpec(source=str(csv), val_fraction=0.0))
    assert [(r.prompt, r.seed, r.split) for r in recs] == [("a, b", 5, "train"), ("c", 6, "test"), ("d", 7, "train")]
    assert len(load_prompts(PromptSpec(source=str(prompts_file), limit=1, val_fraction=0.2))) == 3


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(PromptSpec(source=str(tmp_path / "nope.txt")))
    bad = tmp_path / "bad.csv"
    bad.write_text("text,number\na,1\n")
    with pytest.raises(ValueError, match="needs columns 'prompt'"):
        load_prompts(PromptSpec(source=str(bad)))
    with pytest.raises(ValueError, match="val_fraction"):
        PromptSpec(val_fraction=1.5)
