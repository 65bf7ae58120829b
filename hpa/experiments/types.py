"""Plugin-facing types of experiments: a :class:`Task` names a dataset, a default
architecture and a default :class:`Recipe`; its dataset function returns a
:class:`Dataset` of numpy arrays.  Torch-free on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hpa.errors import OptionError

if TYPE_CHECKING:  # numpy stays off the import path of 'hpa --help' and 'hpa plugins'
    import numpy as np

SCHEDULES = ("constant", "step", "exponential")
INITS = ("kaiming_normal", "default")


@dataclass(frozen=True)
class Dataset:
    """Images and labels as numpy arrays; normalisation happens on the training device."""

    train_images: np.ndarray  # (N, C, H, W): uint8 in 0..255, or float32 in [0, 1]
    train_labels: np.ndarray  # (N,) int64 class indices in 0..num_classes-1
    test_images: np.ndarray  # (M, C, H, W), same dtype and layout as train_images
    test_labels: np.ndarray  # (M,) int64
    num_classes: int
    mean: tuple[float, ...] = (0.5,)  # per channel (or one for all), after scaling to [0, 1]
    std: tuple[float, ...] = (0.5,)  # (0.5, 0.5): pixels in [-1, 1], as Gamba et al. 2020 A.7 trains
    source: dict[str, Any] = field(default_factory=dict)  # files and checksums, copied into run.json

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train_images.shape[1:])


@dataclass(frozen=True)
class Recipe:
    """How to train; every field is a ``hpa train`` flag and a key of run.json.

    Defaults are Gamba et al. 2020 §3.1 and appendix A.1.
    """

    epochs: int = 100  # passes over the training split
    batch_size: int = 128
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 coefficient of SGD
    schedule: str = "step"  # "constant" | "step" (lr * step_factor every step_epochs) | "exponential"
    step_epochs: int = 25  # epochs between two step decays
    step_factor: float = 0.1  # multiplier at each step decay
    gamma: float = 10 ** (-1 / 25)  # exponential: lr * gamma**epoch (Gamba et al. 2020 A.8 interpolates the step)
    init: str = "kaiming_normal"  # "kaiming_normal" (fan-out, zero biases) | "default" (the module's own)
    shift: int = 4  # random shifts of up to ±shift pixels, zero-padded; 0: none
    flip: bool = True  # random horizontal flips
    validation: float = 0.1  # stratified fraction of the training set held out, seeded

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



LABEL_NOISE_MODES = ("uniform", "wrong")
_PIXEL_NOISE = ("shuffle_pixels", "random_pixels", "gaussian_images")


@dataclass(frozen=True)
class Noise:
    """How ``hpa train`` corrupts the stored dataset (Gamba et al. 2020 Fig. 6, A.6; Zhang et al. 2017).

    Every field is a ``hpa train`` flag and a key of run.json's ``config.noise``.  Labels are
    corrupted on the training part only (after the validation split); pixels on every split.
    """

    label_noise: float = 0.0  # probability that a training label is corrupted
    label_noise_mode: str = "uniform"  # "uniform": redrawn over all classes | "wrong": always another class
    shuffle_pixels: bool = False  # one fixed permutation of pixel positions for every image of every split
    random_pixels: bool = False  # an independent fixed permutation per image
    gaussian_images: bool = False  # images replaced by Gaussian noise with the training set's channel moments
    noise_seed: int | None = None  # seed of every corruption; None: the run seed

    @property
    def pixel_corruption(self) -> str | None:
        """The one pixel corruption asked for (as a field name), or None."""
        chosen = [name for name in _PIXEL_NOISE if getattr(self, name)]
        return chosen[0] if chosen else None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def noise_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Noise))


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
    if noise.label_noise_mode not in LABEL_NOISE_MODES:
        raise OptionError(f"--label-noise-mode {noise.label_noise_mode!r} is unknown; choose from "
                          f"{', '.join(LABEL_NOISE_MODES)}")
    chosen = [name for name in _PIXEL_NOISE if getattr(noise, name)]
    if len(chosen) > 1:
        flags = " and ".join("--" + name.replace("_", "-") for name in chosen)
        raise OptionError(f"{flags} each replace the pixels; give only one of them")


@dataclass(frozen=True)
class NamedRecipe:
    """A recipe with a name (``hpa train --recipe NAME``): fields that replace the task's defaults."""

    name: str
    description: str  # one line for 'hpa experiments'
    changes: dict[str, Any]  # Recipe fields; explicit flags override them in turn


NAMED_RECIPES = {recipe.name: recipe for recipe in (
    NamedRecipe("paper", "the task's own defaults (Gamba et al. 2020 §3.1, appendix A.1)", {}),
    # Seed 004 Fig. 6 (random labels): no augmentation or weight decay would hide memorisation.
    NamedRecipe("noisy-labels", "Gamba et al. 2020 Fig. 6: lr 0.01, exponential decay 0.95 per epoch, no augmentation, "
                "no weight decay", {"lr": 0.01, "schedule": "exponential", "gamma": 0.95, "shift": 0,
                                    "flip": False, "weight_decay": 0.0}),
)}
DEFAULT_RECIPE = "paper"


def named_recipe(name: str) -> NamedRecipe:
    """The named recipe ``name``; an unknown name is an OptionError with "did you mean"."""
    from hpa.registry import suggest

    if name not in NAMED_RECIPES:
        raise OptionError(f"unknown recipe {name!r}{suggest(name, NAMED_RECIPES)}; 'hpa experiments' lists "
                          "the recipes")
    return NAMED_RECIPES[name]
