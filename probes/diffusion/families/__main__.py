"""``python -m probes.diffusion.families``: list a family's layers, size the real models' stores,
build a tiny pipeline folder. Offline; a stand-in for ``diffusion-probes layers --model …`` until
the main CLI takes families (see the integration plan in the module docs)."""
from __future__ import annotations

import argparse
import sys

from probes.diffusion.families.spec import FAMILIES


def _layers(args: argparse.Namespace) -> None:
    from probes.diffusion.families.layers import registry_for

    kinds = args.kinds.split(",") if args.kinds else None
    if args.model:
        from probes.diffusion.families.sizes import real_models, real_registry

        if args.model in real_models():
            reg = real_registry(args.model, args.size, args.size, kinds)
        else:
            from probes.diffusion.families.loading import load_family_pipeline

            pipe = load_family_pipeline(args.model, args.family, local_files_only=True)
            size = args.size or _native(pipe)
            reg = registry_for(pipe, size, size, args.family, kinds)
    else:
        from probes.diffusion.families.tiny import build_tiny_pipeline, tiny_architecture

        if not args.family:
            sys.exit("give --family (one of: " + ", ".join(FAMILIES) + ") or --model")
        size = args.size or int(tiny_architecture(args.family)["image_size"])
        reg = registry_for(build_tiny_pipeline(args.family), size, size, args.family, kinds)
    for info in reg.select(args.pattern):
        print(f"{info.name:14s} {info.kind:6s} {info.channels:5d} ch  {info.grid[0]}x{info.grid[1]}  "
              f"{info.readout:14s} {info.module}")


def _native(pipe) -> int:
    from probes.diffusion.families.spec import family_of

    family = family_of(pipe)
    den = getattr(pipe, family.denoiser)
    return int(getattr(den.config, "sample_size", 64) or 64) * int(pipe.vae_scale_factor)


def _sizes(args: argparse.Namespace) -> None:
    from probes.diffusion.families.sizes import real_models, size_table
    from probes.store.activations import human_bytes

    sources = real_models()
    print(f"{'model':42s} {'px':>5s} {'layers':>6s} {'tokens':>10s} {'channels':>9s} {'per step':>9s} "
          f"{'usual steps':>11s} {'per image':>9s} {f'{args.steps} steps':>9s}")
    for r in size_table(args.steps):
        print(f"{r.model_id:42s} {r.resolution:5d} {r.layers:6d} {r.tokens:>10s} {r.channels:>9s} "
              f"{human_bytes(r.per_step):>9s} {r.usual_steps:11d} {human_bytes(r.per_image_usual):>9s} "
              f"{human_bytes(r.per_image_protocol):>9s}")
    print("\ncond half only, float16, every default layer (x2 for both halves). Sources:")
    for model_id, entry in sources.items():
        print(f"  {model_id}: {entry['source']}")


def _build(args: argparse.Namespace) -> None:
    from probes.diffusion.families.tiny import save_tiny_pipeline

    print(save_tiny_pipeline(args.family, args.out, args.init_seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m probes.diffusion.families", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layers", help="list a family's layers (tiny config, a local folder, or a known real model)")
    p.add_argument("--family", choices=list(FAMILIES))
    p.add_argument("--model", help="a local pipeline folder, or a Hub id listed by `sizes` (no weights needed)")
    p.add_argument("--pattern", default="*", help="fnmatch pattern over names or module paths")
    p.add_argument("--kinds", help="comma-separated layer kinds (transformers: block,attn)")
    p.add_argument("--size", type=int, help="image size in pixels (default: native)")
    p.set_defaults(fn=_layers)
    p = sub.add_parser("sizes", help="store size per image of the real models at native resolution")
    p.add_argument("--steps", type=int, default=15, help="captured steps for the last column (the protocol: 15)")
    p.set_defaults(fn=_sizes)
    p = sub.add_parser("build-tiny", help="save a tiny random pipeline of a family as a local folder")
    p.add_argument("--family", required=True, choices=list(FAMILIES))
    p.add_argument("--out", required=True)
    p.add_argument("--init-seed", type=int, default=0)
    p.set_defaults(fn=_build)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
