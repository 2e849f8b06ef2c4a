"""Image classifiers by name: any torchvision or timm classification model, or the toy world's.

Why: the replication ran an ImageNet VGG-16 on the image decoded after every denoising step and
found the prompt's class only from step ~11 of 15, while probes read the scene from step ~3.
That comparison needs a classifier that runs on the decoded images as they are (uint8 RGB, any
size), so every classifier here takes ``[N, H, W, 3]`` uint8 arrays, does its own preprocessing
and returns class probabilities; the caller never needs to know which library built it.

Names (see :func:`load_classifier`):

* ``torchvision:<model>``: any model of ``torchvision.models.list_models(module=torchvision.models)``
  (the classification models), e.g. ``torchvision:vgg16`` (the default, ImageNet weights).
* ``timm:<model>``: any ``timm`` model, e.g. ``timm:resnet18`` or ``timm:resnet18.a1_in1k``.
* ``toy``: the toy world's shape classifier (:mod:`probes.labels.toy_nets`), 4 multi-label classes.

Weights are read from the libraries' own caches (torchvision: ``$TORCH_HOME/hub/checkpoints``;
timm: the Hugging Face cache). Missing weights are reported before anything is built, with the
file, the place it was looked for and how to get it; ``weights=None`` gives random weights
(tests, shapes only).
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from probes.common.env import offline
from probes.common.hashing import sha256_file
from probes.common.hub import hub_cache_dir
from probes.common.progress import progress_bar
from probes.common.registry import Registry
from probes.labels.base import Missing

DEFAULT_CLASSIFIER = "torchvision:vgg16"
EXAMPLES = ("torchvision:vgg16", "torchvision:resnet50", "timm:resnet18", "timm:convnext_tiny.fb_in1k", "toy")
#: ``full``: the whole image resized to the model's input side (the replication's Keras VGG-16 saw
#: the 512 px image resized to 224x224); ``crop``: the weights' own eval transform (resize the short
#: side, then centre-crop), which drops the image's border.
VIEWS = ("full", "crop")

#: a batch of uint8 NHWC images -> [B, K] probabilities (float32, CPU)
BatchFn = Callable[[np.ndarray], torch.Tensor]


@dataclass
class ImageClassifier:
    """A classifier on uint8 RGB images: ``clf(images [N, H, W, 3]) -> probabilities [N, K]``.

    :param name: the name it was loaded by (``torchvision:vgg16``, ``toy``, ...).
    :param num_classes: ``K``.
    :param categories: the class names in output order, or None when the weights do not say.
    :param multi_label: True when each output is an independent sigmoid (the toy classifier) rather
        than one softmax over classes; the arg-max is the predicted class either way.
    :param batch_fn: one batch of images -> probabilities; preprocessing, device and ``no_grad``
        are its business.
    :param batch_size: images per forward pass.
    """

    name: str
    num_classes: int
    categories: list[str] | None
    multi_label: bool
    batch_fn: BatchFn = field(repr=False)
    batch_size: int = 16

    def __call__(self, images: np.ndarray, progress: bool = False) -> torch.Tensor:
        """Class probabilities ``[N, K]`` (float32, CPU) of uint8 RGB images ``[N, H, W, 3]``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"classifier {self.name!r} takes uint8 RGB images [N, H, W, 3]; "
                             f"got {images.dtype} {images.shape}")
        # a batch is copied: it may be a read-only slice of a memory-mapped store, which torch refuses
        starts = range(0, len(images), self.batch_size)
        out = [self.batch_fn(np.array(images[i:i + self.batch_size]))
               for i in progress_bar(len(starts), f"classify ({self.name})", "batch", progress, iterable=starts)]
        if not out:
            return torch.zeros(0, self.num_classes)
        return torch.cat(out).float().cpu()


