"""Training on several processes with ``torch.distributed``: ``torchrun ... -m hpa train`` or ``--nproc N``.

Each process trains on its rows of the single-process run's global batches and the
gradients are summed (see ``hpa.experiments.loop``), so N processes follow the
one-process recipe with no learning-rate rescaling.  Rank 0 alone writes the run
folder and shows progress.  ``--nproc`` starts the ranks with hpa's own launcher
(below); several nodes use torchrun.  The environment variables both set (RANK,
WORLD_SIZE, LOCAL_RANK) are read without importing torch, so ``hpa --help`` stays fast.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from hpa.errors import OptionError


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_lead() -> bool:
    """True for the one process that writes and talks: rank 0, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``hpa ARGV`` on ``nproc`` local processes, set up as torchrun sets up its ranks; the exit code.

    hpa's own small launcher rather than torchrun's agent, so that ``--nproc`` fails the way a
    single process does: one line, exit status 2, no launcher traceback.  Rank 0's output is
    passed through as it comes; the other ranks' is held back and only the error of a rank
    that fails first is shown (once, if rank 0 has not shown the same line).  When one rank
    fails, the others get :data:`GRACE_SECONDS` to stop, then are killed: they would wait in
    a collective for the failed one.  ``argv`` must not contain ``--nproc``.
    """
    if nproc < 1:
        raise OptionError(f"--nproc must be a positive number of processes, not {nproc}")
    if sys.stderr.isatty() and not {"--progress", "--no-progress", "--quiet"} & set(argv):
        argv = [*argv, "--progress"]  # rank 0 writes to a pipe: keep the live bar a terminal gets
    return _Ranks(nproc, argv).run()


GRACE_SECONDS = 5.0


class _Ranks:
    """The processes of one ``--nproc`` run and their output."""

    def __init__(self, nproc: int, argv: list[str]) -> None:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0",
               # as torchrun does; the CPU trainer sets its own count (--cpu-threads)
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.muted = threading.Event()  # set once another rank failed first: rank 0's words no longer count
        self.shown: collections.deque[str] = collections.deque(maxlen=64)  # rank 0's last lines on stderr
        self.held: list[collections.deque[str]] = []
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.signalled: int | None = None  # a signal the launcher passed on to the ranks
        for rank in range(nproc):
            proc = subprocess.Popen([sys.executable, "-m", "hpa", *argv],
                                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                    stdout=None if rank == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE)
            held: collections.deque[str] = collections.deque(maxlen=64)
            reader = threading.Thread(target=self._read, args=(proc.stderr, held, rank == 0), daemon=True)
            reader.start()
            self.procs.append(proc)
            self.held.append(held)
            self.readers.append(reader)

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._pass_on)
        try:
            failure = self._first_failure()
        except KeyboardInterrupt:  # Ctrl-C reached every rank too: each stops as it would alone
            self.muted.set()
            try:
                self._stop()
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
                for proc in self.procs:
                    proc.kill()
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        if failure is None:
            self._join_readers()
            return 0
        rank, code = failure
        self._stop()
        if self.signalled is not None:  # stopped on request, as one process would be: no error to report
            return 128 + self.signalled
        self._report(rank, code)
        return code if code > 0 else 128 - code

    def _first_failure(self) -> tuple[int, int] | None:
        """(rank, exit code) of the first rank to fail, or None once all succeeded."""
        while True:
            codes = [proc.poll() for proc in self.procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0):
                    if rank != 0:
                        self.muted.set()
                    return rank, code
            if all(code == 0 for code in codes):
                return None
            time.sleep(0.05)

    def _stop(self) -> None:
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._join_readers()

    def _report(self, rank: int, code: int) -> None:
        """The failed rank's error once; a rank that failed without hpa's error line is also named."""
        lines = [line for line in (self.shown if rank == 0 else self.held[rank]) if line.strip()]
        errors = [line for line in lines if line.startswith("Error:")]
        if rank != 0:  # rank 0's own lines were passed through as they came
            for line in errors[-1:] or lines[-20:]:  # hpa's errors are one line; a crash shows its last output
                if line not in self.shown:
                    sys.stderr.write(line + "\n")
        if not errors:
            how = f"was killed by {_signal_name(-code)}" if code < 0 else f"stopped with status {code}"
            said = "its last output is above" if lines else "it printed nothing"
            sys.stderr.write(f"Error: process {rank} of --nproc {how} ({said}); run with --nproc 1 to see whether "
                             "one process fails the same way\n")
        sys.stderr.flush()

    def _read(self, stream, held: collections.deque[str], passed_on: bool) -> None:
        """Keep the last lines of ``stream``; pass rank 0's through as they come (``\\r`` bars too)."""
        partial = b""
        while chunk := os.read(stream.fileno(), 65536):
            if passed_on and not self.muted.is_set():
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                target = self.shown
            else:
                target = held
            *complete, partial = (partial + chunk).split(b"\n")
            target.extend(line.decode(errors="replace").rsplit("\r", 1)[-1] for line in complete)
        stream.close()

    def _join_readers(self) -> None:
        for reader in self.readers:
            reader.join(timeout=GRACE_SECONDS)

    def _pass_on(self, signum, frame) -> None:
        """SIGTERM to the launcher (a batch system's stop) reaches every rank, as it would one process."""
        self.signalled = signum
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@dataclass
class World:
    """This process's place in the process group."""

    rank: int
    size: int
    device: "object"  # the torch.device this rank trains on

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def sum_gradients(self, model) -> None:
        """Replace every gradient by its sum over processes (all started before any is awaited)."""
        import torch.distributed as dist

        pending = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters() if p.grad is not None]
        for work in pending:
            work.wait()

    def sum(self, tensor):
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        import torch.distributed as dist

        box = [value if self.lead else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def join(device: str) -> World | None:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on CUDA); None when not launched."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    import torch
    import torch.distributed as dist

    _die_with_launcher()
    # Imported after the group exists, torch._dynamo keeps references to it (torch 2.15): the group
    # then outlives destroy_process_group, and a gloo worker thread still finishing a collective
    # at interpreter exit aborts the process ("terminate called without an active exception").
    # hpa's tracer imports torch._dynamo anyway, so import it before the group.
    import torch._dynamo  # noqa: F401
    parsed = torch.device(device)
    if parsed.type == "cuda":
        parsed = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(parsed)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if parsed.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=parsed)


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when its launcher (hpa's ``--nproc`` or torchrun's agent) dies.

    torchrun starts every rank in a session of its own, and either launcher can be killed alone
    (kill -9 of its pid, a batch system's kill): the ranks would go on training, and writing the
    run folder, as orphans while a ``--resume`` starts.  Elsewhere this does nothing.
    """
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
