"""The trainer's CPU path (issue 9 speed bars), measured in one run; the machine is shared.

* one ``digits`` epoch of the default architecture (cifar:small_max), end to end through
  ``hpa.experiments.train`` (snapshot, metrics and state writes included);
* training throughput (images/s) on CIFAR-shaped data (3x32x32 uint8, batch 128, augmentation on)
  for a small and a VGG-sized network, with the trainer's default CPU threads;
* the batched augmentation alone, per 128-image batch.

Run: .venv/bin/python benchmarks/bench_train_cpu.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hpa.experiments.augment import augment
from hpa.experiments.data import DeviceData
from hpa.experiments.loop import train_one_epoch
from hpa.experiments.model import build_model
from hpa.experiments.config import default_cpu_threads
from hpa.experiments.train import train
from hpa.experiments.types import Dataset, Recipe


def digits_epoch() -> None:
    with tempfile.TemporaryDirectory() as folder:
        run = train("digits", out=Path(folder) / "run", epochs=2, device="cpu")
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [line["seconds"] for line in lines[1:]]
    print(f"digits epoch (cifar:small_max, 1211 train images, batch 64): "
          f"{min(seconds):.2f} s (best of {len(seconds)})")


def cifar_throughput(arch: str, images: int = 1024) -> None:
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8), np.arange(images) % 10,
                   rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8), np.arange(10) % 10, num_classes=10)
    recipe = Recipe(validation=0.0)
    model, _ = build_model(arch, data, 0, "kaiming_normal", "bench")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device_data = DeviceData(data, recipe, 0, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(default_cpu_threads())
    try:
        started = time.perf_counter()
        train_one_epoch(model, optimizer, device_data, recipe, 0, 1)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    print(f"CIFAR-shaped training, {arch}: {images / seconds:.0f} images/s "
          f"({images} images in {seconds:.2f} s, {default_cpu_threads()} threads)")


def augmentation() -> None:
    batch = torch.rand(128, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(default_cpu_threads())  # as the trainer runs
    augment(batch, 4, True, gen)
    started = time.perf_counter()
    for _ in range(50):
        augment(batch, 4, True, gen)
    torch.set_num_threads(threads)
    print(f"augment 128x3x32x32 (shift 4 + flip): {(time.perf_counter() - started) / 50 * 1e3:.2f} ms per batch")


if __name__ == "__main__":
    digits_epoch()
    augmentation()
    cifar_throughput("cifar:small_max")
    cifar_throughput("cifar:vgg11_cifar", images=256)
