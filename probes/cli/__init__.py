"""Commands, wiring only: ``train.py``, ``evaluate.py`` and every ``diffusion-probes`` subcommand, under one
convention (:mod:`probes.cli.convention`)."""
