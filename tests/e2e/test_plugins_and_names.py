"""The plug-in route for user code, and names checked when the config is parsed (before any compute)."""
from __future__ import annotations

import textwrap

import pytest

from tests.e2e.test_cli import run_inprocess
from tests.e2e.test_fast_dev_run import QUICK


def test_a_labeler_in_a_users_file_runs_through_import(tmp_path):
    plugin = tmp_path / "my_labels.py"
    plugin.write_text(textwrap.dedent('''
        import numpy as np
        from probes.labels import Labeler, register_labeler

        @register_labeler("left_half")
        class LeftHalf(Labeler):
            """Foreground = the left half of the image: a label nobody else produces."""
            def __call__(self, images, indices=None):
                out = np.zeros(images.shape[:3], np.float32)
                out[:, :, : images.shape[2] // 2] = 1.0
                return out
    '''))
    run_inprocess("fit", "--import", str(plugin), "--config", "configs/tiny.yaml", *QUICK,
                  "--data.labels", "{foreground: {name: left_half}}", "--data.store_root", str(tmp_path / "s"),
                  "--run_dir", str(tmp_path / "run"))
    caches = list((tmp_path / "s").glob("*/labels/foreground/*"))
    assert caches and all("left_half" in p.name for p in caches)
    import numpy as np

    labels = np.load(next(caches[0].glob("labels.npy")))
    assert labels[:, :, : labels.shape[2] // 2].min() == 1.0 and labels[:, :, labels.shape[2] // 2:].max() == 0.0


@pytest.mark.parametrize("override, needle, valid", [
    (["--data.labels", "{foreground: {name: otsuu}}"], "unknown labeler 'otsuu'", "otsu"),
    (["--data.labels", "{foregruond: {name: otsu}}"], "unknown task 'foregruond'", "foreground"),
    (["--data.capture.layers", "[upp3.0]"], "'upp3.0' names no layer", "up3.0"),
])
def test_misspelt_names_fail_at_parse_time_listing_valid_ones(tmp_path, capsys, override, needle, valid):
    with pytest.raises((SystemExit, KeyError, ValueError)) as err:
        run_inprocess("fit", "--config", "configs/tiny.yaml", *override, "--data.store_root", str(tmp_path / "s"),
                      "--run_dir", str(tmp_path / "run"))
    message = str(err.value) + capsys.readouterr().err
    assert needle in message and valid in message
    assert not (tmp_path / "s").exists()     # nothing was generated: the check came before any compute
