"""Concept erasure for edits: LEACE leaves no linear concept information, and erased edits move no concept."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probes.diffusion.layers import LayerInfo, LayerRegistry
from probes.experiments.intervention.editor import ActivationEditor, EditSettings
from probes.experiments.intervention.erasure import (
    ErasingEditor,
    MaskConcept,
    fit_eraser,
    fit_store_erasers,
    optimise_in_subspace,
    select_concepts,
    tokens_from_mask,
    toy_concepts,
)
from probes.experiments.intervention.objective import ProbeObjective
from probes.experiments.intervention.pipeline import sample_images
from probes.store.activations import ActivationStore
from probes.toy.world import COLOURS, SHAPES, render, scene_for
from tests.integration.test_intervention_editor import RECORDS, SPEC, block_target, make_probe

COLOURS_K, CLASSES_K, D = 4, 3, 16


def planted(n: int, seed: int = 0, background: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens whose colour and class shift the class-conditional mean (shared, correlated noise);
    a share of background tokens (labels -1) sits elsewhere. Means and noise are fixed by seed 0."""
    fixed = np.random.default_rng(0)
    mean_colour, mean_class = fixed.normal(size=(COLOURS_K, D)) * 1.5, fixed.normal(size=(CLASSES_K, D)) * 1.5
    mix = fixed.normal(size=(D, D)) / np.sqrt(D)
    rng = np.random.default_rng(seed)
    colour, cls = rng.integers(0, COLOURS_K, n), rng.integers(0, CLASSES_K, n)
    x = mean_colour[colour] + mean_class[cls] + rng.normal(size=(n, D)) @ mix.T
    bg = rng.random(n) < background
    x[bg] = rng.normal(size=(int(bg.sum()), D)) @ mix.T - 3.0
    colour[bg], cls[bg] = -1, -1
    return x, colour, cls


def held_out_accuracy(train_x, train_y, test_x, test_y) -> float:
    keep, keep_test = train_y >= 0, test_y >= 0
    clf = LogisticRegression(max_iter=2000).fit(train_x[keep], train_y[keep])
    return float(clf.score(test_x[keep_test], test_y[keep_test]))


def chance_bound(y: np.ndarray) -> float:
    """The best constant predictor's accuracy plus three binomial standard errors."""
    y = y[y >= 0]
    p = np.bincount(y).max() / len(y)
    return p + 3 * np.sqrt(p * (1 - p) / len(y))


def test_leace_leaves_no_linear_colour_information_on_held_out_tokens():
    x, colour, cls = planted(6000)
    tx, tcolour, tcls = planted(3000, seed=1)
    assert held_out_accuracy(x, colour, tx, tcolour) > 0.9 and held_out_accuracy(x, cls, tx, tcls) > 0.9
    eraser = fit_eraser(torch.from_numpy(x), [colour], [COLOURS_K], ["colour"])
    ex, etx = (eraser.erase(torch.from_numpy(a)).numpy() for a in (x, tx))
    assert held_out_accuracy(ex, colour, etx, tcolour) <= chance_bound(tcolour)
    assert held_out_accuracy(ex, cls, etx, tcls) > 0.9                # only colour was erased
    both = fit_eraser(torch.from_numpy(x), [colour, cls], [COLOURS_K, CLASSES_K], ["colour", "class"])
    ex, etx = (both.erase(torch.from_numpy(a)).numpy() for a in (x, tx))
    assert held_out_accuracy(ex, colour, etx, tcolour) <= chance_bound(tcolour)
    assert held_out_accuracy(ex, cls, etx, tcls) <= chance_bound(tcls)
    assert both.rank == (COLOURS_K - 1) + (CLASSES_K - 1)               # one-hots sum to 1: one direction less each


def test_an_edit_along_the_projected_direction_moves_no_linear_readout_of_the_concept():
    x, colour, cls = planted(4000)
    eraser = fit_eraser(torch.from_numpy(x), [colour, cls], [COLOURS_K, CLASSES_K], shrinkage=False)
    keep = colour >= 0
    z = np.concatenate([np.eye(COLOURS_K)[colour[keep]], np.eye(CLASSES_K)[cls[keep]]], 1)
    xc = x[keep] - x[keep].mean(0)
    readout = np.linalg.lstsq(xc, z - z.mean(0), rcond=None)[0]           # least squares: the best linear readout
    w = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    delta = eraser.project(w)
    assert delta.norm() > 0.1 * w.norm()                                 # there is something left to edit along
    change = readout.T @ delta.numpy()
    assert np.abs(change).max() <= 1e-5 * np.linalg.norm(readout, 2) * float(delta.norm())
    assert np.abs(readout.T @ w.numpy()).max() > 0.1                     # the raw direction did move it
    torch.testing.assert_close(eraser.project(delta), delta)            # a projection
    xs = torch.from_numpy(x[:5])                                         # the eraser passes the edit unchanged
    torch.testing.assert_close(eraser.erase(xs + delta), eraser.erase(xs) + delta)


