"""A seeded, resumable optimisation loop shared by the toy VAE and U-Net trainers.

Why one loop: both stages must survive being killed at any moment (the recipe runs for tens of
minutes on shared CPUs) and must give the same weights when rerun. Each step draws its batch,
noise and timesteps from a generator seeded by ``(seed, step)``, so a resumed run needs no saved
RNG state and continues exactly where the last checkpoint left off; checkpoints are written to a
temporary file and renamed, so a kill mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probes.common.files import atomic_write, atomic_write_text, read_checkpoint
from probes.common.progress import progress_bar


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write then rename: a reader (or a resumed run) never sees a half-written file."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The only randomness a step may use: a pure function of (seed, step), so resuming is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup, then cosine down to ``floor``.

    ``floor=1`` is a constant rate, which (with EMA) lets a finished run be extended by raising its
    step count and rerunning: the continuation is then exactly a longer run.
    """
    if step < warmup:
        return (step + 1) / warmup
    if floor >= 1.0:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of parameters, with the usual ``(1+n)/(10+n)`` warm-up.

    Why: a few thousand CPU steps at a high learning rate leave noisy weights; averaging them is
    nearly free and gives cleaner samples. The warm-up keeps early averages from clinging to the
    random init.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, module.parameters()):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)


@dataclass
class LoopResult:
    """What a finished stage reports into RECIPE.md."""

    steps: int
    seconds: float
    final_loss: float
    losses: list[float]


def run_loop(name: str, ckpt_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             loss_fn: Callable[[torch.Generator], torch.Tensor], *, steps: int, seed: int, lr: float,
             warmup: int, ckpt_every: int, lr_floor: float = 0.1, ema_decay: float | None = None,
             grad_clip: float = 1.0) -> tuple[LoopResult, EMA | None]:
    """Train ``model`` for ``steps`` optimiser steps, resuming from ``ckpt_path`` if it exists.

    ``loss_fn(generator)`` computes one batch's loss using only ``generator`` for randomness.
    Wall time is summed over resumed runs, so RECIPE.md reports the real cost of a stage.
    """
    ema = EMA(model, ema_decay) if ema_decay else None
    start, elapsed, losses = 0, 0.0, []
    if ckpt_path.exists():
        state = read_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.shadow = state["ema"]
        start, elapsed, losses = state["step"], state["seconds"], state["losses"]

    def save(step: int) -> None:
        atomic_torch_save({"step": step, "seconds": elapsed, "losses": losses,
                           "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "ema": ema.shadow if ema is not None else None}, ckpt_path)

    model.train()
    bar = progress_bar(steps, name, iterable=range(start, steps), initial=start, mininterval=5.0)
    tick = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup, lr_floor)
        loss = loss_fn(step_generator(seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{_mean_tail(losses):.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            now = time.time()
            elapsed, tick = elapsed + now - tick, now
            save(step + 1)
    bar.close()
    model.eval()
    done = max(start, steps)
    return LoopResult(done, elapsed, _mean_tail(losses), losses), ema


def _mean_tail(losses: list[float], n: int = 50) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def write_json_atomic(obj: Any, path: Path) -> None:
    """Stage records (``done.json``) are written whole or not at all."""
    atomic_write_text(path, json.dumps(obj, indent=2))
