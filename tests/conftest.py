"""Shared fixtures: offline, CPU, a tiny random-weight SD, and a small prompt set."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # a stray hub call fails fast instead of retrying
os.environ.setdefault("WANDB_MODE", "disabled")     # tests that check W&B set offline themselves
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# OMP_NUM_THREADS, when set, wins (on busy shared cores one thread is several times faster than two)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


#: set to 1 where the reference material must be there (CI: `.ci/run`): its absence then fails the test
REQUIRE_REFERENCE_ENV = "DPROBE_REQUIRE_REFERENCE"


def reference_path(*parts: str, what: str = "reference material") -> Path:
    """A path under ``../shared/reference`` (the reference split, TRACER's key list and test vector).

    Where it is absent the test is skipped, saying why; with ``DPROBE_REQUIRE_REFERENCE=1`` (CI,
    which has the folder) it fails instead, so a missing copy never passes quietly.
    """
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        reason = (f"needs {what} at {path}, which is absent: the checks against the reference cannot run "
                  f"here (the project itself works without it)")
        if os.environ.get(REQUIRE_REFERENCE_ENV, "").strip() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; {REQUIRE_REFERENCE_ENV}=1 says it must be there", pytrace=False)
        pytest.skip(f"{reason}; set {REQUIRE_REFERENCE_ENV}=1 to make its absence a failure")
    return path


def reference_dir(*parts: str) -> Path:
    """A folder of ``../shared/reference`` (see :func:`reference_path`)."""
    return reference_path(*parts)


@pytest.fixture(scope="session")
def tiny_pipe():
    from probes.diffusion.loading import DiffusionSpec, load_pipeline

    return load_pipeline(DiffusionSpec(source="random", architecture="tiny"), "cpu")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"a photo of thing number {i}" for i in range(12)) + "\n")
    return path


def serve_downloads(monkeypatch: pytest.MonkeyPatch, folder: Path | None) -> list[str]:
    """Answer ``urllib.request.urlopen`` from the files in ``folder`` (by the URL's last part), so
    that download code runs for real offline; ``folder=None``: the network is unreachable. Returns
    the list of URLs asked for."""
    import urllib.request

    urls: list[str] = []

    def fake_urlopen(url, timeout=0):
        urls.append(url)
        if folder is None:
            raise OSError("network unreachable")
        return open(folder / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls
