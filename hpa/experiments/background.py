"""What keeps a run's snapshots off the training path: host copies written by a background
thread (:class:`BackgroundWriter`), and the per-snapshot statistics on that thread or in a
separate process (:class:`SnapshotStatistics`), with ``stats/finished.jsonl`` saying which
snapshots' statistics were finished.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

from hpa.errors import LoadError
from hpa.experiments.layout import FINISHED, snapshot_files
from hpa.experiments.stats import EpochStatistics
from hpa.files import atomic_write_text
from hpa.rebind import rebind


def host_copy(tree, into=None):
    """``tree`` (a state dict, nested dicts/lists of tensors) with every tensor copied to host memory.

    Returns (copy, ready): on CUDA the copies go to pinned memory without blocking the GPU and
    ``ready()`` waits for them; on CPU they are plain copies and ``ready()`` returns at once.
    ``into``: an earlier copy of the same tree whose tensors are no longer read, reused as the
    destination (no allocation: on a CPU the fresh pages of a new copy cost as much as the copying).
    """
    event = None

    def copy_tensor(tensor: torch.Tensor, target) -> torch.Tensor:
        nonlocal event
        tensor = tensor.detach()
        cuda = tensor.device.type == "cuda"
        reusable = isinstance(target, torch.Tensor) and target.shape == tensor.shape and target.dtype == tensor.dtype
        if not reusable and not cuda:
            return tensor.clone()
        host = target if reusable else torch.empty_like(tensor, device="cpu", pin_memory=True)
        host.copy_(tensor, non_blocking=cuda)
        event = event or (torch.cuda.Event() if cuda else None)
        return host

    def walk(value, target):
        if isinstance(value, torch.Tensor):
            return copy_tensor(value, target)
        if isinstance(value, dict):
            target = target if isinstance(target, dict) else {}
            return type(value)((key, walk(item, target.get(key))) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            target = target if isinstance(target, (list, tuple)) and len(target) == len(value) else [None] * len(value)
            return type(value)(walk(item, old) for item, old in zip(value, target))
        return value

    copied = walk(tree, into)
    if event is not None:
        event.record()  # after every copy was queued on the current stream
    return copied, (event.synchronize if event is not None else (lambda: None))


class BackgroundWriter:
    """The run folder's writes on one background thread, in submission order.

    At most one job is in flight: ``submit`` first waits for the previous one, so a
    failed write surfaces (re-raised) one epoch later at the latest, and ``waited``
    counts the seconds training spent waiting for writes (not the wait in ``close``,
    when training is over).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpa-writer")
        self._pending = None
        self.waited = 0.0

    def submit(self, job, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(job, *args)

    def wait(self, counted: bool = True) -> None:
        if self._pending is not None:
            started = time.perf_counter()
            try:
                self._pending.result()
            finally:
                self._pending = None
                self.waited += (time.perf_counter() - started) if counted else 0.0

    def close(self) -> None:
        try:
            self.wait(counted=False)
        finally:
            self._pool.shutdown(wait=True)


class SnapshotStatistics:
    """A run's per-snapshot statistics (``hpa.experiments.stats.EpochStatistics``), off the training path.

    ``separate_process``: a spawned CPU process records them, in order, while training goes on
    (for CUDA runs, whose host cores are otherwise idle).  Otherwise they run on the calling
    thread, the trainer's writer thread, so that a CPU run's files (and a kill's effects) stay
    exactly those of a synchronous run.  Either way ``stats/finished.jsonl`` records when each
    snapshot's statistics were finished, and :meth:`pending` tells a resumed run what to redo.
    """

    def __init__(self, folder, structure, model, statistics, separate_process: bool) -> None:
        self.folder, self.names = folder, tuple(statistics)
        # The worker gets the traced structure only (modules of local classes do not pickle), so it
        # serves networks whose snapshots rebind to it; the rest (weights computed in forward) stay here.
        separate_process = separate_process and bool(self.names) and _rebinds(structure, model)
        self._arguments = (str(folder), structure, None if separate_process else model, self.names)
        self._pool, self._futures, self._done = None, [], None
        if not separate_process:
            _start_worker(*self._arguments)
            self._local = _WORKER["statistics"]
        self.separate_process = separate_process

    def resume(self, done: int) -> list[int]:
        """Reload the statistics of epochs up to ``done``; returns the snapshot epochs to record again."""
        self._done = done
        if not self.separate_process:
            self._local.resume(done)
        return pending_statistics(self.folder, done) if self.names else []

    def record(self, epoch: int, snapshot) -> None:
        if not self.names:
            return
        if not self.separate_process:
            _record(epoch, str(snapshot))
            return
        if self._pool is None:
            self._pool = _spawn_pool(self._arguments, self._done)
        self._futures.append(self._pool.submit(_record, epoch, str(snapshot)))

    def close(self) -> None:
        """Wait for every submitted snapshot (re-raising the first failure)."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._futures = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def separate_statistics_process(device_type: str) -> bool:
    """Whether a run's statistics go to a separate CPU process: for CUDA training (HPA_STATISTICS_PROCESS
    1 or 0 forces the choice), else onto the writer thread, which keeps CPU runs bitwise resumable."""
    import os

    choice = os.environ.get("HPA_STATISTICS_PROCESS")
    return device_type == "cuda" if choice is None else choice == "1"


def _rebinds(structure, model) -> bool:
    try:
        rebind(structure, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    except LoadError:
        return False
    return True


def pending_statistics(folder, done: int) -> list[int]:
    """Snapshot epochs up to ``done`` whose statistics were never finished (the run was killed first)."""
    folder = Path(folder)
    path = folder / FINISHED
    finished = set()
    if path.exists():
        finished = {json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()}
    epochs = list(snapshot_files(folder))
    return [epoch for epoch in epochs if epoch <= done and epoch not in finished]


_WORKER: dict = {}  # the statistics state of this process (the worker's, or the trainer's own)


def _spawn_pool(arguments, done):
    # spawn, not fork: the trainer holds CUDA and threads that a forked child must not inherit.
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(*arguments, done))


def _start_worker(folder, structure, model, names, done=None) -> None:
    _WORKER["statistics"] = EpochStatistics(Path(folder), structure, model, names)
    if done is not None:
        _WORKER["statistics"].resume(done)


def _record(epoch: int, snapshot: str) -> None:
    """Record one snapshot's statistics, then note the time they finished."""
    statistics = _WORKER["statistics"]
    statistics.record(epoch, Path(snapshot))
    path = statistics.folder / FINISHED
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < epoch]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(path, "".join(line + "\n" for line in kept) + json.dumps({"epoch": epoch, "finished": stamp}) + "\n")
