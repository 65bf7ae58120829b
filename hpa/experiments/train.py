"""``hpa train``: train a task's architecture with a recipe, writing a run folder.

Reproducible by construction: every random stream (validation split, init,
batch order, augmentation, dropout) is a function of (seed, epoch) (see
``hpa.experiments.data``), CPU training runs with deterministic algorithms,
and the per-epoch state holds model and optimizer only.  So a run resumed
after ``kill -9`` ends bitwise equal, on CPU, to one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hpa.errors import HpaError, OptionError
from hpa.experiments.distributed import is_lead
from hpa.experiments.layout import TRACKER
from hpa.experiments.loggers import Loggers
from hpa.experiments.run import RunDir, snapshot_name
from hpa.experiments.types import (DEFAULT_RECIPE, INIT_SCHEMES, NAMED_RECIPES, PIXELS, SCHEDULES, Noise, Recipe, Task,
                                   check_noise, named_recipe, noise_fields, noise_from_flags, recipe_fields)

FORMAT = 1  # of run.json


class TrainingError(HpaError):
    """Training stopped: the loss became NaN or Inf.  Finished epochs are kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C: the finished epochs are kept and run.json says "interrupted".

    A KeyboardInterrupt still (so that nothing catches it as an error); its message is the one
    line that says how to continue, which the CLI prints before exiting with status 130.
    """

    @classmethod
    def of(cls, folder: Path) -> TrainingInterrupted:
        return cls(f"Stopped by Ctrl-C; the finished epochs are kept in {folder}: continue with "
                   f"'hpa train --resume {folder}'")


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
    from hpa.plugins import registries

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
    from hpa.plugins import registries
    from hpa.registry import parse_spec

    loaders = registries()["loaders"]
    parsed = parse_spec(arch, loaders)
    loader = loaders.get(parsed.prefix)
    return loader.init_scheme(parsed.name) if loader.init_scheme is not None else "default"


def get_task(name: str) -> Task:
    from hpa.plugins import registries

    registry = registries()["experiments"]
    task = registry.get(name)  # unknown names: SpecError with "did you mean"
    if not isinstance(task, Task):
        raise OptionError(f"the experiment {name!r} is not a training task; 'hpa experiments' lists the tasks")
    return task


def train(task: str | None = None, *, out: str | Path | None = None, resume: str | Path | None = None,
          arch: str | None = None, seed: int | None = None, device: str | None = None,
          data: str | Path | None = None, download: bool = False, snapshot_every: int | None = None,
          statistics: tuple[str, ...] | list[str] | None = None,
          precision: str | None = None, compiled: bool | None = None, cpu_threads: int | None = None,
          progress: Callable[[str], None] | None = None, command: str | None = None,
          recipe_name: str | None = None, log: tuple[str, ...] | list[str] = (), **recipe_values: Any) -> Path:
    """Train ``task`` into the new folder ``out``, or continue the run in ``resume``; returns the folder.

    ``recipe_name`` is a named recipe (types.NAMED_RECIPES, default "paper") whose fields replace
    the task's defaults.  ``recipe_values`` are :class:`Recipe` fields, which override it in turn,
    and :class:`Noise` fields (plus ``random_labels=True``, i.e. ``label_noise=1``).  None (like
    every other None) means "the default" for a new run and "as recorded" for a resumed one,
    where any other value that differs from the record is refused.  ``log``: dashboards that
    also get each epoch's values (hpa.experiments.loggers: tensorboard, wandb, mlflow).
    """
    noise_given = noise_from_flags(recipe_values)  # random_labels resolved; a conflict is refused
    recipe_values = {k: v for k, v in recipe_values.items() if k not in (*noise_fields(), "random_labels")}
    unknown = sorted(set(recipe_values) - set(recipe_fields()))
    if unknown:
        raise OptionError(f"unknown recipe field {unknown[0]!r}; the fields are {', '.join(recipe_fields())}")
    statistics = None if statistics is None else tuple(s for s in statistics if s != "none")
    given = {"task": task, "arch": arch, "seed": seed, "device": device, "snapshot_every": snapshot_every,
             "statistics": statistics, "precision": precision, "compiled": compiled,
             "cpu_threads": cpu_threads, "recipe_name": recipe_name, **noise_given,
             **{k: v for k, v in recipe_values.items()}}
    if resume is not None:
        if out is not None:
            raise OptionError("give either --out (a new run) or --resume (an existing one), not both")
        run = RunDir.open(resume)  # run.json checked: damaged, it is refused in one line
        record = run.read_record()
        if record.get("writer") == TRACKER:
            raise OptionError(f"{run.path} was recorded by hpa.Tracker from your own training loop; continue it "
                              "there (a new hpa.Tracker with another out=), hpa train cannot")
        config = config_from_record(record)
        _refuse_differences(config, given)
        if is_lead():
            run.metrics()  # checked before the (possibly slow) data loading: nothing else holds its losses
        data = record.get("data_dir") if data is None else data
    else:
        if task is None or out is None:
            raise OptionError("hpa train needs --plugin TASK and --out DIR (or --resume DIR)")
        config = _new_config(get_task(task), given)
        if is_lead():  # under torch.distributed only rank 0 touches the run folder
            RunDir.check_new(out)  # before the (possibly slow) data loading; created once all is known to work
        run, record = None, None
    loggers = Loggers(log if is_lead() else ())  # names and packages checked before the data is loaded
    trainer = _Trainer(config, data, download, progress, loggers)
    if run is None:
        run = RunDir.create(out) if is_lead() else RunDir(Path(out).expanduser())
        trainer.start(run, command or _command_line())
    else:
        trainer.resume(run, record, command or _command_line())
    return run.path


# -- configuration ---------------------------------------------------------------------------

def _new_config(task: Task, given: dict[str, Any]) -> TrainConfig:
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
    _check_recipe(recipe)
    every = given["snapshot_every"] if given["snapshot_every"] is not None else 1
    if every < 1:
        raise OptionError(f"--snapshot-every must be a positive number of epochs, not {every}")
    statistics = ("projection",) if given["statistics"] is None else tuple(given["statistics"])
    _check_statistics(statistics)
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
    from hpa.experiments.loop import PRECISIONS

    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r} is unknown; choose from {', '.join(PRECISIONS)}")
    if precision == "tf32" and not device.startswith("cuda"):
        raise OptionError("--precision tf32 exists only on CUDA devices; use fp32 or bf16 with --device cpu")


def _check_statistics(names: tuple[str, ...]) -> None:
    from hpa.plugins import registries

    for name in names:
        registries()["statistics"].get(name)  # unknown: SpecError with "did you mean"


def _check_recipe(recipe: Recipe) -> None:
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


def _refuse_differences(config: TrainConfig, given: dict[str, Any]) -> None:
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


def _command_line() -> str:
    """How this process was started, for library calls (the CLI passes its own ``hpa ...`` line)."""
    return shlex.join([sys.executable, *sys.argv])


def dataset_as_trained(dataset, config: TrainConfig):
    """``dataset`` as ``config`` trains on it: its noise applied, its normalisation resolved.

    Returns :class:`hpa.experiments.noise.NoisyData`, whose dataset's ``mean`` and ``std`` are
    the per-channel values the network's input is normalised with (``recipe.pixels``).  Labels are
    corrupted on the training part of the seeded validation split only; pixels as ``config.noise``
    says.  Deterministic, so a resumed run (or ``hpa reinit``) rebuilds exactly the data the run saw.
    """
    from hpa.experiments.data import stratified_split
    from hpa.experiments.noise import corrupt_dataset

    train_index, _ = stratified_split(dataset.train_labels, config.recipe.validation, config.seed)
    if len(train_index) == 0:
        raise OptionError(f"--validation {config.recipe.validation} holds out all {len(dataset.train_labels)} "
                          "training images, so none is left to train on; choose a smaller fraction")
    seed = config.seed if config.noise.noise_seed is None else config.noise.noise_seed
    noisy = corrupt_dataset(dataset, config.noise, train_index, seed)
    mean, std = pixel_normalisation(dataset, config.recipe.pixels, train_index)
    return dataclasses.replace(noisy, dataset=dataclasses.replace(noisy.dataset, mean=mean, std=std))


def pixel_normalisation(dataset, pixels: str, train_index) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in the [0, 1] scale of the stored pixels, for ``pixels`` (types.PIXELS).

    "standardised" measures the stored images of the training part (the validation images are
    held out of it); the clean images, so a corruption that keeps the channel moments keeps them.
    """
    if pixels == "symmetric":
        return (0.5,), (0.5,)
    if pixels == "unit":
        return (0.0,), (1.0,)
    if pixels == "dataset":
        return tuple(map(float, dataset.mean)), tuple(map(float, dataset.std))
    from hpa.experiments.noise import channel_moments

    scale = 1 / 255 if dataset.train_images.dtype.name == "uint8" else 1.0
    mean, std = channel_moments(dataset.train_images[train_index])
    if not all(value > 0 for value in std):
        raise OptionError("--pixels standardised needs pixels that vary in every channel, but a channel of the "
                          "training images is constant; choose --pixels symmetric or unit")
    return tuple(float(m * scale) for m in mean), tuple(float(v * scale) for v in std)


