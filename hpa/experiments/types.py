"""Plugin-facing types of experiments: a :class:`Task` names a dataset, a default
architecture and a default :class:`Recipe`; its dataset function returns a
:class:`Dataset` of numpy arrays.  Torch-free on purpose.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hpa.errors import OptionError, suggest

if TYPE_CHECKING:  # numpy stays off the import path of 'hpa --help' and 'hpa plugins'
    import numpy as np

SCHEDULES = ("constant", "step", "exponential")
#: ``--precision``: fp32 (faithful), tf32 or bf16 change rounding only (hpa.experiments.loop).
PRECISIONS = ("fp32", "tf32", "bf16")

#: Initialisation schemes (``--init``), each defined in one line; hpa.experiments.model draws them.
#: Every scheme but "default" sets all biases to zero, as both papers' code did.
INIT_SCHEMES = {
    "kaiming_normal": "every conv and linear weight Kaiming-normal, fan-out (std sqrt(2 / fan_out)); "
                      "the literal sentence of Gamba et al. 2020 §3.1",
    "kaiming_conv": "convs Kaiming-normal fan-out, linears N(0, 0.01): torchvision's VGG init, which the "
                    "authors' code used for the published VGG figures",
    "normal": "every conv and linear weight N(0, init_std^2) (Fig. 15: N(0, 0.01), a VGG-19 that fails to learn)",
    "xavier_uniform": "every conv and linear weight Xavier-uniform with the ReLU gain sqrt(2): the authors' "
                      "LeNet (2020 code)",
    "xavier_normal": "every conv and linear weight Xavier-normal with the ReLU gain sqrt(2): the default of "
                     "the 2019 cone paper's code",
    "default": "the module's own initialisation (PyTorch's layer defaults, or its constructor's), seeded",
}

#: How stored pixels become the network's input (``--pixels``); the trainer resolves the per-channel
#: mean and std once and records them in run.json's ``normalisation``.
PIXELS = {
    "dataset": "per channel with the mean and std the task declares (CIFAR and MNIST: the constants of the "
               "2020 authors' code; a task that declares none: [-1, 1])",
    "symmetric": "scaled to [-1, 1] (the wording of Gamba et al. 2020 A.7)",
    "unit": "scaled to [0, 1] (Fig. 21's CIFAR10+, the authors' --unnormalize)",
    "standardised": "per channel with the training split's own mean and std, computed once",
}


@dataclass(frozen=True)
class Dataset:
    """Images and labels as numpy arrays; normalisation happens on the training device."""

    train_images: np.ndarray  # (N, C, H, W): uint8 in 0..255, or float32 in [0, 1]
    train_labels: np.ndarray  # (N,) int64 class indices in 0..num_classes-1
    test_images: np.ndarray  # (M, C, H, W), same dtype and layout as train_images
    test_labels: np.ndarray  # (M,) int64
    num_classes: int
    # The task's per-channel normalisation (or one value for all channels), after scaling to [0, 1]: what
    # recipe pixels "dataset" uses.  The default (0.5, 0.5) gives pixels in [-1, 1].
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    source: dict[str, Any] = field(default_factory=dict)  # files and checksums, copied into run.json

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train_images.shape[1:])


@dataclass(frozen=True)
class Recipe:
    """How to train; every field is a ``hpa train`` flag (its comment the flag's help) and a key of run.json.

    Defaults are Gamba et al. 2020 §3.1 and appendix A.1.
    """

    epochs: int = 100  # epochs: passes over the training split.
    batch_size: int = 128  # batch size.
    lr: float = 0.01  # base learning rate.
    momentum: float = 0.9  # SGD momentum.
    weight_decay: float = 5e-4  # weight decay (the L2 coefficient of SGD).
    schedule: str = "step"  # constant, step (lr * step_factor every step_epochs) or exponential.
    step_epochs: int = 25  # epochs between step decays.
    step_factor: float = 0.1  # learning-rate factor at each step.
    gamma: float = 10 ** (-1 / 25)  # per-epoch factor of the exponential schedule, lr * gamma**epoch
    #                                 (Gamba et al. 2020 A.8 interpolates the step).
    init: str | None = None  # the init scheme, one of kaiming_normal, kaiming_conv, normal, xavier_uniform,
    #                          xavier_normal, default ('hpa experiments' defines each).  [default:
    #                          the architecture's own, as its paper's code; 'hpa list-models cifar' shows it]
    init_std: float = 0.01  # the std of every weight under --init normal.  [default: 0.01]
    shift: int = 4  # random shifts of up to ±N pixels, zero-padded (0: none).
    flip: bool = True  # random horizontal flips.
    validation: float = 0.1  # held-out fraction of the training set (stratified, seeded).
    pixels: str = "dataset"  # the network's input: dataset (the task's channel mean and std; CIFAR,
    #                          MNIST: the 2020 authors' constants), symmetric ([-1, 1], the 2020 paper's
    #                          wording), unit ([0, 1], Fig. 21's CIFAR10+) or standardised (the training
    #                          split's own mean and std).  [default: dataset]
    crop: int | None = None  # the streaming path's crop side: training draws a random resized crop of it,
    #                          validation and test a centre crop (--recipe imagenet: 224).  [default: none]
    resize: int | None = None  # validation and test: resize the shorter side to N before the centre crop
    #                            (--recipe imagenet: 256).  [default: none]
    scale_min: float = 0.08  # the random resized crop's smallest area, a fraction of the image's.
    scale_max: float = 1.0  # the random resized crop's largest area, a fraction of the image's.
    classes: int | None = None  # train on a seeded subset of N of the task's classes (drawn by --class-seed,
    #                             recorded in run.json).  [default: all]
    class_seed: int = 0  # seed of the --classes subset, apart from --seed so that every seed of a --seeds run
    #                      trains on the same classes.  [default: 0]
    data_path: str | None = None  # in-memory (the dataset decoded once, on the device) or streaming (files
    #                               decoded by DataLoader workers as training goes).  [default: the task's
    #                               choice: streaming for imagenet, and for an imagefolder that needs crops
    #                               or would not fit in memory]
    skip_unreadable: bool = False  # skip an image that cannot be decoded and record its path in run.json
    #                                (streaming); without it the run stops naming the file.

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch`` (the first epoch trains at ``lr``)."""
        done = epoch - 1
        if self.schedule == "step":
            return self.lr * self.step_factor ** (done // self.step_epochs)
        if self.schedule == "exponential":
            return self.lr * self.gamma ** done
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def field_help(cls: type) -> dict[str, str]:
    """Each field of the dataclass ``cls`` (defined in this file) -> its comment, the help of its flag.

    A comment may go on over the following lines that hold only a comment.  Read from this
    file's text, so that a new recipe or noise field is one commented line.
    """
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    start = lines.index(f"class {cls.__name__}:")
    names = {f.name for f in fields(cls)}
    helps: dict[str, list[str]] = {}
    last = None
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        name, sep, rest = line.strip().partition(":")
        if name in names and sep and "  # " in rest:
            last = name
            helps[name] = [rest.split("  # ", 1)[1].strip()]
        elif last is not None and line.strip().startswith("#"):
            more = line.strip().lstrip("#").strip()
            helps[last].append(("  " if more.startswith("[default") else " ") + more)
        else:
            last = None
    return {name: "".join(parts) for name, parts in helps.items()}


def recipe_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Recipe))


