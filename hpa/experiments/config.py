"""A run's configuration: :class:`TrainConfig` from the task, the named recipe and the flags, every
value checked; the checks of a resume against run.json; the device; the task lookup.

Torch-free at import (``hpa experiments`` lists the tasks through here); :func:`resolve_device`
imports torch when it is called.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Any

from hpa.errors import OptionError
from hpa.experiments.types import (DEFAULT_RECIPE, NAMED_RECIPES, PRECISIONS, Noise, Recipe, Task, check_noise,
                                   check_recipe, named_recipe, noise_fields, recipe_fields)
from hpa.plugins import registries
from hpa.specs import parse_spec


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's numbers; resuming refuses any difference."""

    task: str
    arch: str
    seed: int
    recipe: Recipe
    snapshot_every: int
    device: str
    statistics: tuple[str, ...] = ("projection",)  # run on every snapshot
    precision: str = "fp32"  # fp32 (faithful), tf32 or bf16: changes rounding only
    compiled: bool = False  # torch.compile: changes rounding only
    recipe_name: str = DEFAULT_RECIPE  # the named recipe the recipe started from (types.NAMED_RECIPES)
    noise: Noise = Noise()  # corruption of the stored dataset; noise_seed None: the run seed
    # CPU runs: torch threads per process.  CPU reductions depend on the thread count, so a run is
    # bitwise reproducible (and resumable) at the count it records; None on CUDA, where it changes nothing.
    cpu_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "arch": self.arch, "seed": self.seed, "recipe": self.recipe.to_dict(),
                "snapshot_every": self.snapshot_every, "device": self.device,
                "statistics": list(self.statistics), "precision": self.precision, "compiled": self.compiled,
                "recipe_name": self.recipe_name, "noise": self.noise.to_dict(), "cpu_threads": self.cpu_threads}


def list_tasks() -> list[Task]:
    return [item for item in registries()["experiments"].items() if isinstance(item, Task)]


def describe_tasks() -> list[dict[str, Any]]:
    """Every task: name, description, default architecture, input size, classes, recipe and named recipes.

    ``recipe.init`` is resolved for the task's default architecture (what ``hpa train --plugin NAME``
    would record); ``recipe_noise`` holds the noise fields of the named recipes that set any.
    """
    def resolved(recipe: Recipe, architecture: str) -> dict[str, Any]:
        return dataclasses.replace(recipe, init=recipe.init or architecture_init(architecture)).to_dict()

    return [{"name": task.name, "description": task.description, "architecture": task.architecture,
             "input_size": None if task.input_size is None else list(task.input_size),
             "num_classes": task.num_classes, "recipe": resolved(task.recipe, task.architecture),
             "recipes": {name: resolved(dataclasses.replace(task.recipe, **named.changes), task.architecture)
                         for name, named in NAMED_RECIPES.items()},
             "recipe_noise": {name: dict(named.noise) for name, named in NAMED_RECIPES.items() if named.noise}}
            for task in list_tasks()]


def architecture_init(arch: str) -> str:
    """The init scheme ``arch``'s paper code used (its loader's ``init_scheme``), else "default"."""
    loaders = registries()["loaders"]
    parsed = parse_spec(arch, loaders)
    loader = loaders.get(parsed.prefix)
    return loader.init_scheme(parsed.name) if loader.init_scheme is not None else "default"


def get_task(name: str) -> Task:
    registry = registries()["experiments"]
    task = registry.get(name)  # unknown names: SpecError with "did you mean"
    if not isinstance(task, Task):
        raise OptionError(f"the experiment {name!r} is not a training task; 'hpa experiments' lists the tasks")
    return task


def new_config(task: Task, given: dict[str, Any]) -> TrainConfig:
    named = named_recipe(given.get("recipe_name") or DEFAULT_RECIPE)
    changes = {k: given[k] for k in recipe_fields() if given.get(k) is not None}
    recipe = dataclasses.replace(task.recipe, **{**named.changes, **changes})
    arch = given["arch"] or task.architecture
    if recipe.init is None:  # the architecture's own scheme, resolved now so that run.json names it
        recipe = dataclasses.replace(recipe, init=architecture_init(arch))
    noise = Noise(**{**named.noise, **{k: given[k] for k in noise_fields() if given.get(k) is not None}})
    check_noise(noise)
    if given["seed"] is not None and given["seed"] < 0:
        raise OptionError(f"--seed must be zero or a positive integer, not {given['seed']}")
    check_recipe(recipe)
    every = given["snapshot_every"] if given["snapshot_every"] is not None else 1
    if every < 1:
        raise OptionError(f"--snapshot-every must be a positive number of epochs, not {every}")
    statistics = ("projection",) if given["statistics"] is None else tuple(given["statistics"])
    check_statistics(statistics)
    device = resolve_device(given["device"])
    precision = given["precision"] or "fp32"
    _check_precision(precision, device)
    cpu_threads = _cpu_threads(given.get("cpu_threads"), device)
    return TrainConfig(task=task.name, arch=arch,
                       seed=int(given["seed"] or 0), recipe=recipe, snapshot_every=int(every),
                       device=device, statistics=statistics, precision=precision,
                       compiled=bool(given["compiled"]), recipe_name=named.name, noise=noise,
                       cpu_threads=cpu_threads)


