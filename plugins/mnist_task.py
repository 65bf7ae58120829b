"""``hpa train --plugin mnist`` / ``fashion_mnist``: the idx files, read by torchvision.

``--data DIR`` holds ``MNIST/raw/`` (or ``FashionMNIST/raw/``) with the four
uncompressed idx files, as torchvision lays them out; ``--download`` fetches
and extracts them.  torchvision checks only that the files exist and their
idx magic numbers; hpa adds the shape checks and records each file's sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hpa import LoadError, hookimpl
from hpa.experiments import Dataset, Recipe, Task, data_root

# 28x28 digits: ±4-pixel shifts as on CIFAR; no flips (a mirrored digit is another symbol).
_RECIPE = Recipe(flip=False)


@hookimpl
def register_experiments(register):
    register(Task(name="mnist", dataset=lambda data, download: load_mnist("MNIST", data, download),
                  architecture="cifar:lenet6", input_size=(1, 28, 28), num_classes=10, recipe=_RECIPE,
                  present=lambda data: mnist_present("MNIST", data),
                  description="MNIST handwritten digits (torchvision idx files; 60k train, 10k test)"))
    register(Task(name="fashion_mnist", dataset=lambda data, download: load_mnist("FashionMNIST", data, download),
                  architecture="cifar:lenet6", input_size=(1, 28, 28), num_classes=10, recipe=Recipe(),
                  present=lambda data: mnist_present("FashionMNIST", data),
                  description="Fashion-MNIST (torchvision idx files; 60k train, 10k test)"))


def mnist_present(class_name: str, data_dir) -> None:
    """LoadError when an idx file is missing from --data DIR (Task.present)."""
    import torchvision.datasets as tvd

    folder, names = _files_of(getattr(tvd, class_name), data_root(data_dir))
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise LoadError(f"{class_name} files missing from {folder}: {', '.join(missing)}; put the uncompressed "
                        f"idx files there (inside --data DIR), or pass --download")


def _files_of(dataset_class, root: Path) -> tuple[Path, list[str]]:
    """(the folder of the uncompressed idx files, their names)."""
    return root / dataset_class.__name__ / "raw", [Path(url).stem for url, _ in dataset_class.resources]


def load_mnist(class_name: str, data_dir, download: bool) -> Dataset:
    import numpy as np
    import torchvision.datasets as tvd

    dataset_class = getattr(tvd, class_name)
    root = data_root(data_dir)
    folder, names = _files_of(dataset_class, root)
    if download:
        _download(dataset_class, root)
    mnist_present(class_name, data_dir)
    try:
        train, test = dataset_class(str(root), train=True), dataset_class(str(root), train=False)
    except Exception as exc:  # torchvision's idx reader: wrong magic, truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"cannot read the {class_name} idx files in {folder} ({type(exc).__name__}: {reason}); "
                        "they are truncated or of another format; extract them again or pass --download") from None
    for split, what in ((train, "train"), (test, "test")):
        if split.data.ndim != 3 or len(split.data) != len(split.targets):
            raise LoadError(f"the {class_name} {what} idx files in {folder} do not pair images with labels")
    source = {"dataset": f"torchvision.datasets.{class_name}", "folder": str(folder),
              "files": {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}}
    # MNIST: the constants of the 2020 authors' code (data_loader.py; its std is theirs, sic); Fashion-MNIST,
    # in no paper, keeps the Dataset default, [-1, 1].
    mean, std = ((0.1307,), (0.3015,)) if class_name == "MNIST" else ((0.5,), (0.5,))
    return Dataset(
        train_images=train.data.numpy()[:, None].copy(), train_labels=train.targets.numpy().astype(np.int64),
        test_images=test.data.numpy()[:, None].copy(), test_labels=test.targets.numpy().astype(np.int64),
        num_classes=len(dataset_class.classes), mean=mean, std=std, source=source)


def _download(dataset_class, root: Path) -> None:
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"cannot download {dataset_class.__name__} into {root} ({reason}); without network, "
                        f"put the uncompressed idx files in {root / dataset_class.__name__ / 'raw'}") from None
