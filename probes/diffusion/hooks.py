"""Forward hooks on named U-Net modules, set on entry and removed on exit.

Capture, intervention and the semantic lens all swap behaviour the way diffusers swaps attention
processors: an object attaches itself to modules for the length of a ``with`` block and leaves
the model as it found it. This is that lifecycle, once; subclasses say which hook goes where.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn


class HookNeverFired(RuntimeError):
    """A hooked layer produced nothing: its module was bypassed (e.g. a fused attention kernel)."""


class ModuleHooks:
    """Base of hook objects: ``with obj:`` registers :meth:`hooks`, leaving removes them all."""

    unet: nn.Module

    def hooks(self) -> Iterable[tuple[str, Callable[..., Any]]]:
        """``(module path, forward hook)`` pairs, in registration order."""
        raise NotImplementedError

    def pre_hooks(self) -> Iterable[tuple[str, Callable[..., Any]]]:
        """``(module path, forward pre-hook)`` pairs (``""`` is the U-Net itself)."""
        return ()

    def kwarg_pre_hooks(self) -> Iterable[tuple[str, Callable[..., Any]]]:
        """``(module path, forward pre-hook)`` pairs whose hook also receives the call's keyword arguments
        (``hook(module, args, kwargs)``): what a recorder of the U-Net's inputs needs."""
        return ()

    def __enter__(self):
        self._handles: list[Any] = []
        for path, fn in self.hooks():
            self._handles.append(self.unet.get_submodule(path).register_forward_hook(fn))
        for path, fn in self.pre_hooks():
            self._handles.append(self.unet.get_submodule(path).register_forward_pre_hook(fn))
        for path, fn in self.kwarg_pre_hooks():
            self._handles.append(self.unet.get_submodule(path).register_forward_pre_hook(fn, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
