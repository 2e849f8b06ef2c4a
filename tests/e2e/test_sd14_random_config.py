"""``configs/sd14/random_weights.yaml``: the SD v1.4 architecture, random weights, a few prompts."""
from __future__ import annotations

from tests.e2e.test_cli import run_inprocess


def test_sd14_random_weights_config_composes_the_real_protocol_on_random_weights():
    text = run_inprocess("fit", "--config", "configs/sd14/random_weights.yaml", "--print_config")
    for needle in ("source: random", "architecture: sd14", "steps: 15", "guidance_scale: 7.5", "scheduler: lms",
                   "height: 512", "source: demo", "limit: 2", "name: otsu", "name: vertical", "name: luminance",   # labels/classical.yaml, inline
                   "max_epochs: 30", "probes.training.progress.ProbeProgressBar"):
        assert needle in text, needle
