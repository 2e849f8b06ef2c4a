"""diffusion-probes: what a text-to-image diffusion model knows while it draws.

One package, one folder per stage; data flows one way, and so do imports. :data:`ORDER` lists the
packages in that order: a module imports its own package and those listed before it, never one
listed after it, and no two files import each other (``tests/unit/test_import_order.py`` reads
every import, those inside functions included). The README's "Development" section draws it.
"""

#: the packages in the order data flows: foundations (shared tools, the task list, the toy world,
#: pure scores) first, then the pipeline's stages, then what uses the pipeline (experiments, the
#: recipes of the shipped weights, the benchmark) and last the command line that wires it all
ORDER: tuple[str, ...] = (
    "probes.common",       # hashing, registry, CSV, progress, env, threads, downloads
    "probes.paths",        # where the shipped data lives
    "probes.tasks",        # probing tasks and their metrics' direction
    "probes.toy",          # the toy world: renderer and prompt builder
    "probes.metrics",      # pure scores: exact per-image metrics, maps, baselines' rows
    "probes.prompts",      # prompt sets -> (prompt, seed, split) records
    "probes.diffusion",    # the diffusion model: loading, tokenizer, layer registry, hooks
    "probes.generation",   # sampling + capture hooks
    "probes.store",        # the activation store, the stage that fills it, its disk estimate
    "probes.replay",       # another U-Net run on a recorded trajectory (the same-image controls)
    "probes.labels",       # pseudo-labelers, the label cache, the labelling stage
    "probes.contract",     # what the data side hands the probes (ProbeSpec)
    "probes.training",     # data module, datasets, probe banks, SGD/ridge/mean-difference modules
    "probes.export",       # safetensors + JSON export, loading, rebuilding the module
    "probes.reporting",    # results, metrics.csv, plots, panels, reports, W&B
    "probes.experiments",  # classify, intervention, lens, toy sample quality (siblings)
    "probes.recipes",      # how the toy world's shipped weights were trained (siblings)
    "probes.bench",        # make bench
    "probes.cli",          # every command: wiring only
)
#: packages whose subpackages are independent of each other: each imports the pipeline, never a sibling
SIBLINGS: tuple[str, ...] = ("probes.experiments", "probes.recipes")
