"""``make bench``: measure the framework's speed claims and write them to BENCHMARKS.md.

Every ratio is measured within one run, alternating the two sides in rounds (these machines are
noisy), and every figure is written with the device, the library versions and the command.
Sections: capture overhead; probe bank vs one probe at a time; store read throughput vs ``dd``;
streaming ridge vs cached SGD (wall time and metric gap); the whole experiment next to plain
diffusers generation of the same images (tiny model and SD v1.4 architecture); torch threads on a
shared machine; SD v1.4 architecture throughput on the GPU when one is present; and the projected
cost of the 617-image experiment on one GPU from FLOP counts (a projection, not a measurement).
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from probes.bench.planted import planted_datamodule
from probes.common.files import atomic_write_text
from probes.common.quiet import quiet_known_noise
from probes.common.threads import apply_thread_policy
from probes.diffusion.layers import LayerRegistry
from probes.diffusion.loading import DiffusionSpec, load_architecture, load_pipeline
from probes.generation.call import initial_latents
from probes.generation.sampling import (
    CaptureSpec,
    GenerationSpec,
    generate,
    make_scheduler,
    native_size,
)
from probes.prompts.sets import PromptRecord, PromptSpec, load_prompts
from probes.reporting.run_outputs import RunOutputs
from probes.training.datamodule import ActivationDataModule
from probes.training.heads import ProbeBank, SortedBlocks, regression_loss
from probes.training.module import ProbeModule
from probes.training.ridge import RidgeProbeModule

REPO = Path(__file__).resolve().parents[2]


def _env() -> str:
    import diffusers
    import transformers

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return (f"device: {dev}; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
            f"{transformers.__version__}, pytorch-lightning {pl.__version__}, numpy {np.__version__}, "
            f"python {platform.python_version()}, torch threads {torch.get_num_threads()}")


def _rounds(fns: dict[str, Callable[[], Any]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Time each function once per round, alternating, after one warm-up call each (``warmup``)."""
    for fn in fns.values() if warmup else ():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out[k].append(time.perf_counter() - t0)
    return out


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(index=i, prompt=f"a photo of object number {i}", seed=i, split="train") for i in range(n)]