@dataclass(frozen=True)
class Task:
    """A training task, registered through ``register_experiments``; ``hpa train --plugin NAME``."""

    name: str  # "cifar10": what --plugin names
    dataset: Callable[[Path | None, bool], Dataset]  # (--data folder or None, --download) -> Dataset
    architecture: str  # default --arch, a loader spec such as "cifar:vgg19"
    input_size: tuple[int, ...] | None  # (C, H, W) of the images; None: known only from the data
    recipe: Recipe = Recipe()  # the task's defaults; flags override single fields
    description: str = ""  # one line for 'hpa experiments'
    num_classes: int | None = None  # known before loading the data, for listings; None: from the data
    # The streaming path (hpa.experiments.streaming): --data folder -> the task's image files, decoded as
    # training goes.  None: the task trains in memory only.
    files: Callable[[Path | None], FileDataset] | None = None
    # --data folder -> None, or LoadError naming what is missing and where to put it; from file names,
    # decoding nothing (what hpa study checks before it writes anything).  None: the task cannot tell cheaply.
    present: Callable[[Path | None], None] | None = None


@dataclass(frozen=True)
class FileDataset:
    """A dataset read from image files as training goes (the streaming path); torch-free.

    Paths are stored as one numpy bytes array per split (relative to ``root``), so that DataLoader
    workers share them without copying a Python list each.  Images are decoded by torchvision and
    transformed by the recipe's ``crop``, ``resize`` and scale fields.
    """

    root: str  # the --data folder; every path is relative to it
    train_files: np.ndarray  # (N,) bytes: paths of the training images, in the task's order
    train_labels: np.ndarray  # (N,) int64
    test_files: np.ndarray  # (M,) bytes
    test_labels: np.ndarray  # (M,) int64
    classes: tuple[str, ...]  # class names; a label is an index into them
    mean: tuple[float, ...] = (0.5,)  # per-channel normalisation, as Dataset's
    std: tuple[float, ...] = (0.5,)
    source: dict[str, Any] = field(default_factory=dict)  # copied into run.json
    streaming_only: bool = False  # True: the task never decodes the whole set into memory (imagenet)
    channels: int = 3  # images are decoded to RGB

    @property
    def num_classes(self) -> int:
        return len(self.classes)



