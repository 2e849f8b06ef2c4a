"""User code on the command line: labelers, tasks and layers defined outside this package.

Names in a config (``data.labels.depth.name: my_depth``) are looked up in registries, so user
code must be imported *before* the config is parsed and checked. Three routes, all imported
before parsing:

- ``--import my_module`` or ``--import path/to/file.py`` (repeatable), on any command;
- ``DIFFUSION_PROBES_IMPORT=mod1,path/to/file.py`` in the environment (cluster job scripts);
- an installed package declaring an entry point in the group ``diffusion_probes.plugins``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

ENTRY_POINT_GROUP = "diffusion_probes.plugins"
ENV_VAR = "DIFFUSION_PROBES_IMPORT"


class PluginError(RuntimeError):
    """A plug-in's own code raised while it was imported: named with the file or module it came from."""


def import_plugin(ref: str) -> None:
    """Import a module by dotted name, or a ``.py`` file by path (registered under its stem)."""
    path = Path(ref).expanduser()
    if ref.endswith(".py"):
        if not path.is_file():
            raise FileNotFoundError(f"--import {ref}: no such file")
        name = f"diffusion_probes_plugin_{path.stem}"
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise PluginError(f"while importing plug-in {path}: {type(err).__name__}: {err}") from err
        return
    try:
        importlib.import_module(ref)
    except ModuleNotFoundError as err:
        if err.name is not None and ref.split(".")[0] != err.name.split(".")[0]:   # the plug-in's own import failed
            raise PluginError(f"while importing plug-in {ref}: {type(err).__name__}: {err}") from err
        raise ModuleNotFoundError(f"--import {ref}: {err}. Pass an importable module name (on PYTHONPATH) "
                                  f"or the path of a .py file") from err
    except Exception as err:
        raise PluginError(f"while importing plug-in {ref}: {type(err).__name__}: {err}") from err


def plugin_refs(argv: Sequence[str]) -> list[str]:
    """``--import X`` / ``--import=X`` values in ``argv``, then the environment's."""
    refs: list[str] = []
    for k, arg in enumerate(argv):
        if arg == "--import" and k + 1 < len(argv):
            refs.append(argv[k + 1])
        elif arg.startswith("--import="):
            refs.append(arg.split("=", 1)[1])
    refs += [r.strip() for r in os.environ.get(ENV_VAR, "").split(",") if r.strip()]
    return refs


def strip_imports(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--import`` options (the parsers never see them)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--import":
            skip = True
        elif not arg.startswith("--import="):
            out.append(arg)
    return out


def load_plugins(argv: Sequence[str]) -> list[str]:
    """Import every plugin named in ``argv``, the environment and installed entry points."""
    refs = plugin_refs(argv)
    for ref in refs:
        import_plugin(ref)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:
            raise PluginError(f"while importing plug-in {ep.value} (entry point {ep.name!r} of "
                              f"{ENTRY_POINT_GROUP}): {type(err).__name__}: {err}") from err
        refs.append(f"{ep.name} (entry point)")
    return refs
