"""hpa's trainer against a conventional PyTorch loop, side by side in one run (issue 11 §3).

Both train VGG-19 (``cifar:vgg19``, hpa's builder, Kaiming init) on the same device from
CIFAR-shaped data written in the real CIFAR-10 python-batch format (uint8 32x32x3):

* **hpa**: ``hpa train --plugin cifar10 --epochs 1`` in a subprocess, per precision (and,
  with ``--nproc``, on several processes).  Its epoch time is the metrics line's ``seconds``
  of epoch 1 (training plus the small test split's evaluation); the share spent waiting on
  snapshots and statistics is run.json's ``waiting_seconds`` over the run's epoch time.
* **conventional**: torchvision ``CIFAR10`` with RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor and Normalize, a ``DataLoader`` with one worker per core, fp32, eager, the for-loop
  SGD, torch's default thread count.

Run: .venv/bin/python benchmarks/bench_train.py --images 384 --device cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ARCH = "cifar:vgg19"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the cifar10 task's normalisation


def write_cifar(root: Path, images: int, test_images: int, seed: int = 0) -> Path:
    """cifar-10-batches-py/ as the official archive lays it out: 5 train batches, a test batch, the meta file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = [len(part) for part in np.array_split(np.arange(images), 5)]
    for name, count in [(f"data_batch_{i + 1}", n) for i, n in enumerate(sizes)] + [("test_batch", test_images)]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, count)],
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": sizes[0], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def hpa_epoch(data: Path, device: str, precision: str, nproc: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        command = [sys.executable, "-m", "hpa", "train", "--plugin", "cifar10", "--data", str(data), "--arch", ARCH,
                   "--epochs", "1", "--validation", "0", "--batch-size", str(batch), "--device", device,
                   "--precision", precision, "--out", str(run), "--quiet"]
        if nproc > 1:
            command += ["--nproc", str(nproc)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        record = json.loads((run / "run.json").read_text())
    seconds = lines[1]["seconds"]
    total = sum(line["seconds"] for line in lines)
    return {"path": f"hpa x{nproc}" if nproc > 1 else "hpa", "precision": precision, "seconds": seconds,
            "images": record["split"]["n_train"], "waiting_share": record["waiting_seconds"] / total,
            "peak_gpu_bytes": record.get("peak_gpu_memory_bytes")}


def conventional_epoch(data: Path, device: str, batch: int) -> dict:
    """The usual loop: a torchvision dataset, per-image PIL transforms in DataLoader workers, fp32, eager."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from hpa.experiments.model import build_model
    from hpa.experiments.types import Dataset

    reader = _pinned_cifar10(data / "cifar-10-batches-py")
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = reader(str(data), train=True, transform=transform)
    loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=os.cpu_count(),
                        pin_memory=device.startswith("cuda"), persistent_workers=False)
    shape = Dataset(np.zeros((1, 3, 32, 32), np.uint8), np.zeros(1, np.int64), np.zeros((1, 3, 32, 32), np.uint8),
                    np.zeros(1, np.int64), num_classes=10)
    model, _ = build_model(ARCH, shape, 0, "kaiming_normal", "cifar10")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"path": "conventional", "precision": "fp32", "seconds": seconds, "images": len(train),
            "waiting_share": None, "peak_gpu_bytes": peak}


def _pinned_cifar10(folder: Path):
    """torchvision's CIFAR10 with the checksums of the files written here (it refuses unknown files)."""
    from torchvision import datasets

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    official = datasets.CIFAR10
    return type("SyntheticCIFAR10", (official,), {
        "train_list": [[name, md5(name)] for name, _ in official.train_list],
        "test_list": [[name, md5(name)] for name, _ in official.test_list],
        "meta": {**official.meta, "md5": md5(official.meta["filename"])}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="training images (CIFAR-10 has 50,000)")
    parser.add_argument("--test-images", type=int, default=None, help="test images [default: images / 50]")
    parser.add_argument("--device", default=None, help="cpu or cuda [default: cuda when present]")
    parser.add_argument("--precisions", default=None, help="comma-separated [default: fp32,tf32,bf16 on CUDA, "
                                                           "fp32,bf16 on CPU]")
    parser.add_argument("--nproc", type=int, default=1, help="also run hpa on this many processes")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precisions = (args.precisions or ("fp32,tf32,bf16" if device.startswith("cuda") else "fp32,bf16")).split(",")
    print(f"machine: {os.cpu_count()} cores, device {device} "
          f"({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), torch {torch.__version__}")
    print(f"VGG-19, {args.images} images of 32x32x3, batch {args.batch_size}, one run each "
          f"(s/epoch is for {args.images} images; a full CIFAR epoch is {50_000 / args.images:.0f}x that)")
    print(f"{'path':<14}{'precision':<10}{'s/epoch':>9}{'images/s':>10}{'x conv.':>9}{'waiting':>9}{'peak GPU':>11}")
    with tempfile.TemporaryDirectory() as scratch:
        data = write_cifar(Path(scratch), args.images, args.test_images or max(10, args.images // 50))
        base = report(conventional_epoch(data, device, args.batch_size))
        for precision in precisions:
            report(hpa_epoch(data, device, precision, 1, args.batch_size), base)
        if args.nproc > 1:
            report(hpa_epoch(data, device, "fp32", args.nproc, args.batch_size), base)


def report(row: dict, base: float | None = None) -> float:
    """Print one row as soon as it is measured; returns its images/s."""
    speed = row["images"] / row["seconds"]
    waiting = "-" if row["waiting_share"] is None else f"{100 * row['waiting_share']:.1f}%"
    peak = "-" if row["peak_gpu_bytes"] is None else f"{row['peak_gpu_bytes'] / 2**30:.2f} GiB"
    print(f"{row['path']:<14}{row['precision']:<10}{row['seconds']:>9.2f}{speed:>10.1f}{speed / (base or speed):>9.2f}"
          f"{waiting:>9}{peak:>11}", flush=True)
    return speed


if __name__ == "__main__":
    main()
