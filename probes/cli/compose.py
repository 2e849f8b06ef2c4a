"""Config composition: an experiment file names its base configs and states only what differs.

LightningCLI already stacks ``--config a.yaml --config b.yaml`` (the last wins, nested keys
merge). A config may list its bases under ``defaults:`` (paths relative to the file, as in
lightning-hydra-template's ``configs/experiment/``); ``--config exp.yaml`` then expands to
``--config base... --config exp.yaml``, recursively, bases first.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml


def config_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    """``path``'s bases, then ``path``: the order in which they are applied."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ValueError(f"config defaults form a cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found") from None
    bases = data.get("defaults") or [] if isinstance(data, dict) else []
    if isinstance(bases, str):
        bases = [bases]
    out: list[Path] = []
    for base in bases:
        out += config_bases((path.parent / base), (*seen, path))
    return [*out, path]


def expand_configs(argv: Sequence[str]) -> list[str]:
    """Rewrite every ``--config FILE`` of ``argv`` into its chain of bases (see module docstring)."""
    out: list[str] = []
    k = 0
    while k < len(argv):
        arg = argv[k]
        value = None
        if arg in ("--config", "-c") and k + 1 < len(argv):
            value, k = argv[k + 1], k + 2
        elif arg.startswith("--config="):
            value, k = arg.split("=", 1)[1], k + 1
        else:
            out.append(arg)
            k += 1
            continue
        path = Path(value)
        if path.suffix in (".yaml", ".yml") and not path.exists():
            raise FileNotFoundError(f"config file {value} does not exist (looked for {path.absolute()})")
        if path.suffix in (".yaml", ".yml"):
            for p in config_bases(path):
                out += ["--config", str(p)]
        else:
            out += ["--config", value]
    return out


class _Applied:
    """The type of ``defaults:``: parsed to nothing, since :func:`expand_configs` applied the bases
    already; a printed or saved config that kept them would apply them again, relative to wherever
    it then lies."""

    def __call__(self, bases: object) -> None:
        return None

    def __repr__(self) -> str:
        return "list of config files"


def add_defaults_key(parser) -> None:
    """Let ``parser`` read config files that name their bases (``defaults:``): the bases are already
    expanded by :func:`expand_configs`, so the key itself carries nothing and is dropped (it never
    reaches a printed or saved config)."""
    parser.add_argument("--defaults", type=_Applied(), default=None,
                        help="base configs of a config file (relative to it), applied before it")
