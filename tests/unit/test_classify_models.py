"""Classifiers by name: shapes, preprocessing, offline errors, and the toy classifier's accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.experiments.classify.models import ImageClassifier, _hub_dir_set, classifier_prerequisites, load_classifier
from probes.toy.world import SHAPES, render_many, scene_for


@pytest.fixture(scope="module")
def vgg16() -> ImageClassifier:
    torch.manual_seed(0)
    return load_classifier("torchvision:vgg16", weights=None)


def test_vgg16_random_weights_gives_imagenet_softmax(vgg16):
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    probs = vgg16(images)
    assert probs.shape == (2, 1000) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert vgg16.num_classes == 1000 and not vgg16.multi_label
    assert vgg16.categories[951] == "lemon" and vgg16.categories[948] == "Granny Smith"
    assert vgg16(images[:0]).shape == (0, 1000)


def test_full_view_resizes_the_whole_image_and_normalises(vgg16):
    preprocess = vgg16.batch_fn.preprocess
    colour = torch.tensor([200, 100, 30], dtype=torch.uint8)
    x = colour.view(1, 3, 1, 1).expand(1, 3, 37, 53).contiguous()
    y = preprocess(x)
    assert y.shape == (1, 3, 224, 224)        # the weights' crop size, whole image, no crop
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (colour.float() / 255 - mean) / std
    torch.testing.assert_close(y[0].mean((1, 2)), want, atol=1e-5, rtol=0)
    assert float((y[0] - want.view(3, 1, 1)).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_crop_view_drops_the_border_and_full_view_keeps_it(name):
    """A red frame 4 px wide around a grey 256 px image: the weights' centre crop (224 of 256 px for
    torchvision, crop_pct 0.95 for timm's resnet18, i.e. ~6 px a side) cuts it away; the full view
    keeps it along the edges."""
    image = np.full((1, 256, 256, 3), 128, np.uint8)
    image[:, :4] = image[:, -4:] = image[:, :, :4] = image[:, :, -4:] = (255, 0, 0)
    x = torch.from_numpy(image).permute(0, 3, 1, 2)
    crop = load_classifier(name, weights=None, view="crop").batch_fn.preprocess(x)
    full = load_classifier(name, weights=None, view="full").batch_fn.preprocess(x)
    grey_red = (128 / 255 - 0.485) / 0.229      # the red channel of grey, normalised
    assert crop.shape == full.shape == (1, 3, 224, 224)
    assert float((crop[0, 0, :, 0] - grey_red).abs().max()) < 0.01    # left column of the crop: grey
    assert float(full[0, 0, :, 0].min()) > 2.0                        # left column of the full view: red
    assert abs(float(full[0, 0, 112, 112]) - grey_red) < 0.01   # centre: grey either way


def test_timm_random_weights_shapes_and_categories():
    clf = load_classifier("timm:resnet18", weights=None, batch_size=2)
    probs = clf(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    assert probs.shape == (3, 1000)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert clf.categories is not None and clf.categories[951] == "lemon"


def test_weights_from_a_state_dict_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    net = resnet18().eval()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    clf = load_classifier("torchvision:resnet18", weights=str(path))
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = clf.batch_fn.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        want = torch.softmax(net(x), 1)
    torch.testing.assert_close(clf(images), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cache_env, parts", [
    ("torchvision:vgg16", "TORCH_HOME", lambda tmp: (str(tmp / "hub" / "checkpoints" / "vgg16-397923af.pth"),
                                                     "https://download.pytorch.org/models/vgg16-397923af.pth",
                                                     "TORCH_HOME")),
    ("timm:resnet18", "HF_HUB_CACHE", lambda tmp: ("timm/resnet18.a1_in1k", str(tmp), "hf download")),
])
def test_missing_weights_fail_offline_naming_where_and_how(name, cache_env, parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(cache_env, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_classifier(name)
    msg = str(err.value)
    for part in (name, *parts(tmp_path), "weights=None"):
        assert part in msg, (part, msg)


def test_cache_dir_is_where_the_checkpoint_is_looked_for(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert classifier_prerequisites("torchvision:vgg16", cache_dir=str(tmp_path))
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"")
    assert classifier_prerequisites("torchvision:vgg16", cache_dir=str(tmp_path)) == []
    before = torch.hub.get_dir()
    with _hub_dir_set(tmp_path):
        assert torch.hub.get_dir() == str(tmp_path)
    assert torch.hub.get_dir() == before


@pytest.mark.parametrize("name, hint", [
    ("vgg16", "torchvision:<model>"), ("keras:vgg16", "timm:<model>"),
    ("torchvision:vgg61", "vgg16"), ("torchvision:fasterrcnn_resnet50_fpn", "classification"),
    ("timm:resnet1888", "resnet18"),
])
def test_unknown_names_fail_with_the_valid_choices(name, hint):
    with pytest.raises(ValueError, match="unknown classifier") as err:
        load_classifier(name, weights=None)
    assert hint in str(err.value)


def test_bad_images_and_options_are_refused(vgg16):
    with pytest.raises(ValueError, match="uint8"):
        vgg16(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="view"):
        load_classifier("torchvision:vgg16", weights=None, view="squash")
    with pytest.raises(ValueError, match="DEFAULT"):
        load_classifier("torchvision:vgg16", weights="IMAGENET9K")


def test_toy_classifier_names_the_shape_of_one_object_renders():
    from probes.labels.toy_nets import WEIGHTS_DIR, trained_world

    n, seed, world = 120, 4242, trained_world(WEIGHTS_DIR)     # the world the shipped classifier knows
    images = render_many(n, seed, max_objects=1, fields=("rgb",), world=world)["rgb"]
    truth = np.array([SHAPES.index(scene_for(seed, i, 1, world).objects[0].shape) for i in range(n)])
    clf = load_classifier("toy")
    assert clf.categories == list(SHAPES) and clf.num_classes == 4 and clf.multi_label
    probs = clf(images)
    assert probs.shape == (n, 4) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    accuracy = float((probs.argmax(1).numpy() == truth).mean())
    # the V2 classifier's one-object top-1 on validation renders is 0.952 (data/toy/labelers/RECIPE.md; V1's
    # was 0.996 here): 0.9 is that less two binomial standard deviations of 120 scenes (0.02 each)
    assert accuracy >= 0.9, accuracy
    assert len(set(truth.tolist())) == 4            # every class was tested


def test_toy_classifier_refuses_random_weights():
    with pytest.raises(ValueError, match="DEFAULT"):
        load_classifier("toy", weights=None)
