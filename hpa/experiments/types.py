"""Plugin-facing types of experiments: a :class:`Task` names a dataset, a default
architecture and a default :class:`Recipe`; its dataset function returns a
:class:`Dataset` of numpy arrays.  Torch-free on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    std: tuple[float, ...] = (0.5,)  # (0.5, 0.5): pixels in [-1, 1], as seed 004 A.7 trains
    source: dict[str, Any] = field(default_factory=dict)  # files and checksums, copied into run.json

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.train_images.shape[1:])


@dataclass(frozen=True)
class Recipe:
    """How to train; every field is a ``hpa train`` flag and a key of run.json.

    Defaults are seed 004 §3.1 and appendix A.1.
    """

    epochs: int = 100  # passes over the training split
    batch_size: int = 128
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 coefficient of SGD
    schedule: str = "step"  # "constant" | "step" (lr * step_factor every step_epochs) | "exponential"
    step_epochs: int = 25  # epochs between two step decays
    step_factor: float = 0.1  # multiplier at each step decay
    gamma: float = 10 ** (-1 / 25)  # exponential: lr * gamma**epoch (seed 004 A.8 interpolates the step)
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

