"""What an intervention run is asked to do: one typed config, read from YAML or the command line.

``configs/intervention/*.yaml`` hold these keys; ``diffusion-probes intervene`` reads them with the
project's CLI convention (``--config``, ``--print_config``, overrides). Checked when built, before
any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from probes.experiments.intervention.targets import PATH_KINDS, RANDOM_KINDS

CONDITIONS = ("edit", "noop", "random")
#: ``activation``: optimise the layers' activations (the reference's edit); ``latent``: guide the latent x_t
#: with the probes' loss (Readout Guidance); ``both``: run the two, one table with a row per mode
MODES = ("activation", "latent", "both")
#: the reference's defaults: foreground edits the 9 decoder layers at steps 0-4, depth all 16 at steps 0-2
TASK_DEFAULTS: dict[str, dict[str, list]] = {
    "foreground": {"layers": ["up*"], "steps": [0, 1, 2, 3, 4]},
    "depth": {"layers": ["*"], "steps": [0, 1, 2]},
}


@dataclass
class InterventionConfig:
    """Edit activations so that the probes read a moved object, and measure whether the image follows.

    :param probes: probe export folder (probes.json + probes.safetensors) or W&B artifact
        reference ``entity/project/name:version``.
    :param task: the task whose probes edit (``foreground`` or ``depth``; any exported task).
    :param layers: layers to edit, names or patterns, in forward order (default per task: the 9
        decoder layers ``up*`` for foreground, all ``*`` for depth).
    :param steps: denoising steps to edit (default per task: 0-4 foreground, 0-2 depth).
    :param iterations: Adam iterations per edited (step, layer) (128; 0 reproduces the original).
    :param lr: Adam's learning rate on the activation (5e-3).
    :param huber_delta: regression tasks' Huber threshold in probe z-units (1).
    :param binary_loss: foreground's edit loss: ``auto`` (the loss the exported probes were fitted
        with: cross-entropy for SGD probes, as the reference; squared error on ±1 for ridge and
        mean-difference probes), ``cross_entropy`` or ``squared``.
    :param optimizer: ``adam`` (the reference's), ``sgd``, or ``projection`` (the smallest edit after
        which the probe reads the target: closed form, no iterations; see ``EditSettings``).
    :param mode: ``activation`` (today's edit: optimise the activations), ``latent`` (back-propagate the
        probes' loss to the latent x_t at ``guidance_steps`` and let the U-Net redraw) or ``both`` (the
        two, one after the other; conditions are then named ``activation/edit``, ``latent/edit``, ...).
    :param guidance_weight: latent mode: RMS change of the variance-preserving latent per iteration
        (0 reproduces the original image bit for bit).
    :param guidance_steps: latent mode: the steps to guide (default: the edit steps).
    :param guidance_iterations: latent mode: gradient steps on the latent per guided step.
    :param erase: activation mode: concepts the edit may not move linearly (LEACE fitted on the
        probes' store, training samples): ``colour`` and/or ``class`` in the toy world; ``[]`` (default)
        is today's edit bit for bit.
    :param erase_samples: how many training samples of the store fit the erasers.
    :param activation_shift: activation mode: measure how far each edit moves the tokens out of their
        distribution (Mahalanobis distance under the store's per-(step, layer) token mean and
        covariance, edited over unedited); needs the probes' store, and is reported as not measured
        without it.
    :param shift_samples: how many training samples of the store fit those Gaussians.
    :param conditions: any of ``edit``, ``noop``, ``random`` (default: all three).
    :param random_target: the random control's target: ``other_image`` (another test image's label)
        or ``random_shift`` (this image's label moved by an independent shift).
    :param value_range: regression targets are rescaled to this range in z-units (reference
        [-9, 9]); ``null`` keeps the training z-score.
    :param images: how many images (the first ones of ``split``).
    :param split: ``test`` (the reported numbers) or ``val``: choose edit settings on validation
        scenes, then run the chosen ones once on test.
    :param batch_size: images per pipeline call (all conditions use the same batches).
    :param seed: seed of the shifts and random pairings (per image: independent of ``images``).
    :param video: write the moving-object video (first test image): one intervention per frame, about
        two thirds of a run's time, so off unless asked for.
    :param video_path: ``circle`` or ``line``.
    :param video_frames: frames (one intervention each).
    :param video_extent: the path's radius / half-length, in px at 512 px (scaled to the image).
    :param fps: video frame rate.
    :param grid_images: images shown in each PNG grid.
    :param out: output folder (default ``outputs/interventions/<task>-<time>``).
    :param prompts_dir: local folder with the reference prompt CSVs (sets ``prompts.local_dir``).
    :param device: ``auto``, ``cpu`` or ``cuda``.
    :param wandb_project: log to a new W&B run in this project (offline without credentials);
        without it, results are logged only into an already active run.
    :param progress: progress bars.
    :param allow_other_model: edit even when the export's data config names another model than the one its
        probes were trained on (another init seed, revision, permutation or architecture): refused by default.
    """

    probes: str
    task: str = "foreground"
    layers: list[str] | None = None
    steps: list[int] | None = None
    iterations: int = 128
    lr: float = 5e-3
    huber_delta: float = 1.0
    binary_loss: str = "auto"
    optimizer: str = "adam"
    mode: str = "activation"
    guidance_weight: float = 0.02
    guidance_steps: list[int] | None = None
    guidance_iterations: int = 1
    erase: list[str] = field(default_factory=list)
    erase_samples: int = 64
    activation_shift: bool = True
    shift_samples: int = 64
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    random_target: str = "other_image"
    value_range: tuple[float, float] | None = (-9.0, 9.0)
    images: int = 16
    split: str = "test"
    batch_size: int = 1
    seed: int = 0
    video: bool = False
    video_path: str = "circle"
    video_frames: int = 16
    video_extent: float = 105.0
    fps: float = 8.0
    grid_images: int = 8
    out: str | None = None
    prompts_dir: str | None = None
    device: str = "auto"
    wandb_project: str | None = None
    progress: bool = True
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        self.conditions = list(self.conditions or CONDITIONS)
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown conditions {bad}; choose from {list(CONDITIONS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.guidance_weight < 0 or self.guidance_iterations < 1:
            raise ValueError(f"guidance_weight must be >= 0 and guidance_iterations >= 1, got "
                             f"{self.guidance_weight}, {self.guidance_iterations}")
        self.erase = list(self.erase or [])
        if self.erase and self.mode == "latent":
            raise ValueError(f"erase: {self.erase} constrains the activation edit; latent mode edits no activation: "
                             f"use mode: activation or both, or erase: []")
        if self.erase_samples < 1:
            raise ValueError(f"erase_samples must be >= 1, got {self.erase_samples}")
        if self.split not in ("test", "val"):
            raise ValueError(f"split must be test or val (settings are chosen on val, reported on test), "
                             f"got {self.split!r}")
        if self.shift_samples < 1:
            raise ValueError(f"shift_samples must be >= 1, got {self.shift_samples}")
        if self.random_target not in RANDOM_KINDS:
            raise ValueError(f"random_target must be one of {list(RANDOM_KINDS)}, got {self.random_target!r}")
        if self.video_path not in PATH_KINDS:
            raise ValueError(f"video_path must be one of {list(PATH_KINDS)}, got {self.video_path!r}")
        if self.images < 1 or self.batch_size < 1:
            raise ValueError(f"images and batch_size must be >= 1, got {self.images}, {self.batch_size}")

    def edit_layers(self) -> list[str]:
        """The layers to edit: as given, else the task's default."""
        return self.layers or TASK_DEFAULTS.get(self.task, TASK_DEFAULTS["depth"])["layers"]

    def modes(self) -> list[str]:
        """The edit modes to run, in order."""
        return ["activation", "latent"] if self.mode == "both" else [self.mode]

    def latent_steps(self) -> list[int]:
        """The steps latent guidance acts on: as given, else the edit steps."""
        return self.guidance_steps if self.guidance_steps is not None else self.edit_steps()

    def edit_steps(self) -> list[int]:
        """The steps to edit: as given, else the task's default."""
        return self.steps if self.steps is not None else TASK_DEFAULTS.get(self.task, TASK_DEFAULTS["depth"])["steps"]