def default_cpu_threads() -> int:
    """The cores this process may use, shared among the processes torchrun started on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _cpu_threads(given: int | None, device: str) -> int | None:
    if not device.startswith("cpu"):
        if given is not None:
            raise OptionError("--cpu-threads sets the threads of CPU training; leave it out with --device cuda")
        return None
    if given is None:
        return default_cpu_threads()
    if int(given) != given or given < 1:
        raise OptionError(f"--cpu-threads must be a positive number of threads, not {given}")
    return int(given)


def _check_precision(precision: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r} is unknown; choose from {', '.join(PRECISIONS)}")
    if precision == "tf32" and not device.startswith("cuda"):
        raise OptionError("--precision tf32 exists only on CUDA devices; use fp32 or bf16 with --device cpu")


def check_statistics(names: tuple[str, ...]) -> None:
    for name in names:
        registries()["statistics"].get(name)  # unknown: SpecError with "did you mean"


def resolve_device(device: str | None) -> str:
    """``device`` checked (None: cuda when present, else cpu), as a torch device string."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise OptionError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {device} asked for CUDA, but torch sees no GPU here; use --device cpu")
    return str(parsed)


def config_from_record(record: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a run.json records (a run recorded by an older hpa keeps what it trained with)."""
    saved = record["config"]
    return TrainConfig(task=saved["task"], arch=saved["arch"], seed=saved["seed"],
                       recipe=Recipe(**{**_older_recipe(record), **saved["recipe"]}),
                       snapshot_every=saved["snapshot_every"], device=saved["device"],
                       statistics=tuple(saved.get("statistics", ())), precision=saved.get("precision", "fp32"),
                       compiled=bool(saved.get("compiled", False)),
                       recipe_name=saved.get("recipe_name", DEFAULT_RECIPE),
                       noise=Noise(**{**_OLDER_NOISE, **saved.get("noise", {})}),
                       # runs recorded before the option trained CPU runs on one thread
                       cpu_threads=saved.get("cpu_threads", 1 if str(saved["device"]).startswith("cpu") else None))


# Runs recorded before these fields existed corrupted pixels on every split, before augmentation,
# and normalised with the dataset's declared mean and std (all tasks declared 0.5: [-1, 1]).
_OLDER_NOISE = {"pixel_noise_splits": "all", "pixel_noise_order": "permute_then_augment"}


def _older_recipe(record: dict[str, Any]) -> dict[str, Any]:
    recorded = record.get("normalisation", {})
    symmetric = set(recorded.get("mean", [0.5])) == {0.5} and set(recorded.get("std", [0.5])) == {0.5}
    return {"pixels": "symmetric" if symmetric else "dataset"}


def refuse_differences(config: TrainConfig, given: dict[str, Any]) -> None:
    saved = {**{k: v for k, v in config.to_dict().items() if k not in ("recipe", "noise")},
             **config.recipe.to_dict(), **config.noise.to_dict()}
    for key, value in given.items():
        if value is None or key not in saved:
            continue
        if key == "statistics":
            value = list(value)
        same = str(value) == str(saved[key]) if key == "device" else value == saved[key]
        if not same:
            flag = {"task": "--plugin", "statistics": "--stat", "compiled": "--compile",
                    "recipe_name": "--recipe"}.get(
                key, f"--{key.replace('_', '-')}")
            raise OptionError(f"cannot resume with {flag} {value}: the run was started with {saved[key]}; "
                              f"resume without {flag}, or start a new run with another --out")


def command_line() -> str:
    """How this process was started, for library calls (the CLI passes its own ``hpa ...`` line)."""
    return shlex.join([sys.executable, *sys.argv])