def _check_torchvision(name: str, model: str) -> None:
    valid = _torchvision_models()
    if model not in valid:
        raise ValueError(f"unknown classifier {name!r}: {model!r} is not a torchvision classification model"
                         f"{_close(model, valid)}; all of them: torchvision.models.list_models("
                         f"module=torchvision.models)")


def _check_timm(name: str, model: str) -> None:
    import timm

    if not timm.is_model(model):
        base = model.split(".")[0]
        valid = timm.list_models(f"*{base}*", pretrained=True) or timm.list_models()
        raise ValueError(f"unknown classifier {name!r}: {model!r} is not a timm model{_close(model, valid)}; "
                         "list them with timm.list_models('<pattern>', pretrained=True)")


def _check_toy(name: str, model: str) -> None:
    """The toy world's one classifier takes no model name."""


#: classifier families by the prefix of their name (``<backend>:<model>``; ``toy`` alone): each entry
#: checks a model name of its family, so a misspelt model fails when the config is read
BACKENDS: Registry[Callable[[str, str], None]] = Registry(
    "classifier backend", how_to_add="Name a classifier torchvision:<model>, timm:<model> or toy")
BACKENDS.register("torchvision", _check_torchvision)
BACKENDS.register("timm", _check_timm)
BACKENDS.register("toy", _check_toy)


def parse_name(name: str) -> tuple[str, str]:
    """``"torchvision:vgg16"`` -> ``("torchvision", "vgg16")``; ``"toy"`` -> ``("toy", "")``.

    Unknown prefixes and unknown models fail here, before any weights are read.
    """
    name = name.strip()
    backend, sep, model = name.partition(":")
    needs_model = backend != "toy"
    if backend not in BACKENDS or bool(sep and model) != needs_model or (sep and not needs_model):
        raise ValueError(f"unknown classifier {name!r}: use 'torchvision:<model>', 'timm:<model>' or 'toy' "
                         f"(e.g. {', '.join(EXAMPLES)})")
    BACKENDS.get(backend)(name, model)
    return backend, model


def _close(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=5, cutoff=0.5)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


# -- where the weights are ----------------------------------------------------------------------
def _torchvision_weights(model: str, weights: str | None):
    """The ``WeightsEnum`` member that ``weights`` names (``DEFAULT``, ``IMAGENET1K_V1``, or a full
    ``VGG16_Weights.IMAGENET1K_V1``), the default member when ``weights`` is None or a file (its
    preprocessing and class names still apply), or None when the model has no weights at all."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(model)
    except (ValueError, KeyError):
        return None
    if weights is None or Path(weights).expanduser().is_file():
        return enum.DEFAULT
    key = weights.split(".")[-1]
    if key == "DEFAULT":
        return enum.DEFAULT
    if key not in enum.__members__:
        raise ValueError(f"classifier 'torchvision:{model}' has no weights {weights!r}; choose 'DEFAULT', one of "
                         f"{list(enum.__members__)}, a path to a state-dict file, or None (random weights)")
    return enum[key]


def verify_hub_checkpoint(path: Path) -> None:
    """torch.hub's ``check_hash`` for a checkpoint already in the cache: its sha256 must start with the hash in
    its name (``vgg16-397923af.pth``). torchvision checks a file when it downloads it, not when it finds it
    cached, so a damaged or swapped file in the cache would otherwise load silently."""
    m = re.search(torch.hub.HASH_REGEX, path.name)
    if not path.is_file() or m is None:
        return
    got = sha256_file(path)
    if not got.startswith(m.group(1)):
        raise ValueError(f"{path} has sha256 {got[:16]}..., but its name says it starts with {m.group(1)} (torch.hub's "
                         f"check_hash): the cached weights are damaged or not the published ones; delete the file "
                         f"(it is downloaded again and checked) or pass weights=<a state-dict file you trust>")


def _torch_hub_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir())


@contextlib.contextmanager
def _hub_dir_set(cache_dir: str | os.PathLike | None) -> Iterator[None]:
    """Point torch.hub at ``cache_dir`` while torchvision's builder reads its checkpoint.

    torchvision's builders take no download folder, and a builder is the only place that knows
    how its weights change the architecture (Inception's input transform, ViT's image size), so
    the folder is set around the call. ``torch.hub._hub_dir`` is restored rather than re-set,
    because ``set_dir(get_dir())`` would pin today's ``$TORCH_HOME`` for good.
    """
    if cache_dir is None:
        yield
        return
    previous = torch.hub._hub_dir
    torch.hub.set_dir(str(Path(cache_dir).expanduser()))
    try:
        yield
    finally:
        torch.hub._hub_dir = previous


def _timm_weights_files(model: str) -> tuple[str | None, list[str], str | None]:
    """(Hugging Face repo, candidate file names, URL) of a timm model's pretrained weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    if cfg is None:
        return None, [], None
    repo = cfg.hf_hub_id.split("@")[0] if cfg.hf_hub_id else None
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return repo, files, cfg.url or None


