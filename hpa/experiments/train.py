"""``hpa train``: train a task's architecture with a recipe, writing a run folder.

Reproducible by construction: every random stream (validation split, init,
batch order, augmentation, dropout) is a function of (seed, epoch) (see
``hpa.experiments.data``), CPU training runs with deterministic algorithms,
and the per-epoch state holds model and optimizer only.  So a run resumed
after ``kill -9`` ends bitwise equal, on CPU, to one never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hpa.errors import HpaError, OptionError
from hpa.experiments.run import RunDir
from hpa.experiments.stats import EpochStatistics
from hpa.experiments.types import INITS, SCHEDULES, Recipe, Task, recipe_fields

FORMAT = 1  # of run.json
# CPU reductions depend on the thread count; one thread makes a CPU run give the same bytes on
# every machine (as zoo/train.py did) and is robust on a shared machine.
CPU_THREADS = 1


class TrainingError(HpaError):
    """Training stopped: the loss became NaN or Inf.  Finished epochs are kept."""


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

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "arch": self.arch, "seed": self.seed, "recipe": self.recipe.to_dict(),
                "snapshot_every": self.snapshot_every, "device": self.device,
                "statistics": list(self.statistics)}


def list_tasks() -> list[Task]:
    from hpa.plugins import registries

    return [item for item in registries()["experiments"].items() if isinstance(item, Task)]


def describe_tasks() -> list[dict[str, Any]]:
    """Every task: name, description, default architecture, input size, classes and recipe."""
    return [{"name": task.name, "description": task.description, "architecture": task.architecture,
             "input_size": None if task.input_size is None else list(task.input_size),
             "num_classes": task.num_classes, "recipe": task.recipe.to_dict()} for task in list_tasks()]


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
          progress: Callable[[str], None] | None = None, command: str | None = None,
          **recipe_values: Any) -> Path:
    """Train ``task`` into the new folder ``out``, or continue the run in ``resume``; returns the folder.

    ``recipe_values`` are :class:`Recipe` fields; None (like every other None) means "the
    default" for a new run and "as recorded" for a resumed one, where any other value
    that differs from the record is refused.
    """
    unknown = sorted(set(recipe_values) - set(recipe_fields()))
    if unknown:
        raise OptionError(f"unknown recipe field {unknown[0]!r}; the fields are {', '.join(recipe_fields())}")
    statistics = None if statistics is None else tuple(s for s in statistics if s != "none")
    given = {"task": task, "arch": arch, "seed": seed, "device": device, "snapshot_every": snapshot_every,
             "statistics": statistics,
             **{k: v for k, v in recipe_values.items()}}
    if resume is not None:
        if out is not None:
            raise OptionError("give either --out (a new run) or --resume (an existing one), not both")
        run = RunDir.open(resume)
        record = run.read_record()
        config = _config_from_record(record)
        _refuse_differences(config, given)
        data = record.get("data_dir") if data is None else data
    else:
        if task is None or out is None:
            raise OptionError("hpa train needs --plugin TASK and --out DIR (or --resume DIR)")
        config = _new_config(get_task(task), given)
        RunDir.check_new(out)  # before the (possibly slow) data loading; created once all is known to work
        run, record = None, None
    trainer = _Trainer(config, data, download, progress)
    if run is None:
        run = RunDir.create(out)
        trainer.start(run, command or _command_line())
    else:
        trainer.resume(run, record, command or _command_line())
    return run.path


# -- configuration ---------------------------------------------------------------------------

def _new_config(task: Task, given: dict[str, Any]) -> TrainConfig:
    changes = {k: given[k] for k in recipe_fields() if given.get(k) is not None}
    recipe = dataclasses.replace(task.recipe, **changes)
    _check_recipe(recipe)
    every = given["snapshot_every"] if given["snapshot_every"] is not None else 1
    if every < 1:
        raise OptionError(f"--snapshot-every must be a positive number of epochs, not {every}")
    statistics = ("projection",) if given["statistics"] is None else tuple(given["statistics"])
    _check_statistics(statistics)
    return TrainConfig(task=task.name, arch=given["arch"] or task.architecture,
                       seed=int(given["seed"] or 0), recipe=recipe, snapshot_every=int(every),
                       device=_resolve_device(given["device"]), statistics=statistics)


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
        if not getattr(recipe, name) >= 0:
            raise OptionError(f"--{name.replace('_', '-')} must be zero or positive, not {getattr(recipe, name)}")
    if recipe.schedule not in SCHEDULES:
        raise OptionError(f"--schedule {recipe.schedule!r} is unknown; choose from {', '.join(SCHEDULES)}")
    if recipe.init not in INITS:
        raise OptionError(f"--init {recipe.init!r} is unknown; choose from {', '.join(INITS)}")
    if not 0 <= recipe.validation < 1:
        raise OptionError(f"--validation must be a fraction in [0, 1), not {recipe.validation}")
    if recipe.shift < 0:
        raise OptionError(f"--shift must be zero or a positive number of pixels, not {recipe.shift}")


def _resolve_device(device: str | None) -> str:
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


def _config_from_record(record: dict[str, Any]) -> TrainConfig:
    saved = record["config"]
    return TrainConfig(task=saved["task"], arch=saved["arch"], seed=saved["seed"], recipe=Recipe(**saved["recipe"]),
                       snapshot_every=saved["snapshot_every"], device=saved["device"],
                       statistics=tuple(saved.get("statistics", ())))


def _refuse_differences(config: TrainConfig, given: dict[str, Any]) -> None:
    saved = {**{k: v for k, v in config.to_dict().items() if k != "recipe"}, **config.recipe.to_dict()}
    for key, value in given.items():
        if value is None or key not in saved:
            continue
        if key == "statistics":
            value = list(value)
        same = str(value) == str(saved[key]) if key == "device" else value == saved[key]
        if not same:
            flag = {"task": "--plugin", "statistics": "--stat"}.get(key, f"--{key.replace('_', '-')}")
            raise OptionError(f"cannot resume with {flag} {value}: the run was started with {saved[key]}; "
                              f"resume without {flag}, or start a new run with another --out")


def _command_line() -> str:
    """How this process was started, for library calls (the CLI passes its own ``hpa ...`` line)."""
    return shlex.join([sys.executable, *sys.argv])


# -- the trainer ----------------------------------------------------------------------------

class _Trainer:
    def __init__(self, config: TrainConfig, data, download: bool, progress) -> None:
        import torch

        from hpa.experiments.model import build_model

        self.config = config
        self.progress = progress or (lambda line: None)
        self.device = torch.device(config.device)
        task = get_task(config.task)
        self.data_dir = None if data is None else str(Path(data).expanduser())
        self.dataset = task.dataset(None if data is None else Path(self.data_dir), download)
        self.model, self.structure = build_model(config.arch, self.dataset, config.seed, config.recipe.init,
                                                 task.name)
        self.model.to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.recipe.lr,
                                         momentum=config.recipe.momentum, weight_decay=config.recipe.weight_decay)

    # -- entry points --------------------------------------------------------------------------

    def start(self, run: RunDir, command: str) -> None:
        from hpa.experiments.model import graph_record

        self.run = run
        self.record = self._new_record(command)
        run.write_record(self.record)
        run.write_graph(graph_record(self.structure, self.config.arch))
        self.statistics = EpochStatistics(run.path, self.structure, self.model, self.config.statistics)
        self._loop(first_epoch=0)

    def resume(self, run: RunDir, record: dict[str, Any], command: str) -> None:
        self.run, self.record = run, record
        if record.get("dataset") != self.dataset.source:
            raise OptionError(f"the dataset differs from the one {run.path} was trained on (files or checksums "
                              "changed); resume with the same --data")
        state = run.read_state()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        done = int(state["epoch"])
        run.truncate_to(done)
        self.statistics = EpochStatistics(run.path, self.structure, self.model, self.config.statistics)
        self.statistics.resume(done)
        self.record.update(status="running", resumed=record.get("resumed", []) + [{"from_epoch": done,
                                                                                    "command": command}])
        run.write_record(self.record)
        self.progress(f"resuming {run.path} after epoch {done}")
        self._loop(first_epoch=done + 1)

    # -- the epochs -----------------------------------------------------------------------------

    def _loop(self, first_epoch: int) -> None:
        import torch

        from hpa.experiments.data import DeviceData

        data = DeviceData(self.dataset, self.config.recipe, self.config.seed, self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        deterministic = torch.are_deterministic_algorithms_enabled()
        threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if self.device.type == "cpu":
            torch.set_num_threads(CPU_THREADS)
        try:
            with torch.random.fork_rng(devices=devices):  # dropout draws from the global RNG; leave it as found
                for epoch in range(first_epoch, self.config.recipe.epochs + 1):
                    self._epoch(data, epoch)
        except BaseException as exc:
            if isinstance(exc, TrainingError):
                self._finish("failed", str(exc))
            raise
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
        self._finish("complete")

    def _epoch(self, data, epoch: int) -> None:
        from hpa.experiments.loop import evaluate, train_one_epoch

        started = time.perf_counter()
        recipe = self.config.recipe
        line: dict[str, Any] = {"epoch": epoch, "lr": recipe.lr_at(epoch) if epoch else None}
        if epoch == 0:
            line.update(train_loss=None, train_accuracy=None)
        else:
            line.update(train_one_epoch(self.model, self.optimizer, data, recipe, self.config.seed, epoch))
            if not math.isfinite(line["train_loss"]):
                raise TrainingError(f"the training loss became {line['train_loss']} in epoch {epoch}; epochs "
                                    f"0-{epoch - 1} are kept in {self.run.path}; lower --lr and start a new run")
        line.update(evaluate(self.model, data, data.validation, "val"))
        line.update(evaluate(self.model, data, data.test, "test"))
        snapshot = epoch % self.config.snapshot_every == 0 or epoch == recipe.epochs
        line["snapshot"] = self.run.write_snapshot(epoch, self.model.state_dict()) if snapshot else None
        if snapshot:
            self.statistics.record(epoch, self.run.path / line["snapshot"])
        line["seconds"] = round(time.perf_counter() - started, 3)
        self.run.append_metrics(line)
        self.run.write_state(epoch, self.model.state_dict(), self.optimizer.state_dict())
        self.progress(_progress_line(line, recipe.epochs))

    def _finish(self, status: str, reason: str | None = None) -> None:
        self.record["status"] = status
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
            "normalisation": {"mean": list(self.dataset.mean), "std": list(self.dataset.std)},
            "versions": _versions(),
            "host": {"platform": f"{platform.system()}-{platform.machine()}", "python": platform.python_version(),
                     "threads": CPU_THREADS if self.device.type == "cpu" else _threads(), "device_name": _device_name(self.device)},
            "command": command,
        }


    def _split_sizes(self) -> dict[str, Any]:
        from hpa.experiments.data import stratified_split

        train, validation = stratified_split(self.dataset.train_labels, self.config.recipe.validation,
                                             self.config.seed)
        return {"validation": self.config.recipe.validation, "stratified": True, "seeded_by": "seed",
                "n_train": int(len(train)), "n_validation": int(len(validation)),
                "n_test": int(len(self.dataset.test_labels))}


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
