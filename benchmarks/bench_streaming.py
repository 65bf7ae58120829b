"""hpa's streaming path against the conventional loop of PyTorch's ImageNet example, on a JPEG tree it writes.

    python benchmarks/bench_streaming.py [--images 256] [--workers 2] [--arch cifar:small_max] [--crop 64]

Writes real JPEGs of mixed sizes around 500x375 (as in ImageNet) into a temporary ImageNet-layout
tree, then, in one run, with the same workers, model (fp32, eager) and batch size:

* images/s of one training epoch through hpa's path (``hpa.experiments.streaming.FileData``) and
  through ``torchvision.datasets.ImageFolder`` + ``transforms`` + ``DataLoader`` (shuffle=True);
* the share of each step spent waiting for the next batch (time in ``next(loader)``);
* peak RSS of a whole ``hpa train --plugin imagenet`` run against the number of images (a fresh
  process per size, ``ru_maxrss`` of the process and of its DataLoader workers).

GPU figures (``--device cuda --arch cifar:alexnet --crop 224``) only where a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_tree(root: Path, images: int, classes: int = 4, seed: int = 0) -> Path:
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(seed)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = int(torch.randint(300, 451, (1,), generator=gen)), int(torch.randint(400, 601, (1,), generator=gen))
            small = torch.rand(3, h // 16, w // 16, generator=gen)
            image = torch.nn.functional.interpolate(small[None], size=(h, w), mode="bilinear")[0]
            (folder / f"{i:06d}.JPEG").write_bytes(bytes(encode_jpeg((image * 255).to(torch.uint8), quality=90).numpy()))
    return root


def timed_epoch(batches, model, optimizer, device, normalise):
    """(images/s, share of the epoch spent waiting for batches) of one training pass."""
    waited, count = 0.0, 0
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        before = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            break
        waited += time.perf_counter() - before
        images, labels = normalise(images.to(device)), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return count / seconds, waited / seconds


def hpa_batches(tree, args, device):
    from hpa.experiments.image_tree import image_tree
    from hpa.experiments.streaming import FileData, Streamed
    from hpa.experiments.types import IMAGENET_AUGMENTATION, Recipe

    recipe = Recipe(**{**IMAGENET_AUGMENTATION, "crop": args.crop, "resize": int(args.crop * 8 / 7)},
                    batch_size=args.batch_size, validation=0.0)
    files = image_tree(tree, "bench", "layout", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data = FileData(Streamed(files, (3, args.crop, args.crop), files.mean, files.std), recipe, 0, device,
                    workers=args.workers)
    normalise = data.normalisation
    return ((b.images, b.labels) for b in data.train_batches(0, 1, args.batch_size)), normalise


def conventional_batches(tree, args):
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    dataset = datasets.ImageFolder(str(tree / "train"), transforms.Compose([
        transforms.RandomResizedCrop(args.crop), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                       pin_memory=torch.cuda.is_available())


def model_for(args, device):
    from hpa.experiments.model import build_model
    from hpa.experiments.types import Dataset

    import numpy as np

    shape = Dataset(np.zeros((1, 3, args.crop, args.crop), np.uint8), np.zeros(1, np.int64),
                    np.zeros((1, 3, args.crop, args.crop), np.uint8), np.zeros(1, np.int64), num_classes=4)
    model = build_model(args.arch, shape, 0, "default", "bench")[0].to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


RSS = """
import json, resource, sys
from hpa.experiments.train import train
train("imagenet", data=sys.argv[1], out=sys.argv[2], arch=sys.argv[3], epochs=1, batch_size=32, crop=int(sys.argv[4]),
      resize=int(int(sys.argv[4]) * 8 / 7), device="cpu", statistics=["none"], workers=int(sys.argv[5]), snapshot_every=1)
print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arch", default="cifar:small_max")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), **vars(args)}
    with tempfile.TemporaryDirectory() as folder:
        tree = write_tree(Path(folder) / "tree", args.images)
        for name in ("conventional", "hpa", "conventional", "hpa"):  # each twice: the second of each is reported
            model, optimizer = model_for(args, device)
            if name == "hpa":
                batches, normalise = hpa_batches(tree, args, device)
            else:
                batches, normalise = conventional_batches(tree, args), (lambda x: x)
            rate, waiting = timed_epoch(batches, model, optimizer, device, normalise)
            out[name] = {"images_per_s": round(rate, 1), "waiting_share": round(waiting, 3)}
        rss = {}
        for count in (args.images // 4, args.images):
            sub = write_tree(Path(folder) / f"rss{count}", count, seed=count)
            proc = subprocess.run([sys.executable, "-c", RSS, str(sub), str(Path(folder) / f"run{count}"), args.arch,
                                   str(args.crop), str(args.workers)], capture_output=True, text=True, check=True)
            own, workers = json.loads(proc.stdout.strip().splitlines()[-1])
            rss[count] = {"process_mib": round(own / 1024, 1), "largest_worker_mib": round(workers / 1024, 1)}
        out["peak_rss"] = rss
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