def test_erased_optimisation_reaches_the_target_without_moving_the_concept():
    x, colour, cls = planted(3000)
    eraser = fit_eraser(torch.from_numpy(x), [colour, cls], [COLOURS_K, CLASSES_K]).to("cpu")
    layer = LayerInfo("up2.0", "m", D, (8, 8))
    probe = make_probe(layer, 0)
    target = block_target(2)
    acts = torch.from_numpy(x[:128].reshape(2, 64, D)).float()
    objective = ProbeObjective(probe, target, binary_loss="squared")
    for settings in (EditSettings(binary_loss="squared", lr=0.05), EditSettings(optimizer="projection",
                                                                                binary_loss="squared")):
        z, before, after = optimise_in_subspace(acts, objective, settings, eraser.project)
        delta = z - acts
        assert torch.all(after < 0.2 * before)
        moved = eraser.readout(delta)
        assert float(moved.abs().max()) <= 1e-5 * float(eraser.eraser.proj_right.norm()) * float(delta.norm())
    # the projection reads the target exactly: the same squared-error optimum as the unconstrained edit
    free = ProbeObjective(probe, target, binary_loss="squared")(objective.project(acts))
    torch.testing.assert_close(after, free, rtol=1e-4, atol=1e-5)
    zero, _, _ = optimise_in_subspace(acts, objective, EditSettings(iterations=0), eraser.project)
    assert torch.equal(zero, acts)


def test_tokens_take_the_majority_label_of_their_block():
    mask = -np.ones((4, 4), np.int16)
    mask[:2, :2] = 2                      # token 0: all colour 2
    mask[:2, 2:] = [[1, 1], [1, -1]]      # token 1: 3 of 4 pixels colour 1
    mask[2:, :2] = [[0, 1], [-1, -1]]     # token 2: no label covers half
    assert tokens_from_mask(mask, (2, 2), 3).tolist() == [2, 1, -1, -1]
    assert tokens_from_mask(mask, (2, 2), 3, min_share=0.8).tolist() == [2, -1, -1, -1]
    with pytest.raises(ValueError, match="token grid"):
        tokens_from_mask(mask, (3, 3), 3)
    with pytest.raises(ValueError, match="-1..1"):
        tokens_from_mask(mask, (2, 2), 2)


def test_toy_concepts_label_the_objects_a_render_shows():
    r = render(scene_for(5, 0), 64)
    concepts = toy_concepts(lambda i: r)
    colour, cls = (concepts[n].token_labels(0, (8, 8)) for n in ("colour", "class"))
    assert concepts["colour"].num_classes == len(COLOURS) and concepts["class"].num_classes == len(SHAPES)
    shown = {(int(c), int(k)) for c, k in zip(r.colours.ravel(), r.classes.ravel()) if c >= 0}
    pairs = {(int(c), int(k)) for c, k in zip(colour, cls) if c >= 0}
    assert pairs and pairs <= shown
    assert ((colour >= 0) == (cls >= 0)).all()                 # one object per pixel: both or neither
    assert select_concepts(["class"], concepts) == [concepts["class"]]
    with pytest.raises(KeyError, match="available"):
        select_concepts(["texture"], concepts)


def test_store_erasers_fit_per_step_and_layer(tmp_path):
    n, grid, size = 24, (8, 8), 32
    manifest = {"fingerprint": "test", "request": {}, "num_samples": n, "generation": {"height": size, "width": size},
                "capture": {"layers": [{"name": "up1.0", "module": "m", "channels": D, "grid": list(grid)}],
                            "steps": [0, 2], "halves": ["cond"], "dtype": "float32"}, "prompts": []}
    store = ActivationStore.create(tmp_path / "store", manifest)
    maps = []
    for i in range(n):                                           # a colour map per sample, planted tokens to match
        x, colour, _ = planted(64, seed=10 + i)
        maps.append(np.repeat(np.repeat(colour.reshape(grid), 4, 0), 4, 1))
        acts = np.stack([x, x + 1.0])[:, None].astype(np.float32)          # [steps, halves, T, C]
        store.write_batch([i], np.zeros((1, size, size, 3), np.uint8), {"up1.0": acts[None]}, [{}])
    source = MaskConcept("colour", COLOURS_K, lambda i: maps[i])
    erasers = fit_store_erasers(store, [source], [(0, "up1.0"), (2, "up1.0")], range(16))
    assert sorted(erasers) == [(0, "up1.0"), (2, "up1.0")]
    assert erasers[(0, "up1.0")].rank == COLOURS_K - 1
    labelled = sum(int((m[::4, ::4] >= 0).sum()) for m in maps[:16])
    assert erasers[(0, "up1.0")].tokens == labelled
    # held-out samples: erased tokens carry no colour; the other step's eraser is fitted on its own tokens
    train = np.concatenate([store.activation("up1.0", i)[0, 0] for i in range(16)])
    test = np.concatenate([store.activation("up1.0", i)[0, 0] for i in range(16, n)])
    y_train = np.concatenate([maps[i][::4, ::4].ravel() for i in range(16)])
    y_test = np.concatenate([maps[i][::4, ::4].ravel() for i in range(16, n)])
    e = erasers[(0, "up1.0")]
    acc = held_out_accuracy(e.erase(torch.from_numpy(train)).numpy(), y_train, e.erase(torch.from_numpy(test)).numpy(),
                            y_test)
    assert acc <= chance_bound(y_test)
    torch.testing.assert_close(erasers[(2, "up1.0")].eraser.bias, e.eraser.bias + 1.0)
    with pytest.raises(ValueError, match="captured steps"):
        fit_store_erasers(store, [source], [(1, "up1.0")], range(4))
    with pytest.raises(KeyError, match="stored"):
        fit_store_erasers(store, [source], [(0, "up3.0")], range(4))


