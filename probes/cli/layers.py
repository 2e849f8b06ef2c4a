"""``diffusion-probes layers`` and ``sizes``: a model's probe layers, and what a store of them costs.

Both read configs only (a denoiser built on the meta device: no weights, no network), so they
answer before anything is downloaded: ``layers --model`` takes a family (its first real model),
a Hub id (the cached config, else the layer-fixing fields kept for the real models), a local
pipeline folder, or a random architecture (``tiny``, ``sd14``, ``tiny_<family>``).
"""
from __future__ import annotations

from probes.diffusion.families.sizes import bytes_per_image, real_models, size_table
from probes.diffusion.families.spec import FAMILIES, get_family
from probes.diffusion.loading import DiffusionSpec, list_architectures
from probes.store.activations import human_bytes
from probes.store.disk import planned_registry


def model_spec(model: str, family: str | None = None) -> DiffusionSpec:
    """The :class:`DiffusionSpec` ``layers --model`` means: a family's first real model, a random
    architecture, or a Hub id / local folder (``family`` where it cannot be read off the model)."""
    if model in FAMILIES:
        known = [m for m in get_family(model).real_models if m in real_models()]
        if not known:
            raise ValueError(f"model family {model} has no real model with a known config; give --model a Hub id or "
                             f"folder")
        return DiffusionSpec(model_id=known[0], family=model, tokenizer="default")
    if model in list_architectures():
        return DiffusionSpec(source="random", architecture=model, tokenizer="default")
    return DiffusionSpec(model_id=model, family=family, tokenizer="default")


def layers(model: str = "sd1", family: str | None = None, pattern: str = "*", kinds: str | None = None,
           size: int | None = None, steps: int = 15, halves: int = 1) -> list[str]:
    """List a model's probe layers: name, kind, channels, token grid, readout rule, hooked module.

    :param model: a model family (sd1, sd2, sdxl, sd3, pixart_alpha, pixart_sigma, flux: its first real
        model), a Hub id, a local pipeline folder, or a random architecture (tiny, sd14, tiny_<family>).
    :param family: the model's family, where it cannot be read off the model (an unknown Hub id).
    :param pattern: fnmatch pattern over names or module paths (``joint*``, ``up*``, ``transformer_blocks.1*``).
    :param kinds: comma-separated layer kinds: transformers ``block,attn``; U-Nets ``attn1`` (the probes')
        and the lens's ``res,attn,sampler,out``.
    :param size: image side in pixels (default: the model's native size).
    :param steps: captured steps, for the store size per image printed last (the protocol's 15).
    :param halves: 1 (the conditional half, the protocol's) or 2 (both CFG halves), for that size.
    """
    spec = model_spec(model, family)
    planned = planned_registry(spec, size, size, kinds.split(",") if kinds else None)
    if planned is None:
        raise SystemExit(f"no config for {model!r}: not a family ({', '.join(FAMILIES)}), a random architecture "
                         f"({', '.join(list_architectures())}), a local pipeline folder, a cached Hub id, or one of "
                         f"{', '.join(real_models())}")
    registry, (h, w) = planned
    chosen = registry.select(pattern)
    lines = [f"{info.name:14s} {info.kind:6s} {info.channels:5d} ch  {info.grid[0]}x{info.grid[1]:<4d} "
             f"{info.readout:14s} {info.module}" for info in chosen]
    what = spec.model_id if not spec.is_random else f"random:{spec.architecture}"
    lines.insert(0, f"# {what} (model family {spec.family_name}) at {h}x{w}: {len(chosen)} of {len(registry)} layers")
    lines.append(f"# store per image: {human_bytes(bytes_per_image(chosen, steps, halves))} "
                 f"({steps} steps x {halves} half{'s' if halves > 1 else ''}, float16)")
    print("\n".join(lines))
    return lines


def sizes(steps: int = 15) -> list[str]:
    """Store size per image of the real models at native resolution (every default layer, cond half, fp16).

    :param steps: captured steps for the last column (the protocol's 15).
    """
    lines = [f"{'model':42s} {'family':13s} {'px':>5s} {'layers':>6s} {'tokens':>10s} {'channels':>9s} "
             f"{'per step':>9s} {'usual steps':>11s} {'per image':>9s} {f'{steps} steps':>9s}"]
    for r in size_table(steps):
        lines.append(f"{r.model_id:42s} {r.family:13s} {r.resolution:5d} {r.layers:6d} {r.tokens:>10s} "
                     f"{r.channels:>9s} {human_bytes(r.per_step):>9s} {r.usual_steps:11d} "
                     f"{human_bytes(r.per_image_usual):>9s} {human_bytes(r.per_image_protocol):>9s}")
    lines.append("cond half only, float16, every default layer (x2 for both halves). Sources:")
    lines += [f"  {model_id}: {entry['source']}" for model_id, entry in real_models().items()]
    print("\n".join(lines))
    return lines
