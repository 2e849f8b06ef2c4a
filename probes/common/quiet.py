"""Silence the library messages a user of this project cannot act on (and only those).

A new user reads the console top to bottom; each of these lines looked like a problem and none is:

- Lightning's "Tip: ... try installing litlogger": an advertisement.
- LightningCLI's "args parameter is intended to run from within Python": this project's CLI
  rewrites ``sys.argv`` on purpose (``defaults:`` expansion, ``--import``) and passes the result.
- "`isinstance(treespec, LeafSpec)` is deprecated": a torch deprecation inside Lightning's own code.
- "`configure_optimizers` returned `None`": the one-pass (ridge) probes are solved in closed form
  and have no optimizer by design.

W&B's "anonymous setting has no effect" is avoided at its source (``probes.reporting.wandb_logger``).
Every filter matches the exact message, so any other warning still shows.
"""
from __future__ import annotations

import logging
import warnings

#: (message regex, why it is noise) for Python warnings
WARNINGS = (
    (r"LightningCLI's args parameter is intended to run from within Python", "our CLI passes rewritten argv"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "torch deprecation inside Lightning"),
    (r"`LightningModule.configure_optimizers` returned `None`", "closed-form probes have no optimizer"),
    (r"The `local_dir_use_symlinks` argument is deprecated", "diffusers' load_config passes it to huggingface_hub"),
)
#: substrings of Lightning info messages to drop
INFO = ("try installing [litlogger]",)


class _DropMessages(logging.Filter):
    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


_done = False


def quiet_known_noise() -> None:
    """Install the filters of the module docstring (once per process)."""
    global _done
    if _done:
        return
    for pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    drop = _DropMessages(INFO)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(drop)
    _done = True