def classifier_prerequisites(name: str = DEFAULT_CLASSIFIER, weights: str | None = "DEFAULT",
                             cache_dir: str | None = None, where: str = "classifier") -> list[Missing]:
    """What :func:`load_classifier` would need and is not on this machine, without loading anything.

    :param where: the config key the name came from, quoted in the message.
    :return: empty when everything is there (or ``weights`` is None: random weights need nothing).
    """
    backend, model = parse_name(name)
    if weights is None:
        return []
    if weights != "DEFAULT" and Path(weights).expanduser().exists() and backend != "toy":
        return []
    if backend == "toy":
        from probes.labels.toy_nets import FILES, FIX, WEIGHTS_DIR

        folder = WEIGHTS_DIR if weights == "DEFAULT" else Path(weights).expanduser()
        path = folder / FILES["classifier"]
        return [] if path.is_file() else [Missing(f"toy classifier weights ({where}): {path} is missing", FIX)]
    if backend == "torchvision":
        w = _torchvision_weights(model, weights)
        if w is None:
            return [Missing(f"classifier {name!r} ({where}): torchvision has no pretrained weights for it",
                            "pass weights=None (random) or a state-dict file")]
        path = _torch_hub_dir(cache_dir) / "checkpoints" / os.path.basename(urlparse(w.url).path)
        if path.is_file():
            return []
        return [Missing(f"weights {w} of classifier {name!r} ({where}): not at {path}",
                        f"download {w.url} to {path} (torch reads $TORCH_HOME/hub/checkpoints; "
                        f"set TORCH_HOME or cache_dir to use another folder), or pass weights=<state-dict file>; "
                        f"weights=None gives random weights (tests only)", w.url)]
    from huggingface_hub import try_to_load_from_cache

    tagged = model if weights == "DEFAULT" else f"{model.split('.')[0]}.{weights}"
    repo, files, url = _timm_weights_files(tagged)
    if repo is None and url is None:
        return [Missing(f"classifier 'timm:{tagged}' ({where}): timm knows no pretrained weights for it",
                        "pick a tag from timm.list_models(pretrained=True), or pass weights=None (random)")]
    hf_dir = hub_cache_dir(cache_dir)
    if repo is not None:
        if any(isinstance(try_to_load_from_cache(repo, f, cache_dir=str(hf_dir)), str) for f in files):
            return []
        return [Missing(f"weights of classifier 'timm:{tagged}' ({where}): {repo} ({' or '.join(files)}) is not "
                        f"in the Hugging Face cache {hf_dir}",
                        f"hf download {repo} {files[0]}" + (f" --cache-dir {cache_dir}" if cache_dir else "")
                        + "; or pass weights=<checkpoint file>; weights=None gives random weights (tests only)",
                        f"https://huggingface.co/{repo}")]
    path = _torch_hub_dir(cache_dir) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return []
    return [Missing(f"weights of classifier 'timm:{tagged}' ({where}): not at {path}",
                    f"download {url} to {path}, or pass weights=<checkpoint file>", url)]


