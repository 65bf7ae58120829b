"""Many independent jobs, run here or on a cluster: the engine under ``hpa study`` and ``hpa gallery``.

A :class:`Job` is a name, a module-level (picklable) callable and its arguments; an executor
runs a list of jobs and yields one :class:`Outcome` per job as each finishes.  A job that fails
becomes an outcome with its one-line reason and never stops the others; a job that raises
:class:`Requeue` (it was stopped after saving its progress) is run again, up to ``max_requeue``
times.

- ``local``: N jobs at once on this machine, each in a fresh process whose environment is set
  before the job's module is imported (so before torch is): one GPU each (``CUDA_VISIBLE_DEVICES``)
  when GPUs are present, else the CPU cores split between the jobs (``OMP_NUM_THREADS``).
- ``slurm``: one SLURM job array through submitit, a task per job; a job SLURM pre-empts or times
  out is checkpointed and requeued by submitit (:class:`_Checkpointable`).
- ``submitit-local``: submitit's own LocalExecutor, the slurm code path on this machine (tests,
  and a dry run of a study before a cluster).

Torch-free: the core (hpa gallery) uses it too.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click

from hpa.errors import HpaError, OptionError, suggest

EXECUTORS = {
    "local": "N jobs at once on this machine (--jobs N), one GPU each when GPUs are present, "
             "else the CPU cores split between them (--cpu-threads)",
    "slurm": "a SLURM job array through submitit (--partition --time --gpus-per-task --account --sbatch)",
    "submitit-local": "submitit's LocalExecutor: the slurm code path on this machine, every job at once",
}
MAX_REQUEUE = 3  # a job stopped more often than this is reported as failed
_INSTALL_SUBMITIT = "pip install 'hpa[slurm]' (or: pip install submitit)"


@dataclass(frozen=True)
class Job:
    """One unit of work: ``function(*args)`` in a process of its own; its stdout/stderr go to ``log``."""

    name: str
    function: Callable[..., Any]  # module-level, so that it pickles by reference
    args: tuple = ()
    log: Path | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of one job: ``value`` when ``ok``, else ``error``, one line."""

    name: str
    ok: bool
    value: Any = None
    error: str | None = None
    job_id: str | None = None  # the scheduler's id (SLURM's array task), None for local jobs
    requeued: int = 0  # how often the job was stopped and run again


class Requeue(Exception):  # noqa: N818  (a request, not an error)
    """Raised by a job that was stopped (SIGTERM, pre-emption) after saving its progress: run it again."""


# -- local ------------------------------------------------------------------------------------

