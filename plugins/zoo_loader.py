"""``zoo:NAME``: the small models trained by hpa's own recipe and shipped inside it (no network).

Weights (``--weights``):

* omitted (``DEFAULT``): the shipped trained weights, ``zoo/<NAME>.safetensors``;
* ``none`` (``weights=None`` in Python): the initialisation ``hpa train --seed (recipe seed + --seed)``
  starts from (``hpa_zoo.models.init``).  With the default ``--seed 0`` this is exactly the module training
  started from, so ``--compare-init`` compares the shipped weights with their
  true initialisation; any other ``--seed`` gives another random init;
* a path: a local state_dict file for the same architecture (read without
  executing pickled code unless ``--trust-pickle``).

torch is imported only when a model is loaded.
"""

from __future__ import annotations

import os
from typing import Any

from hpa import LoadError, LoadOptions, Loader, OptionError, SpecError, hookimpl, suggest

PREFIX = "zoo"


@hookimpl
def register_loaders(register):
    register(Loader(
        prefix=PREFIX,
        load=load,
        build=build,
        list_models=list_models,
        builds_init=True,
        description="small CNNs trained by hpa's own recipe on scikit-learn's digits; offline",
    ))


def list_models() -> list[str]:
    """The zoo models whose trained weights are shipped."""
    from hpa_zoo.models import MODELS

    return sorted(name for name, config in MODELS.items() if config.weights_path.exists())


def build(name: str, options: LoadOptions):
    """The untrained module: ``torch.manual_seed(options.seed)``, then build (what ``hpa train --arch zoo:NAME``
    trains; the trainer passes its own seed for the init stream)."""
    from hpa_zoo.models import build_seeded

    return build_seeded(_config(name).name, options.seed)


def load(name: str, options: LoadOptions):
    from hpa.backends.torch_trace import trace_module

    config = _config(name)
    model, weights_info = _model(config, options)
    input_size = options.input_size or config.input_size
    metadata = config.metadata()
    source = {
        "model": config.name,
        "weights": weights_info,
        "seed": config.seed + options.seed if options.random_init else config.seed,
        "dataset": config.dataset,
        "recipe": metadata.get("recipe"),
        "train_accuracy": metadata.get("train_accuracy"),
        "test_accuracy": metadata.get("test_accuracy"),
        "command": metadata.get("command"),
    }
    return trace_module(model, tuple(input_size), fold_bn=options.fold_bn, source=source, seed=options.seed,
                        copy_weights=False)  # the module is ours and dropped: no copy needed


def _config(name: str):
    from hpa_zoo.models import MODELS

    if name not in MODELS:
        raise SpecError(f"unknown zoo model {name!r}{suggest(name, MODELS, 'zoo:')} "
                        "(run 'hpa list-models zoo')")
    return MODELS[name]


def _model(config, options: LoadOptions) -> tuple[Any, str]:
    """The module with the weights ``options.weights`` asks for, and a description of them."""
    from hpa_zoo.models import init

    weights = options.weights
    if options.random_init:
        return init(config.name, config.seed + options.seed), "init"
    model = init(config.name)
    if options.default_weights:
        if not config.weights_path.exists():
            raise LoadError(f"the zoo has no trained weights for {config.name} ({config.weights_path} is missing); "
                            f"rebuild them with: python -m hpa_zoo.train {config.name} --out zoo/ "
                            "(it runs hpa train)")
        _load_state(model, _read_shipped(config.weights_path), config.weights_path)
        return model, "trained"
    if not (os.path.sep in weights or os.path.exists(weights) or "." in os.path.basename(weights)):
        raise OptionError(f"--weights {weights!r} means nothing to the zoo loader; omit it for the trained "
                          "weights, or give 'none' or the path of a state_dict file")
    from hpa.backends.torch_files import read_state_dict

    _load_state(model, read_state_dict(weights, trust_pickle=options.trust_pickle), weights)
    return model, os.fspath(weights)


def _read_shipped(path):
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged install
        raise LoadError(f"the shipped zoo weights {path} are unreadable ({type(exc).__name__}: {exc}); "
                        "reinstall hpa or rebuild them with python -m hpa_zoo.train") from exc


def _load_state(model, state, where) -> None:
    import numpy as np
    import torch

    from hpa.backends.torch_models import load_into

    # numpy arrays from a memory-mapped file are read-only; copy them (zoo models are tiny)
    state = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()}
    load_into(model, state, f"this zoo architecture ({where})")