def _refuse_missing(name: str, weights: str | None, cache_dir: str | None) -> None:
    """Raise before building when weights are missing and nothing may be downloaded."""
    missing = classifier_prerequisites(name, weights, cache_dir)
    if missing and (offline() or missing[0].url is None):
        m = missing[0]
        raise FileNotFoundError(f"{m.what} (downloads are off: HF_HUB_OFFLINE or DPROBE_OFFLINE). Fix: {m.fix}"
                                if m.url else f"{m.what}. Fix: {m.fix}")


# -- building -----------------------------------------------------------------------------------
def load_classifier(name: str = DEFAULT_CLASSIFIER, weights: str | None = "DEFAULT",
                    device: str | torch.device = "cpu", cache_dir: str | None = None, *,
                    view: str = "full", batch_size: int = 16) -> ImageClassifier:
    """A classifier by name, ready to run on uint8 RGB images.

    :param name: ``torchvision:<model>``, ``timm:<model>`` or ``toy`` (see the module docstring).
    :param weights: ``"DEFAULT"`` (the library's default pretrained weights; for torchvision VGG-16
        ``IMAGENET1K_V1``), a torchvision weights name (``IMAGENET1K_V1``), a timm pretrained tag
        (``a1_in1k``), a path to a checkpoint file (toy: a folder), or None for random weights
        (tests; the default weights' preprocessing and class names are kept).
    :param device: where the network runs; probabilities always come back on the CPU.
    :param cache_dir: torchvision: the torch hub folder (default ``$TORCH_HOME/hub``; checkpoints
        in its ``checkpoints/``); timm: the Hugging Face hub cache (default ``$HF_HUB_CACHE``).
    :param view: ``full`` (default; the whole image resized to the model's input side, as the
        replication fed Keras's VGG-16) or ``crop`` (the weights' own eval transform: resize, then
        centre-crop). Both normalise with the weights' mean and std. Ignored by ``toy``.
    :param batch_size: images per forward pass.
    """
    backend, model = parse_name(name)
    if view not in VIEWS:
        raise ValueError(f"classifier view {view!r} is not one of {VIEWS}")
    if batch_size < 1:
        raise ValueError(f"classifier batch_size must be >= 1, got {batch_size}")
    if backend == "toy":
        return _load_toy(weights, batch_size)
    _refuse_missing(name, weights, cache_dir)
    device = torch.device(device)
    try:
        if backend == "torchvision":
            net, preprocess, categories = _build_torchvision(model, weights, cache_dir, view)
        else:
            net, preprocess, categories = _build_timm(model, weights, cache_dir, view)
    except OSError as err:     # a failed download (URLError is an OSError) or an unreadable file
        missing = classifier_prerequisites(name, weights, cache_dir)
        fix = f" Fix: {missing[0].fix}" if missing else ""
        raise RuntimeError(f"could not load the weights of classifier {name!r} ({err}).{fix}") from err
    net = net.to(device).eval()
    num_classes = int(_num_outputs(net, preprocess, device))
    if categories is not None and len(categories) != num_classes:
        categories = None
    return ImageClassifier(name=name, num_classes=num_classes, categories=categories, multi_label=False,
                           batch_fn=_SoftmaxBatch(net, preprocess, device), batch_size=batch_size)


class _SoftmaxBatch:
    """uint8 NHWC -> preprocess -> network -> softmax, without autograd."""

    def __init__(self, net: torch.nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device):
        self.net, self.preprocess, self.device = net, preprocess, device

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        logits = self.net(self.preprocess(x))
        return torch.softmax(logits.float(), dim=1).cpu()


@torch.inference_mode()
def _num_outputs(net: torch.nn.Module, preprocess, device: torch.device) -> int:
    """K: timm's ``num_classes``, else the last linear layer's width, else one small forward pass."""
    k = getattr(net, "num_classes", None)
    if isinstance(k, int) and k > 0:
        return k
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if linear:   # torchvision registers the classifier head last (aux heads come before it)
        return linear[-1].out_features
    x = preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device))
    return net(x).shape[-1]