@dataclass
class LocalExecutor:
    """``jobs`` at once, each in a fresh process; see the module docstring for how they share the machine."""

    jobs: int = 1
    cpu_threads: int | None = None  # in all, split between the jobs; default: the usable cores
    gpus: list[str] | None = None  # default: those CUDA_VISIBLE_DEVICES or nvidia-smi name
    max_requeue: int = MAX_REQUEUE
    name: str = field(default="local", init=False)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise OptionError(f"--jobs must be 1 or more, not {self.jobs}")
        if self.gpus is None:
            self.gpus = visible_gpus()
        if not self.gpus:
            total = self.cpu_threads or usable_cores()
            if total // self.jobs < 1:
                raise OptionError(f"--jobs {self.jobs} on {total} CPU threads would oversubscribe them: give "
                                  f"--jobs {total} or fewer, or more --cpu-threads")

    def slot_environments(self) -> list[dict[str, str]]:
        """The environment of each of the ``jobs`` slots."""
        if self.gpus:
            return [{"CUDA_VISIBLE_DEVICES": self.gpus[i % len(self.gpus)]} for i in range(self.jobs)]
        threads = str((self.cpu_threads or usable_cores()) // self.jobs)
        return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HPA_CPU_THREADS": threads}
                for _ in range(self.jobs)]

    def describe(self) -> str:
        slots = self.slot_environments()
        if self.gpus:
            return f"local: {self.jobs} at once, GPUs {','.join(self.gpus)}"
        return f"local: {self.jobs} at once, {slots[0]['OMP_NUM_THREADS']} CPU threads each"

    def run(self, jobs: Iterable[Job], on_submit: Callable[[str, str | None], None] | None = None
            ) -> Iterator[Outcome]:
        pending = deque((job, 0) for job in jobs)
        free = deque(self.slot_environments())
        running: dict[int, tuple[Job, int, Any, Any, dict[str, str]]] = {}
        context = multiprocessing.get_context("spawn")
        try:
            while pending or running:
                while pending and free:
                    job, tries = pending.popleft()
                    slot = free.popleft()
                    process, receiver = _start(context, job, slot)
                    running[process.sentinel] = (job, tries, process, receiver, slot)
                    if on_submit is not None and tries == 0:
                        on_submit(job.name, None)
                # the result's pipe as well as the process: a large result is read while the job still sends it
                ready = wait_for([entry[3] for entry in running.values()] + list(running))
                for key in {_key_of(item, running) for item in ready}:
                    job, tries, process, receiver, slot = running.pop(key)
                    free.append(slot)
                    kind, payload = _received(process, receiver)
                    if kind == "requeue" and tries < self.max_requeue:
                        pending.appendleft((job, tries + 1))
                        continue
                    if kind == "requeue":
                        kind, payload = "error", f"stopped {tries + 1} times ({payload}); not requeued again"
                    yield Outcome(job.name, kind == "ok", payload if kind == "ok" else None,
                                  None if kind == "ok" else payload, None, tries)
        finally:  # stopped (Ctrl-C, an error, the caller closed us): the jobs still running stop cleanly
            _stop_all([entry[2] for entry in running.values()])


def _start(context, job: Job, slot: dict[str, str]):
    receiver, sender = context.Pipe(duplex=False)
    payload = pickle.dumps((job.function, job.args))  # by reference: unpickled after the env is set
    log = None if job.log is None else str(job.log)
    process = context.Process(target=_child, args=(payload, slot, log, sender), name=f"hpa-job-{job.name}")
    process.start()
    sender.close()
    return process, receiver


def _key_of(ready, running: dict) -> int:
    """The running job a ready pipe or process sentinel belongs to."""
    if isinstance(ready, int):
        return ready
    return next(key for key, entry in running.items() if entry[3] is ready)


def _child(payload: bytes, environment: dict[str, str], log: str | None, sender) -> None:
    """In the job's process: set the environment, then import the job's module and run it."""
    os.environ.update(environment)
    if log is not None:
        _redirect_output(log)
    try:
        function, args = pickle.loads(payload)
        sender.send(("ok", function(*args)))
    except Requeue as exc:
        sender.send(("requeue", " ".join(str(exc).split()) or "stopped"))
    except BaseException as exc:  # noqa: BLE001  (a job's failure is its outcome, never the caller's crash)
        traceback.print_exc()
        sender.send(("error", one_line(exc)))


def _redirect_output(log: str | Path) -> None:
    """This process's stdout and stderr (its children's too) appended to ``log``."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    stream = open(log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (open for the process's lifetime)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream


def _received(process, receiver) -> tuple[str, Any]:
    try:
        if receiver.poll():
            return receiver.recv()
    except EOFError:  # the job ended without a result: its exit status says how
        pass
    except (OSError, pickle.UnpicklingError) as exc:
        return "error", f"its result could not be read back ({one_line(exc)})"
    finally:
        receiver.close()
        process.join()
    code = process.exitcode
    if code is not None and code < 0:
        return "error", f"its process was killed by {signal.Signals(-code).name}"
    return "error", f"its process exited with status {code} without a result"


def _stop_all(processes: list, grace: float = 60.0) -> None:
    """SIGTERM every process (a training job finishes its current write), then SIGKILL what is left."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


# -- submitit (slurm, submitit-local) ---------------------------------------------------------

