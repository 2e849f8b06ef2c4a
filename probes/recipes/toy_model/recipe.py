"""Train the toy world's diffusion model end to end: ``diffusion-probes toy-model --out data/toy/model --work outputs/toy``.

Why a recipe: every offline number of this project otherwise comes from random weights. This
renders the toy world, trains SD v1.4's VAE class on it, caches the latents and caption
embeddings, trains SD v1.4's U-Net topology on them, and saves a standard diffusers
``StableDiffusionPipeline`` folder (fp16 safetensors, ``MANIFEST.sha256``, ``RECIPE.md``,
``samples.png``) that the probing pipeline loads like SD itself.

Rerunning the same command resumes: finished stages are read back from ``--work``, an interrupted
training stage continues from its last checkpoint, and the result is the same.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from probes.common.files import atomic_write, atomic_write_text
from probes.common.hashing import sha256_file
from probes.common.progress import progress_bar
from probes.diffusion.toy_vae import build_vae
from probes.paths import REPO_ROOT
from probes.recipes.toy_model import autoencoder, denoiser
from probes.recipes.toy_model.checkpoint import write_json_atomic

DEFAULT_CONFIG = REPO_ROOT / "configs" / "toy" / "model.yaml"
RENDER_CHUNK = 1000


def load_config(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def clip_tokenizer():
    """The project's offline CLIP tokenizer (the one every random-weight pipeline gets)."""
    from probes.diffusion.tokenizer import offline_clip_tokenizer

    return offline_clip_tokenizer()


def render_dataset(cfg: dict[str, Any], work: Path) -> tuple[np.ndarray, list[str], float]:
    """RGB images and captions of the training scenes, rendered once and cached (chunks resume)."""
    from probes.toy.world import render_many

    d = cfg["data"]
    final = work / "scenes.npz"
    if not final.exists():
        parts = work / "scenes_parts"
        parts.mkdir(parents=True, exist_ok=True)
        tick = time.time()
        chunks = range(0, d["n_scenes"], RENDER_CHUNK)
        for start in progress_bar(len(chunks), "render scenes", iterable=chunks):
            part = parts / f"{start:07d}.npz"
            if part.exists():
                continue
            n = min(RENDER_CHUNK, d["n_scenes"] - start)
            batch = render_many(n, d["world_seed"], size=d["size"], start=start,
                                max_objects=d["max_objects"], fields=("rgb",), world=d.get("world", "v1"))
            with atomic_write(part, "wb") as f:
                np.savez(f, rgb=batch["rgb"], captions=np.array(batch["captions"]))
        chunks = [np.load(p) for p in sorted(parts.glob("[0-9]*.npz"))]
        rgb = np.concatenate([c["rgb"] for c in chunks])
        captions = np.concatenate([c["captions"] for c in chunks])
        with atomic_write(final, "wb") as f:
            np.savez(f, rgb=rgb, captions=captions, seconds=np.array(time.time() - tick))
        shutil.rmtree(parts)
    data = np.load(final)
    return data["rgb"], [str(c) for c in data["captions"]], float(data["seconds"])


def cached_latents(vae, rgb: np.ndarray, vae_steps: int, work: Path) -> tuple[np.ndarray, float]:
    """Posterior means of every scene, computed once per trained VAE (keyed by its step count)."""
    path, meta = work / "latents.npy", work / "latents.json"
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("vae_steps") == vae_steps:
        return np.load(path), json.loads(meta.read_text())["seconds"]
    tick = time.time()
    lat = autoencoder.encode_latents(vae, rgb)
    seconds = time.time() - tick
    with atomic_write(path, "wb") as f:
        np.save(f, lat)
    write_json_atomic({"vae_steps": vae_steps, "seconds": seconds}, meta)
    return lat, seconds


def save_tokenizer(tokenizer, folder: Path) -> None:
    """SD's tokenizer layout (``vocab.json`` + ``merges.txt``, 1.6 MB), not the 3.6 MB ``tokenizer.json``."""
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    tokenizer.backend_tokenizer.model.save(str(folder))


def write_manifest(folder: Path) -> list[str]:
    """``sha256sum``-format lines over every weight file (``sha256sum -c MANIFEST.sha256`` checks them)."""
    files = sorted(p for p in folder.rglob("*.safetensors"))
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    atomic_write_text(folder / "MANIFEST.sha256", "\n".join(lines) + "\n")
    return lines


def write_scheduler_config(sched: dict[str, Any], path: Path) -> None:
    """Exactly SD v1.4's keys: diffusers would also save ``timestep_spacing: leading``, which K-LMS
    built ``from_config`` would inherit, moving its 15 timesteps off the protocol's 999 ... 0."""
    import diffusers

    atomic_write_text(path, json.dumps(sched | {"_diffusers_version": diffusers.__version__}, indent=2) + "\n")