LABEL_NOISE_MODES = ("uniform", "wrong")
_PIXEL_NOISE = ("shuffle_pixels", "random_pixels", "gaussian_images")
PIXEL_NOISE_SPLITS = ("train", "all")
PIXEL_NOISE_ORDERS = ("augment_then_permute", "permute_then_augment")


@dataclass(frozen=True)
class Noise:
    """How ``hpa train`` corrupts the data (Gamba et al. 2020 Figs. 6 and 20; Zhang et al. 2017).

    Every field is a ``hpa train`` flag and a key of run.json's ``config.noise``.  Labels are
    corrupted on the training part only (after the validation split).  Pixels are corrupted on
    the images trained on, after their augmentation, as the authors' code did; ``pixel_noise_splits``
    and ``pixel_noise_order`` choose otherwise.
    """

    label_noise: float = 0.0  # corrupt each training label with probability P (validation and test labels
    #                           stay clean).  [default: 0]
    label_noise_mode: str = "uniform"  # uniform (redrawn over all classes, Zhang et al. 2017) or wrong (always
    #                                    another class, (y + U{1..C-1}) mod C, as the code of Gamba et al. 2020
    #                                    Fig. 6).  [default: uniform]
    shuffle_pixels: bool = False  # one fixed permutation of pixel positions, the same for every image (Zhang
    #                               et al. 2017's 'shuffled pixels').
    random_pixels: bool = False  # an independent fixed permutation of pixel positions for each image (Gamba
    #                              et al. 2020 Fig. 20; Zhang et al.'s 'random pixels').
    gaussian_images: bool = False  # images replaced by Gaussian noise with the training images' per-channel
    #                                mean and std (Zhang et al. 2017's 'Gaussian').
    noise_seed: int | None = None  # seed of the corruption.  [default: the run's --seed]
    pixel_noise_splits: str = "train"  # the pixel noise reaches the images trained on (Fig. 20) or all splits,
    #                                    validation and test too (Zhang et al. 2017).  [default: train]
    pixel_noise_order: str = "augment_then_permute"  # permute each augmented training image (the authors'
    #                                                  code) or the stored images once, before augmentation.
    #                                                  [default: augment_then_permute]

    @property
    def pixel_corruption(self) -> str | None:
        """The one pixel corruption asked for (as a field name), or None."""
        chosen = [name for name in _PIXEL_NOISE if getattr(self, name)]
        return chosen[0] if chosen else None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def noise_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Noise))


#: What a field's ``hpa train`` flag needs beyond its name, type and comment: a fixed choice list
#: (click refuses anything else) or a metavar.  A field without an entry needs none.
FLAG_CHOICES = {"pixel_noise_splits": PIXEL_NOISE_SPLITS, "pixel_noise_order": PIXEL_NOISE_ORDERS,
                "data_path": ("in-memory", "streaming")}
FLAG_METAVARS = {"label_noise": "P", "label_noise_mode": "MODE", "crop": "N", "resize": "N", "classes": "N"}


