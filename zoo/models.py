"""The zoo's architectures and recipes: name -> :class:`ZooConfig`.

Every model here is small, trains on CPU in seconds from a dataset that ships
inside scikit-learn, and has its trained weights stored next to this file as
``<name>.safetensors`` with a ``<name>.json`` record of how they were made.

The weights are trained by hpa's own trainer (``hpa train --plugin digits
--arch zoo:NAME``, see ``zoo/train.py``), and the initial weights are part of
the recipe: ``init(name)`` seeds torch as the trainer does for the config's
``seed`` and builds the model.  Training starts from exactly that module,
so ``hpa scan zoo:NAME --compare-init`` compares the shipped weights with the
true initialisation they were trained from.

torch is imported inside the builders, so listing the zoo stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ZOO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """How the shipped weights were trained: ``hpa train --plugin digits --arch zoo:NAME`` with these flags."""

    lr: float = 0.05  # learning rate, constant
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4
    epochs: int = 30
    batch_size: int = 64
    schedule: str = "constant"  # no decay
    init: str = "default"  # the modules' own init, under init()'s seeding
    shift: int = 0  # no augmentation
    flip: bool = False
    validation: float = 0.0  # train on the digits task's whole 75 % training split

    def flags(self) -> list[str]:
        """The ``hpa train`` flags of this recipe."""
        out = []
        for name, value in vars(self).items():
            if isinstance(value, bool):
                out.append(f"--{'' if value else 'no-'}{name}")
            else:
                out += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
        return out


@dataclass(frozen=True)
class ZooConfig:
    name: str  # "digits_cnn": the name after "zoo:"
    build: Callable[[], Any]  # () -> torch.nn.Module, freshly initialised from torch's global RNG
    input_size: tuple[int, ...]  # (C, H, W) without batch
    seed: int  # torch.manual_seed before build(): the training init
    dataset: str  # where the data comes from
    num_classes: int
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""

    @property
    def weights_path(self) -> Path:
        return ZOO_DIR / f"{self.name}.safetensors"

    @property
    def metadata_path(self) -> Path:
        return ZOO_DIR / f"{self.name}.json"

    def metadata(self) -> dict[str, Any]:
        """The training record shipped with the weights ({} when not trained yet)."""
        if not self.metadata_path.exists():
            return {}
        return json.loads(self.metadata_path.read_text())


# -- architectures (plain torch) -------------------------------------------------------

def _digits_cnn():
    from torch import nn

    return _named(
        conv1=nn.Conv2d(1, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(),
        pool1=nn.MaxPool2d(2),  # 8x8 -> 4x4
        conv3=nn.Conv2d(32, 32, 3, padding=1), relu3=nn.ReLU(),
        conv4=nn.Conv2d(32, 32, 3, padding=1), relu4=nn.ReLU(),
        pool2=nn.MaxPool2d(2),  # 4x4 -> 2x2
        flatten=nn.Flatten(),
        fc=nn.Linear(32 * 2 * 2, 10),
    )


def _digits_vgg():
    from torch import nn

    return _named(
        conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 16, 3, padding=1), relu2=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv3=nn.Conv2d(16, 32, 3, padding=1), relu3=nn.ReLU(),
        conv4=nn.Conv2d(32, 32, 3, padding=1), relu4=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(32 * 2 * 2, 64), relu5=nn.ReLU(),
        fc2=nn.Linear(64, 10),
    )


def _named(**modules):
    """An nn.Sequential whose layers have readable names (conv1, bn1, ...), kept in the graph."""
    from collections import OrderedDict

    from torch import nn

    return nn.Sequential(OrderedDict(modules))


_DIGITS = "sklearn.datasets.load_digits (8x8 grayscale, 1797 images, 10 classes)"

MODELS: dict[str, ZooConfig] = {
    config.name: config
    for config in (
        ZooConfig(
            name="digits_cnn", build=_digits_cnn, input_size=(1, 8, 8), seed=0, dataset=_DIGITS,
            num_classes=10,
            description="4 conv layers (the first two with BatchNorm) + linear, ~25k parameters",
        ),
        ZooConfig(
            name="digits_vgg", build=_digits_vgg, input_size=(1, 8, 8), seed=1, dataset=_DIGITS,
            num_classes=10,
            description="VGG-like: 4 plain conv layers, no BatchNorm, + 2 linear, ~25k parameters",
        ),
    )
}


def get(name: str) -> ZooConfig:
    """The config of ``name``; KeyError when there is none (the loader turns it into a SpecError)."""
    return MODELS[name]


def init(name: str, seed: int | None = None):
    """The model of ``name`` as ``hpa train --seed SEED`` initialises it (default: the recipe's seed).

    ``init(name)`` is the exact module the shipped weights were trained from.
    """
    from hpa.experiments.rng import stream_seed

    config = get(name)
    return build_seeded(name, stream_seed(config.seed if seed is None else seed, "init"))


def build_seeded(name: str, torch_seed: int):
    """``torch.manual_seed(torch_seed)``, then build (the caller's RNG is left alone)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        return get(name).build()


def trained(name: str):
    """The model of ``name`` with its shipped trained weights, in eval mode."""
    from safetensors.torch import load_file

    config = get(name)
    if not config.weights_path.exists():
        raise FileNotFoundError(f"{config.weights_path} is missing; run: python -m hpa_zoo.train {name} --out zoo/")
    model = init(name)
    model.load_state_dict(load_file(str(config.weights_path)))
    return model.eval()