# -- the trainer ----------------------------------------------------------------------------

class _Trainer:
    def __init__(self, config: TrainConfig, data, download: bool, progress, loggers: Loggers) -> None:
        import torch

        from hpa.experiments.distributed import join
        from hpa.experiments.loop import make_optimizer, memory_format
        from hpa.experiments.model import BackgroundWriter, build_model

        self.config, self.loggers = config, loggers
        self.world = join(config.device)  # None unless started by torchrun with several processes
        self.lead = self.world is None or self.world.lead
        self.progress = (progress if self.lead else None) or (lambda line: None)
        self.device = torch.device(config.device) if self.world is None else self.world.device
        self.writer = BackgroundWriter()
        task = get_task(config.task)
        self.data_dir = None if data is None else str(Path(data).expanduser())
        noisy = dataset_as_trained(task.dataset(None if data is None else Path(self.data_dir), download), config)
        self.dataset, self.train_labels, self.noise_report = noisy.dataset, noisy.train_labels, noisy.report
        self.train_orders = noisy.train_orders
        self.model, self.structure = build_model(config.arch, self.dataset, config.seed, config.recipe.init,
                                                 task.name, config.recipe.init_std)
        self.model.to(self.device, memory_format=memory_format(self.device, config.precision))
        self.optimizer = make_optimizer(self.model, config.recipe, self.device)
        # The compiled module shares the parameters; snapshots read the plain one (no _orig_mod. keys).
        self.forward = torch.compile(self.model) if config.compiled else self.model

    # -- entry points --------------------------------------------------------------------------

    def start(self, run: RunDir, command: str) -> None:
        from hpa.experiments.model import graph_record

        self.run = run
        self.record = self._new_record(command)
        if self.lead:
            run.write_record(self.record)
            run.write_graph(graph_record(self.structure, self.config.arch))
        self.statistics = self._statistics(run)
        self._loop(first_epoch=0)

    def resume(self, run: RunDir, record: dict[str, Any], command: str) -> None:
        self.run, self.record = run, record
        if record.get("dataset") != self.dataset.source:
            raise OptionError(f"the dataset differs from the one {run.path} was trained on (files or checksums "
                              "changed); resume with the same --data")
        state, note, repair = None, None, None
        if self.lead:  # every file checked, and what can be made again planned, before anything is written
            reader = run.reader()
            state, note = run.resume_state(reader, self.config.recipe.epochs)  # unusable: the last good epoch
            repair = run.plan_repair(reader, state, self.model.state_dict())  # the model is still epoch 0's
        if self.world is not None:  # rank 0's state, so every rank starts from the same bytes
            state = self.world.broadcast(state)
        self.model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        done = int(state["epoch"])
        if self.lead:
            from hpa.experiments.model import graph_record

            if note:
                _warn(note)
            repair.apply(graph_record(self.structure, self.config.arch), self.structure, self.model)
        self.statistics = self._statistics(run)
        self.record.update(status="running", resumed=record.get("resumed", []) + [{"from_epoch": done,
                                                                                    "command": command}])
        if self.lead:
            run.truncate_to(done)
            for epoch in self.statistics.resume(done):  # snapshots whose statistics a kill interrupted
                self.statistics.record(epoch, run.path / snapshot_name(epoch))
            run.write_record(self.record)
        self.progress(f"resuming {run.path} after epoch {done}")
        self._loop(first_epoch=done + 1)

    def _statistics(self, run: RunDir):
        """Statistics of each snapshot, off the training path (model.separate_statistics_process says where)."""
        from hpa.experiments.model import SnapshotStatistics, separate_statistics_process

        separate = separate_statistics_process(self.device.type)
        return SnapshotStatistics(run.path, self.structure, self.model, self.config.statistics, separate)

    # -- the epochs -----------------------------------------------------------------------------

    def _loop(self, first_epoch: int) -> None:
        import torch

        from hpa.experiments.data import DeviceData
        from hpa.experiments.loop import steady_host_memory

        shard = None if self.world is None else (self.world.rank, self.world.size)
        data = DeviceData(self.dataset, self.config.recipe, self.config.seed, self.device, shard=shard,
                          train_labels=self.train_labels, train_orders=self.train_orders)
        devices = [self.device] if self.device.type == "cuda" else []
        deterministic = torch.are_deterministic_algorithms_enabled()
        threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if self.config.cpu_threads is not None:
            torch.set_num_threads(self.config.cpu_threads)
        try:
            host = steady_host_memory() if self.device.type == "cpu" else contextlib.nullcontext()
            # dropout draws from the global RNG: leave it as found
            with torch.random.fork_rng(devices=devices), host:
                for epoch in range(first_epoch, self.config.recipe.epochs + 1):
                    self._epoch(data, epoch)
            self.writer.close()
            self.statistics.close()
            self.loggers.publish(self.run.path)
        except BaseException as exc:
            self._close_writer_after(exc)
            if isinstance(exc, TrainingError):
                self._finish("failed", str(exc))
            elif isinstance(exc, KeyboardInterrupt):  # Ctrl-C: the finished epochs are written, say so
                self._finish("interrupted")
                raise TrainingInterrupted.of(self.run.path) from None
            raise
        finally:
            self.loggers.close()
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
            if self.world is not None:
                self.world.close()
        self._finish("complete")
        if self.lead:
            self._write_figures()

    def _close_writer_after(self, exc: BaseException) -> None:
        """Let the finished epochs' writes and statistics complete; the first error stays the one raised."""
        for closing in (self.writer.close, self.statistics.close):
            try:
                closing()
            except Exception:  # noqa: S110  (exc, already on its way, is the error to report)
                pass

    def _epoch(self, data, epoch: int) -> None:
        from hpa.experiments.loop import evaluate, train_one_epoch

        started = time.perf_counter()
        recipe = self.config.recipe
        line: dict[str, Any] = {"epoch": epoch, "lr": recipe.lr_at(epoch) if epoch else None}
        if epoch == 0:
            line.update(train_loss=None, train_accuracy=None)
        else:
            line.update(train_one_epoch(self.forward, self.optimizer, self._counted(data, epoch), recipe,
                                        self.config.seed, epoch, self.config.precision, self.world))
            if not math.isfinite(line["train_loss"]):
                raise TrainingError(f"the training loss became {line['train_loss']} in epoch {epoch}; epochs "
                                    f"0-{epoch - 1} are kept in {self.run.path}; lower --lr and start a new run")
        if not self.lead:  # rank 0 evaluates and writes; the others go on to the next epoch
            return
        line.update(evaluate(self.forward, data, data.validation, "val", self.config.precision))
        line.update(evaluate(self.forward, data, data.test, "test", self.config.precision))
        snapshot = epoch % self.config.snapshot_every == 0 or epoch == recipe.epochs
        line["snapshot"] = snapshot_name(epoch) if snapshot else None
        line["seconds"] = round(time.perf_counter() - started, 3)
        self._submit_writes(epoch, line)
        if hasattr(self.progress, "epoch_finished"):
            self.progress.epoch_finished(line)
        self.progress(_progress_line(line, recipe.epochs))

    def _submit_writes(self, epoch: int, line: dict[str, Any]) -> None:
        """Copy model and optimizer to host memory and hand the epoch's writes to the writer thread."""
        from hpa.experiments.model import host_copy

        copied = time.perf_counter()
        (model_state, optimizer_state), ready = host_copy((self.model.state_dict(), self.optimizer.state_dict()))
        self.writer.waited += time.perf_counter() - copied
        self.writer.submit(self._write_epoch, epoch, line, model_state, optimizer_state, ready)

    def _write_epoch(self, epoch: int, line, model_state, optimizer_state, ready) -> None:
        """On the writer thread, in the run folder's order: snapshot (and its statistics), metrics, state."""
        ready()
        if line["snapshot"]:
            self.run.write_snapshot(epoch, model_state)
            self.statistics.record(epoch, self.run.path / line["snapshot"])
        self.run.append_metrics(line)
        self.run.write_state(epoch, model_state, optimizer_state)
        self.loggers.publish(self.run.path)  # dashboards (--log): the epochs whose values are all written

    def _counted(self, data, epoch: int):
        """``data``, reporting each batch to a progress bar when the caller's ``progress`` draws one."""
        if not hasattr(self.progress, "epoch_started"):
            return data
        self.progress.epoch_started(epoch, self.config.recipe.epochs, len(data.train))
        return _CountedBatches(data, self.progress.advance)

    def _write_figures(self) -> None:
        """figures/: the training curves and each statistic's values over epochs (hpa.render.series)."""
        from hpa.experiments.open_run import open_run

        open_run(self.run.path).plot()

    def _finish(self, status: str, reason: str | None = None) -> None:
        if not self.lead:
            return
        self.record["status"] = status
        self.record["waiting_seconds"] = round(self.writer.waited, 3)  # training blocked on writes, this session
        if self.device.type == "cuda":
            import torch

            self.record["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        if reason:
            self.record["failure"] = reason
        self.run.write_record(self.record)

    def _new_record(self, command: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "status": "running",
            "config": self.config.to_dict(),
            "input_size": list(self.dataset.input_size),
            "num_classes": self.dataset.num_classes,
            "data_dir": self.data_dir,
            "dataset": self.dataset.source,
            "split": self._split_sizes(),
            "noise": self.noise_report,
            "normalisation": {"pixels": self.config.recipe.pixels, "mean": list(self.dataset.mean),
                              "std": list(self.dataset.std)},
            "versions": _versions(),
            "host": {"platform": f"{platform.system()}-{platform.machine()}", "python": platform.python_version(),
                     "threads": self.config.cpu_threads or _threads(),
                     "device_name": _device_name(self.device)},
            "command": command,
            "processes": 1 if self.world is None else self.world.size,
        }


    def _split_sizes(self) -> dict[str, Any]:
        from hpa.experiments.data import stratified_split

        train, validation = stratified_split(self.dataset.train_labels, self.config.recipe.validation,
                                             self.config.seed)
        return {"validation": self.config.recipe.validation, "stratified": True, "seeded_by": "seed",
                "n_train": int(len(train)), "n_validation": int(len(validation)),
                "n_test": int(len(self.dataset.test_labels))}


class _CountedBatches:
    """``data`` whose ``train_batches`` reports each finished batch's size; the loop stays unaware."""

    def __init__(self, data, advance: Callable[[int], None]) -> None:
        self._data, self._advance = data, advance

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def train_batches(self, *args: Any, **kwargs: Any):
        for batch in self._data.train_batches(*args, **kwargs):
            yield batch
            self._advance(batch.total)


def _warn(note: str) -> None:
    """One line on stderr ("Warning: ..." from the CLI), shown even with --quiet."""
    import warnings

    from hpa.plugins import HpaWarning

    warnings.warn(note, HpaWarning, stacklevel=3)


def _progress_line(line: dict[str, Any], epochs: int) -> str:
    def number(key: str, digits: int = 4) -> str:
        value = line.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    return (f"epoch {line['epoch']}/{epochs}: train loss {number('train_loss')} acc {number('train_accuracy')}"
            f"  val loss {number('val_loss')} acc {number('val_accuracy')}"
            f"  test acc {number('test_accuracy')}  {line['seconds']:.1f}s")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("hpa", "torch", "torchvision", "timm", "numpy", "scikit-learn", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
