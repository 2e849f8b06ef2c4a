"""A config group named by path (``labels: ../labels/toy.yaml``), read where it is named.

A dataclass or class parameter named by a group file is read into the config by jsonargparse, so
that ``--print_config`` and a run's saved ``config.yaml`` hold its values. A mapping parameter is
not: jsonargparse keeps the path as given, relative to the config file that named it, and the
saved config then works only from the folder the run started in. :class:`GroupFile` is the type
such a parameter accepts besides the mapping itself: the file is resolved as jsonargparse resolves
every path in a config (relative to the file naming it, else the working directory), read at
parse time, and written back as its content, so printed and saved configs are self-contained.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from jsonargparse.typing import Path_fr, register_type


class GroupFile:
    """The mapping held by a YAML group file, and the file it came from (for messages)."""

    def __init__(self, content: Mapping[str, Any], path: str = "") -> None:
        self.content = dict(content)
        self.path = path

    def __repr__(self) -> str:
        return f"GroupFile({self.path!r}, {self.content!r})"


def read_group_file(value: Any) -> GroupFile:
    """``value`` (a path) read as a group file; a ``TypeError``/``ValueError`` lets jsonargparse try the
    parameter's other types (an inline mapping)."""
    if not isinstance(value, str):
        raise TypeError(f"a group file is named by a path, got {type(value).__name__}")
    path = Path_fr(value)            # relative to the config file that names it, as jsonargparse resolves paths
    content = yaml.safe_load(open(path.absolute).read())
    if not isinstance(content, Mapping):
        raise ValueError(f"group file {value!r} holds {type(content).__name__}, not a mapping of keys to values")
    return GroupFile(content, path.absolute)


register_type(GroupFile, serializer=lambda group: group.content, deserializer=read_group_file)
