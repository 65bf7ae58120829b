"""The trainer: one run's epochs, from its configuration to its run folder.

Reproducible by construction: every random stream (validation split, init, batch order,
augmentation, dropout) is a function of (seed, epoch) (``hpa.experiments.rng``), CPU training
runs with deterministic algorithms, and the per-epoch state holds model and optimizer only.
So a run resumed after ``kill -9`` ends bitwise equal, on CPU, to one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import signal
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from hpa.errors import HpaWarning, OptionError, TrainingError, TrainingInterrupted
from hpa.experiments.background import BackgroundWriter, SnapshotStatistics, host_copy, separate_statistics_process
from hpa.experiments.config import TrainConfig, get_task
from hpa.experiments.data import DeviceData, dataset_as_trained, stratified_split
from hpa.experiments.distributed import join
from hpa.experiments.layout import RUN_FORMAT, snapshot_name
from hpa.experiments.loggers import Loggers
from hpa.experiments.loop import evaluate_split, make_optimizer, memory_format, steady_host_memory, train_one_epoch
from hpa.experiments.model import build_model, graph_record
from hpa.experiments.open_run import open_run
from hpa.experiments.run import RunDir
from hpa.experiments.streaming import FileData, default_workers, training_data


class Trainer:
    """Trains ``config`` into a run folder: :meth:`start` a new one, or :meth:`resume` one from run.json."""

    def __init__(self, config: TrainConfig, data, download: bool, progress, loggers: Loggers,
                 workers: int | None = None) -> None:
        self.config, self.loggers = config, loggers
        self.world = join(config.device)  # None unless started by torchrun with several processes
        self.lead = self.world is None or self.world.lead
        self.progress = (progress if self.lead else None) or (lambda line: None)
        self.device = torch.device(config.device) if self.world is None else self.world.device
        self.writer = BackgroundWriter()
        task = get_task(config.task)
        self.data_dir = None if data is None else str(Path(data).expanduser())
        loaded = training_data(task, None if data is None else Path(self.data_dir), download, config, self.device)
        self.streamed, self.data_record = loaded.streamed, loaded.record
        # The path taken is recorded as the recipe's data_path, so a resume takes it again.
        self.config = config = dataclasses.replace(
            config, recipe=dataclasses.replace(config.recipe, data_path=loaded.record["path"]))
        if self.streamed is None:
            noisy = dataset_as_trained(loaded.dataset, config)
            self.dataset, self.train_labels, self.noise_report = noisy.dataset, noisy.train_labels, noisy.report
            self.train_orders = noisy.train_orders
        else:  # the streaming path (hpa.experiments.streaming): no noise, nothing decoded yet
            self.dataset, self.train_labels, self.train_orders = self.streamed, None, None
            self.noise_report = {"labels": None, "pixels": None}
            self.workers = default_workers() if workers is None else int(workers)
            if self.workers < 0:
                raise OptionError(f"--workers must be zero or a positive number of processes, not {workers}")
            self.data_record["workers"] = self.workers
        self.model, self.structure = build_model(config.arch, self.dataset, config.seed, config.recipe.init,
                                                 task.name, config.recipe.init_std)
        self.model.to(self.device, memory_format=memory_format(self.device, config.precision))
        self.optimizer = make_optimizer(self.model, config.recipe, self.device)
        # The compiled module shares the parameters; snapshots read the plain one (no _orig_mod. keys).
        self.forward = torch.compile(self.model) if config.compiled else self.model

    # -- entry points --------------------------------------------------------------------------

    def start(self, run: RunDir, command: str) -> None:
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
        """Statistics of each snapshot, off the training path (background.separate_statistics_process says where)."""
        separate = separate_statistics_process(self.device.type)
        return SnapshotStatistics(run.path, self.structure, self.model, self.config.statistics, separate)

    # -- the epochs -----------------------------------------------------------------------------

    def _loop(self, first_epoch: int) -> None:
        shard = None if self.world is None else (self.world.rank, self.world.size)
        if self.streamed is not None:
            data = FileData(self.streamed, self.config.recipe, self.config.seed, self.device, shard=shard,
                            workers=self.workers, skip=self.config.recipe.skip_unreadable)
        else:
            data = DeviceData(self.dataset, self.config.recipe, self.config.seed, self.device, shard=shard,
                              train_labels=self.train_labels, train_orders=self.train_orders)
        devices = [self.device] if self.device.type == "cuda" else []
        deterministic = torch.are_deterministic_algorithms_enabled()
        threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if self.config.cpu_threads is not None:
            torch.set_num_threads(self.config.cpu_threads)
        stack = contextlib.ExitStack()
        try:
            host = steady_host_memory() if self.device.type == "cpu" else contextlib.nullcontext()
            stack.enter_context(_signals_stop())
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
            stack.close()
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
        skipped = self._skipped(data)
        if not self.lead:  # rank 0 evaluates and writes; the others go on to the next epoch
            return
        line.update(evaluate_split(self.forward, data, data.validation, "val", self.config.precision))
        line.update(evaluate_split(self.forward, data, data.test, "test", self.config.precision))
        self._record_skipped({**skipped, **self._skipped(data, gather=False)})
        snapshot = epoch % self.config.snapshot_every == 0 or epoch == recipe.epochs
        line["snapshot"] = snapshot_name(epoch) if snapshot else None
        line["seconds"] = round(time.perf_counter() - started, 3)
        self._submit_writes(epoch, line)
        if hasattr(self.progress, "epoch_finished"):
            self.progress.epoch_finished(line)
        self.progress(_progress_line(line, recipe.epochs))

    def _skipped(self, data, gather: bool = True) -> dict[str, str]:
        """Images the streaming path skipped since the last call, in every process (gather) or this one."""
        if not isinstance(data, FileData):
            return {}
        mine = data.take_skipped()
        if not gather or self.world is None:
            return mine
        return {path: why for part in self.world.gather(mine) for path, why in part.items()}

    def _record_skipped(self, skipped: dict[str, str]) -> None:
        """run.json's data.skipped: every skipped image's path and reason, and the count (written at once)."""
        record = self.record.setdefault("data", {}).setdefault("skipped", {"count": 0, "files": {}})
        new = {path: why for path, why in skipped.items() if path not in record["files"]}
        if new:
            record["files"].update(new)
            record["count"] = len(record["files"])
            self.run.write_record(self.record)

    def _submit_writes(self, epoch: int, line: dict[str, Any]) -> None:
        """Copy model and optimizer to host memory and hand the epoch's writes to the writer thread."""
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
        open_run(self.run.path).plot()

    def _finish(self, status: str, reason: str | None = None) -> None:
        if not self.lead:
            return
        self.record["status"] = status
        self.record["waiting_seconds"] = round(self.writer.waited, 3)  # training blocked on writes, this session
        if self.device.type == "cuda":
            self.record["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        if reason:
            self.record["failure"] = reason
        self.run.write_record(self.record)

    def _new_record(self, command: str) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
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
            "versions": versions(),
            "host": {"platform": f"{platform.system()}-{platform.machine()}", "python": platform.python_version(),
                     "threads": self.config.cpu_threads or _threads(),
                     "device_name": _device_name(self.device)},
            "command": command,
            "processes": 1 if self.world is None else self.world.size,
            "data": self.data_record,
        }


    def _split_sizes(self) -> dict[str, Any]:
        train, validation = stratified_split(self.dataset.train_labels, self.config.recipe.validation,
                                             self.config.seed)
        return {"validation": self.config.recipe.validation, "stratified": True, "seeded_by": "seed",
                "n_train": int(len(train)), "n_validation": int(len(validation)),
                "n_test": int(len(self.dataset.test_labels))}


@contextlib.contextmanager
def _signals_stop():
    """SIGTERM and SIGUSR1 (a scheduler's pre-emption or time limit) stop training as Ctrl-C does: the
    finished epochs' writes complete, run.json says "interrupted", and a requeued job resumes from there."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(signum, frame) -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


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
    warnings.warn(note, HpaWarning, stacklevel=3)


def _progress_line(line: dict[str, Any], epochs: int) -> str:
    def number(key: str, digits: int = 4) -> str:
        value = line.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    return (f"epoch {line['epoch']}/{epochs}: train loss {number('train_loss')} acc {number('train_accuracy')}"
            f"  val loss {number('val_loss')} acc {number('val_accuracy')}"
            f"  test acc {number('test_accuracy')}  {line['seconds']:.1f}s")


def versions() -> dict[str, str]:
    out = {}
    for dist in ("hpa", "torch", "torchvision", "timm", "numpy", "scikit-learn", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _threads() -> int:
    return torch.get_num_threads()


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
