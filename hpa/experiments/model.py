"""The trainable module of a run: built through the architecture's loader, initialised by the recipe.

Also what keeps its snapshots off the training path: host copies written by a background
thread, and the per-snapshot statistics on that thread or in a separate process.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from hpa.errors import HpaError, OptionError
from hpa.experiments.data import generator, stream_seed
from hpa.experiments.types import INIT_SCHEMES, Dataset
from hpa.registry import LoadOptions


def build_model(arch: str, dataset: Dataset, seed: int, init: str, task: str, init_std: float = 0.01):
    """(module, traced ConvGraph) for ``arch`` sized for ``dataset``, initialised by the scheme ``init``
    (types.INIT_SCHEMES); refuses an architecture that does not fit."""
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
    from hpa.nn import ChannelReLUConv2d  # hpa.nn registers a tracer converter: loaded when first needed

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


# -- snapshots off the training path ------------------------------------------------------------

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
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpa-writer")
        self._pending = None
        self.waited = 0.0

    def submit(self, job, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(job, *args)

    def wait(self, counted: bool = True) -> None:
        import time

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


# -- statistics off the training path ----------------------------------------------------------

FINISHED = "stats/finished.jsonl"  # one line per snapshot whose statistics are written: epoch, time


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
    from hpa.errors import LoadError
    from hpa.rebind import rebind

    try:
        rebind(structure, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    except LoadError:
        return False
    return True


def pending_statistics(folder, done: int) -> list[int]:
    """Snapshot epochs up to ``done`` whose statistics were never finished (the run was killed first)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    path = folder / FINISHED
    finished = set()
    if path.exists():
        finished = {json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()}
    epochs = sorted(int(p.name[len("epoch-"):-len(".safetensors")]) for p in (folder / "snapshots").glob(
        "epoch-*.safetensors") if p.name[len("epoch-"):-len(".safetensors")].isdigit())
    return [epoch for epoch in epochs if epoch <= done and epoch not in finished]


_WORKER: dict = {}  # the statistics state of this process (the worker's, or the trainer's own)


def _spawn_pool(arguments, done):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the trainer holds CUDA and threads that a forked child must not inherit.
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(*arguments, done))


def _start_worker(folder, structure, model, names, done=None) -> None:
    from pathlib import Path

    from hpa.experiments.stats import EpochStatistics

    _WORKER["statistics"] = EpochStatistics(Path(folder), structure, model, names)
    if done is not None:
        _WORKER["statistics"].resume(done)


def _record(epoch: int, snapshot: str) -> None:
    """Record one snapshot's statistics, then note the time they finished."""
    import json
    import time
    from pathlib import Path

    from hpa.files import atomic_write_text

    statistics = _WORKER["statistics"]
    statistics.record(epoch, Path(snapshot))
    path = statistics.folder / FINISHED
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < epoch]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(path, "".join(line + "\n" for line in kept) + json.dumps({"epoch": epoch, "finished": stamp}) + "\n")
