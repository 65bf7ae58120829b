"""``hpa.Tracker``: an ``hpa train`` run folder written from the caller's own training loop.

::

    tracker = hpa.Tracker(model, out="runs/mine", input_size=(3, 32, 32))
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, ...)
        tracker.epoch(epoch, metrics={"train_loss": ..., "val_accuracy": ...})
    tracker.close()

The folder is the one :mod:`hpa.experiments.run` writes for ``hpa train`` (names in
:mod:`hpa.experiments.layout`), so ``hpa.open_run``, ``hpa analyse-run``, ``run:DIR@N``
and the figures read it unchanged.  What differs is recorded: ``run.json`` says
``"writer": "hpa.Tracker"``, holds no task or recipe (the caller's loop owns them) and
no ``state/last.pt`` (there is no optimizer to resume; ``hpa train --resume`` refuses).

The training is never changed: the module is traced once, on a copy; each
``epoch()`` copies the weights to host memory (``model.host_copy``) and hands the
snapshot, its statistics and the metrics line to the background writer
(``model.BackgroundWriter``), every random generator left as found.  Under
``torch.distributed`` only rank 0 writes; the other ranks' calls do nothing.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import random
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

import hpa
from hpa.api import parse_input_size
from hpa.errors import HpaError, HpaWarning, OptionError
from hpa.experiments.background import BackgroundWriter, SnapshotStatistics, host_copy, separate_statistics_process
from hpa.experiments.distributed import is_lead
from hpa.experiments.layout import RESERVED, RUN_JSON, SEEDS_JSON, TRACKER, snapshot_name
from hpa.experiments.loggers import Loggers
from hpa.experiments.model import graph_record, unwrapped
from hpa.experiments.open_run import open_run
from hpa.experiments.run import RunDir
from hpa.experiments.trainer import versions
from hpa.plugins import registries

__all__ = ["Tracker"]

FORMAT = 1  # of run.json, as hpa train's


class Tracker:
    """Records ``model`` into the new run folder ``out``: epoch 0 now, then each ``epoch(n)``.

    ``input_size``: one input's shape without the batch, as ``(3, 32, 32)``.  ``statistics``:
    run on every snapshot (``hpa plugins`` lists them).  ``every``: snapshot every N-th
    epoch, as ``hpa train --snapshot-every`` (epoch 0 always).
    ``log``: dashboards that also get the values, any of "tensorboard", "wandb", "mlflow".
    ``name``: what the run is called in figures and run.json (default: the module's class).
    ``seed``: the seed the caller used, recorded (default: ``torch.initial_seed()``, recorded
    as inferred).  ``figures``: draw ``figures/`` on ``close``.
    """

    def __init__(self, model, out: str | os.PathLike, *, input_size, statistics: Iterable[str] = ("projection",),
                 every: int = 1, log: Iterable[str] = (), name: str | None = None, seed: int | None = None,
                 figures: bool = True) -> None:
        import torch

        self.module = unwrapped(model)
        if not isinstance(self.module, torch.nn.Module):
            raise OptionError(f"hpa.Tracker needs a torch.nn.Module, not a {type(model).__name__}")
        try:
            self.input_size = parse_input_size(input_size)
        except OptionError as exc:  # its words name the command line's flag
            raise OptionError(str(exc).replace("--input-size", "input_size=")) from None
        if self.input_size is None:
            raise OptionError("hpa.Tracker needs input_size, one input's shape without the batch, as (3, 32, 32)")
        self.statistics = _checked_statistics(statistics)
        self.every = _checked_every(every)
        self.figures = figures
        self.lead = _is_lead()
        self.last_epoch = 0
        self._last_time = time.perf_counter()
        self._warned: set[str] = set()
        self._failed: str | None = None
        self._closed = False
        if not self.lead:
            return
        self.path = _check_new(out)
        log = tuple(log)
        self.loggers = Loggers(log)  # checked (and the packages imported) before anything is written
        with untouched_rngs():
            probe, structure = _trace(self.module, self.input_size)
        self._start(probe, structure, name or _class_name(self.module), seed)

    # -- the caller's loop --------------------------------------------------------------------------

    def epoch(self, number: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record the module after epoch ``number`` (1, 2, ...) with ``metrics`` (numbers); returns at once.

        Epochs must go forward; an epoch left out is recorded as a metrics line with
        ``"tracked": false`` and nothing else.  A NaN or infinite metric is recorded as null
        (warned once per name).
        """
        if self._closed:
            raise OptionError("this hpa.Tracker is closed; make a new one with another out= to record more")
        number = self._checked_epoch(number)
        line = {"epoch": number, **self._checked_metrics(metrics or {})}
        self.last_epoch = number
        if not self.lead or self._failed:
            return
        now = time.perf_counter()
        line["seconds"] = round(now - self._last_time, 3)
        self._last_time = now
        gaps = [{"epoch": skipped, "tracked": False, "snapshot": None} for skipped in range(self._lined + 1, number)]
        self._lined = number
        self._submit(number, gaps, line, snapshot=number % self.every == 0)

    def close(self, status: str = "complete") -> None:
        """Wait for the background work (snapshots, statistics, dashboards), mark the run ``status``, draw figures."""
        if self._closed:
            return
        self._closed = True
        if not self.lead:
            return
        self._finalizer.detach()
        try:
            self._drain()
        finally:
            self._finish(status if not self._failed else "failed")
        if self.figures and status == "complete" and not self._failed:
            open_run(self.path).plot()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close("complete" if kind is None else "incomplete")

    # -- the run folder -------------------------------------------------------------------------------

    def _start(self, probe, structure, name: str, seed: int | None) -> None:
        import torch


        self.run = RunDir.create(self.path)
        self.record = _new_record(self, name, seed, torch.initial_seed())
        self.run.write_record(self.record)
        self.run.write_graph(graph_record(structure, name))
        self.writer = BackgroundWriter()
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        self.statistics = SnapshotStatistics(self.path, structure, probe, self.statistics,
                                             separate_statistics_process(device.type))
        self._lined = 0  # the last epoch with a metrics line
        self._writing = 0  # the epoch the writer thread is writing
        # The host copies of the last two snapshots (see _submit); the second is allocated (and its pages
        # touched) now, so that no epoch() pays for fresh memory.
        self._buffers: list = [host_copy(self.module.state_dict())[0]]
        # A run that ends without close() (dropped, or the process exits): marked incomplete, what was written kept.
        self._finalizer = weakref.finalize(self, _at_exit, self.writer, self.statistics, self.run, self.record)
        self._submit(0, [], {"epoch": 0, "seconds": None}, snapshot=True)

    def _submit(self, epoch: int, gaps: list[dict], line: dict, snapshot: bool) -> None:
        line["snapshot"] = snapshot_name(epoch) if snapshot else None
        state, ready = None, (lambda: None)
        if snapshot:
            # Two sets of host buffers in turn: the writer still reads the previous epoch's, and
            # submit() waits for it before this one is handed over, so the one before is free.
            slot = self._buffers.pop(0) if len(self._buffers) == 2 else None
            state, ready = host_copy(self.module.state_dict(), into=slot)
            self._buffers.append(state)
        try:
            self.writer.submit(self._write, epoch, gaps, line, state, ready)
        except Exception as exc:  # the previous epoch's write failed: stop recording, never the training
            self._stop(exc)

    def _write(self, epoch: int, gaps: list[dict], line: dict, state, ready) -> None:
        """On the writer thread, in the run folder's order: snapshot (and its statistics), metrics, dashboards."""
        ready()
        self._writing = epoch  # what a failure names: one job is in flight at a time
        if state is not None:
            self.run.write_snapshot(epoch, state)
            self.statistics.record(epoch, self.path / snapshot_name(epoch))
        for entry in gaps + [line]:
            self.run.append_metrics(entry)
        self.loggers.publish(self.path)

    def _drain(self) -> None:
        try:
            self.writer.close()
            self.statistics.close()
        except Exception as exc:
            self._stop(exc)
        self.loggers.publish(self.path)
        self.loggers.close()

    def _stop(self, exc: BaseException) -> None:
        self._failed = f"{type(exc).__name__}: {exc}" if not isinstance(exc, HpaError) else str(exc)
        warn(f"hpa.Tracker stopped recording {self.path} at epoch {self._writing} ({self._failed}); "
             "training goes on, and what was written before is kept")

    def _finish(self, status: str) -> None:
        self.record["status"] = status
        self.record["waiting_seconds"] = round(self.writer.waited, 3)
        if self._failed:
            self.record["failure"] = self._failed
        try:
            self.run.write_record(self.record)
        except (OSError, HpaError) as exc:  # atomic writes raise OutputError for the file system's errors
            warn(f"hpa.Tracker could not mark {self.path / RUN_JSON} {status} ({exc})")

    # -- checks ---------------------------------------------------------------------------------------

    def _checked_epoch(self, number) -> int:
        if isinstance(number, bool) or not isinstance(number, numbers.Integral):
            raise OptionError(f"tracker.epoch() takes a whole epoch number, not {number!r}")
        number = int(number)
        if number <= self.last_epoch:
            done = (f"epoch {self.last_epoch} is recorded already" if self.last_epoch
                    else "epoch 0 is the initialisation")
            raise OptionError(f"tracker.epoch({number}): epochs must go forward and {done}; pass "
                              f"{self.last_epoch + 1} or later")
        return number

    def _checked_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(metrics, Mapping):
            raise OptionError(f"metrics= takes a dict of names to numbers, not a {type(metrics).__name__}")
        out = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or key in RESERVED:
                raise OptionError(f"metrics name {key!r} is not allowed: names are text, and "
                                  f"{', '.join(RESERVED)} are hpa's own")
            out[key] = self._number(key, value)
        return out

    def _number(self, key: str, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, (str, bytes)):
            raise OptionError(f"metrics[{key!r}] must be a number, not text ({value!r})")
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            raise OptionError(f"metrics[{key!r}] must be a number, not {type(value).__name__}") from None
        if math.isfinite(number):
            return int(number) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else number
        if key not in self._warned:
            self._warned.add(key)
            warn(f"metrics[{key!r}] is {number} at epoch {self.last_epoch + 1}; recorded as null (warned once)")
        return None


# -- helpers ------------------------------------------------------------------------------------------



def _is_lead() -> bool:
    """Rank 0 of an initialised process group, else hpa's own rule (the RANK variable)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return is_lead()


def _checked_statistics(statistics) -> tuple[str, ...]:
    names = (statistics,) if isinstance(statistics, str) else tuple(statistics or ())
    for name in names:
        registries()["statistics"].get(name)  # unknown: SpecError with "did you mean"
    return tuple(dict.fromkeys(names))


def _checked_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise OptionError(f"every= must be a positive whole number of epochs, not {every!r}")
    return int(every)


def _check_new(out) -> Path:
    """``out`` when a new run may be written there; an HpaError naming the fix otherwise (nothing written)."""
    path = Path(out).expanduser()
    if path.is_dir() and ((path / RUN_JSON).exists() or (path / SEEDS_JSON).exists()):
        raise HpaError(f"{path} already holds an hpa run; give hpa.Tracker a new out= folder (nothing was changed)")
    if path.is_dir() and any(path.iterdir()):
        first = sorted(entry.name for entry in path.iterdir())[0]
        raise HpaError(f"{path} is not empty and is not an hpa run: it holds {first}; give hpa.Tracker a new "
                       "out= folder (nothing was changed)")
    return RunDir.check_new(path)  # a file, or a place no folder can be made


def _trace(module, input_size):
    """(a CPU copy of ``module``, its traced structure): tracing switches a module to eval mode, so a copy."""
    probe = copy.deepcopy(module).cpu()
    return probe, hpa.load(probe, input_size=input_size)


def _class_name(module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _new_record(tracker: Tracker, name: str, seed: int | None, initial_seed: int) -> dict[str, Any]:
    inferred = [] if seed is not None else ["config.seed"]
    return {
        "format": FORMAT,
        "writer": TRACKER,
        "status": "running",
        # The keys every run reader needs; task and recipe are the caller's loop, not recorded here.
        "config": {"task": None, "arch": name, "seed": int(seed if seed is not None else initial_seed),
                   "recipe": {}, "snapshot_every": tracker.every, "device": _device_of(tracker.module),
                   "statistics": list(tracker.statistics)},
        "inferred": inferred,  # config.seed: torch.initial_seed() when the caller gave none
        "input_size": list(tracker.input_size),
        "versions": versions(),
        "command": _command_line(),
        "processes": _world_size(),
    }


def _device_of(module) -> str:
    parameter = next(iter(module.parameters()), None)
    return str(parameter.device) if parameter is not None else "cpu"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _command_line() -> str:
    import shlex
    import sys

    return shlex.join([sys.executable, *sys.argv])


def _at_exit(writer, statistics, run, record) -> None:
    """The process ends without close(): let the submitted work finish, mark the run incomplete."""
    for closing in (writer.close, statistics.close):
        try:
            closing()
        except Exception:  # noqa: S110  (the run stays readable up to its last whole epoch)
            pass
    record["status"] = "incomplete"
    try:
        run.write_record(record)
    except (OSError, HpaError):
        pass


@contextmanager
def untouched_rngs():
    """Every random generator of the caller (torch CPU and CUDA, numpy's global, Python's) as found after."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def warn(message: str) -> None:
    """One ``Warning:`` line (HpaWarning), as the trainer's."""
    import warnings

    warnings.warn(message, HpaWarning, stacklevel=3)
