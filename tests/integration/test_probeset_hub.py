"""``ProbeSet.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``, offline: the Hub is a local folder."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from probes.export.probeset import META, WEIGHTS, ProbeSet, load_probes
from tests.exports import small_export


def same_probes(a: ProbeSet, b: ProbeSet) -> None:
    assert a.infos == b.infos
    assert sorted(a.tensors) == sorted(b.tensors)
    for key, t in a.tensors.items():
        assert torch.equal(t, b.tensors[key])
    assert {k: v for k, v in a.meta.items() if k != "weights_sha256"} == \
        {k: v for k, v in b.meta.items() if k != "weights_sha256"}


def test_save_pretrained_round_trip_and_repr(tmp_path):
    probes = load_probes(small_export(tmp_path / "run"))
    assert repr(probes) == "ProbeSet(tasks=['depth', 'foreground'], layers=2, steps=3)"
    out = probes.save_pretrained(tmp_path / "shared")
    assert {p.name for p in out.iterdir()} == {META, WEIGHTS, "README.md"}
    assert "library_name: diffusion-probes" in (out / "README.md").read_text()
    again = ProbeSet.from_pretrained(out)
    same_probes(probes, again)
    same_probes(probes, load_probes(out))          # the export format, readable as before
    acts = torch.randn(2, 256, 32)
    torch.testing.assert_close(again.get("depth", "up3.0", 1)(acts), probes.get("depth", "up3.0", 1)(acts))


def fake_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> list[dict]:
    """``HfApi.create_repo`` / ``upload_folder`` write into a huggingface_hub cache laid out as a download
    leaves it (``models--user--name/{refs/main, snapshots/<commit>/}``), so that the real
    ``snapshot_download`` reads it back offline."""
    uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append(dict(repo_id=repo_id, files=sorted(p.name for p in Path(folder_path).iterdir()), **kwargs))
        commit = f"{len(uploads):040x}"
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return SimpleNamespace(oid=commit)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return uploads


def test_push_to_hub_then_from_pretrained_by_repo_id(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    uploads = fake_hub(monkeypatch, cache)
    probes = load_probes(small_export(tmp_path / "run"))
    probes.push_to_hub("someone/tiny-probes")
    assert uploads[0]["repo_id"] == "someone/tiny-probes"
    assert uploads[0]["files"] == sorted([META, WEIGHTS, "README.md"])
    assert "ProbeSet(tasks=" in uploads[0]["commit_message"]
    fetched = ProbeSet.from_pretrained("someone/tiny-probes", cache_dir=cache, local_files_only=True)
    same_probes(probes, fetched)


def test_from_pretrained_names_what_it_could_not_find(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hub repository id"):
        ProbeSet.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(FileNotFoundError, match="could not be read"):
        ProbeSet.from_pretrained("someone/not-cached", cache_dir=tmp_path, local_files_only=True)
