"""Training on several processes with ``torch.distributed``: ``torchrun ... -m hpa train`` or ``--nproc N``.

Each process trains on its rows of the single-process run's global batches and the
gradients are summed (see ``hpa.experiments.loop``), so N processes follow the
one-process recipe with no learning-rate rescaling.  Rank 0 alone writes the run
folder and shows progress.  The environment variables that torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK) are read without importing torch, so ``hpa --help``
stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from hpa.errors import OptionError


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_lead() -> bool:
    """True for the one process that writes and talks: rank 0, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``hpa ARGV`` on ``nproc`` local processes through ``torch.distributed.run``; its exit code.

    ``argv`` must not contain ``--nproc`` (the started processes would launch again).
    """
    if nproc < 1:
        raise OptionError(f"--nproc must be a positive number of processes, not {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "hpa", *argv]
    # torchrun would set OMP_NUM_THREADS=1 itself, with a banner; the CPU trainer uses one thread anyway.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    # Inherits stdout/stderr: rank 0's progress lines appear as they are written.
    return subprocess.call(command, env=env)


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
    parsed = torch.device(device)
    if parsed.type == "cuda":
        parsed = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(parsed)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if parsed.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=parsed)


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when its torchrun agent dies.

    torchrun starts every rank in a session of its own, so killing the launcher's process
    group (kill -9, a batch system's kill) would leave the ranks training, and writing the
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
