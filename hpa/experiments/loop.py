"""One training epoch and one evaluation pass, on data already on the device.

The speed choices here change only floating-point rounding, never the recipe:
``--precision`` (fp32, the faithful default; tf32 or bf16 autocast), channels-last
activations where they help, the foreach/fused SGD kernels, host memory kept mapped
between steps on CPU, and ``torch.compile``.
Under ``torch.distributed`` each process trains on its rows of the same global
batches, and the gradients are summed so that the update is the single-process one.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from typing import Any

import torch
import torch.nn.functional as F

from hpa.experiments.augment import epoch_draws, training_inputs
from hpa.experiments.data import DeviceData, Normalisation, Split
from hpa.experiments.rng import stream_seed
from hpa.experiments.types import Recipe

EVAL_BATCH = 1000


def memory_format(device: torch.device, precision: str = "fp32") -> torch.memory_format:
    """channels_last where it helps: on CUDA (tensor cores want NHWC) and for bf16 on CPU (oneDNN's
    AMX kernels: VGG-19, 1 thread, 40 -> 48 images/s).  fp32 on CPU keeps NCHW, which measured faster
    there (24.6 vs 32.5 images/s) and gives the plain path's bytes."""
    if device.type == "cuda" or precision == "bf16":
        return torch.channels_last
    return torch.contiguous_format


def make_optimizer(model, recipe: Recipe, device: torch.device) -> torch.optim.SGD:
    """The recipe's SGD with the multi-tensor kernels: fused on CUDA, foreach on CPU.

    foreach performs the for-loop's very operations per tensor, so CPU runs keep its bytes
    (tests/test_fast_path.py checks them against a for-loop).  The fused CPU kernel rounds
    differently and, once host memory stays mapped (below), is only 3-5 % faster on VGG-19.
    """
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, **kernel)


@contextlib.contextmanager
def steady_host_memory():
    """Keep freed host memory mapped for the next step while the block runs (glibc; speed only).

    glibc returns every block above its mmap threshold (at most 32 MiB) to the kernel when it is
    freed, so each step page-faults the same gradients and temporaries in again: for VGG-19's
    100-million-weight classifier that is a quarter of a CPU step (2 threads: 58 images/s without
    this, 73 with it).  Inside the block every block comes from the heap, which is never trimmed;
    afterwards glibc's defaults are set again and the heap is trimmed.  Elsewhere it does nothing.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """Run the block at ``precision``; the global TF32 switches are restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # cuDNN convolutions default to TF32: fp32 must switch that off to be the faithful precision.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def train_one_epoch(model, optimizer, data: DeviceData, recipe: Recipe, seed: int, epoch: int,
                    precision: str = "fp32", world=None) -> dict[str, Any]:
    """Train ``model`` for 1-based ``epoch``; returns train_loss and train_accuracy (on augmented batches).

    ``world`` (a :class:`hpa.experiments.distributed.World`) sums gradients and totals over processes.
    """
    for group in optimizer.param_groups:
        group["lr"] = recipe.lr_at(epoch)
    torch.manual_seed(stream_seed(seed, "dropout", epoch))  # the caller forks the global RNG
    draws = epoch_draws(seed, epoch)
    model.train()
    fmt = memory_format(data.device, precision)
    total_loss = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    for batch in data.train_batches(seed, epoch, recipe.batch_size):
        inputs = training_inputs(data, batch, recipe, draws).contiguous(memory_format=fmt)
        optimizer.zero_grad(set_to_none=True)
        with precision_mode(precision, data.device):
            logits = model(inputs)
        loss = _batch_loss(logits.float(), batch, world)
        loss.backward()
        if world is not None:
            world.sum_gradients(model)
        optimizer.step()
        # Accumulated on the device: no host sync per batch.
        total_loss += loss.detach().double() * batch.total
        correct += (logits.detach().argmax(1) == batch.labels).sum()
    if world is not None:
        total_loss, correct = world.sum(total_loss), world.sum(correct)
    count = len(data.train)
    return {"train_loss": float(total_loss.item()) / count, "train_accuracy": int(correct.item()) / count}


def _batch_loss(logits, batch, world):
    """The mean cross-entropy of the global batch, or this process's share of it (its sum / global size):
    summed over processes that is the mean, whatever the (possibly uneven) split of the last batch."""
    if world is None and not batch.augmented:
        return F.cross_entropy(logits, batch.labels)
    # the streaming path always divides by the global batch's size, so a skipped image (ignored label)
    # weighs the same in one process and in many
    return F.cross_entropy(logits, batch.labels, reduction="sum") / batch.total


@torch.no_grad()
def evaluate(model, split: Split, normalisation: Normalisation, precision: str | None = "fp32",
             batch_size: int = EVAL_BATCH) -> tuple[float | None, float | None]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``split``; (None, None) when it is empty.

    The one evaluation pass, of the trainer and of ``hpa reinit``: batches of ``batch_size`` stored
    images, each normalised (:class:`~hpa.experiments.data.Normalisation`), losses summed in float64.
    ``precision`` None runs under torch's global settings as they are (``hpa reinit``).
    """
    if len(split) == 0:
        return None, None
    model.eval()
    device = split.labels.device
    fmt = torch.contiguous_format if precision is None else memory_format(device, precision)
    mode = contextlib.nullcontext if precision is None else (lambda: precision_mode(precision, device))
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    counted = torch.zeros((), dtype=torch.int64, device=device)
    for stored, labels in _eval_batches(split, batch_size):
        images = normalisation(stored).contiguous(memory_format=fmt)
        with mode():
            logits = model(images).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
        counted += (labels != -100).sum()  # a skipped image of the streaming path has the ignored label
    count = int(counted.item())
    if count == 0:
        return None, None
    return float(total_loss.item()) / count, int(correct.item()) / count


def _eval_batches(split, batch_size: int):
    """(stored images, labels) of ``split`` in batches: slices of an in-memory Split, or a FileSplit's own."""
    if hasattr(split, "batches"):
        yield from split.batches(batch_size)
        return
    for start in range(0, len(split), batch_size):
        yield split.images[start:start + batch_size], split.labels[start:start + batch_size]


def evaluate_split(model, data: DeviceData, split: Split, prefix: str, precision: str = "fp32") -> dict[str, Any]:
    """``{prefix}_loss`` and ``{prefix}_accuracy`` of ``model`` on one of ``data``'s splits (metrics.jsonl's)."""
    loss, accuracy = evaluate(model, split, data.normalisation, precision)
    return {f"{prefix}_loss": loss, f"{prefix}_accuracy": accuracy}
