"""The trainable module of a run: built through the architecture's loader, initialised by the recipe."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hpa.errors import HpaError, OptionError
from hpa.experiments.data import generator, stream_seed
from hpa.experiments.types import Dataset
from hpa.registry import LoadOptions


def build_model(arch: str, dataset: Dataset, seed: int, init: str, task: str):
    """(module, traced ConvGraph) for ``arch`` sized for ``dataset``; refuses an architecture that does not fit."""
    from hpa.plugins import registries
    from hpa.registry import parse_spec

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
    if init == "kaiming_normal":
        kaiming_normal_init(model, seed)
    return model, _trace_fitting(model, arch, dataset, task)


def kaiming_normal_init(model: nn.Module, seed: int) -> None:
    """Seed 004 §3.1: Kaiming-normal weights (variance 2 / fan-out) and zero biases for every conv and linear."""
    from hpa.nn import ChannelReLUConv2d

    draws = generator(seed, "init")
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, ChannelReLUConv2d)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, kinds):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=draws)
                for name in ("bias", "out_bias"):
                    if getattr(module, name, None) is not None:
                        nn.init.zeros_(getattr(module, name))


def _trace_fitting(model: nn.Module, arch: str, dataset: Dataset, task: str):
    """Trace a copy (tracing switches a module to eval mode) and check the output has one logit per class."""
    import hpa

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
