"""Generation progress moves at every denoising step, and its U-Net-call counter is the summary's."""
from __future__ import annotations

import probes.generation.sampling as sampling
from probes.diffusion.layers import LayerRegistry
from probes.generation.sampling import CaptureSpec, GenerationSpec, generate
from probes.prompts.sets import PromptRecord

RECS = [PromptRecord(index=i, prompt=f"a photo of a boat {i}", seed=i, split="train") for i in range(5)]


def test_bar_moves_per_step_and_counts_guided_calls_like_the_summary(tiny_pipe, monkeypatch):
    bars: list[sampling.StepProgress] = []
    ticks: list[int] = []

    class Recording(sampling.StepProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def step(self, guided_calls: int) -> None:
            ticks.append(guided_calls)
            super().step(guided_calls)

    monkeypatch.setattr(sampling, "StepProgress", Recording)
    lay = LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)).select(["mid.0"])
    spec = GenerationSpec(steps=4, batch_size=2)
    out = list(generate(tiny_pipe, RECS, range(5), spec, lay, CaptureSpec(), progress=True))
    (bar,) = bars
    assert bar.bar.total == 3 * 4 and bar.bar.n == 3 * 4   # 3 batches x 4 steps, one tick per step
    assert len(ticks) == 12 and ticks == sorted(ticks)
    summary = sum(b.guided_calls for b in out)              # what "[generation] ... guided U-Net calls" sums
    assert summary == 5 * 4 and bar.guided_calls == summary == ticks[-1]
    assert ticks[:4] == [2, 4, 6, 8]                        # a batch of 2 images: 2 guided calls per step
    assert bar.images_done == 5
