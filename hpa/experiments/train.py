"""``hpa train``: train a task's architecture with a recipe, writing a run folder (or resume one).

The configuration is checked here, before anything is written or loaded
(``hpa.experiments.config``); the epochs are the trainer's (``hpa.experiments.trainer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hpa.errors import OptionError
from hpa.experiments.config import command_line, config_from_record, get_task, new_config, refuse_differences
from hpa.experiments.distributed import is_lead
from hpa.experiments.layout import TRACKER
from hpa.experiments.loggers import Loggers
from hpa.experiments.run import RunDir
from hpa.experiments.trainer import Trainer
from hpa.experiments.types import noise_fields, noise_from_flags, recipe_fields


def train(task: str | None = None, *, out: str | Path | None = None, resume: str | Path | None = None,
          arch: str | None = None, seed: int | None = None, device: str | None = None,
          data: str | Path | None = None, download: bool = False, snapshot_every: int | None = None,
          statistics: tuple[str, ...] | list[str] | None = None,
          precision: str | None = None, compiled: bool | None = None, cpu_threads: int | None = None,
          workers: int | None = None,
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
        refuse_differences(config, given)
        if is_lead():
            run.metrics()  # checked before the (possibly slow) data loading: nothing else holds its losses
        data = record.get("data_dir") if data is None else data
    else:
        if task is None or out is None:
            raise OptionError("hpa train needs --plugin TASK and --out DIR (or --resume DIR)")
        config = new_config(get_task(task), given)
        if is_lead():  # under torch.distributed only rank 0 touches the run folder
            RunDir.check_new(out)  # before the (possibly slow) data loading; created once all is known to work
        run, record = None, None
    loggers = Loggers(log if is_lead() else ())  # names and packages checked before the data is loaded
    trainer = Trainer(config, data, download, progress, loggers, workers=workers)  # workers: the streaming path's loaders
    if run is None:
        run = RunDir.create(out) if is_lead() else RunDir(Path(out).expanduser())
        trainer.start(run, command or command_line())
    else:
        trainer.resume(run, record, command or command_line())
    return run.path