def _full_view(side: int, interpolation, mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    """The whole image resized (antialiased) to ``side`` x ``side``, then normalised."""
    from torchvision.transforms.v2 import functional as F

    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255.0)
        x = F.resize(x, [side, side], interpolation=interpolation, antialias=True)
        return (x - mean_t.to(x.device)) / std_t.to(x.device)

    return preprocess


def _build_torchvision(model: str, weights: str | None, cache_dir: str | None, view: str):
    from torchvision.models import get_model

    w = _torchvision_weights(model, weights)
    file = Path(weights).expanduser() if weights is not None and Path(weights).expanduser().is_file() else None
    if weights is None or file is not None:
        net = get_model(model, weights=None)
        if file is not None:
            net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    else:
        verify_hub_checkpoint(_torch_hub_dir(cache_dir) / "checkpoints" / os.path.basename(urlparse(w.url).path))
        with _hub_dir_set(cache_dir):   # a download is checked by torchvision itself (check_hash=True)
            net = get_model(model, weights=w)
    if w is None:
        raise ValueError(f"classifier 'torchvision:{model}' has no weights metadata, so its preprocessing is "
                         f"unknown; use a model with pretrained weights")
    t = w.transforms()
    if view == "crop":
        def preprocess(x: torch.Tensor) -> torch.Tensor:
            return t(x)
    else:
        preprocess = _full_view(int(t.crop_size[0]), t.interpolation, t.mean, t.std)
    return net, preprocess, list(w.meta.get("categories") or []) or None


def _build_timm(model: str, weights: str | None, cache_dir: str | None, view: str):
    import timm
    from timm.data import create_transform, resolve_model_data_config
    from torchvision.transforms import InterpolationMode

    file = Path(weights).expanduser() if weights is not None and Path(weights).expanduser().is_file() else None
    if weights is None or file is not None:
        net = timm.create_model(model, pretrained=False, checkpoint_path=str(file) if file else None)
    else:
        tagged = model if weights == "DEFAULT" else f"{model.split('.')[0]}.{weights}"
        net = timm.create_model(tagged, pretrained=True, cache_dir=cache_dir)
    cfg = resolve_model_data_config(net)
    if view == "crop":
        t = create_transform(**cfg, is_training=False)

        def preprocess(x: torch.Tensor) -> torch.Tensor:
            return t(x.float().div(255.0))
    else:
        preprocess = _full_view(int(cfg["input_size"][-1]), InterpolationMode(cfg["interpolation"]),
                                cfg["mean"], cfg["std"])
    return net, preprocess, _timm_categories(net)


def _timm_categories(net: torch.nn.Module) -> list[str] | None:
    """ImageNet class names (first synonym) when timm can tell which ImageNet subset the head is."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(net)
    if not subset:
        return None
    return [d.split(",")[0].strip() for d in ImageNetInfo(subset).label_descriptions()]


def _load_toy(weights: str | None, batch_size: int) -> ImageClassifier:
    """The toy world's shape classifier: [N, 4] independent sigmoids over :data:`SHAPES`."""
    from probes.labels.toy_nets import load_toy_net, predict
    from probes.toy.world import SHAPES

    if weights is None:
        raise ValueError("the toy classifier has no random-weight variant: it ships trained weights "
                         "(data/toy/labelers); use weights='DEFAULT' or a folder holding classifier.safetensors")
    folder = None if weights == "DEFAULT" else Path(weights).expanduser()
    load_toy_net("classifier", folder)       # missing or corrupt weights fail here, not on the first batch

    def batch_fn(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(predict("classifier", images, folder, batch_size=batch_size))

    return ImageClassifier(name="toy", num_classes=len(SHAPES), categories=list(SHAPES), multi_label=True,
                           batch_fn=batch_fn, batch_size=batch_size)
