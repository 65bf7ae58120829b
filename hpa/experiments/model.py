"""The trainable module of a run: built through the architecture's loader, initialised by the
recipe, traced once (the graph record of graph.json).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

import hpa
from hpa.errors import HpaError, OptionError
from hpa.experiments.rng import generator, stream_seed
from hpa.experiments.types import INIT_SCHEMES, Dataset
from hpa.nn import ChannelReLUConv2d
from hpa.options import LoadOptions
from hpa.plugins import registries
from hpa.specs import parse_spec


def build_model(arch: str, dataset: Dataset, seed: int, init: str, task: str, init_std: float = 0.01):
    """(module, traced ConvGraph) for ``arch`` sized for ``dataset``, initialised by the scheme ``init``
    (types.INIT_SCHEMES); refuses an architecture that does not fit."""
    loaders = registries()["loaders"]
    parsed = parse_spec(arch, loaders)
    loader = loaders.get(parsed.prefix)
    if loader.build is None:
        raise OptionError(f"the {parsed.prefix} loader cannot build a trainable module yet; choose an --arch "
                          "from a loader that can, such as cifar:NAME (hpa list-models cifar)")
    size = dataset.input_size
    declared = {option.name for option in loader.options}
    wanted = {"num_classes": dataset.num_classes, "in_channels": size[0]}
    extra = {key: value for key, value in wanted.items() if key in declared}
    options = LoadOptions(weights="none", input_size=size, seed=stream_seed(seed, "init"), extra=extra)
    try:
        model = loader.build(parsed.name, options)
    except OptionError as exc:  # the builder's own size checks
        shown = "x".join(map(str, size))
        raise OptionError(f"--arch {arch} does not fit the {task} task's {shown} images ({exc})") from None
    initialise(model, init, seed, init_std)
    return model, _trace_fitting(model, arch, dataset, task)


def initialise(model: nn.Module, scheme: str, seed: int, std: float = 0.01) -> None:
    """Draw every conv and linear weight of ``model`` by ``scheme`` (types.INIT_SCHEMES); zero their biases.

    The draws come from the run's "init" stream in module order, so a seed always gives the same
    weights.  "default" leaves the module as its constructor initialised it.
    """
    if scheme == "default":
        return
    draws = generator(seed, "init")
    kinds = _convs() + (nn.Linear,)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, kinds):
                _draw(module.weight, scheme, isinstance(module, nn.Linear), std, draws)
                for name in ("bias", "out_bias"):
                    if getattr(module, name, None) is not None:
                        nn.init.zeros_(getattr(module, name))


def _convs() -> tuple[type, ...]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, ChannelReLUConv2d)


_RELU_GAIN = math.sqrt(2.0)


def _draw(weight: torch.Tensor, scheme: str, linear: bool, std: float, draws: torch.Generator) -> None:
    if scheme == "kaiming_normal" or (scheme == "kaiming_conv" and not linear):
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu", generator=draws)
    elif scheme == "kaiming_conv":
        nn.init.normal_(weight, 0.0, 0.01, generator=draws)
    elif scheme == "normal":
        nn.init.normal_(weight, 0.0, std, generator=draws)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight, gain=_RELU_GAIN, generator=draws)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight, gain=_RELU_GAIN, generator=draws)
    else:
        raise OptionError(f"--init {scheme!r} is unknown; choose from {', '.join(INIT_SCHEMES)}")


def _trace_fitting(model: nn.Module, arch: str, dataset: Dataset, task: str):
    """Trace a copy (tracing switches a module to eval mode) and check the output has one logit per class."""
    size = dataset.input_size
    shown = "x".join(map(str, size))
    probe = copy.deepcopy(model)
    try:
        graph = hpa.load(probe, input_size=size)
        with torch.no_grad():
            logits = probe.eval()(torch.zeros(2, *size))
    except (HpaError, RuntimeError) as exc:
        cause = exc.__cause__ or exc  # the tracer wraps the forward pass's own error
        reason = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise OptionError(f"--arch {arch} does not fit the {task} task's {shown} images ({reason}); "
                          "choose an architecture for this input size") from None
    if tuple(logits.shape) != (2, dataset.num_classes):
        raise OptionError(f"--arch {arch} gives {tuple(logits.shape[1:])} outputs per image but the {task} task "
                          f"has {dataset.num_classes} classes; pass an architecture with num_classes outputs")
    return graph


def graph_record(graph, arch: str) -> dict[str, Any]:
    """The traced structure, JSON-ready: layers (with their ``params`` map), skipped parts, input shape."""
    return {
        "spec": arch,
        "input_shape": list(graph.input_shape or ()),
        "layers": [layer.attributes() for layer in graph],
        "skipped": [skipped.to_dict() for skipped in graph.skipped],
    }


def unwrapped(model):
    """The module whose state dict names the weights: not a DDP/DataParallel wrapper nor a compiled one."""
    for attribute in ("_orig_mod", "module"):
        inner = getattr(model, attribute, None)
        if inner is not None and type(model).__name__ in ("OptimizedModule", "DistributedDataParallel",
                                                           "DataParallel"):
            return unwrapped(inner)
    return model
