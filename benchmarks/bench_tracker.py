"""What ``hpa.Tracker`` costs a training loop (issue 22 §1), measured in one run; the machine may be shared.

For VGG-19 sized for CIFAR (``cifar:vgg19``, 3x32x32, 10 classes, batch 128, SGD with momentum) on this
machine's device:

* **copy**: copying the weights into host buffers allocated once (``model.host_copy(..., into=)``;
  pinned memory on CUDA), the least any recorder must spend on the training path;
* **blocks**: how long each ``tracker.epoch(n)`` call keeps the loop waiting (target: no longer than the copy);
* **extra per epoch**: the same epochs trained without and with a tracker (statistics and snapshot
  writes then run in the background, beside the training).

A 45,000-image CIFAR epoch is too slow for a shared 2-core CPU, so ``--images`` (default 1024) random
CIFAR-shaped images make an epoch, and the overhead is also given as a fraction of a 45,000-image epoch,
scaled from the measured time per image: the background work per epoch does not grow with the images,
so that fraction is (extra per epoch) / (45,000 x seconds per image).  Target: <= 5 %.

Blocks of epochs run plain, tracked, tracked, plain (each tracked block a new tracker), so that a machine
load that drifts falls on both kinds alike; the extra per epoch counts every second of a tracked block,
its ``close()`` included, against the plain blocks (an upper bound: in a long run the last epoch's
background work is paid once, not per epoch).

Run: .venv/bin/python benchmarks/bench_tracker.py [--images 1024] [--epochs 2] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hpa
from hpa.experiments.background import host_copy
from hpa.experiments.model import build_model
from hpa.experiments.types import Dataset

FULL_EPOCH = 45_000


def vgg19(device: torch.device):
    data = Dataset(np.zeros((10, 3, 32, 32), np.uint8), np.arange(10), np.zeros((10, 3, 32, 32), np.uint8),
                   np.arange(10), num_classes=10)
    model, _ = build_model("cifar:vgg19", data, 0, "kaiming_normal", "bench")
    return model.to(device)


def batches(images: int, device: torch.device):
    draws = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=draws)
    y = torch.randint(0, 10, (images,), generator=draws)
    return [(x[i:i + 128].to(device), y[i:i + 128].to(device)) for i in range(0, images, 128)]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epochs(model, data, epochs: int, device, tracker=None) -> tuple[list[float], list[float]]:
    """(seconds of each epoch, including its tracker.epoch call; seconds each tracker.epoch call blocked)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    epoch_seconds, blocked = [], []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        synchronise(device)
        if tracker is not None:
            called = time.perf_counter()
            tracker.epoch(epoch, metrics={"train_loss": loss.item()})
            blocked.append(time.perf_counter() - called)
        epoch_seconds.append(time.perf_counter() - started)
    return epoch_seconds, blocked


def copy_seconds(model, device, repeat: int = 5) -> float:
    """Median seconds of copying the weights into host buffers allocated once (a bare memcpy, or DMA on CUDA)."""
    buffers, _ = host_copy(model.state_dict())
    times = []
    for _ in range(repeat):
        synchronise(device)
        started = time.perf_counter()
        _, ready = host_copy(model.state_dict(), into=buffers)
        ready()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per block; blocks run plain, tracked, "
                        "tracked, plain, so that a drifting machine load falls on both alike")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    data = batches(args.images, device)
    torch.manual_seed(0)
    models = {"plain": vgg19(device), "tracked": vgg19(device)}
    for model in models.values():
        train_epochs(model, data[:1], 1, device)  # warm-up: first-call costs (allocator, kernels) out of both
    copies, blocked, closes = [], [], []
    epochs: dict[str, list[float]] = {"plain": [], "tracked": []}
    blocks: dict[str, list[float]] = {"plain": [], "tracked": []}  # a block's time, a tracked one's close() included
    with tempfile.TemporaryDirectory() as folder:
        for index, kind in enumerate(("plain", "tracked", "tracked", "plain")):
            copies.append(copy_seconds(models["tracked"], device))
            tracker = None
            if kind == "tracked":
                tracker = hpa.Tracker(models[kind], out=Path(folder) / f"run-{index}", input_size=(3, 32, 32),
                                      figures=False)
            started = time.perf_counter()
            seconds, calls = train_epochs(models[kind], data, args.epochs, device, tracker)
            if tracker is not None:
                closing = time.perf_counter()
                tracker.close()
                closes.append(time.perf_counter() - closing)
            blocks[kind].append(time.perf_counter() - started)
            epochs[kind] += seconds
            blocked += calls
        series_rows = len(hpa.open_run(Path(folder) / "run-1").series)
    copy = statistics.median(copies)
    plain_epoch, tracked_epoch = statistics.median(epochs["plain"]), statistics.median(epochs["tracked"])
    steady = tracked_epoch - plain_epoch
    bound = (sum(blocks["tracked"]) - sum(blocks["plain"])) / len(epochs["tracked"])
    per_image = plain_epoch / args.images
    report = {
        "device": str(device), "threads": torch.get_num_threads(), "images_per_epoch": args.images,
        "epochs_per_block": args.epochs, "copy_seconds": copies, "epoch_call_seconds": blocked,
        "epoch_call_over_copy_median": statistics.median(blocked) / copy,
        "epoch_call_over_copy_worst": max(blocked) / copy,
        "plain_epoch_seconds": epochs["plain"], "tracked_epoch_seconds": epochs["tracked"],
        "close_wait_seconds": closes, "extra_seconds_per_epoch_steady": steady,
        "extra_seconds_per_epoch_bound": bound, "extra_fraction_measured": bound / plain_epoch,
        "extra_fraction_45000_images": bound / (FULL_EPOCH * per_image), "series_rows": series_rows,
    }
    print(f"VGG-19 (cifar:vgg19, 3x32x32) on {device}, {report['threads']} threads, {args.images} images per epoch, "
          f"blocks plain, tracked, tracked, plain of {args.epochs} epochs")
    print(f"  copy of the weights into host buffers: {copy * 1000:.0f} ms (median of {len(copies)} medians of 5; "
          f"{', '.join(f'{c * 1000:.0f}' for c in copies)})")
    print(f"  tracker.epoch() blocked: {', '.join(f'{b * 1000:.0f}' for b in blocked)} ms "
          f"(median / copy = {report['epoch_call_over_copy_median']:.2f}, worst / copy = "
          f"{report['epoch_call_over_copy_worst']:.2f})")
    print(f"  epoch without / with tracker (median): {plain_epoch:.2f} s / {tracked_epoch:.2f} s "
          f"(steady difference {steady:+.2f} s)")
    print(f"  extra per epoch, every background second counted (close() waits included): {bound:+.2f} s "
          f"= {report['extra_fraction_measured']:+.1%} of this epoch")
    print(f"  scaled to a {FULL_EPOCH}-image epoch ({FULL_EPOCH * per_image:.0f} s here): "
          f"{report['extra_fraction_45000_images']:+.2%} (target <= 5 %)")
    print(f"  close() waited {', '.join(f'{c:.2f}' for c in closes)} s for the last epoch's statistics and writes")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
