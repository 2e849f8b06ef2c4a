"""A user's mistake reads as the sentence that explains it, not as a traceback or a usage dump.

The project's own checks already name the bad value and the fix (``ValueError``,
``FileNotFoundError``, unknown registry names); what buried them was the way out: a traceback of
40 lines, or jsonargparse's usage of every option (100 lines for ``fit``) above its message, or its
report of every type a value failed to be ("Does not validate against any of the Union
subtypes"). Here, once for every command: parsers raise instead of printing usage
(:class:`ExplainedParser`), a misspelt key gets the closest valid ones (``difflib``), and the
console entry points (:func:`guarded`) print one message for a user error and exit non-zero. A
bug (any other exception) keeps its traceback, and so does everything with ``--debug`` or
``DPROBE_DEBUG=1``.
"""
from __future__ import annotations

import difflib
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningArgumentParser

from probes.cli.side_by_side import RunFailed
from probes.common.env import env_flag
from probes.common.registry import UnknownName

DEBUG_FLAG, DEBUG_ENV = "--debug", "DPROBE_DEBUG"

#: what a user's mistake raises: the project's checks, and the parser's
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, UnknownName, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, FileExistsError, ArgumentError,
                                                RunFailed)   # its message quotes the failed run's own error

_UNION = "Does not validate against any of the Union subtypes"
_UNKNOWN_KEY = (re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'"),
                re.compile(r"Group '([^']+)' does not accept option '([^']+)'"),
                re.compile(r"Option '([^']+)' is not accepted"),
                re.compile(r"Key '([^']+)' is not expected"))


class UsageError(ArgumentError, ValueError):
    """A command line or config the parser refused, explained: an ``ArgumentError``, so that
    jsonargparse's own handling of parse errors still applies, and a ``ValueError`` (a bad value)
    for a caller that runs a command in-process (a notebook, a test)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


def option_keys(parser: ArgumentParser) -> list[str]:
    """Every option key ``parser`` accepts (``data.batch_size``), its subcommands' included."""
    keys: list[str] = []
    for action in parser._actions:
        choices = getattr(action, "_name_parser_map", None)
        if isinstance(choices, dict):           # subcommands: their keys, as written after the subcommand
            for sub in choices.values():
                keys += option_keys(sub)
        elif action.dest not in ("help", "config", "print_config", "defaults") and action.option_strings:
            keys.append(action.dest)
    return sorted(set(keys))


def did_you_mean(key: str, keys: Sequence[str], prefix: str = "") -> str:
    """``; did you mean data.batch_size?`` for a misspelt ``key``, or nothing (``prefix``: ``--`` on the
    command line)."""
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close and "." in key:              # the leaf alone: ``data.prompt.limit`` vs ``data.prompts.limit``
        leaf = key.rsplit(".", 1)[1]
        close = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.8)][:3]
    return f"; did you mean {' or '.join(prefix + k for k in close)}?" if close else ""


def unknown_command(name: str, commands: Sequence[str]) -> str:
    """The message for a command that does not exist."""
    close = difflib.get_close_matches(name, commands, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown command {name!r}; {hint}(commands: {', '.join(commands)})"


def sentence(message: str, keys: Sequence[str] = ()) -> str:
    """A parse or check error's message cut to what the user did wrong, with the closest valid key
    when a key is unknown."""
    message = message.strip()
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if unknown:
        options = [t.split("=", 1)[0] for t in unknown.group(1).split() if t.startswith("--")]
        if options:
            return "; ".join(f"unknown option {o}{did_you_mean(o[2:], keys, '--')}" for o in options)
        return f"unexpected argument(s): {unknown.group(1)}"
    for pattern in _UNKNOWN_KEY:
        found = pattern.search(message)
        if found:
            key = ".".join(found.groups())
            return f"unknown key {key!r} (in a config file or on the command line){did_you_mean(key, keys)}"
    missing = re.search(r'Parser key "([^"]+)":\s*File does not exist: (\S+)', message)
    if missing:
        return f"{missing.group(1)}: file {missing.group(2)} does not exist"
    key = re.match(r'Parser key "([^"]+)":\s*', message)
    body = message[key.end():] if key else message
    body = _union_reason(body) if _UNION in body else " ".join(body.split())
    body = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", body)
    body = re.sub(r"Expected a (\S+)\. Got value: (.*)", r"expected \1, got \2", body)
    return f"{key.group(1)}: {body}" if key else body


def _union_reason(message: str) -> str:
    """jsonargparse's report of a value that fit none of a parameter's types: the errors that are not
    "it is not that type" are the reason (a ``ValueError`` of the class it was meant for, a nested
    parser's explained error)."""
    lines = message.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Errors:"), len(lines))
    items: list[list[str]] = []
    indent = None
    for line in lines[start + 1:]:
        depth, text = len(line) - len(line.lstrip()), line.strip()
        if text.startswith("- ") and (indent is None or depth <= indent):
            indent = depth
            items.append([text[2:].strip()])
        elif indent is not None and depth > indent:
            items[-1].append(text)
        else:
            break                                   # "Given value type: ..." ends the list
    reasons = []
    for head, *rest in items:
        if head.startswith(("Expected a ", "Not of type NoneType")) and not rest:
            continue                                # merely not that type
        reason = " ".join(rest) if head.endswith(":") and rest else " ".join([head, *rest])
        reasons.append(sentence(reason) if _UNION in reason else reason)
    if not reasons:
        given = re.search(r"Given value: (.*)", message)
        return f"{given.group(1) if given else 'the value'} is none of the accepted types"
    return "; ".join(dict.fromkeys(reasons))


class ExplainedParser(ArgumentParser):
    """A parser that raises :class:`UsageError` with the explained message instead of printing its
    usage and exiting (jsonargparse's debug mode still gets the raw error)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise UsageError(sentence(message, option_keys(self))) from ex


class ExplainedLightningParser(ExplainedParser, LightningArgumentParser):
    """:class:`ExplainedParser` for ``fit`` and its siblings (LightningCLI's parser class)."""


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` (anywhere) or ``DPROBE_DEBUG=1`` asks for tracebacks, and ``argv`` without it."""
    return DEBUG_FLAG in argv or env_flag(DEBUG_ENV), [a for a in argv if a != DEBUG_FLAG]


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user's mistake the project explained: one of :data:`USER_ERRORS`, or a
    ``KeyError`` whose message is a sentence (an unknown layer, task or probe); a bare ``KeyError('x')``
    is a bug, and keeps its traceback."""
    if isinstance(err, USER_ERRORS):
        return True
    return isinstance(err, KeyError) and len(err.args) == 1 and " " in str(err.args[0])


def explain(err: BaseException) -> str:
    """The message a user reads for ``err`` (a ``KeyError``'s without the quotes it prints with)."""
    if isinstance(err, (UsageError, RunFailed)):      # RunFailed quotes a log: its lines stay lines
        return str(err)
    return sentence(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))


def guarded(run: Callable[[list[str]], Any], argv: Sequence[str], prog: str) -> Any:
    """``run(argv)``, with a user's mistake (:data:`USER_ERRORS`) printed as ``prog: <message>`` and a
    non-zero exit; ``--debug`` (removed from ``argv``) or ``DPROBE_DEBUG=1`` lets it raise."""
    debug, argv = debug_requested(list(argv))
    if debug:
        return run(argv)
    try:
        return run(argv)
    except Exception as err:
        if not is_user_error(err):
            raise
        sys.exit(f"{prog}: error: {explain(err)}\n(the traceback: add {DEBUG_FLAG}, or set {DEBUG_ENV}=1)")
