"""``hpa train --plugin cifar10`` / ``cifar100``: the CIFAR python batches, read by torchvision.

``--data DIR`` is the folder that holds ``cifar-10-batches-py/`` (or
``cifar-100-python/``), as torchvision lays it out; ``--download`` fetches the
official archive there.  Without either, the default folder is
``$HPA_DATA`` or ``~/.cache/hpa/data``.

torchvision MD5-checks every batch file against the official release even
when it does not download.  hpa first runs that same check; when it fails
(a re-packed or sub-sampled copy, a test fixture), hpa verifies the files
itself (each one must unpickle to the batch layout: ``data`` uint8 rows of
3*32*32, labels in range) and then pins torchvision's check to the MD5 of the
files actually present, so torchvision's own loading code reads them.
``run.json`` records every file's sha256 and whether the official checksums
matched (``official_release``), so such a run is never mistaken for one on
the real CIFAR.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

from hpa import LoadError, hookimpl
from hpa.experiments import Dataset, Recipe, Task, data_root


# The per-channel constants of the 2020 authors' code (magamba/hp_arrangements, data_loader.py), what
# '--pixels dataset' (the default) normalises with.  Their means are CIFAR's; their stds are not the
# pixels' (CIFAR-10's is about 0.247), a widely copied value: '--pixels standardised' measures the real ones.
AUTHORS_NORMALISATION = {
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2009, 0.1984, 0.2023)),
}


@hookimpl
def register_experiments(register):
    register(Task(name="cifar10", dataset=lambda data, download: load_cifar("CIFAR10", data, download),
                  architecture="cifar:vgg19", input_size=(3, 32, 32), num_classes=10, recipe=Recipe(),
                  present=lambda data: cifar_present("CIFAR10", data),
                  description="CIFAR-10 (torchvision python batches; 50k train, 10k test, 10 classes)"))
    register(Task(name="cifar100", dataset=lambda data, download: load_cifar("CIFAR100", data, download),
                  architecture="cifar:vgg19", input_size=(3, 32, 32), num_classes=100, recipe=Recipe(),
                  present=lambda data: cifar_present("CIFAR100", data),
                  description="CIFAR-100 (torchvision python batches; 50k train, 10k test, 100 classes)"))


def cifar_present(class_name: str, data_dir) -> None:
    """LoadError when a batch file is missing from --data DIR (Task.present)."""
    import torchvision.datasets as tvd

    official = getattr(tvd, class_name)
    _require_files(*_files_of(official, data_root(data_dir)), class_name)


def _files_of(official, root: Path) -> tuple[Path, list[str]]:
    """(the folder of the python batches, their file names)."""
    return root / official.base_folder, [name for name, _ in official.train_list + official.test_list] + [
        official.meta["filename"]]


def load_cifar(class_name: str, data_dir, download: bool) -> Dataset:
    import numpy as np
    import torchvision.datasets as tvd

    official = getattr(tvd, class_name)
    root = data_root(data_dir)
    folder, names = _files_of(official, root)
    if download:
        _download(official, root)
    _require_files(folder, names, class_name)
    matches_official = _all_md5_match(official, folder)
    reader = official if matches_official else _pinned(official, folder)
    try:
        train, test = reader(str(root), train=True), reader(str(root), train=False)
    except Exception as exc:  # torchvision's own reading failed after our checks: say which folder
        raise LoadError(f"cannot read the {class_name} batches in {folder} ({type(exc).__name__}: {exc}); "
                        "re-extract the official archive there, or pass --download") from None
    source = {"dataset": f"torchvision.datasets.{class_name}", "folder": str(folder),
              "official_release": matches_official,
              "files": {name: _sha256(folder / name) for name in names}}
    mean, std = AUTHORS_NORMALISATION[class_name]
    return Dataset(
        train_images=np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)),
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_images=np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)),
        test_labels=np.asarray(test.targets, dtype=np.int64),
        num_classes=len(train.classes), mean=mean, std=std, source=source)


def _download(official, root: Path) -> None:
    try:
        official(str(root), train=True, download=True)
    except Exception as exc:  # offline, DNS, HTTP errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"cannot download {official.__name__} into {root} ({reason}); without network, "
                        f"extract {official.filename} into {root} and pass --data {root}") from None


def _require_files(folder: Path, names: list[str], class_name: str) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise LoadError(f"{class_name} files missing from {folder}: {', '.join(missing)}; extract "
                        f"the official archive so that {folder.name}/ is inside --data DIR, or pass --download")


def _all_md5_match(official, folder: Path) -> bool:
    from torchvision.datasets.utils import check_integrity

    pairs = official.train_list + official.test_list + [[official.meta["filename"], official.meta["md5"]]]
    return all(check_integrity(str(folder / name), md5) for name, md5 in pairs)


def _pinned(official, folder: Path):
    """A subclass of ``official`` whose checksums are those of the files present, after verifying them."""
    batches = official.train_list + official.test_list
    meta_name = official.meta["filename"]
    classes = _unpickle(folder / meta_name, meta_name).get(official.meta["key"])
    if not isinstance(classes, list) or not classes:
        raise LoadError(f"{folder / meta_name} has no {official.meta['key']!r} list; it is not a CIFAR meta file")
    num_classes = len(classes)
    for name, _ in batches:
        _verify_batch(folder / name, num_classes)
    md5 = {name: _md5(folder / name) for name, _ in batches + [[meta_name, None]]}
    return type(f"Pinned{official.__name__}", (official,), {
        "train_list": [[name, md5[name]] for name, _ in official.train_list],
        "test_list": [[name, md5[name]] for name, _ in official.test_list],
        "meta": dict(official.meta, md5=md5[meta_name]),
    })


def _verify_batch(path: Path, num_classes: int) -> None:
    import numpy as np

    entry = _unpickle(path, path.name)
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise LoadError(f"{path} does not hold CIFAR image rows (uint8, 3x32x32 each); re-extract the archive")
    if labels is None or len(labels) != len(data) or not all(0 <= int(v) < num_classes for v in labels):
        raise LoadError(f"{path} has labels that do not match its images or its {num_classes} classes")


def _unpickle(path: Path, what: str) -> dict:
    """CIFAR's own format is a pickle of plain arrays and lists; read with numpy arrays only allowed."""
    try:
        with open(path, "rb") as handle:
            entry = _RestrictedUnpickler(handle, encoding="latin1").load()
    except Exception as exc:
        raise LoadError(f"{path} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); the file is "
                        "truncated or of another format; re-extract the official archive") from None
    if not isinstance(entry, dict):
        raise LoadError(f"{path} is not a CIFAR batch (a pickled dict expected)")
    return entry


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global except the numpy array reconstructors CIFAR batches use."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"),
                # protocol 5 (Python 3.14's default) rebuilds an array from its bytes with _frombuffer
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("_codecs", "encode")}  # how Python 3 pickles protocol <= 2 spell bytes; harmless

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
