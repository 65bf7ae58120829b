"""What ``hpa.Tracker`` costs a training loop (issue 22 §1), measured in one run; the machine may be shared.

For VGG-19 sized for CIFAR (``cifar:vgg19``, 3x32x32, 10 classes, batch 128, SGD with momentum) on this
machine's device:

* **copy**: copying the weights into host buffers allocated once (``model.host_copy(..., into=)``;
  pinned memory on CUDA), the least any recorder must spend on the training path;
* **blocks**: how long each ``tracker.epoch(n)`` call keeps the loop waiting (target: no longer than the copy);
* **extra per epoch**: the same epochs trained without and with a tracker (statistics and snapshot
  writes then run in the background, beside the training), the difference of their median epoch times;
  and the wait in ``close()`` for the last epoch's background work, which no epoch pays.

A 45,000-image CIFAR epoch is too slow for a shared 2-core CPU, so ``--images`` (default 1024) random
CIFAR-shaped images make an epoch, and the overhead is also given as a fraction of a 45,000-image epoch,
scaled from the measured time per image: the background work per epoch does not grow with the images,
so that fraction is (extra per epoch) / (45,000 x seconds per image).  Target: <= 5 %.

Run: .venv/bin/python benchmarks/bench_tracker.py [--images 1024] [--epochs 3] [--device auto] [--json out.json]
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
from hpa.experiments.model import build_model, host_copy
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
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    data = batches(args.images, device)
    torch.manual_seed(0)
    plain_model, tracked_model = vgg19(device), vgg19(device)
    train_epochs(plain_model, data[:1], 1, device)  # warm-up: first-call costs (allocator, kernels) out of both
    copy = copy_seconds(plain_model, device)
    plain, _ = train_epochs(plain_model, data, args.epochs, device)
    with tempfile.TemporaryDirectory() as folder:
        tracker = hpa.Tracker(tracked_model, out=Path(folder) / "run", input_size=(3, 32, 32), figures=False)
        tracked, blocked = train_epochs(tracked_model, data, args.epochs, device, tracker)
        closing = time.perf_counter()
        tracker.close()
        close_wait = time.perf_counter() - closing
        series_rows = len(hpa.open_run(Path(folder) / "run").series)
    plain_epoch, tracked_epoch = statistics.median(plain), statistics.median(tracked)
    extra = tracked_epoch - plain_epoch
    per_image = plain_epoch / args.images
    report = {
        "device": str(device), "threads": torch.get_num_threads(), "images_per_epoch": args.images,
        "epochs": args.epochs, "copy_seconds": copy, "epoch_call_seconds": blocked,
        "epoch_call_over_copy": max(blocked) / copy, "plain_epoch_seconds": plain, "tracked_epoch_seconds": tracked,
        "extra_seconds_per_epoch": extra, "extra_fraction_measured": extra / plain_epoch,
        "extra_fraction_45000_images": extra / (FULL_EPOCH * per_image), "close_wait_seconds": close_wait,
        "series_rows": series_rows,
    }
    print(f"VGG-19 (cifar:vgg19, 3x32x32) on {device}, {report['threads']} threads, {args.images} images per epoch, "
          f"{args.epochs} epochs each")
    print(f"  copy of the weights into host buffers: {copy * 1000:.1f} ms (median of 5)")
    print(f"  tracker.epoch() blocked: {', '.join(f'{b * 1000:.1f}' for b in blocked)} ms "
          f"(worst / copy = {report['epoch_call_over_copy']:.2f})")
    print(f"  epoch without / with tracker (median): {plain_epoch:.2f} s / {tracked_epoch:.2f} s; "
          f"extra {extra:+.2f} s = {report['extra_fraction_measured']:+.1%} of this epoch")
    print(f"  scaled to a {FULL_EPOCH}-image epoch ({FULL_EPOCH * per_image:.0f} s here): "
          f"{report['extra_fraction_45000_images']:+.2%} (target <= 5 %)")
    print(f"  close() waited {close_wait:.2f} s for the last epoch's statistics and writes")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
