"""The one convention of every ``diffusion-probes`` subcommand, and the steps every command takes first.

Every subcommand is a typed Python callable read by jsonargparse, as LightningCLI reads the probe
modules for ``fit``: each parameter is an option and a YAML key, ``--config FILE`` loads a file
(several stack, the last wins), ``--print_config`` shows the resolved config, any key can be
overridden on the command line, and a config file may name its bases under ``defaults:``
(:mod:`probes.cli.compose`, the one place that composition happens). Before parsing, every
command sets the thread policy, silences the library noise a user cannot act on, and imports
the user's plug-ins (``--import``), so that their names are checked like built-in ones.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from probes.cli.compose import add_defaults_key, expand_configs
from probes.cli.errors import ExplainedParser
from probes.cli.plugins import load_plugins, strip_imports
from probes.common.quiet import quiet_known_noise
from probes.common.threads import apply_thread_policy

#: keys the parser adds that are not the component's parameters
PARSER_KEYS = ("config", "defaults", "print_config", "__path__")


def prepared(argv: Sequence[str] | None, plugins: bool = True) -> list[str]:
    """What every command does first: thread policy, quiet logs, user plug-ins, config chains."""
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_thread_policy()   # one torch thread per free core: a shared machine must not thrash
    quiet_known_noise()     # library messages a user cannot act on
    if not plugins:
        return argv
    load_plugins(argv)      # user labelers/tasks/layers are registered before their names are checked
    return expand_configs(strip_imports(argv))


def command_parser(component: Callable[..., Any], prog: str | None = None) -> ArgumentParser:
    """The parser of one typed callable: its parameters (a class: its fields) as options, ``--config``
    files that may name their bases, and ``--print_config``."""
    parser = ExplainedParser(prog=prog, description=(component.__doc__ or "").split("\n\n")[0] or None)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config file (several stack; the last wins)")
    add_defaults_key(parser)
    if isinstance(component, type):     # a config class: its fields are the options (not its methods)
        parser.add_class_arguments(component, as_group=False)
    else:
        parser.add_function_arguments(component, as_group=False)
    return parser


def _arguments(ns: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(vars(ns)).items() if k not in PARSER_KEYS}


def run_typed(component: Callable[..., Any] | Mapping[str, Callable[..., Any]], argv: Sequence[str] | None,
              then: Callable[[Any], Any] | None = None, plugins: bool = True, prog: str | None = None) -> Any:
    """Parse ``argv`` for ``component`` (a function, a config class, or ``{subcommand: function}``)
    and call it with the parsed values; a class is instantiated and handed to ``then``."""
    if isinstance(component, Mapping):
        parser = ExplainedParser(prog=prog)
        subcommands = parser.add_subcommands()
        for name, fn in component.items():
            subcommands.add_subcommand(name, command_parser(fn), help=(fn.__doc__ or "").split("\n")[0])
    else:
        parser = command_parser(component, prog)
    init = parser.instantiate(parser.parse_args(prepared(argv, plugins)))
    if isinstance(component, Mapping):
        name = init["subcommand"]
        component, init = component[name], init[name]
    result = component(**_arguments(init))
    return then(result) if then is not None else result
