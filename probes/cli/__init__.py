"""Entry points: ``train.py``, ``evaluate.py`` and the ``diffusion-probes`` console command."""