def noise_from_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Noise` fields given (None: not given), with ``random_labels`` resolved into ``label_noise``.

    ``values`` may hold any keys; only noise fields and ``random_labels`` are read.
    """
    given = {name: values.get(name) for name in noise_fields() if values.get(name) is not None}
    if values.get("random_labels"):
        if given.get("label_noise", 1.0) != 1.0:
            raise OptionError(f"--random-labels means --label-noise 1, which conflicts with --label-noise "
                              f"{given['label_noise']}; give one of the two")
        given["label_noise"] = 1.0
    return given


def check_noise(noise: Noise) -> None:
    """Refuse values that cannot be meant (an OptionError naming the flag)."""
    if not 0.0 <= noise.label_noise <= 1.0:
        raise OptionError(f"--label-noise must be a probability in [0, 1], not {noise.label_noise}")
    if noise.noise_seed is not None and noise.noise_seed < 0:
        raise OptionError(f"--noise-seed must be zero or a positive integer, not {noise.noise_seed}")
    if noise.label_noise_mode not in LABEL_NOISE_MODES:
        raise OptionError(f"--label-noise-mode {noise.label_noise_mode!r} is unknown; choose from "
                          f"{', '.join(LABEL_NOISE_MODES)}")
    chosen = [name for name in _PIXEL_NOISE if getattr(noise, name)]
    if len(chosen) > 1:
        flags = " and ".join("--" + name.replace("_", "-") for name in chosen)
        raise OptionError(f"{flags} each replace the pixels; give only one of them")
    for name, allowed in (("pixel_noise_splits", PIXEL_NOISE_SPLITS), ("pixel_noise_order", PIXEL_NOISE_ORDERS)):
        if getattr(noise, name) not in allowed:
            raise OptionError(f"--{name.replace('_', '-')} {getattr(noise, name)!r} is unknown; choose from "
                              f"{', '.join(allowed)}")


@dataclass(frozen=True)
class NamedRecipe:
    """A recipe with a name (``hpa train --recipe NAME``): fields that replace the task's defaults.

    docs/reproducing.md says which figure of which paper each one reproduces.
    """

    name: str
    description: str  # one line for 'hpa experiments'
    changes: dict[str, Any]  # Recipe fields; explicit flags override them in turn
    noise: dict[str, Any] = field(default_factory=dict)  # Noise fields, likewise


# Gamba et al. 2020 A.1: "decayed by a factor of 10^(-1/25)" every epoch, interpolating the step schedule.
_SMOOTH = {"schedule": "exponential", "gamma": 10 ** (-1 / 25)}
# Fig. 6 and Fig. 20 follow Zhang et al. 2017: lr 0.01 decayed by 0.95 every epoch.
_ZHANG = {"lr": 0.01, "schedule": "exponential", "gamma": 0.95}
_NO_REGULARISATION = {"shift": 0, "flip": False, "weight_decay": 0.0}

# The 2020 authors' ImageNet transforms (data_loader.load_imagenet), every field a flag.
IMAGENET_AUGMENTATION = {"crop": 224, "resize": 256, "scale_min": 0.08, "scale_max": 1.0, "shift": 0, "flip": True}

NAMED_RECIPES = {recipe.name: recipe for recipe in (
    NamedRecipe("paper", "the task's own defaults: Gamba et al. 2020 §3.1 and A.1 as the authors' code ran them "
                "(step decay ÷10 every 25 epochs, the architecture's own init)", {}),
    NamedRecipe("exponential", "Gamba et al. 2020 A.8: the smooth schedule, lr × 10^(-1/25) every epoch "
                "(Figs. 16, 17, 21, 22 right, 24)", dict(_SMOOTH)),
    NamedRecipe("random-labels", "Gamba et al. 2020 Fig. 6 as its code made it: every training label replaced by "
                "another class ((y + U{1..C-1}) mod C, never the true one), lr 0.01 × 0.95 per epoch, no "
                "augmentation, no weight decay", {**_ZHANG, **_NO_REGULARISATION},
                {"label_noise": 1.0, "label_noise_mode": "wrong"}),
    NamedRecipe("random-labels-uniform", "Fig. 6 as its text says (Zhang et al. 2017): every training label "
                "redrawn uniformly over all classes, so about 1/C stay correct; otherwise as random-labels",
                {**_ZHANG, **_NO_REGULARISATION}, {"label_noise": 1.0, "label_noise_mode": "uniform"}),
    NamedRecipe("noisy-labels", "the Fig. 6 training without the labels' corruption (choose it with "
                "--label-noise P): lr 0.01 × 0.95 per epoch, no augmentation, no weight decay",
                {**_ZHANG, **_NO_REGULARISATION}),
    NamedRecipe("pixel-shuffle", "Gamba et al. 2020 Fig. 20: each training image's pixels shuffled by its own "
                "fixed permutation after augmentation, lr 0.01 × 0.95 per epoch", dict(_ZHANG),
                {"random_pixels": True}),
    NamedRecipe("failing-init", "Gamba et al. 2020 Fig. 15: every weight drawn from N(0, 0.01), a VGG-19 that "
                "fails to learn", {"init": "normal", "init_std": 0.01}),
    NamedRecipe("unit-pixels", "Gamba et al. 2020 Fig. 21's CIFAR10+: pixels in [0, 1], the smooth schedule",
                {**_SMOOTH, "pixels": "unit"}),
    NamedRecipe("paper-text", "Gamba et al. 2020 §3.1 and A.7 read literally: Kaiming-normal for every layer, "
                "pixels in [-1, 1] (not what the figures were made with: see docs/reproducing.md)",
                {"init": "kaiming_normal", "pixels": "symmetric"}),
    NamedRecipe("imagenet", "the ImageNet augmentation of the 2020 authors' code (torchvision's ImageNet "
                "example): training RandomResizedCrop(224, scale 0.08-1) and flips, validation and test "
                "Resize(256) then CenterCrop(224); streamed from the files", dict(IMAGENET_AUGMENTATION)),
    NamedRecipe("cones-2019", "the defaults of Gamba et al. 2019's code: lr 0.1, batches of 100, 75 epochs, "
                "÷10 every 20, Xavier-normal init, pixels standardised with the training split's statistics",
                {"lr": 0.1, "batch_size": 100, "epochs": 75, "step_epochs": 20, "step_factor": 0.1,
                 "init": "xavier_normal", "pixels": "standardised"}),
)}
DEFAULT_RECIPE = "paper"


def named_recipe(name: str) -> NamedRecipe:
    """The named recipe ``name``; an unknown name is an OptionError with "did you mean"."""
    if name not in NAMED_RECIPES:
        raise OptionError(f"unknown recipe {name!r}{suggest(name, NAMED_RECIPES)}; 'hpa experiments' lists "
                          "the recipes")
    return NAMED_RECIPES[name]


def check_recipe(recipe: Recipe) -> None:
    """Every field of ``recipe`` in range; an OptionError naming the flag otherwise."""
    positive = {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "step_epochs": recipe.step_epochs}
    for name, value in positive.items():
        if int(value) != value or value < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")
    if not recipe.lr > 0 or not math.isfinite(recipe.lr):
        raise OptionError(f"--lr must be a positive number, not {recipe.lr}")
    for name in ("momentum", "weight_decay"):
        if not getattr(recipe, name) >= 0 or not math.isfinite(getattr(recipe, name)):
            raise OptionError(f"--{name.replace('_', '-')} must be zero or positive, not {getattr(recipe, name)}")
    for name in ("step_factor", "gamma"):  # a factor of the rate: 0 stops training, a negative one ascends
        if not getattr(recipe, name) > 0 or not math.isfinite(getattr(recipe, name)):
            raise OptionError(f"--{name.replace('_', '-')} must be a positive number, not {getattr(recipe, name)}")
    if recipe.schedule not in SCHEDULES:
        raise OptionError(f"--schedule {recipe.schedule!r} is unknown; choose from {', '.join(SCHEDULES)}")
    if recipe.init not in INIT_SCHEMES:
        raise OptionError(f"--init {recipe.init!r} is unknown; choose from {', '.join(INIT_SCHEMES)}")
    if not recipe.init_std > 0 or not math.isfinite(recipe.init_std):
        raise OptionError(f"--init-std must be a positive number, not {recipe.init_std}")
    if not 0 <= recipe.validation < 1:
        raise OptionError(f"--validation must be a fraction in [0, 1), not {recipe.validation}")
    if recipe.shift < 0:
        raise OptionError(f"--shift must be zero or a positive number of pixels, not {recipe.shift}")
    if recipe.pixels not in PIXELS:
        raise OptionError(f"--pixels {recipe.pixels!r} is unknown; choose from {', '.join(PIXELS)}")
    for name in ("crop", "resize", "classes"):
        value = getattr(recipe, name)
        if value is not None and (int(value) != value or value < 1):
            raise OptionError(f"--{name} must be a positive integer, not {value}")
    if not 0 < recipe.scale_min <= recipe.scale_max <= 1:
        raise OptionError(f"--scale-min and --scale-max must satisfy 0 < min <= max <= 1, not {recipe.scale_min} "
                          f"and {recipe.scale_max}")
    if recipe.data_path not in (None, "in-memory", "streaming"):
        raise OptionError(f"--data-path {recipe.data_path!r} is unknown; choose from in-memory, streaming")
    if recipe.classes is not None and recipe.classes < 2:
        raise OptionError(f"--classes must be at least 2 (a classifier of one class learns nothing), not "
                          f"{recipe.classes}")


def data_root(data_dir) -> Path:
    """Where a task's dataset files are: ``--data``, else ``$HPA_DATA``, else ``~/.cache/hpa/data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("HPA_DATA") or Path.home() / ".cache" / "hpa" / "data")
