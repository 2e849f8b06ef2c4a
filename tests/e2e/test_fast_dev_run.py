"""Lightning's fast_dev_run on the tiny config: the whole pipeline, one batch per split, in-process."""
from __future__ import annotations

from tests.e2e.test_cli import run_inprocess

#: one batch per split on two prompts, no logger and no plots: the cheapest full run
QUICK = ["--data.prompts.limit", "2", "--trainer.fast_dev_run", "true", "--trainer.logger", "false",
         "--outputs.plots", "false", "--data.generation.steps", "3"]


def test_fast_dev_run_of_the_tiny_config(tmp_path):
    """The demo's config end to end in-process, one batch per split (Lightning's fast_dev_run)."""
    run_inprocess("fit", "--config", "configs/tiny.yaml", *QUICK, "--data.store_root", str(tmp_path / "s"),
                  "--run_dir", str(tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert (tmp_path / "run" / "probes" / "probes.safetensors").is_file()