@dataclass
class SubmititExecutor:
    """One job array through submitit: ``cluster`` "slurm", or "local" for submitit's LocalExecutor."""

    folder: Path  # submitit's pickles and logs
    cluster: str = "slurm"
    partition: str | None = None
    time_minutes: int = 60
    gpus_per_task: int | None = None
    account: str | None = None
    sbatch: dict[str, str] = field(default_factory=dict)  # extra sbatch options, without the dashes
    max_requeue: int = MAX_REQUEUE
    poll_seconds: float = 2.0

    @property
    def name(self) -> str:
        return "slurm" if self.cluster == "slurm" else "submitit-local"

    def __post_init__(self) -> None:
        require_submitit(self.name)
        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise OptionError("--executor slurm needs SLURM's sbatch on the PATH: run on the cluster's login node, "
                              "or use --executor local")

    def describe(self) -> str:
        where = f" partition {self.partition}" if self.partition else ""
        return f"{self.name}:{where} {self.time_minutes} min per task"

    def _executor(self):
        import submitit  # here, not at the top: an optional extra (hpa[slurm])

        self.folder.mkdir(parents=True, exist_ok=True)
        if self.cluster != "slurm":
            executor = submitit.LocalExecutor(folder=self.folder, max_num_timeout=self.max_requeue)
            executor.update_parameters(timeout_min=self.time_minutes, gpus_per_node=self.gpus_per_task or 0)
            return executor
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.max_requeue)
        given = {"partition": self.partition, "gpus_per_task": self.gpus_per_task, "account": self.account}
        executor.update_parameters(time=self.time_minutes, additional_parameters=dict(self.sbatch),
                                   **{key: value for key, value in given.items() if value is not None})
        return executor

    def run(self, jobs: Iterable[Job], on_submit: Callable[[str, str | None], None] | None = None
            ) -> Iterator[Outcome]:
        """Submits every job now (not on the first ``next``), then yields their outcomes as they end."""
        executor = self._executor()
        waiting = {job.name: (job, handle, 0) for job, handle in self._submit(executor, list(jobs), on_submit)}
        return self._outcomes(executor, waiting, on_submit)

    def _outcomes(self, executor, waiting: dict, on_submit) -> Iterator[Outcome]:
        while waiting:
            for name, (job, handle, tries) in list(waiting.items()):
                if not handle.done():
                    continue
                del waiting[name]
                kind, payload = _reported(handle)
                if kind == "requeue" and tries < self.max_requeue:  # stopped outside submitit's checkpointing
                    (_, again), = self._submit(executor, [job], on_submit)
                    waiting[name] = (job, again, tries + 1)
                    continue
                if kind == "requeue":
                    kind, payload = "error", f"stopped {tries + 1} times ({payload}); not requeued again"
                job_id = str(handle.job_id) if self.cluster == "slurm" else None
                yield Outcome(name, kind == "ok", payload if kind == "ok" else None,
                              None if kind == "ok" else payload, job_id, tries)
            if waiting:
                time.sleep(self.poll_seconds)

    def _submit(self, executor, jobs: list[Job], on_submit) -> list[tuple[Job, Any]]:
        if self.cluster == "slurm":
            with executor.batch():  # one array, a task per job
                handles = [executor.submit(_Checkpointable(job.function, job.log), *job.args) for job in jobs]
        else:
            handles = [executor.submit(_Checkpointable(job.function, job.log), *job.args) for job in jobs]
        for job, handle in zip(jobs, handles):
            if on_submit is not None:
                on_submit(job.name, str(handle.job_id) if self.cluster == "slurm" else None)
        return list(zip(jobs, handles))


def _reported(handle) -> tuple[str, Any]:
    """What the job's :class:`_Checkpointable` returned, or why it returned nothing."""
    try:
        return handle.result()
    except Exception as exc:  # noqa: BLE001  (killed, timed out too often: submitit's error says which)
        return "error", _last_line(str(exc))


