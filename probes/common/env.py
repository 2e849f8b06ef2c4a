"""Environment flags, read one way everywhere.

``HF_HUB_OFFLINE`` (the hub's own flag) and ``DPROBE_OFFLINE`` (this project's, for non-hub
downloads too) both mean "never touch the network"; every loader asks :func:`offline`.
"""
from __future__ import annotations

import os

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
OFFLINE_ENV = ("HF_HUB_OFFLINE", "DPROBE_OFFLINE")


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1/true/yes/on, any case)."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def offline() -> bool:
    """Whether the user asked for no network access (``HF_HUB_OFFLINE`` or ``DPROBE_OFFLINE``)."""
    return any(env_flag(k) for k in OFFLINE_ENV)