def export_pipeline(vae, text_encoder, tokenizer, unet, cfg: dict[str, Any], out: Path) -> int:
    """Write the diffusers folder (fp16 weights) to ``<out>.tmp`` and swap it in whole; returns bytes."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    sched_cfg = {k: v for k, v in cfg["scheduler"].items() if not k.startswith("_")}
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(sched_cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    save_tokenizer(tokenizer, tmp / "tokenizer")
    write_scheduler_config(cfg["scheduler"], tmp / "scheduler" / "scheduler_config.json")
    # transformers loads with dtype "auto" (the config's) when no dtype is given: say float32
    # so a bare from_pretrained upcasts the text encoder like diffusers does the U-Net and VAE
    te_cfg = tmp / "text_encoder" / "config.json"
    atomic_write_text(te_cfg, json.dumps(json.loads(te_cfg.read_text()) | {"dtype": "float32"}, indent=2) + "\n")
    write_manifest(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return sum(p.stat().st_size for p in out.rglob("*.safetensors"))


def sample_grid(out: Path, captions: list[str], cfg: dict[str, Any]) -> float:
    """Generate with the protocol's sampler (K-LMS from the saved scheduler config, guidance 7.5)
    from the folder just written, so the grid also proves the folder loads; returns seconds."""
    from diffusers import LMSDiscreteScheduler, StableDiffusionPipeline
    from PIL import Image

    s = cfg["samples"]
    tick = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = captions[: s["n"]]
    size = cfg["data"]["size"]
    images = pipe(prompts, num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"], height=size,
                  width=size, generator=torch.Generator().manual_seed(s["seed"]), output_type="np").images
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    grid = np.zeros((rows * size, cols * size, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = (img * 255).round().clip(0, 255).astype(np.uint8)
    with atomic_write(out / "samples.png", "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    atomic_write_text(out / "samples.txt", "\n".join(prompts) + "\n")
    return time.time() - tick


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def write_recipe(out: Path, command: str, cfg: dict[str, Any], config_text: str, rec: dict[str, Any]) -> None:
    """RECIPE.md: what it takes to get these exact weights again, and what it cost here."""
    v, u = cfg["vae"]["train"], cfg["unet"]["train"]
    mb = rec["weight_bytes"] / 1e6
    text = f"""# Toy world diffusion model: recipe

Made by

```bash
{command}
```

(config copied below, with the step timings that chose the widths; rerunning the command resumes from
`--work`; raising `unet.train.steps` and rerunning trains longer, exactly as a longer run would).

| stage | what | wall time |
|---|---|---|
| render | {cfg['data']['n_scenes']} scenes, `render_many(n, seed={cfg['data']['world_seed']}, size={cfg['data']['size']}, world={cfg['data'].get('world', 'v1')!r})` | {rec['render_s']:.0f} s |
| VAE | {v['steps']} steps x batch {v['batch_size']} ({v['crop']} px crops), AdamW lr {v['lr']} ({_schedule(v)}), final loss {rec['vae_loss']:.4f} (L1 + {v.get('chroma_weight', 0)} x colour L1, mean of last 50 steps); reconstruction MAE on 512 of its training scenes (full 64 px) {rec['vae_mae']:.2f}/255 | {rec['vae_s']:.0f} s |
| latents | posterior means of all scenes; `scaling_factor` = 1/std = {rec['scaling_factor']:.5f} | {rec['latents_s']:.0f} s |
| text | {rec['n_captions']} distinct captions (+ the empty prompt) through the frozen CLIP text encoder | {rec['text_s']:.0f} s |
| U-Net | {u['steps']} steps x batch {u['batch_size']}, AdamW lr {u['lr']} (warmup {u['warmup']}, {_schedule(u)}), Min-SNR-{u['snr_gamma']}, caption dropout {u['caption_dropout']}, EMA {u['ema_decay']}; final loss (mean of last 50 steps) {rec['unet_loss']:.4f} | {rec['unet_s']:.0f} s |
| samples | {cfg['samples']['n']} images, K-LMS {cfg['samples']['steps']} steps, guidance {cfg['samples']['guidance_scale']} (`samples.png`, prompts in `samples.txt`) | {rec.get('samples_s', 0):.0f} s |

