"""Train and evaluate the toy world's labelers: ``diffusion-probes toy-labelers train|eval``.

Why a plain loop: two small networks, a few minutes on a CPU, and the need to resume after an
interruption exactly where it stopped. Each step draws its batch from ``rng([seed, step])``
(stateless), so a run stopped at step k and resumed gives the same weights as an uninterrupted
one; checkpoints (model, optimiser, schedule, step, elapsed time) land in ``OUT/.checkpoints``
every ``--checkpoint-every`` steps and are removed once both networks are written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save

from probes.common.files import atomic_write, atomic_write_bytes, atomic_write_text, read_checkpoint
from probes.common.hashing import sha256_file
from probes.common.progress import progress_bar
from probes.labels import toy_nets as labelers
from probes.recipes.toy_labelers.evaluate import Scores, evaluate, present_classes
from probes.toy.world import render_many

EVAL_SEED = 20_231_108
FIELDS = ("rgb", "foreground", "inv_depth", "shading", "classes")


@dataclass(frozen=True)
class Recipe:
    """How the toy labelers are trained (every step's batch is drawn from ``rng([seed, step])``).

    :param seed: seed of the training scenes and batches.
    :param scenes: rendered training scenes.
    :param dense_steps: steps of the dense network (foreground, depth, shading).
    :param classifier_steps: steps of the shape classifier.
    :param batch: images per step.
    :param lr: peak learning rate (one-cycle schedule).
    :param checkpoint_every: steps between resumable checkpoints.
    :param threads: torch threads.
    """

    seed: int = 0
    scenes: int = 10_000
    dense_steps: int = 600
    classifier_steps: int = 1_500
    batch: int = 32
    lr: float = 3e-3
    checkpoint_every: int = 100
    threads: int = 1


def render_training_set(recipe: Recipe) -> dict[str, torch.Tensor]:
    """Tensors ready for batching: images, foreground, z-scored inverse depth, shading, classes."""
    if recipe.seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} is the held-out evaluation seed")
    d = render_many(recipe.scenes, recipe.seed, fields=FIELDS)
    inv = d["inv_depth"]
    mean, std = inv.mean((1, 2), keepdims=True), inv.std((1, 2), keepdims=True)
    return {
        "x": torch.from_numpy(d["rgb"]).permute(0, 3, 1, 2).contiguous(),       # uint8 NCHW
        "foreground": torch.from_numpy(d["foreground"].astype(np.float32)),
        "depth": torch.from_numpy(((inv - mean) / np.maximum(std, 1e-6)).astype(np.float32)),
        "shading": torch.from_numpy(d["shading"]),
        "present": torch.from_numpy(present_classes(d["classes"])),
    }


def _batch(data: dict[str, torch.Tensor], recipe: Recipe, name: str, step: int
           ) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([recipe.seed, step, 0 if name == "dense" else 1])
    idx = torch.from_numpy(rng.choice(len(data["x"]), size=min(recipe.batch, len(data["x"])),
                                      replace=False))
    flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
    out = {}
    for k, v in data.items():
        v = v[idx]
        if v.ndim >= 3:          # a mirrored render is a render of the mirrored scene
            v = torch.where(flip.view(-1, *([1] * (v.ndim - 1))), v.flip(-1), v)
        out[k] = v
    out["x"] = out["x"].float().div_(255.0).contiguous(memory_format=torch.channels_last)
    return out


def _loss(name: str, net: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    y = net(b["x"])
    if name == "classifier":
        return F.binary_cross_entropy_with_logits(y, b["present"])
    return (F.binary_cross_entropy_with_logits(y[:, 0], b["foreground"])
            + F.mse_loss(y[:, 1], b["depth"])
            + 10.0 * F.mse_loss(y[:, 2], b["shading"]))


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def train_net(name: str, data: dict[str, torch.Tensor], recipe: Recipe, out: Path,
              stop_after: int | None = None) -> dict:
    """Train one network, resuming from ``out/.checkpoints/<name>.pt`` if present; write
    ``<name>.safetensors`` + ``<name>.json`` when done. ``stop_after`` simulates an interruption
    (tests). Returns the run's summary (steps, resumed_from, wall seconds)."""
    steps = recipe.dense_steps if name == "dense" else recipe.classifier_steps
    torch.manual_seed(recipe.seed)
    net = labelers.build(name).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    ckpt_dir = out / ".checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{name}.pt"
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = read_checkpoint(ckpt)
        if state["recipe"] != asdict(recipe):
            raise ValueError(f"{ckpt} was written by another recipe {state['recipe']}; delete "
                             f"{ckpt_dir} or pass the same options")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, elapsed = state["step"], state["elapsed"]
    resumed_from = start
    net.train()
    t0 = time.perf_counter()
    last = min(steps, stop_after) if stop_after is not None else steps
    bar = progress_bar(steps, f"toy {name}", iterable=range(start, last), initial=start, mininterval=2.0)
    for step in bar:
        loss = _loss(name, net, _batch(data, recipe, name, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        done = step + 1
        if done % recipe.checkpoint_every == 0 or done == last:
            _save_atomic({"model": net.state_dict(), "opt": opt.state_dict(),
                          "sched": sched.state_dict(), "step": done,
                          "elapsed": elapsed + time.perf_counter() - t0,
                          "recipe": asdict(recipe)}, ckpt)
    elapsed += time.perf_counter() - t0
    summary = {"net": name, "steps": last, "resumed_from": resumed_from,
               "train_seconds": round(elapsed, 1)}
    if last < steps:
        return summary
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(out / labelers.FILES[name], save(tensors))
    os.chmod(out / labelers.FILES[name], 0o644)
    config = {"widths": list(net.widths), "recipe": asdict(recipe), **summary,
              "parameters": sum(p.numel() for p in net.parameters())}
    atomic_write_text((out / labelers.FILES[name]).with_suffix(".json"), json.dumps(config, indent=2))
    return summary


def _already_done(name: str, recipe: Recipe, out: Path) -> dict | None:
    cfg = (out / labelers.FILES[name]).with_suffix(".json")
    if cfg.exists() and (out / labelers.FILES[name]).exists():
        config = json.loads(cfg.read_text())
        if config.get("recipe") == asdict(recipe):
            return config
    return None


def write_manifest(out: Path) -> None:
    lines = [f"{sha256_file(out / f)}  {f}" for f in sorted(labelers.FILES.values())]
    atomic_write_text(out / "MANIFEST.sha256", "\n".join(lines) + "\n")


def write_recipe(out: Path, recipe: Recipe, command: str, summaries: list[dict],
                 render_seconds: float, scores: Scores, eval_seconds: float) -> None:
    train_s = sum(s["train_seconds"] for s in summaries)
    params = {s["net"]: json.loads((out / labelers.FILES[s["net"]]).with_suffix(".json")
                                   .read_text())["parameters"] for s in summaries}
    s = asdict(scores)
    text = f"""# Toy-world labelers: how these weights were made

Command (from the repository root):

    {command}

Recipe: `{json.dumps(asdict(recipe))}`

- Training data: {recipe.scenes} renders `scene_for({recipe.seed}, 0..{recipe.scenes - 1})`, 64 px,
  horizontal flips; each step samples its batch from `default_rng([seed, step, net])`.
- `dense.safetensors`: TinyUNet, {params.get('dense', '?')} parameters, {recipe.dense_steps} steps
  of batch {recipe.batch}; channels = foreground logit, per-image z-scored inverse depth, shading.
- `classifier.safetensors`: ShapeClassifier, {params.get('classifier', '?')} parameters,
  {recipe.classifier_steps} steps of batch {recipe.batch}; 4 sigmoid outputs over SHAPES; a shape
  is "present" when >= {labelers.MIN_VISIBLE_PIXELS} pixels show it.
- AdamW (lr {recipe.lr}, one-cycle schedule, weight decay 1e-4), torch threads {recipe.threads}.

Wall time (measured on this machine, `nice -n 19`, load average at the end
{' / '.join(f'{v:.1f}' for v in os.getloadavg())} over 1 / 5 / 15 min on {os.cpu_count()} cores): rendering {render_seconds:.0f} s, training {train_s:.0f} s
({', '.join(f"{x['net']} {x['train_seconds']:.0f} s" for x in summaries)}),
held-out evaluation {eval_seconds:.0f} s; total {render_seconds + train_s + eval_seconds:.0f} s.

Held-out evaluation: {s['n_images']} renders of seed {s['seed']} (never used in training),
per-image means:

| metric | value | project bar |
|---|---|---|
| foreground Dice (threshold 0.5) | {s['foreground_dice']:.4f} | >= 0.95 |
| depth Spearman (vs true inverse depth) | {s['depth_spearman']:.4f} | >= 0.95 |
| shading Spearman | {s['shading_spearman']:.4f} | >= 0.9 |
| shading Spearman, object pixels only | {s['shading_spearman_objects']:.4f} | |
| ceiling: jittered true depth's Spearman | {s['depth_spearman_tie_ceiling']:.4f} | |
| ceiling: jittered true shading's Spearman | {s['shading_spearman_tie_ceiling']:.4f} | |
| classifier: top class named by the caption | {s['classifier_top1_in_caption']:.4f} | |
| classifier: per-shape accuracy (vs visible shapes, 0.5) | {s['classifier_label_accuracy']:.4f} | |
| classifier: exact set of visible shapes | {s['classifier_exact_match']:.4f} | |

The shading bar sits above the metric's ceiling in this world: a directional light shades the
flat ground and the wall uniformly, so about half of each image's true shading is one tied
value, and any predictor that is not exactly constant there breaks the tie; the "ceiling" rows
are what the truth itself scores once its ties are broken by a 1e-9 jitter.

Check the files with `sha256sum -c MANIFEST.sha256` in this folder.
"""
    atomic_write_text(out / "RECIPE.md", text)
    atomic_write_text(out / "eval.json", json.dumps(s, indent=2) + "\n")


def train(out: Path, recipe: Recipe, force: bool = False, eval_n: int = 512,
          command: str = "", stop_after: int | None = None) -> list[dict]:
    """Both networks, then the manifest, the held-out evaluation and RECIPE.md."""
    torch.set_num_threads(recipe.threads)
    out.mkdir(parents=True, exist_ok=True)
    summaries, pending = [], []
    for name in ("dense", "classifier"):
        done = None if force else _already_done(name, recipe, out)
        if done is not None:
            summaries.append({k: done[k] for k in ("net", "steps", "resumed_from",
                                                   "train_seconds")})
        else:
            pending.append(name)
    t0 = time.perf_counter()
    data = render_training_set(recipe) if pending else None
    render_seconds = time.perf_counter() - t0
    for name in pending:
        summary = train_net(name, data, recipe, out, stop_after=stop_after)
        summaries.append(summary)
        if stop_after is not None and summary["steps"] < (
                recipe.dense_steps if name == "dense" else recipe.classifier_steps):
            return summaries
    write_manifest(out)
    labelers._load_net.cache_clear()
    t0 = time.perf_counter()
    scores = evaluate(out, n=eval_n, seed=EVAL_SEED)
    eval_seconds = time.perf_counter() - t0
    write_recipe(out, recipe, command, summaries, render_seconds, scores, eval_seconds)
    shutil.rmtree(out / ".checkpoints", ignore_errors=True)
    return summaries


def train_command(out: Path = labelers.WEIGHTS_DIR, recipe: Recipe = Recipe(), force: bool = False,
                  eval_n: int = 512) -> list[dict]:
    """``diffusion-probes toy-labelers train``: train both networks (resumes from ``OUT/.checkpoints``).

    :param out: the weights folder to write.
    :param recipe: the training recipe (seeds, sizes, steps, learning rate, threads).
    :param force: retrain even if the weights exist.
    :param eval_n: held-out renders the written weights are scored on.
    """
    out = Path(out)
    summaries = train(out, recipe, force=force, eval_n=eval_n, command="diffusion-probes " + " ".join(sys.argv[1:]))
    for summary in summaries:
        print(json.dumps(summary))
    print((out / "RECIPE.md").read_text())
    return summaries


def evaluate_command(weights: Path = labelers.WEIGHTS_DIR, n: int = 512, threads: int = 1) -> dict:
    """``diffusion-probes toy-labelers eval``: score weights on held-out renders.

    :param weights: the weights folder.
    :param n: renders scored.
    :param threads: torch threads.
    """
    torch.set_num_threads(threads)
    scores = asdict(evaluate(Path(weights), n=n, seed=EVAL_SEED))
    print(json.dumps(scores, indent=2))
    return scores
