"""Tests that need ``../shared/reference`` skip where it is absent, saying why, and fail instead where
``DPROBE_REQUIRE_REFERENCE=1`` says it must be there (CI)."""
from __future__ import annotations

import pytest

import tests.conftest as conftest


def test_an_absent_reference_skips_with_its_reason_or_fails_when_required(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "REFERENCE", tmp_path / "no-reference")
    monkeypatch.delenv(conftest.REQUIRE_REFERENCE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"needs reference material at .*no-reference/chen2023"):
        conftest.reference_dir("chen2023")
    monkeypatch.setenv(conftest.REQUIRE_REFERENCE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="DPROBE_REQUIRE_REFERENCE=1 says it must be there"):
        conftest.reference_dir("chen2023")
    (tmp_path / "no-reference" / "chen2023").mkdir(parents=True)
    assert conftest.reference_dir("chen2023") == tmp_path / "no-reference" / "chen2023"