Seed {cfg['seed']} (VAE init seed {cfg['seed']}, text encoder {cfg['seed'] + 1}, U-Net {cfg['seed'] + 2}; every
training step's batch and noise come from a generator seeded by (stage seed, step)).
Weights: {mb:.1f} MB of fp16 safetensors (loading with `dtype=torch.float32` upcasts), checked by
`MANIFEST.sha256` (`cd data/toy/model && sha256sum -c MANIFEST.sha256`).
Parameters: U-Net {rec['params']['unet'] / 1e6:.2f} M, VAE {rec['params']['vae'] / 1e6:.2f} M, text encoder
{rec['params']['text_encoder'] / 1e6:.2f} M (of which {rec['params']['token_embedding'] / 1e6:.2f} M token embedding).

Machine: {rec['machine']}.

```yaml
{config_text.rstrip()}
```
"""
    atomic_write_text(out / "RECIPE.md", text)


#: stages ``until`` may stop after: what a parallel job waits for (the labelers need the VAE)
STOP_AFTER = ("vae",)


def run(config: Path, out: Path, work: Path, command: str, until: str | None = None) -> dict[str, Any]:
    """All stages, each skipped or resumed from ``work`` when already (partly) done; ``until="vae"``
    stops once ``work/vae.ckpt`` holds the finished VAE (``make toy-model`` then trains the labelers,
    which need it, beside the U-Net)."""
    if until is not None and until not in STOP_AFTER:
        raise ValueError(f"until={until!r} is no stage to stop after; use one of {STOP_AFTER} or leave it unset")
    cfg = load_config(config)
    # the U-Net stage may use more threads than the stages before it: ``make toy-model`` trains
    # the labelers before it, so it has both cores to itself
    unet_threads = int(cfg["unet"]["train"].get("threads", cfg.get("threads", 1)))
    if unet_threads < 1:
        raise ValueError(f"unet.train.threads={unet_threads} in {config}: give a thread count of 1 or more")
    torch.set_num_threads(int(cfg.get("threads", 1)))
    work.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])
    rec: dict[str, Any] = {"machine": machine()}

    rgb, captions, rec["render_s"] = render_dataset(cfg, work)

    vae = build_vae(cfg["vae"]["arch"], seed)
    vres = autoencoder.train_vae(vae, rgb, cfg["vae"]["train"], work / "vae.ckpt", seed)
    rec.update(vae_s=vres.seconds, vae_loss=vres.final_loss, vae_mae=autoencoder.reconstruction_error(vae, rgb[-512:]))
    if until == "vae":
        return rec

    latents, rec["latents_s"] = cached_latents(vae, rgb, vres.steps, work)
    rec["scaling_factor"] = autoencoder.scaling_factor(latents)
    vae.register_to_config(scaling_factor=rec["scaling_factor"])

    tick = time.time()
    tokenizer = clip_tokenizer()
    text_encoder = denoiser.build_text_encoder(cfg["text_encoder"], seed + 1)
    distinct, caption_index = denoiser.caption_table(captions)
    embeds = denoiser.embed_captions(text_encoder, tokenizer, distinct)
    rec.update(text_s=time.time() - tick, n_captions=len(distinct) - 1)

    torch.set_num_threads(unet_threads)
    rec["machine"] += f"; {unet_threads} thread(s) in the U-Net stage"
    unet = denoiser.build_unet(cfg["unet"]["arch"], seed + 2)
    ures, ema = denoiser.train_unet(unet, latents * rec["scaling_factor"], caption_index, embeds,
                                     cfg["unet"]["train"], cfg["scheduler"], work / "unet.ckpt", seed + 2)
    if ema is not None:
        ema.copy_to(unet)
    rec.update(unet_s=ures.seconds, unet_loss=ures.final_loss)
    rec["params"] = {"unet": _count(unet), "vae": _count(vae), "text_encoder": _count(text_encoder),
                     "token_embedding": text_encoder.get_input_embeddings().weight.numel()}

    rec["weight_bytes"] = export_pipeline(vae, text_encoder, tokenizer, unet, cfg, out)
    if cfg["samples"]["n"] > 0:
        rec["samples_s"] = sample_grid(out, captions, cfg)
    write_recipe(out, command, cfg, config.read_text(), rec)
    write_json_atomic({k: v for k, v in rec.items()} | {"vae_losses": vres.losses, "unet_losses": ures.losses},
                      work / "records.json")
    return rec


def _schedule(train: dict[str, Any]) -> str:
    floor = float(train.get("lr_floor", 0.1))
    return "then constant" if floor >= 1 else f"cosine to {floor:g}x"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def toy_model(out: Path = Path("data/toy/model"), work: Path = Path("outputs/toy"),
              recipe: Path = DEFAULT_CONFIG, until: str | None = None) -> dict[str, Any]:
    """``diffusion-probes toy-model`` (``make toy-model``): train the toy world's diffusion model.

    :param out: the diffusers pipeline folder to write.
    :param work: caches and checkpoints (a rerun resumes from them).
    :param recipe: the recipe's YAML (architecture, data, training).
    :param until: stop after this stage (``vae``: the VAE is trained, ``work/vae.ckpt`` final); a
        rerun without it continues from there.
    """
    command = "diffusion-probes " + " ".join(sys.argv[1:])
    rec = run(Path(recipe), Path(out), Path(work), command, until=until)
    print(json.dumps({k: v for k, v in rec.items() if k != "params"}, indent=2))
    return rec
