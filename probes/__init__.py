"""diffusion-probes: what a text-to-image diffusion model knows while it draws.

One package, one folder per stage, data flowing one way::

    prompts/ -> diffusion/ + generation/ (capture) -> store/ -> labels/ -> training/ (probes)
             -> metrics/ -> reporting/ (csv, plots, reports, W&B) and export/

``contract.py`` is what the data side hands the probe side; ``cli/`` wires the stages together.
"""
