"""``diffusion-probes lens --config configs/lens/toy.yaml``: the semantic lens experiments.

A typed entry function read with the project's CLI convention (:mod:`probes.cli.convention`): every
parameter is a YAML key (nested sections are the dataclasses of :mod:`probes.experiments.lens.runner`,
:mod:`probes.experiments.lens.features` and :mod:`probes.experiments.lens.embeddings`),
``--print_config`` shows them all and any key can be overridden on the command line
(``--features.timestep 200``). Configs compose with ``defaults:`` as the training configs do.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from probes.common.files import atomic_write_text
from probes.diffusion.loading import DiffusionSpec
from probes.experiments.lens.embeddings import PoolingSpec
from probes.experiments.lens.features import FeatureSpec
from probes.experiments.lens.runner import DataSpec, ExperimentSpec, run_lens
from probes.reporting.tables import RANDOM_WARNING


def lens(data: DataSpec = DataSpec(), diffusion: DiffusionSpec = DiffusionSpec(), video: DataSpec | None = None,
         features: FeatureSpec = FeatureSpec(), pooling: PoolingSpec = PoolingSpec(),
         experiments: ExperimentSpec = ExperimentSpec(), control_permute_seed: int | None = 0,
         labels: list[str] = ["model", "control"], out: str | None = None,  # noqa: B006
         cache_root: str = "outputs/lens_cache", device: str = "auto", wandb: bool = False,
         wandb_project: str = "diffusion-probes", wandb_group: str | None = None,
         compare: list[str] | None = None, compare_labels: list[str] | None = None,
         title: str | None = None, progress: bool = True) -> Path:
    """Run the semantic lens on one model (and its permuted-weights control) and write its report.

    :param data: the image dataset (``kind: toy | coco | voc``) the semantic, robustness,
        timestep and step experiments use.
    :param diffusion: the model (as in the training configs; ``source: hub`` with ``model_id`` a Hub
        id or a local diffusers folder such as ``data/toy/model``).
    :param video: the video dataset (``kind: toy_video | davis``) of the video experiment.
    :param features: how features are read (layers, timestep, prompt, denoising steps).
    :param pooling: how features become one vector per object, and how many objects per image.
    :param experiments: which experiments run and their sweeps.
    :param control_permute_seed: also run the permuted-weights control with this seed (``null``: no
        control); its rows are labelled ``labels[1]``.
    :param labels: names of the model and the control in tables and plots.
    :param out: output folder (default ``outputs/lens/<data kind>-<time>``).
    :param cache_root: where the object embeddings are cached (shared by runs; keyed by settings).
    :param device: ``auto``, ``cpu`` or ``cuda``.
    :param wandb: log to W&B (offline unless an API key is configured, as the training runs).
    :param wandb_project: W&B project.
    :param wandb_group: W&B group (put a model and other runs in one group to overlay them).
    :param compare: other lens run folders whose ``metrics.csv`` is drawn beside this run's.
    :param compare_labels: names of the compared runs (default: their folder names).
    :param title: report title.
    :param progress: progress bars.
    """
    from probes.experiments.lens.report import (
        log_wandb,
        read_metrics_csv,
        summary,
        write_metrics_csv,
        write_plots,
        write_report,
    )

    if len(labels) != 2 or labels[0] == labels[1]:
        raise ValueError(f"labels must be two different names (model, control), got {labels}")
    dest = Path(out) if out else Path("outputs/lens") / f"{data.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    config = {"data": asdict(data), "diffusion": asdict(diffusion), "video": asdict(video) if video else None,
              "features": asdict(features), "pooling": asdict(pooling), "experiments": asdict(experiments),
              "control_permute_seed": control_permute_seed, "labels": list(labels), "out": str(dest),
              "cache_root": cache_root, "device": device, "wandb": wandb, "wandb_project": wandb_project,
              "wandb_group": wandb_group, "compare": compare, "compare_labels": compare_labels, "title": title}
    atomic_write_text(dest / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    result = run_lens(diffusion, data, video, features, pooling, experiments, cache_root, device,
                      control_permute_seed, (labels[0], labels[1]), progress)
    rows = list(result.rows)
    write_metrics_csv(rows, dest / "metrics.csv")
    for k, run in enumerate(compare or []):
        name = compare_labels[k] if compare_labels and k < len(compare_labels) else Path(run).name
        rows += [{**r, "model": f"{name}/{r['model']}"} for r in read_metrics_csv(Path(run) / "metrics.csv")]
    distance = experiments.primary_distance
    ranked = result.ranked.get(labels[0], [])
    tsne = [n for n in ranked if "+" not in n][:experiments.tsne_layers]
    plots = write_plots(rows, dest, distance, list(result.first_at_16.values()), result.reference, tsne,
                        result.class_names, result.layer_order)
    n_obj = {m: len(o) for m, o in result.reference.items()}
    meta = {"title": title or f"{data.kind} on {diffusion.identity()['model_id']}",
            "model": json.dumps(diffusion.identity()),
            "control": f"permute_seed={control_permute_seed}" if control_permute_seed is not None else "none",
            "dataset": json.dumps(data.relevant()),
            "features": json.dumps(asdict(features)), "objects": json.dumps(n_obj),
            "command": "diffusion-probes lens " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["lens"] else sys.argv[1:]),
            "sweep layers": ", ".join(result.sweep_layers)}
    if video is not None:
        meta["video"] = json.dumps(video.relevant())
    if diffusion.is_random:
        meta["warning"] = RANDOM_WARNING.split("\n")[0]
    md, html_path = write_report(dest, rows, plots, distance, labels, meta, result.first_at_16)
    facts = {"seconds": round(time.time() - started, 1), "objects": n_obj, "sweep_layers": result.sweep_layers,
             "first_at_16": result.first_at_16, "ranking": result.ranked.get(labels[0], [])[:20]}
    bar = summary(result.rows, distance, labels)
    if "control" in bar:
        facts["control"] = bar["control"]
    atomic_write_text(dest / "summary.json", json.dumps(facts, indent=1, default=str))
    if wandb:
        from probes.reporting.wandb_logger import start_wandb_run

        run = start_wandb_run(wandb_project, dest, name=dest.name, group=wandb_group, job_type="lens", config=config)
        log_wandb(run, rows, plots, distance, labels)
        run.finish()
    print(f"Lens report: {html_path} (and {md.name}, metrics.csv, summary.json)")
    if "control" in facts:
        c = facts["control"]
        print(f"best layer {c['layer']} ({distance}): k-NN accuracy {c['model_knn']:.3f}, control "
              f"{c['control_knn']:.3f}, gap {c['gap']:+.3f}, chance {c['chance']:.3f}")
    return dest
