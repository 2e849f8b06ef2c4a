"""Small probe exports built in a test, without a pipeline or training: what the hostile-input tests damage."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from probes.contract import ProbeSpec
from probes.diffusion.layers import LayerInfo
from probes.diffusion.loading import DiffusionSpec
from probes.export.probeset import export_probes
from probes.generation.sampling import CaptureSpec, GenerationSpec
from probes.prompts.sets import PromptSpec
from probes.training.module import ProbeModule

TINY = DiffusionSpec(source="random", architecture="tiny", precision="fp32")
#: two layers of the tiny random model, as its registry describes them
LAYERS = (LayerInfo("mid.0", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", 64, (2, 2)),
          LayerInfo("up3.0", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_out.0", 32, (16, 16)))


def data_config(prompts: Path, store_dir: Path, diffusion: DiffusionSpec = TINY) -> dict:
    """A recorded data config like a run's (tiny random model, 3 K-LMS steps, classical labelers)."""
    return {"diffusion": asdict(diffusion), "prompts": asdict(PromptSpec(source=str(prompts), test_fraction=0.5)),
            "generation": asdict(GenerationSpec(steps=3, batch_size=2)), "capture": asdict(CaptureSpec()),
            "labels": {"foreground": {"name": "otsu"}, "depth": {"name": "vertical"}}, "mode": "cached",
            "store_dir": str(store_dir)}


def small_export(folder: Path, weight: float | None = None, store_dir: Path | None = None,
                 diffusion: DiffusionSpec = TINY, model: dict | None = None) -> Path:
    """Foreground and depth probes on two layers x 3 steps, random (or all ``weight``), exported to ``folder``.

    :param model: the model identity the export records (default: ``diffusion``'s, as a run records it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder.parent / f"{folder.name}-prompts.txt"
    prompts.write_text("\n".join(f"a photo of object {i}" for i in range(6)) + "\n")
    spec = ProbeSpec(layers=LAYERS, steps=(0, 1, 2), timesteps=(999.0, 500.0, 1.0), tasks=("foreground", "depth"),
                     label_size=(128, 128), target_stats={"depth": {"mean": 0.6, "std": 0.3}},
                     model=model if model is not None else dict(diffusion.identity(), is_random=diffusion.is_random),
                     is_random=diffusion.is_random, store_dir=str(store_dir or folder.parent / "store"),
                     data_config=data_config(prompts, store_dir or folder.parent / "store", diffusion))
    torch.manual_seed(0)
    module = ProbeModule(tasks=["foreground", "depth"])
    module.build(spec)
    if weight is not None:
        with torch.no_grad():
            for bank in module.banks.values():
                for w in bank.weight.values():
                    w.fill_(weight)
    return export_probes(module, folder / "probes")