@pytest.fixture(scope="module")
def layers(tiny_pipe) -> list[LayerInfo]:
    return list(LayerRegistry.from_unet(tiny_pipe.unet, (16, 16)))


def test_erasure_off_reproduces_the_edit_bit_for_bit_and_on_changes_it(tiny_pipe, layers):
    names = [layer.name for layer in layers]
    layer = layers[names.index("up2.1")]
    probe = make_probe(layer, 1)
    settings = EditSettings(iterations=8)
    plain = ActivationEditor(tiny_pipe.unet, [probe], layers, block_target(), settings)
    off = ErasingEditor(tiny_pipe.unet, [probe], layers, block_target(), settings, erasers={})
    plain_img = sample_images(tiny_pipe, RECORDS, SPEC, [plain])
    assert np.array_equal(plain_img, sample_images(tiny_pipe, RECORDS, SPEC, [off]))
    assert plain.records[0].loss_after == off.records[0].loss_after
    g = torch.Generator().manual_seed(0)                         # an eraser of a random 3-class concept
    x = torch.randn(600, layer.channels, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (600,), generator=g).numpy()
    x += torch.randn(3, layer.channels, generator=g, dtype=torch.float64)[labels] * 2
    eraser = fit_eraser(x, [labels], [3], ["colour"])
    on = ErasingEditor(tiny_pipe.unet, [probe], layers, block_target(), settings, erasers={(1, "up2.1"): eraser})
    on_img = sample_images(tiny_pipe, RECORDS, SPEC, [on])
    assert not np.array_equal(plain_img, on_img)
    assert on.records[0].loss_after[0] < on.records[0].loss_before[0]
    with pytest.raises(ValueError, match="no eraser"):
        ErasingEditor(tiny_pipe.unet, [probe, make_probe(layer, 2)], layers, block_target(), settings,
                      erasers={(1, "up2.1"): eraser})


# -- the concepts `diffusion-probes intervene --erase` fits on -------------------------------------
class _FakeStore:
    def __init__(self, prompts: list[dict], start: str, size: int = 16) -> None:
        self.manifest = {"prompts": prompts, "generation": {"start": start, "height": size, "width": size}}
        self.images = np.zeros((len(prompts), size, size, 3), np.uint8)
        self.root = "fake"

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


def test_sampled_store_concepts_come_from_one_object_captions_over_the_foreground():
    from probes.experiments.intervention.erasure import store_toy_concepts
    from probes.toy.world import COLOURS, SHAPES

    store = _FakeStore([{"prompt": "a blue sphere"}, {"prompt": "a red cube to the left of an orange cone"},
                        {"prompt": "an orange cone"}], "noise")
    left = np.zeros((1, 16, 16), np.float32)
    left[:, :, :8] = 1.0                                       # the "object": the left half
    concepts = store_toy_concepts(store, lambda images: np.repeat(left, len(images), 0))
    colour, shape = concepts["colour"].token_labels(0, (4, 4)), concepts["class"].token_labels(0, (4, 4))
    grid_left = np.tile(np.arange(4) < 2, 4)
    assert (colour[grid_left] == COLOURS.index("blue")).all() and (colour[~grid_left] == -1).all()
    assert (shape[grid_left] == SHAPES.index("sphere")).all() and (shape[~grid_left] == -1).all()
    assert (concepts["colour"].token_labels(1, (4, 4)) == -1).all()     # two objects: which is where is unknown
    assert (concepts["class"].token_labels(2, (4, 4))[grid_left] == SHAPES.index("cone")).all()


def test_render_store_concepts_are_the_scenes_exact_masks():
    from probes.experiments.intervention.erasure import store_toy_concepts
    from probes.toy.prompts import scene_of
    from probes.toy.world import render

    store = _FakeStore([{"prompt": "x", "source_id": "v2:777:1"}], "renders", size=32)
    concepts = store_toy_concepts(store, lambda images: pytest.fail("renders need no foreground labeler"))
    exact = toy_concepts(lambda i: render(scene_of("v2:777:1"), 32))
    for name in ("colour", "class"):
        np.testing.assert_array_equal(concepts[name].token_labels(0, (8, 8)), exact[name].token_labels(0, (8, 8)))
