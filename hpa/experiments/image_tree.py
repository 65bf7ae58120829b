"""An ImageNet-style tree of image files (``train/<class>/*``, ``val/<class>/*``) as a :class:`FileDataset`:
its files in torchvision's order, checked before anything is written.  Torch-free; numpy at call time.

The order is ``torchvision.datasets.ImageFolder``'s: class folders sorted by name (a label is the
index of its folder's name), then within a class every file whose extension torchvision reads,
walking the sub-folders in sorted order and each folder's files sorted by name.  No image is
decoded here: each file's first bytes are checked to be those of an image format, so a file that
is not an image stops the run before its folder exists.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hpa.errors import LoadError
from hpa.experiments.types import FileDataset

#: The extensions torchvision's ImageFolder accepts (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The first bytes of the formats torchvision decodes (WEBP is RIFF....WEBP, checked apart).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P5", b"P6", b"P3", b"P2",
          b"GIF8")


def class_folders(folder: Path) -> list[str]:
    """The class folder names of one split, sorted as torchvision sorts them."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def split_files(root: Path, split: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """(paths relative to ``root``, labels) of ``root/split``, in ImageFolder's order; an empty class refused."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for folder, _, names in sorted(os.walk(root / split / name, followlinks=True)):
            found += [os.path.join(folder, file) for file in sorted(names) if file.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise LoadError(f"{root / split / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put the "
                            f"class's images there or remove the folder from both train/ and val/")
        paths += [os.path.relpath(path, root) for path in found]
        labels += [label] * len(found)
    return paths, labels


def not_an_image(path: Path) -> str | None:
    """Why ``path`` is not an image file (its first bytes are no image format's), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "is not an image (its first bytes are no JPEG, PNG, BMP, TIFF, PPM, GIF or WEBP header)"


def unreadable_files(root: Path, paths: list[str], threads: int = 16) -> dict[str, str]:
    """{relative path: why} for every file of ``paths`` that is not an image (its header; read in threads)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(lambda rel: not_an_image(root / rel), paths, chunksize=256))
    return {rel: why for rel, why in zip(paths, reasons) if why is not None}


def listing_digest(root: Path, paths: list[str]) -> str:
    """sha256 over every file's relative path and byte size: what a resume checks (contents are not hashed;
    a tree of a million files would take hours)."""
    digest = hashlib.sha256()
    for rel in paths:
        digest.update(rel.encode() + b"\0" + str((root / rel).stat().st_size).encode() + b"\n")
    return digest.hexdigest()


def image_tree(data_dir, task: str, layout: str, **fields: Any) -> FileDataset:
    """The :class:`FileDataset` of the tree ``data_dir`` (train/ for training, val/ for the test split).

    ``layout`` is the one line that says where to put what, shown when the tree is not there;
    ``fields`` go to the FileDataset (mean, std, streaming_only).  Every check here is bad input:
    one line naming the folder and the fix.
    """
    import numpy as np  # here: hpa experiments lists the tasks without numpy

    if data_dir is None:
        raise LoadError(f"the {task} task needs --data DIR: {layout}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise LoadError(f"--data {root} {what}: {layout}")
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise LoadError(f"{root} has no {' and no '.join(name + '/' for name in missing)} folder: {layout}")
    classes = class_folders(root / "train")
    if not classes:
        raise LoadError(f"{root / 'train'} holds no class folders: {layout}")
    if class_folders(root / "val") != classes:  # by name: a label is the index of its folder's name in both
        val = class_folders(root / "val")
        only_train = sorted(set(classes) - set(val)) or ["none"]
        only_val = sorted(set(val) - set(classes)) or ["none"]
        raise LoadError(f"{root}/train and {root}/val have different class folders (only in train: "
                        f"{', '.join(only_train[:5])}; only in val: {', '.join(only_val[:5])}); give both the "
                        "same class folder names")
    train, train_labels = split_files(root, "train", classes)
    test, test_labels = split_files(root, "val", classes)
    source = {"folder": str(root), "classes": len(classes), "train_files": len(train), "val_files": len(test),
              "listing_sha256": listing_digest(root, train + test),
              "checksum_of": "relative paths and byte sizes (file contents are not hashed)"}
    return FileDataset(root=str(root), train_files=np.array([p.encode() for p in train]),
                       train_labels=np.asarray(train_labels, dtype=np.int64),
                       test_files=np.array([p.encode() for p in test]),
                       test_labels=np.asarray(test_labels, dtype=np.int64), classes=tuple(classes),
                       source={**source, **fields.pop("source", {})}, **fields)
