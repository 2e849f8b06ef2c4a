"""Train and evaluate the toy world's labelers: ``diffusion-probes toy-labelers train|eval``.

Why a plain loop: two small networks, a few minutes on a CPU, and the need to resume after an
interruption exactly where it stopped. Each step draws its batch and its augmentation from
``rng([seed, step, net])`` (stateless), so a run stopped at step k and resumed gives the same weights as an uninterrupted
one; checkpoints (model, optimiser, schedule, step, elapsed time) land in ``OUT/.checkpoints``
every ``--checkpoint-every`` steps and are removed once both networks are written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save

from probes.common.files import atomic_write, atomic_write_bytes, atomic_write_text, read_checkpoint
from probes.common.hashing import sha256_file
from probes.common.progress import progress_bar
from probes.diffusion import toy_vae
from probes.labels import toy_nets as labelers
from probes.recipes.toy_labelers.evaluate import Scores, evaluate, present_classes
from probes.toy.world import render_many, world_config

#: held-out test renders: scored once, after every setting was chosen (never trained on)
EVAL_SEED = 20_231_108
#: validation renders: settings (steps, widths, augmentation) are chosen on these, never on EVAL_SEED
VAL_SEED = 20_231_109
FIELDS = ("rgb", "foreground", "inv_depth", "shading", "classes")


@dataclass(frozen=True)
class Recipe:
    """How the toy labelers are trained (every step's batch is drawn from ``rng([seed, step, net])``).

    The defaults are the first (V1) labelers' settings; the shipped V2 labelers' recipe is
    ``configs/toy/labelers.yaml`` (``make toy-model`` passes it).

    :param seed: seed of the training scenes and batches.
    :param scenes: rendered training scenes.
    :param dense_steps: steps of the dense network (foreground, depth, shading).
    :param classifier_steps: steps of the shape classifier.
    :param batch: images per step.
    :param lr: peak learning rate (one-cycle schedule).
    :param checkpoint_every: steps between resumable checkpoints.
    :param threads: torch threads.
    :param world: the toy world rendered (``v1``, ``v2``): a labeler is only expected to work there.
    :param dense_widths: the dense U-Net's widths, comma-separated.
    :param classifier_widths: the shape classifier's widths, comma-separated.
    :param blur: largest Gaussian blur sigma (pixels) drawn per training image.
    :param noise: largest pixel noise std (of [0, 1]) drawn per training image.
    :param rotate: random quarter turns (a turned render is the render of a rolled camera, labels exact).
    :param vae_share: share of each batch replaced by the VAE round trip of the same render (needs
        ``vae``), labels still exact.
    :param vae_scenes: the first this many scenes get a VAE round trip.
    :param shading_weight: weight of the shading MSE in the dense loss.
    :param shading_grad_weight: weight of the neighbour-difference shading loss.
    """

    seed: int = 0
    scenes: int = 10_000
    dense_steps: int = 600
    classifier_steps: int = 1_500
    batch: int = 32
    lr: float = 3e-3
    checkpoint_every: int = 100
    threads: int = 1
    world: str = "v1"
    dense_widths: str = "12,24,48,64"
    classifier_widths: str = "24,32,64,96"
    blur: float = 0.0
    noise: float = 0.0
    rotate: bool = False
    vae_share: float = 0.0
    vae_scenes: int = 4_000
    shading_weight: float = 10.0
    shading_grad_weight: float = 0.0


def widths(recipe: Recipe, name: str) -> tuple[int, ...]:
    text = recipe.dense_widths if name == "dense" else recipe.classifier_widths
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"{name}_widths must be comma-separated integers like '12,24,48,64', "
                         f"got {text!r}") from None


def render_training_set(recipe: Recipe) -> dict[str, torch.Tensor]:
    """Tensors ready for batching: images, foreground, z-scored inverse depth, shading, classes."""
    if recipe.seed in (EVAL_SEED, VAL_SEED):
        raise ValueError(f"seed {recipe.seed} is a held-out seed (test {EVAL_SEED}, validation "
                         f"{VAL_SEED}); train on another one, e.g. --seed 0")
    world_config(recipe.world)                  # a bad name fails here, before rendering
    d = render_many(recipe.scenes, recipe.seed, fields=FIELDS, world=recipe.world)
    return training_tensors(d)


def training_tensors(d: dict) -> dict[str, torch.Tensor]:
    """Renders (``render_many``'s dict) -> the tensors ``train_net`` batches from."""
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
    decoded = torch.zeros(len(idx), dtype=torch.bool)
    if recipe.vae_share > 0:
        if "x_vae" not in data:
            raise ValueError(f"vae_share={recipe.vae_share} needs the training renders' VAE round "
                             "trips: pass vae=<the toy model's VAE> (--vae), or set vae_share 0")
        decoded = torch.from_numpy((rng.random(len(idx)) < recipe.vae_share)
                                   & (idx.numpy() < len(data["x_vae"])))
    out = {}
    for k, v in data.items():
        if k == "x_vae":
            continue
        v = v[idx]
        if k == "x" and decoded.any():
            v = v.clone()
            v[decoded] = data["x_vae"][idx[decoded]]
        if v.ndim >= 3:          # a mirrored render is a render of the mirrored scene
            v = torch.where(flip.view(-1, *([1] * (v.ndim - 1))), v.flip(-1), v)
        out[k] = v
    if recipe.rotate:            # a quarter turn of a render is the render of a rolled camera
        turns = rng.integers(0, 4, len(idx))
        for k, v in out.items():
            if v.ndim >= 3:
                out[k] = torch.stack([torch.rot90(a, int(q), dims=(-2, -1)) for a, q in zip(v, turns)])
    x = out["x"].float().div_(255.0)
    if recipe.blur > 0 or recipe.noise > 0:
        x = degrade(x, rng, recipe.blur, recipe.noise, skip=decoded.numpy())
    out["x"] = x.contiguous(memory_format=torch.channels_last)
    return out


def degrade(x: torch.Tensor, rng: np.random.Generator, blur: float, noise: float,
            skip: np.ndarray | None = None) -> torch.Tensor:
    """Blur each image by a Gaussian of sigma ~ U(0, blur) px and add pixel noise of std
    ~ U(0, noise), labels untouched; images marked in ``skip`` (already decoded) stay as they are.

    Why: the labelers label decoded latents, which a 4x VAE has softened and a diffusion model has
    drawn imperfectly; a net that only saw exact renders can read the blur itself as a feature
    (an edge that is soft is far away, a smooth ramp is shading).
    """
    from torchvision.transforms.v2.functional import gaussian_blur

    sigmas = rng.uniform(0.0, blur, len(x)) if blur > 0 else np.zeros(len(x))
    stds = rng.uniform(0.0, noise, len(x)) if noise > 0 else np.zeros(len(x))
    if skip is not None:
        sigmas, stds = np.where(skip, 0.0, sigmas), np.where(skip, 0.0, stds)
    out = []
    for img, sigma, std in zip(x, sigmas, stds):
        if sigma > 0.05:
            size = 2 * int(np.ceil(3 * sigma)) + 1
            img = gaussian_blur(img, [size, size], [float(sigma), float(sigma)])
        if std > 0:
            g = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
            img = (img + float(std) * g).clamp_(0.0, 1.0)
        out.append(img)
    return torch.stack(out)


def _loss(name: str, net: torch.nn.Module, b: dict[str, torch.Tensor], recipe: Recipe
          ) -> torch.Tensor:
    y = net(b["x"])
    if name == "classifier":
        return F.binary_cross_entropy_with_logits(y, b["present"])
    loss = (F.binary_cross_entropy_with_logits(y[:, 0], b["foreground"])
            + F.mse_loss(y[:, 1], b["depth"])
            + recipe.shading_weight * F.mse_loss(y[:, 2], b["shading"]))
    if recipe.shading_grad_weight > 0:
        loss = loss + recipe.shading_grad_weight * _gradient_mse(y[:, 2], b["shading"])
    return loss


def _gradient_mse(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """MSE of neighbouring-pixel differences. Why: the ground's tiles change the albedo in steps
    a few percent high, and shading leaking those steps scrambles the ranks of a smooth ramp
    although it barely moves the plain MSE; differences penalise exactly such steps."""
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (true[..., :, 1:] - true[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (true[..., 1:, :] - true[..., :-1, :])
    return 0.5 * (dx.pow(2).mean() + dy.pow(2).mean())


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def train_net(name: str, data: dict[str, torch.Tensor], recipe: Recipe, out: Path,
              stop_after: int | None = None) -> dict:
    """Train one network, resuming from ``out/.checkpoints/<name>.pt`` if present; write
    ``<name>.safetensors`` + ``<name>.json`` when done. ``stop_after`` simulates an interruption
    (tests). Returns the run's summary (steps, resumed_from, wall and CPU seconds)."""
    steps = recipe.dense_steps if name == "dense" else recipe.classifier_steps
    torch.manual_seed(recipe.seed)
    net = labelers.build(name, {"widths": widths(recipe, name)}).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    ckpt_dir = out / ".checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"{name}.pt"
    start, elapsed, cpu = 0, 0.0, 0.0
    if ckpt.exists():
        state = read_checkpoint(ckpt)
        if relevant(state["recipe"], name) != relevant(asdict(recipe), name):
            raise ValueError(f"{ckpt} was written by another recipe {state['recipe']}; delete "
                             f"{ckpt_dir} or pass the same options")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, elapsed, cpu = state["step"], state["elapsed"], state.get("cpu", 0.0)
    resumed_from = start
    net.train()
    t0, c0 = time.perf_counter(), time.process_time()
    last = min(steps, stop_after) if stop_after is not None else steps
    bar = progress_bar(steps, f"toy {name}", iterable=range(start, last), initial=start, mininterval=2.0)
    for step in bar:
        loss = _loss(name, net, _batch(data, recipe, name, step), recipe)
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
                          "cpu": cpu + time.process_time() - c0,
                          "recipe": asdict(recipe)}, ckpt)
    elapsed += time.perf_counter() - t0
    cpu += time.process_time() - c0
    summary = {"net": name, "steps": last, "resumed_from": resumed_from,
               "train_seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1)}
    if last < steps:
        return summary
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(out / labelers.FILES[name], save(tensors))
    os.chmod(out / labelers.FILES[name], 0o644)
    config = {"widths": list(net.widths), "recipe": asdict(recipe), **summary,
              "parameters": sum(p.numel() for p in net.parameters())}
    atomic_write_text((out / labelers.FILES[name]).with_suffix(".json"), json.dumps(config, indent=2))
    return summary


#: recipe fields only one network reads: changing them leaves the other network's weights valid
_ONLY = {"dense": ("dense_steps", "dense_widths", "shading_weight", "shading_grad_weight"),
         "classifier": ("classifier_steps", "classifier_widths")}


def relevant(recipe: dict, name: str) -> dict:
    """The recipe fields that decide network ``name``'s weights (the other network's own fields
    dropped), so retraining one network with new settings does not retrain the other."""
    other = _ONLY["classifier" if name == "dense" else "dense"]
    return {k: v for k, v in recipe.items() if k not in other}


def _already_done(name: str, recipe: Recipe, out: Path) -> dict | None:
    cfg = (out / labelers.FILES[name]).with_suffix(".json")
    if cfg.exists() and (out / labelers.FILES[name]).exists():
        config = json.loads(cfg.read_text())
        if relevant(config.get("recipe", {}), name) == relevant(asdict(recipe), name):
            return config
    return None


def write_manifest(out: Path) -> None:
    lines = [f"{sha256_file(out / f)}  {f}" for f in sorted(labelers.FILES.values())]
    atomic_write_text(out / "MANIFEST.sha256", "\n".join(lines) + "\n")


def _cell(scores: list[dict], key: str) -> str:
    return " | ".join(f"{s[key]:.4f}" for s in scores)


def write_recipe(out: Path, recipe: Recipe, command: str, summaries: list[dict],
                 timings: dict[str, float], scores: list[Scores], vae: Path | None = None) -> None:
    """RECIPE.md (how the weights were made, what it cost, what they score) and eval.json."""
    train_s = sum(s["train_seconds"] for s in summaries)
    train_cpu = sum(s.get("cpu_seconds", float("nan")) for s in summaries)
    params = {s["net"]: json.loads((out / labelers.FILES[s["net"]]).with_suffix(".json")
                                   .read_text())["parameters"] for s in summaries}
    rows = [asdict(s) for s in scores]
    first = rows[0]
    aug = [f"horizontal flips{', quarter turns' if recipe.rotate else ''}"]
    if recipe.blur > 0:
        aug.append(f"Gaussian blur of sigma ~ U(0, {recipe.blur}) px")
    if recipe.noise > 0:
        aug.append(f"pixel noise of std ~ U(0, {recipe.noise})")
    if recipe.vae_share > 0:
        aug.append(f"a share {recipe.vae_share} of each batch replaced by the VAE round trip of the "
                   f"same render (among the first {recipe.vae_scenes} scenes)")
    vae_line = ""
    if vae is not None:
        f = toy_vae.weights_file(vae)
        vae_line = (f"- VAE (training round trips and the reconstruction column): `{vae}`, weights "
                    f"`{f.name}` sha256 `{sha256_file(f)}`.\n")
    columns = " | ".join(r["images"] for r in rows)
    ceiling_note = ""
    if first["shading_spearman_tie_ceiling"] < 0.95:
        ceiling_note = """
The shading bar sits above the metric's ceiling in this world: a directional light shades the
flat ground and the wall uniformly, so about half of each image's true shading is one tied
value, and any predictor that is not exactly constant there breaks the tie; the "ceiling" rows
are what the truth itself scores once its ties are broken by a 1e-9 jitter.
"""
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    text = f"""# Toy-world labelers: how these weights were made

Command (from the repository root):

    {command}

Recipe: `{json.dumps(asdict(recipe))}`

- Training data: {recipe.scenes} renders `scene_for({recipe.seed}, 0..{recipe.scenes - 1}, world={recipe.world!r})`,
  64 px; augmentation: {'; '.join(aug)} (labels unchanged but for the flips and turns, which move
  with the image); each step samples its batch from `default_rng([seed, step, net])`.
- `dense.safetensors`: TinyUNet {list(widths(recipe, 'dense'))}, {params.get('dense', '?')} parameters,
  {recipe.dense_steps} steps of batch {recipe.batch}; channels = foreground logit, per-image z-scored
  inverse depth, shading.
- `classifier.safetensors`: ShapeClassifier {list(widths(recipe, 'classifier'))}, {params.get('classifier', '?')}
  parameters, {recipe.classifier_steps} steps of batch {recipe.batch}; 4 sigmoid outputs over SHAPES; a
  shape is "present" when >= {labelers.MIN_VISIBLE_PIXELS} pixels show it.
- AdamW (lr {recipe.lr}, one-cycle schedule, weight decay 1e-4), torch threads {recipe.threads}.
{vae_line}- Settings were chosen on validation renders (seed {VAL_SEED}); the table's seed was scored once.

Time on this machine ({os.cpu_count()} shared cores, load average {load} over 1 / 5 / 15 min at
the end; CPU seconds are this process's, wall seconds include waiting for other jobs):
rendering {timings['render_cpu']:.0f} s CPU ({timings['render_s']:.0f} s wall), VAE round trips of
training renders {timings.get('vae_cpu', 0):.0f} s CPU ({timings.get('vae_s', 0):.0f} s wall), training {train_cpu:.0f} s CPU
({train_s:.0f} s wall: {', '.join(f"{x['net']} {x.get('cpu_seconds', float('nan')):.0f} s CPU / {x['train_seconds']:.0f} s wall" for x in summaries)}),
held-out evaluation {timings['eval_cpu']:.0f} s CPU ({timings['eval_s']:.0f} s wall);
total {timings['render_cpu'] + timings.get('vae_cpu', 0) + train_cpu + timings['eval_cpu']:.0f} s CPU, {timings['render_s'] + timings.get('vae_s', 0) + train_s + timings['eval_s']:.0f} s wall.

Held-out evaluation: {first['n_images']} renders of seed {first['seed']} (never trained on or used to
choose settings), world {first['world']}, per-image means, on {columns}:

| metric | {columns} | project bar |
|---|{'---|' * len(rows)}---|
| foreground Dice (threshold 0.5) | {_cell(rows, 'foreground_dice')} | >= 0.95 |
| depth Spearman (vs true inverse depth) | {_cell(rows, 'depth_spearman')} | >= 0.95 |
| shading Spearman | {_cell(rows, 'shading_spearman')} | >= 0.9 |
| shading Spearman, object pixels only | {_cell(rows, 'shading_spearman_objects')} | |
| ceiling: jittered true depth's Spearman | {_cell(rows, 'depth_spearman_tie_ceiling')} | |
| ceiling: jittered true shading's Spearman | {_cell(rows, 'shading_spearman_tie_ceiling')} | |
| classifier: top class named by the caption | {_cell(rows, 'classifier_top1_in_caption')} | |
| classifier: per-shape accuracy (vs visible shapes, 0.5) | {_cell(rows, 'classifier_label_accuracy')} | |
| classifier: exact set of visible shapes | {_cell(rows, 'classifier_exact_match')} | |
{ceiling_note}
Check the files with `sha256sum -c MANIFEST.sha256` in this folder.
"""
    atomic_write_text(out / "RECIPE.md", text)
    atomic_write_text(out / "eval.json", json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n")


def vae_transform(vae_path: Path, vae_config: Path | None = None
                  ) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """uint8 images -> their round trip through the VAE at ``vae_path``, and a name for the scores."""
    kwargs = {} if vae_config is None else {"config": vae_config}
    vae = toy_vae.load_vae(vae_path, **kwargs)
    step = toy_vae.checkpoint_step(vae_path)
    name = "VAE reconstructions" + (f" (checkpoint step {step})" if step is not None else "")
    return (lambda rgb: toy_vae.reconstruct(vae, rgb)), name


def evaluate_all(out: Path, world: str, n: int, seed: int = EVAL_SEED, vae: Path | None = None,
                 vae_config: Path | None = None) -> list[Scores]:
    """Scores on the renders, and on their VAE reconstructions when a VAE is given."""
    scores = [evaluate(out, n=n, seed=seed, world=world)]
    if vae is not None:
        transform, name = vae_transform(vae, vae_config)
        scores.append(evaluate(out, n=n, seed=seed, world=world, transform=transform, images=name))
    return scores


def train(out: Path, recipe: Recipe, force: bool = False, eval_n: int = 512,
          command: str = "", stop_after: int | None = None, vae: Path | None = None,
          vae_config: Path | None = None) -> list[dict]:
    """Both networks, then the manifest, the held-out evaluation and RECIPE.md."""
    world_config(recipe.world)
    widths(recipe, "dense"), widths(recipe, "classifier")
    if recipe.vae_share > 0 and vae is None:
        raise ValueError(f"vae_share={recipe.vae_share} trains on VAE round trips: pass the toy "
                         "model's VAE with --vae (a pipeline folder, its vae/, or <work>/vae.ckpt)")
    torch.set_num_threads(recipe.threads)
    out.mkdir(parents=True, exist_ok=True)
    summaries, pending = [], []
    for name in ("dense", "classifier"):
        done = None if force else _already_done(name, recipe, out)
        if done is not None:
            summaries.append({k: done[k] for k in ("net", "steps", "resumed_from",
                                                   "train_seconds", "cpu_seconds") if k in done})
        else:
            pending.append(name)
    t0, c0 = time.perf_counter(), time.process_time()
    data = render_training_set(recipe) if pending else None
    timings = {"render_s": time.perf_counter() - t0, "render_cpu": time.process_time() - c0,
               "vae_s": 0.0, "vae_cpu": 0.0}
    if data is not None and recipe.vae_share > 0:
        t0, c0 = time.perf_counter(), time.process_time()
        transform, _ = vae_transform(vae, vae_config)
        rgb = data["x"][:recipe.vae_scenes].permute(0, 2, 3, 1).numpy()
        data["x_vae"] = torch.from_numpy(transform(rgb)).permute(0, 3, 1, 2).contiguous()
        timings.update(vae_s=time.perf_counter() - t0, vae_cpu=time.process_time() - c0)
    for name in pending:
        summary = train_net(name, data, recipe, out, stop_after=stop_after)
        summaries.append(summary)
        if stop_after is not None and summary["steps"] < (
                recipe.dense_steps if name == "dense" else recipe.classifier_steps):
            return summaries
    del data
    write_manifest(out)
    labelers._load_net.cache_clear()
    t0, c0 = time.perf_counter(), time.process_time()
    scores = evaluate_all(out, recipe.world, eval_n, EVAL_SEED, vae, vae_config)
    timings.update(eval_s=time.perf_counter() - t0, eval_cpu=time.process_time() - c0)
    write_recipe(out, recipe, command, summaries, timings, scores, vae)
    shutil.rmtree(out / ".checkpoints", ignore_errors=True)
    return summaries


def train_command(out: Path = labelers.WEIGHTS_DIR, recipe: Recipe = Recipe(), force: bool = False,
                  eval_n: int = 512, vae: Path | None = None, vae_config: Path | None = None) -> list[dict]:
    """``diffusion-probes toy-labelers train``: train both networks (resumes from ``OUT/.checkpoints``).

    :param out: the weights folder to write.
    :param recipe: the training recipe (world, seeds, sizes, steps, augmentation, threads).
    :param force: retrain even if the weights exist.
    :param eval_n: held-out renders the written weights are scored on.
    :param vae: the toy model's VAE (a pipeline folder, its ``vae/``, or the model recipe's
        ``<work>/vae.ckpt``): round trips for ``recipe.vae_share``, and a second score column on
        the held-out renders' reconstructions.
    :param vae_config: the model recipe config whose ``vae.arch`` rebuilds a ``vae.ckpt``
        (default ``configs/toy/model.yaml``).
    """
    out = Path(out)
    summaries = train(out, recipe, force=force, eval_n=eval_n, command="diffusion-probes " + " ".join(sys.argv[1:]),
                      vae=vae, vae_config=vae_config)
    for summary in summaries:
        print(json.dumps(summary))
    print((out / "RECIPE.md").read_text())
    return summaries


def evaluate_command(weights: Path = labelers.WEIGHTS_DIR, n: int = 512, seed: int = EVAL_SEED,
                     world: str | None = None, vae: Path | None = None, vae_config: Path | None = None,
                     threads: int = 1) -> list[dict]:
    """``diffusion-probes toy-labelers eval``: score weights on held-out renders (and, with ``vae``,
    on their VAE reconstructions).

    :param weights: the weights folder.
    :param n: renders scored.
    :param seed: scene seed: 20231108 is the test set, 20231109 the validation set.
    :param world: the world rendered (default: the one the weights were trained on).
    :param vae: also score on reconstructions by this VAE (a pipeline folder, its ``vae/``, or the
        model recipe's ``<work>/vae.ckpt``).
    :param vae_config: the recipe config whose ``vae.arch`` rebuilds a ``vae.ckpt``.
    :param threads: torch threads.
    """
    torch.set_num_threads(threads)
    world = world or labelers.trained_world(Path(weights))
    scores = [asdict(s) for s in evaluate_all(Path(weights), world, n, seed, vae, vae_config)]
    print(json.dumps(scores, indent=2))
    return scores