# -- 1. capture overhead ----------------------------------------------------------------------
def capture_overhead(pipe, n_images: int, steps: int, rounds: int, height: int | None = None) -> dict[str, Any]:
    recs = _records(n_images)
    h = height or native_size(pipe)[0]
    spec = GenerationSpec(steps=steps, batch_size=n_images, height=h, width=h)
    f = pipe.vae_scale_factor
    layers = LayerRegistry.from_unet(pipe.unet, (h // f, h // f)).select("*")

    def plain():
        pipe.scheduler = make_scheduler(pipe, "lms")
        lat = initial_latents([r.seed for r in recs], (4, h // f, h // f)).to(pipe.device, pipe.unet.dtype)
        with torch.inference_mode():
            pipe(prompt=[r.prompt for r in recs], negative_prompt=[""] * len(recs), num_inference_steps=steps,
                 guidance_scale=7.5, height=h, width=h, latents=lat, output_type="np")

    def captured():
        for _ in generate(pipe, recs, range(n_images), spec, layers, CaptureSpec(), progress=False):
            pass

    t = _rounds({"plain": plain, "capture": captured}, rounds)
    p, c = statistics.median(t["plain"]), statistics.median(t["capture"])
    return {"images": n_images, "steps": steps, "size": h, "layers": len(layers), "plain_s": p, "capture_s": c,
            "ratio": c / p, "rounds": rounds}


# -- 2. probe bank vs one probe at a time ------------------------------------------------------
def bank_vs_single(dm: ActivationDataModule, task: str = "depth", max_heads: int | None = None) -> dict[str, Any]:
    """One epoch of SGD for every (step, layer) head of ``task``: as one bank, and head by head.

    Same init, same batch order (no shuffle), same Adam: the weights must agree.
    """
    spec = dm.probe_spec
    loader = dm.loader("train", shuffle=False)
    stats = spec.target_stats[task]
    torch.manual_seed(0)
    bank = ProbeBank(spec.layers, len(spec.steps), 1)
    init = {k: v.detach().clone() for k, v in bank.weight.items()}
    heads = [(l, s) for l in spec.layers for s in range(len(spec.steps))][:max_heads]

    def z(batch):
        return (batch["labels"][task].float() - stats["mean"]) / stats["std"]

    t0 = time.perf_counter()
    opt = torch.optim.Adam(bank.parameters(), lr=1e-3)
    for batch in loader:
        y = z(batch)
        opt.zero_grad()
        blocks = {g: SortedBlocks(y, g) for g in {tuple(l.grid) for l in spec.layers}}  # shared by all heads
        loss = sum(regression_loss(bank.forward_layer(l.name, batch["acts"][l.name].float())[..., 0], y, l.grid,
                                   blocks=blocks[tuple(l.grid)]).mean(0).sum() for l in spec.layers)
        loss.backward()
        opt.step()
    t_bank = time.perf_counter() - t0

    t0 = time.perf_counter()
    max_diff = 0.0
    for layer, s in heads:
        key = layer.name.replace(".", "_")
        w = torch.nn.Parameter(init[key][s].clone())
        opt1 = torch.optim.Adam([w], lr=1e-3)
        for batch in loader:  # a full pass over the data for this one probe
            x = batch["acts"][layer.name][:, s].float()
            opt1.zero_grad()
            regression_loss((x @ w)[:, None, :, 0], z(batch), layer.grid).mean().backward()
            opt1.step()
        max_diff = max(max_diff, (w.detach() - bank.weight[key][s].detach()).abs().max().item())
    t_single = (time.perf_counter() - t0) * len(spec.layers) * len(spec.steps) / len(heads)
    return {"heads": len(spec.layers) * len(spec.steps), "heads_timed_single": len(heads), "bank_s": t_bank,
            "single_s": t_single, "speedup": t_single / t_bank, "max_weight_diff": max_diff,
            "images": len(dm.datasets["train"])}


# -- 3. store read throughput ------------------------------------------------------------------
def read_throughput(dm: ActivationDataModule, rounds: int = 3) -> dict[str, Any]:
    """Bytes/s of the training DataLoader over every stored activation vs ``dd`` of the same files."""
    from probes.training.datasets import ActivationDataset, collated

    store = dm.store
    files = [a.path for a in store.acts.values()]
    nbytes = sum(a.nbytes for a in store.acts.values())
    ds = ActivationDataset(store, range(store.num_samples), {})

    def loader_read(workers: int) -> Callable[[], None]:
        def run() -> None:
            for _ in torch.utils.data.DataLoader(ds, batch_size=dm.batch_size, shuffle=True, num_workers=workers,
                                                 collate_fn=collated):
                pass
        return run

    def dd_read() -> None:
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)

    t = _rounds({"dd": dd_read, "w0": loader_read(0), "w2": loader_read(2)}, rounds)
    dd_s = statistics.median(t["dd"])
    out = {"bytes": nbytes, "dd_GBps": nbytes / dd_s / 1e9, "rounds": rounds}
    for w in ("w0", "w2"):
        s = statistics.median(t[w])
        out[w] = {"GBps": nbytes / s / 1e9, "ratio": dd_s / s}
    return out


# -- 4. streaming ridge vs cached SGD ----------------------------------------------------------
def _fit_test(module, dm, epochs: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    trainer = pl.Trainer(accelerator="auto", devices=1, max_epochs=epochs,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    wall = time.perf_counter() - t0
    return wall, {(r["task"], r["layer"], r["step"], r["metric"]): r["value"] for r in module.results["test"]}


def ridge_vs_sgd(make_dm: Callable[[str], ActivationDataModule], sgd_epochs: int) -> dict[str, Any]:
    t_sgd, m_sgd = _fit_test(ProbeModule(), make_dm("cached"), sgd_epochs)
    t_ridge, m_ridge = _fit_test(RidgeProbeModule(), make_dm("streaming"), 1)
    out: dict[str, Any] = {"sgd_s": t_sgd, "ridge_s": t_ridge, "sgd_epochs": sgd_epochs}
    for task, metric in sorted({(k[0], k[3]) for k in m_sgd if k[3] != "loss"}):
        keys = [k for k in m_sgd if k[0] == task and k[3] == metric]
        gap = np.array([m_ridge[k] - m_sgd[k] for k in keys])
        best = max if metric != "rmse" else min
        out[f"{task}/{metric}"] = {"mean_gap": float(gap.mean()), "best_sgd": best(m_sgd[k] for k in keys),
                                   "best_ridge": best(m_ridge[k] for k in keys)}
    return out


# -- 5. the whole experiment next to plain generation ------------------------------------------
def plain_generation(diffusion: DiffusionSpec, records: list[PromptRecord], generation: GenerationSpec,
                     device: str) -> None:
    """What a user runs to get the same images with stock diffusers: load the pipeline, generate
    in the same batches with the same seeds, sampler, steps, size and guidance; no capture."""
    pipe = load_pipeline(diffusion, device)
    h, w = generation.height or native_size(pipe)[0], generation.width or native_size(pipe)[1]
    f = pipe.vae_scale_factor
    pipe.scheduler = make_scheduler(pipe, generation.scheduler)
    dev = torch.device(device)
    for k in range(0, len(records), generation.batch_size):
        recs = records[k:k + generation.batch_size]
        lat = initial_latents([r.seed for r in recs], (pipe.unet.config.in_channels, h // f, w // f))
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            pipe(prompt=[r.prompt for r in recs], negative_prompt=[generation.negative_prompt] * len(recs),
                 num_inference_steps=generation.steps, guidance_scale=generation.guidance_scale, height=h, width=w,
                 latents=lat.to(dev, pipe.unet.dtype), output_type="np")


def whole_experiment(mode: str, diffusion: DiffusionSpec, prompts: PromptSpec, generation: GenerationSpec,
                     labels: dict[str, dict[str, Any]], epochs: int, work: Path) -> None:
    """``train.py fit`` in one process, into a fresh store: load, generate with capture, label,
    fit (``cached``: SGD for ``epochs``; ``streaming``: one-pass ridge, nothing cached), test, and
    write every output (metrics, export, plots, panels, report)."""
    import contextlib
    import io

    dm = ActivationDataModule(diffusion=diffusion, prompts=prompts, generation=generation, capture=CaptureSpec(),
                              labels=labels, mode=mode, store_root=str(work / "stores"), device="auto", progress=False)
    module = ProbeModule(lr=0.01) if mode == "cached" else RidgeProbeModule()
    trainer = pl.Trainer(accelerator="auto", devices=1, max_epochs=epochs if mode == "cached" else 1, logger=False,
                         callbacks=[RunOutputs(out_dir=str(work / "run"), link_store=False)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(work / "run"))
    with contextlib.redirect_stdout(io.StringIO()):   # the run's results table is not the benchmark's
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)


def experiment_vs_plain(diffusion: DiffusionSpec, prompts: PromptSpec, generation: GenerationSpec,
                        labels: dict[str, dict[str, Any]], epochs: int, rounds: int, work: Path) -> dict[str, Any]:
    """Wall time of the whole experiment (cached and streaming) over plain generation of the same
    images, alternating the three in rounds within this process (no warm-up: each side loads its
    model, as a user's run does)."""
    records = load_prompts(prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = iter(range(10 ** 6))
    fns = {"plain": lambda: plain_generation(diffusion, records, generation, device),
           "cached": lambda: whole_experiment("cached", diffusion, prompts, generation, labels, epochs,
                                              work / f"exp-{next(runs)}"),
           "streaming": lambda: whole_experiment("streaming", diffusion, prompts, generation, labels, epochs,
                                                 work / f"exp-{next(runs)}")}
    t = _rounds(fns, rounds, warmup=False)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"images": len(records), "steps": generation.steps, "epochs": epochs, "rounds": rounds,
            "decode": generation.decode, **{f"{k}_s": v for k, v in med.items()},
            "cached_ratio": med["cached"] / med["plain"], "streaming_ratio": med["streaming"] / med["plain"]}


# -- 6. torch threads on a shared machine -----------------------------------------------------
def thread_scaling(pipe, n_images: int, steps: int, rounds: int, counts: tuple[int, ...]) -> dict[str, Any]:
    """The same plain generation with each torch thread count, alternating within one run.

    The machine's load (other processes) is part of the measurement: on a shared machine more
    threads than free cores make every parallel region wait for a descheduled thread.
    """
    recs = _records(n_images)
    h = native_size(pipe)[0]
    f = pipe.vae_scale_factor
    before = torch.get_num_threads()

    def run(n: int) -> Callable[[], None]:
        def go() -> None:
            torch.set_num_threads(n)
            pipe.scheduler = make_scheduler(pipe, "lms")
            lat = initial_latents([r.seed for r in recs], (4, h // f, h // f)).to(pipe.device, pipe.unet.dtype)
            with torch.inference_mode():
                pipe(prompt=[r.prompt for r in recs], negative_prompt=[""] * len(recs), num_inference_steps=steps,
                     guidance_scale=7.5, height=h, width=h, latents=lat, output_type="np")
        return go

    load0 = os.getloadavg()[0]
    try:
        t = _rounds({n: run(n) for n in counts}, rounds)
    finally:
        torch.set_num_threads(before)
    med = {n: statistics.median(v) for n, v in t.items()}
    return {"images": n_images, "steps": steps, "rounds": rounds, "seconds": med, "all": t, "load_before": load0,
            "load_after": os.getloadavg()[0], "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


# -- 8. projection for the 617-image experiment on one GPU ------------------------------------
#: assumed sustained throughputs of one data-centre GPU for the projection (stated in the output)
ASSUMED = {"fp16_tflops": 80.0,    # ~25 % of an A100's 312 TFLOP/s dense fp16 peak
           "fp64_tflops": 10.0,    # ~50 % of an A100's 19.5 TFLOP/s fp64 (tensor core) peak
           "disk_gbps": 2.0}       # a local NVMe SSD, sequential-ish reads


def flop_counts(architecture: str = "sd14") -> dict[str, Any]:
    """FLOPs of one guided U-Net call (cond + uncond, batch 2), one VAE decode and the probes,
    counted by ``torch.utils.flop_counter`` on the meta device (no weights, no compute)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    arch = load_architecture(architecture)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
    s = int(arch["unet"]["sample_size"])
    x = torch.empty(2, int(arch["unet"]["in_channels"]), s, s, device="meta")
    ctx = torch.empty(2, 77, int(arch["unet"]["cross_attention_dim"]), device="meta")
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.full((2,), 999.0, device="meta"), encoder_hidden_states=ctx)
    unet_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vae.decode(torch.empty(1, int(arch["unet"]["in_channels"]), s, s, device="meta"))
    layers = LayerRegistry.from_unet(unet, (s, s)).select("*")
    tc = sum(layer.tokens * layer.channels for layer in layers)              # per step
    tcc = sum(layer.tokens * layer.channels ** 2 for layer in layers)
    return {"unet_guided_call": unet_flops, "vae_decode": fc.get_total_flops(), "layers": len(layers),
            "act_values_per_step": tc, "gram_flops_per_step": 2 * tcc}


def gpu_projection(flops: dict[str, Any], images: int = 617, train: int = 221, val: int = 25, test: int = 371,
                   steps: int = 15, epochs: int = 30, outputs: int = 4) -> dict[str, float]:
    """Seconds of each part of the experiment at the ``ASSUMED`` throughputs (a projection).

    ``outputs``: probe outputs over all tasks (foreground 2 logits + depth + shading).
    """
    f16, f64, disk = ASSUMED["fp16_tflops"] * 1e12, ASSUMED["fp64_tflops"] * 1e12, ASSUMED["disk_gbps"] * 1e9
    per_image_bytes = flops["act_values_per_step"] * steps * 2                    # fp16, conditional half
    gen = images * (steps * flops["unet_guided_call"] + flops["vae_decode"]) / f16
    return {
        "generation_s": gen,
        "decode_test_s": test * steps * flops["vae_decode"] / f16,
        "store_write_s": images * per_image_bytes / disk,
        "store_bytes": images * per_image_bytes,
        "sgd_read_s": (epochs * (train + val) + test) * per_image_bytes / disk,
        "sgd_flops_s": (epochs * train * 3 + epochs * val + test) * 2 * flops["act_values_per_step"] * steps * outputs / f16,
        "ridge_gram_s": train * steps * flops["gram_flops_per_step"] / f64,
    }


def projection_section(flops: dict[str, Any]) -> list[str]:
    p = gpu_projection(flops)
    cached = p["generation_s"] + p["store_write_s"] + p["sgd_read_s"] + p["sgd_flops_s"]
    streaming = p["generation_s"] + p["ridge_gram_s"]
    m = 60.0
    return [
        "## 8. Projection: the 617-image experiment on one GPU (a projection from FLOP counts, not a measurement)", "",
        f"FLOPs counted with `torch.utils.flop_counter` on the SD v1.4 architecture (meta device): one guided U-Net "
        f"call at 512x512 (conditional + unconditional) {flops['unet_guided_call'] / 1e12:.2f} TFLOP, one VAE decode "
        f"{flops['vae_decode'] / 1e12:.2f} TFLOP; the 16 layers hold {flops['act_values_per_step'] / 1e6:.1f} M "
        f"activation values per step. Assumed sustained rates: fp16 {ASSUMED['fp16_tflops']:.0f} TFLOP/s (about a "
        f"quarter of an A100's dense peak), fp64 {ASSUMED['fp64_tflops']:.0f} TFLOP/s, disk "
        f"{ASSUMED['disk_gbps']:.0f} GB/s. Not included: model loading, the labelers (TRACER, MiDaS, Intrinsic), "
        "and Python overhead; a real GPU run will be slower than this.", "",
        "| part | projected minutes |", "|---|---|",
        f"| generation: 617 images x 15 guided U-Net calls + final decode | {p['generation_s'] / m:.1f} |",
        f"| labelers on decoded noisy latents x_(t-1) (`all_decoded.yaml`): 371 test images x 15 decodes "
        f"(the same for decode=x0) | {p['decode_test_s'] / m:.1f} |",
        f"| cached: write the store ({p['store_bytes'] / 1e9:.0f} GB) | {p['store_write_s'] / m:.1f} |",
        f"| cached: read it for 30 SGD epochs (train + val) and test | {p['sgd_read_s'] / m:.1f} |",
        f"| cached: probe FLOPs (720 probes, 30 epochs) | {p['sgd_flops_s'] / m:.2f} |",
        f"| streaming: ridge Gram matrices (fp64) | {p['ridge_gram_s'] / m:.1f} |",
        f"| **whole experiment, cached SGD** | **{cached / m:.1f}** |",
        f"| **whole experiment, streaming ridge** | **{streaming / m:.1f}** |", ""]



# -- report -----------------------------------------------------------------------------------
#: BENCHMARKS.md from this line on holds figures other commands measured (make demo, make toy-model,
#: make intervene, make lens); make bench rewrites what is above it and keeps the rest
KEEP_MARKER = "<!-- measured by other commands; make bench keeps this part -->"


def bench(out: str = "BENCHMARKS.md", quick: bool = False, workdir: str | None = None) -> Path:
    """``diffusion-probes bench`` (``make bench``): measure, and rewrite the measured part of ``out``.

    :param out: the Markdown file to (re)write; what follows its keep-marker is kept.
    :param quick: tiny sizes (checks the script; the figures are not meaningful).
    :param workdir: where stores and runs go (default: a new temporary folder).
    """
    quiet_known_noise()
    threads = apply_thread_policy(verbose=False)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(workdir or tempfile.mkdtemp(prefix="dprobe-bench-"))
    cmd = "make bench" if not quick else f"diffusion-probes bench --quick true --out {out}"
    lines = ["# Benchmarks\n", f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}.", "", f"- {_env()}",
             f"- thread policy (`probes/common/threads.py`): {threads.describe().removeprefix('[threads] ')}; "
             f"load average at start {os.getloadavg()[0]:.1f}", ""]
    pl.seed_everything(0, verbose=False)
    classical = {"foreground": {"name": "otsu"}, "depth": {"name": "vertical"}, "shading": {"name": "luminance"}}
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def make_dm(mode: str, limit: int | None = None) -> ActivationDataModule:
        dm = ActivationDataModule(
            diffusion=DiffusionSpec(source="random", architecture="tiny"),
            prompts=PromptSpec(source=str(REPO / "data/prompts/demo.txt"), limit=limit or (4 if quick else None),
                               val_fraction=0.15, test_fraction=0.25),
            generation=GenerationSpec(batch_size=8), capture=CaptureSpec(),
            labels=classical, mode=mode, store_root=str(work / "stores"), device="auto", progress=False)
        return dm

    # 1
    tiny = load_pipeline(DiffusionSpec(source="random", architecture="tiny"), device)
    co = capture_overhead(tiny, n_images=2 if quick else 8, steps=15, rounds=2 if quick else 7)
    lines += ["## 1. Capture overhead (target <= 1.10x)", "",
              "Generation of the same images with all 16 self-attention layers x 15 steps captured (fp16, moved off "
              "the device once per batch) vs the plain pipeline; median of alternating rounds.", "",
              "| model | images x steps | size | plain (s) | with capture (s) | ratio |", "|---|---|---|---|---|---|",
              f"| tiny (random) | {co['images']} x {co['steps']} | {co['size']} | {co['plain_s']:.3f} | "
              f"{co['capture_s']:.3f} | **{co['ratio']:.3f}x** |"]
    if not quick:
        sd = load_pipeline(DiffusionSpec(source="random", architecture="sd14"), device)
        if torch.cuda.is_available():
            co2 = capture_overhead(sd, n_images=8, steps=15, rounds=5)
        else:
            co2 = capture_overhead(sd, n_images=1, steps=2, rounds=2)  # 2 cores: a few guided calls only
        lines.append(f"| SD v1.4 architecture (random) | {co2['images']} x {co2['steps']} | {co2['size']} | "
                     f"{co2['plain_s']:.2f} | {co2['capture_s']:.2f} | **{co2['ratio']:.3f}x** |")
        if not torch.cuda.is_available():
            lines += ["", "On the CPU the SD v1.4 row is 1 image and 2 guided steps (each call takes seconds on 2 "
                      "cores), and the copy off the device is a no-op, so it measures the hooks and buffers only; "
                      "ratios below 1 are noise."]
        del sd
    lines.append("")

    # 2 and 3 on the tiny demo store
    dm = make_dm("cached")
    dm.setup("fit")
    bs = bank_vs_single(dm, max_heads=12 if quick else None)
    extrapolated = (f" (extrapolated from {bs['heads_timed_single']} heads)"
                    if bs['heads_timed_single'] < bs['heads'] else "")
    lines += ["## 2. Probe bank vs one probe at a time (target >= 10x, identical results)", "",
              f"One SGD epoch (Adam, lr 1e-3, batch {dm.batch_size}, no shuffle) over the {bs['images']} train images of "
              f"the tiny demo store for all {bs['heads']} (step, layer) depth probes: one bank (every batch feeds every "
              "head) vs one pass over the data per probe (the reference's way, minus its regeneration).", "",
              "| all heads as one bank (s) | head by head (s) | speed-up | max weight difference |", "|---|---|---|---|",
              f"| {bs['bank_s']:.2f} | {bs['single_s']:.2f}{extrapolated} "
              f"| **{bs['speedup']:.1f}x** | {bs['max_weight_diff']:.1e} |", ""]
    rt = read_throughput(dm, rounds=2 if quick else 5)
    lines += ["## 3. Store read throughput while training vs raw sequential read (target >= 0.5x)", "",
              f"All activations of the tiny demo store ({rt['bytes'] / 1e6:.0f} MB, 16 layers x 15 steps) read through "
              f"the training DataLoader (shuffled batches of {dm.batch_size}, one memmap read per layer and batch) vs "
              "`dd bs=4M` of the same files (one `dd` process per layer file); all from the page cache (warm), median "
              "of alternating rounds.", "",
              "| reader | GB/s | ratio to dd |", "|---|---|---|",
              f"| dd | {rt['dd_GBps']:.2f} | 1.00x |",
              f"| DataLoader, 0 workers | {rt['w0']['GBps']:.2f} | **{rt['w0']['ratio']:.2f}x** |",
              f"| DataLoader, 2 workers | {rt['w2']['GBps']:.2f} | **{rt['w2']['ratio']:.2f}x** |", "",
              "Workers hand batches to the main process through shared memory (one more copy); with 2 cores they "
              "only pay off when reads wait on a disk rather than the page cache.", ""]

    # 4
    rv = ridge_vs_sgd(lambda mode: make_dm(mode), sgd_epochs=2 if quick else 30)
    lines += ["## 4. Streaming ridge vs cached SGD", "",
              f"Tiny demo experiment (3 tasks x 240 probes), end to end in one process: cached = generation into the "
              f"store + labels + {rv['sgd_epochs']} SGD epochs + test; streaming = generation + labels + one-pass ridge "
              "(λ per head on val) + test, with no activation cache (test images regenerated). Gap = ridge minus SGD "
              "test metric, averaged over the 240 heads.", "",
              "| wall time cached SGD (s) | wall time streaming ridge (s) |", "|---|---|",
              f"| {rv['sgd_s']:.1f} | {rv['ridge_s']:.1f} |", "",
              "| task/metric | mean gap (ridge - SGD) | best head SGD | best head ridge |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['mean_gap']:+.3f} | {v['best_sgd']:.3f} | {v['best_ridge']:.3f} |"
              for k, v in rv.items() if isinstance(v, dict)]
    # the planted set is synthetic (no generation to stream): both read the same store contents
    pv = ridge_vs_sgd(lambda mode: planted_datamodule(work / f"planted-{mode}"), sgd_epochs=5 if quick else 30)
    lines += ["", "Planted-signal dataset (labels a known linear function of one head's activations plus noise; "
              "both read from the same synthetic store):", "",
              "| task/metric | mean gap (ridge - SGD) | best head SGD | best head ridge |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['mean_gap']:+.3f} | {v['best_sgd']:.3f} | {v['best_ridge']:.3f} |"
              for k, v in pv.items() if isinstance(v, dict)]
    lines += ["", f"Wall time on the planted set: SGD {pv['sgd_s']:.1f} s ({pv['sgd_epochs']} epochs), ridge {pv['ridge_s']:.1f} s.", ""]

    # 5
    lines += experiment_section(work, quick, classical)

    # 6
    if quick:
        th = thread_scaling(tiny, n_images=2, steps=3, rounds=1, counts=(1, 2))
    else:
        th = thread_scaling(tiny, n_images=8, steps=15, rounds=5, counts=(1, 2))
    t1 = th["seconds"][1]
    lines += ["## 6. Torch threads on a shared machine", "",
              f"Plain generation of {th['images']} tiny-model images x {th['steps']} steps with 1 and with 2 torch "
              f"threads, alternating within this run (median of {th['rounds']} rounds), on {th['cpus']} CPUs with a "
              f"load average of {th['load_before']:.1f} before and {th['load_after']:.1f} after (other processes' "
              "work counts: that is the point). The thread policy picks one thread per core not busy with others.", "",
              "| torch threads | median seconds | range | time / time with 1 thread |", "|---|---|---|---|"]
    lines += [f"| {n} | {v:.2f} | {min(th['all'][n]):.2f}-{max(th['all'][n]):.2f} | {v / t1:.2f}x |"
              for n, v in th["seconds"].items()]
    lines.append("")

    # 7
    lines += ["## 7. SD v1.4 architecture on the GPU", ""]
    if torch.cuda.is_available() and not quick:
        lines += gpu_section()
    else:
        lines += ["Not measured in this run: no CUDA device. `make bench` on a GPU machine fills this section "
                  "(images/s and U-Net calls/s at 512x512 fp16 with and without capture). Section 8 projects the "
                  "experiment's GPU cost from FLOP counts meanwhile.", ""]
    # 8
    lines += projection_section(flop_counts("sd14"))
    dest = Path(out)
    previous = dest.read_text() if dest.exists() else ""
    kept = previous[previous.index(KEEP_MARKER):] if KEEP_MARKER in previous else ""
    atomic_write_text(dest, "\n".join(lines) + "\n" + ("\n" + kept if kept else ""))   # sections other commands recorded
    print("\n".join(lines))
    if not workdir:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def experiment_section(work: Path, quick: bool, labels: dict[str, dict[str, Any]]) -> list[str]:
    """Section 5: whole experiment / plain generation, tiny model and SD v1.4 architecture."""
    import yaml

    rows = []
    tiny = DiffusionSpec(source="random", architecture="tiny")
    demo = PromptSpec(source="demo", val_fraction=0.15, test_fraction=0.25, limit=1 if quick else None)
    gen = GenerationSpec(**yaml.safe_load((REPO / "configs/generation/demo.yaml").read_text()))
    rows.append((f"tiny (`configs/tiny.yaml`: 8 SGD epochs; labelers on decoded {gen.decode} latents)",
                 experiment_vs_plain(tiny, demo, gen, labels, epochs=1 if quick else 8, rounds=1 if quick else 3,
                                     work=work / "exp-tiny")))
    if not quick:
        sd14 = DiffusionSpec(**yaml.safe_load((REPO / "configs/diffusion/sd14_random.yaml").read_text()))
        few = PromptSpec(source="demo", val_fraction=0.15, test_fraction=0.25, limit=1)   # 1 train, 1 val, 1 test
        gen14 = GenerationSpec(steps=3, batch_size=1, height=512, width=512)
        rows.append(("SD v1.4 architecture, random weights (`configs/diffusion/sd14_random.yaml`), 512x512, "
                     "3 steps, 30 SGD epochs", experiment_vs_plain(sd14, few, gen14, labels, epochs=30, rounds=1,
                                                                 work=work / "exp-sd14")))
    out = ["## 5. The whole experiment next to plain generation of the same images", "",
           "Plain = load the pipeline and generate the images with stock diffusers (same prompts, seeds, batches, "
           "sampler, steps and guidance; no capture). Whole experiment = `train.py fit` in one process into a fresh "
           "store: load, generate with capture (and the decoded intermediate images of the test split where the "
           "config asks: generation.decode), "
           "label (classical labelers), fit, test, and write every output (metrics, export, plots, panels, report). "
           "The three alternate in rounds within this run; medians.", "",
           "| model and settings | images | plain (s) | cached SGD (s) | ratio | streaming ridge (s) | ratio |",
           "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {r['images']} | {r['plain_s']:.1f} | {r['cached_s']:.1f} | **{r['cached_ratio']:.2f}x** | "
                   f"{r['streaming_s']:.1f} | **{r['streaming_ratio']:.2f}x** |")
    out += ["", "With real weights the labelers (TRACER, MiDaS, Intrinsic) add their own cost, which the classical "
            "stand-ins here do not have.", ""]
    return out


def gpu_section() -> list[str]:
    """SD v1.4 architecture, random weights, fp16, 512x512, batch 8: generation with/without capture."""
    pipe = load_pipeline(DiffusionSpec(source="random", architecture="sd14"), "cuda")
    co = capture_overhead(pipe, n_images=8, steps=15, rounds=5)
    ips_plain, ips_cap = 8 / co["plain_s"], 8 / co["capture_s"]
    calls = 617 * 15
    proj_min = 617 / ips_cap / 60
    return ["| batch | plain img/s | capture img/s | U-Net calls/s (capture) | overhead |", "|---|---|---|---|---|",
            f"| 8 | {ips_plain:.2f} | {ips_cap:.2f} | {ips_cap * 15:.1f} | {co['ratio']:.3f}x |", "",
            f"Projected generation of the 617-image experiment ({calls} guided calls): {proj_min:.1f} min.", ""]