class _Checkpointable:
    """The job's callable as submitit runs it: ``checkpoint`` is what submitit calls on pre-emption or
    timeout (SIGUSR2); it lets the job stop cleanly (the callable's ``stop``, when it has one) and asks
    submitit to requeue the same call, which resumes from what the job saved."""

    def __init__(self, function: Callable[..., Any], log: Path | None) -> None:
        self.function, self.log = function, log

    def __call__(self, *args: Any) -> Any:
        if self.log is not None:  # the job's own log, where the caller looks (submitit's keeps its header)
            _redirect_output(self.log)
        try:
            return "ok", self.function(*args)
        except Requeue as exc:
            return "requeue", " ".join(str(exc).split()) or "stopped"
        except Exception as exc:  # noqa: BLE001  (a job's failure is its outcome)
            traceback.print_exc()
            return "error", one_line(exc)

    def checkpoint(self, *args: Any):
        import submitit  # here, not at the top: an optional extra (hpa[slurm])

        stop = getattr(self.function, "stop", None)
        if stop is not None:
            stop()
        return submitit.helpers.DelayedSubmission(self, *args)


def require_submitit(executor: str) -> None:
    try:
        import submitit  # noqa: F401  (only whether it is installed)
    except ImportError:
        raise OptionError(f"--executor {executor} needs submitit, which is not installed: "
                          f"{_INSTALL_SUBMITIT}") from None


# -- the machine --------------------------------------------------------------------------------

def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a cluster's cgroup sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs jobs may use, without importing torch: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [gpu.strip() for gpu in given.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip().isdigit()]


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type (unless an hpa error, whose message is written for a user) and message."""
    message = " ".join(str(exc).split())
    if isinstance(exc, HpaError):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed without a message"


# -- the command-line flags, shared by hpa study and hpa gallery ----------------------------------

def executor_options(function):
    """The executor flags of ``hpa study run``, ``hpa reproduce`` and ``hpa gallery``, defined once."""
    decorators = [
        click.option("--executor", "executor", default="local", show_default=True, metavar="NAME",
                     help="Where jobs run: " + "; ".join(f"{k}: {v}" for k, v in EXECUTORS.items()) + "."),
        click.option("--jobs", type=int, default=None, metavar="N",
                     help="local: jobs at once.  [default: one per GPU, else 1]"),
        click.option("--cpu-threads", "cpu_threads_total", type=int, metavar="N",
                     help="local, without GPUs: CPU threads in all, split between the jobs.  [default: the usable "
                          "cores]"),
        click.option("--partition", help="slurm: the partition."),
        click.option("--time", "time_minutes", type=click.IntRange(min=1), default=60, show_default=True,
                     metavar="MINUTES", help="slurm: time limit of each task; a task that reaches it is requeued "
                                             "and resumes."),
        click.option("--gpus-per-task", type=click.IntRange(min=0), help="slurm: GPUs of each task."),
        click.option("--account", help="slurm: the account charged."),
        click.option("--sbatch", "sbatch", multiple=True, metavar="KEY=VALUE",
                     help="slurm: another sbatch option, repeatable, e.g. --sbatch qos=high --sbatch mem=32G."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


EXECUTOR_FLAGS = ("executor", "jobs", "cpu_threads_total", "partition", "time_minutes", "gpus_per_task", "account",
                  "sbatch")


def make_executor(options: dict[str, Any], folder: Path):
    """The executor the flags of :func:`executor_options` name; ``folder`` holds submitit's files."""
    name = options.get("executor") or "local"
    if name not in EXECUTORS:
        raise OptionError(f"no executor named {name!r}{suggest(name, EXECUTORS)}; the executors are: "
                          f"{', '.join(EXECUTORS)}")
    if name == "local":
        jobs = options.get("jobs")
        if jobs is None:
            jobs = max(1, len(visible_gpus()))
        return LocalExecutor(jobs=jobs, cpu_threads=options.get("cpu_threads_total"))
    return SubmititExecutor(folder=Path(folder), cluster="slurm" if name == "slurm" else "local",
                            partition=options.get("partition"), time_minutes=options.get("time_minutes") or 60,
                            gpus_per_task=options.get("gpus_per_task"), account=options.get("account"),
                            sbatch=_sbatch_options(options.get("sbatch") or ()))


def _sbatch_options(pairs: Iterable[str]) -> dict[str, str]:
    given: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise OptionError(f"--sbatch expects KEY=VALUE, such as --sbatch qos=high, not {pair!r}")
        given[key.replace("-", "_")] = value
    return given
