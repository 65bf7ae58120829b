"""``hpa train --plugin imagefolder --data PATH``: any ImageNet-style tree, read by torchvision;
``hpa train --plugin imagenet --data DIR``: ImageNet itself, always streamed.

``PATH/train/<class>/*.png|jpg`` and ``PATH/val/<class>/...`` (the test
split); class names are the sub-folder names, sorted, and must be the same in
both.  Every image is converted to RGB.  A tree of images of one size that fits
the memory budget is decoded once and trained in memory; images of any size
take the streaming path (hpa.experiments.streaming) with the recipe's crop
(``--crop N``, ``--resize N``, or ``--recipe imagenet``), as does a tree too
large for memory; ``--data-path`` chooses.

The imagenet task reads the layout torchvision's ``ImageNet`` and ``ImageFolder``
read (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, classes in sorted wnid
order, torchvision's class index), downloads nothing, and trains with the 2020
authors' ImageNet recipe (types.IMAGENET_AUGMENTATION; ImageNet's channel mean
and std).  The test split is val/; the validation split is held out of train/.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hpa import LoadError, hookimpl
from hpa.experiments import Dataset, Recipe, Task
from hpa.experiments.image_tree import image_tree
from hpa.experiments.types import IMAGENET_AUGMENTATION

#: ImageNet's per-channel mean and std (the authors' code and torchvision's ImageNet example).
IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_LAYOUT = ("put ImageNet's training images in DIR/train/<wnid>/*.JPEG and its validation images in "
                   "DIR/val/<wnid>/*.JPEG (the layout torchvision's ImageNet and ImageFolder read; hpa downloads "
                   "nothing)")
IMAGEFOLDER_LAYOUT = "an imagefolder tree holds DIR/train/<class>/*.jpg|png and DIR/val/<class>/..."


@hookimpl
def register_experiments(register):
    register(Task(name="imagefolder", dataset=load_imagefolder, architecture="cifar:vgg19", input_size=None,
                  recipe=Recipe(), files=imagefolder_files, present=_checked(imagefolder_files),
                  description="an ImageNet-style train/ + val/ folder tree of images (--data PATH)"))
    register(Task(name="imagenet", dataset=_imagenet_in_memory, architecture="cifar:alexnet",
                  input_size=(3, 224, 224), num_classes=1000, recipe=Recipe(**IMAGENET_AUGMENTATION),
                  files=imagenet_files, present=_checked(imagenet_files),
                  description="ImageNet (ILSVRC-2012) from DIR/train/<wnid>/ and DIR/val/<wnid>/, streamed; "
                              "nothing downloaded"))


def _checked(files):
    """Task.present of a tree: its layout checked (folders, classes, no empty class), nothing decoded."""
    def present(data_dir) -> None:
        files(data_dir)
    return present


def imagenet_files(data_dir):
    mean, std = IMAGENET_NORMALISATION
    return image_tree(data_dir, "imagenet", IMAGENET_LAYOUT, mean=mean, std=std, streaming_only=True,
                      source={"dataset": "ImageNet (torchvision.datasets.ImageNet layout)"})


def imagefolder_files(data_dir):
    return image_tree(data_dir, "imagefolder", IMAGEFOLDER_LAYOUT,
                      source={"dataset": "torchvision.datasets.ImageFolder layout"})


def _imagenet_in_memory(data_dir, download: bool) -> Dataset:
    raise LoadError("the imagenet task is read from its files as training goes (the streaming path); it has no "
                    "in-memory dataset")


def load_imagefolder(data_dir, download: bool) -> Dataset:
    import numpy as np

    if data_dir is None:
        raise LoadError("the imagefolder task needs --data PATH, a folder with train/ and val/ sub-folders")
    root = Path(data_dir).expanduser()
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise LoadError(f"{root} has no {'/ or '.join(missing)}/ folder; an imagefolder tree "
                        "holds train/<class>/... and val/<class>/...")
    train, test = _read(root / "train"), _read(root / "val")
    if train["classes"] != test["classes"]:  # by name: a label is the index of its folder's name in both
        only_train = sorted(set(train["classes"]) - set(test["classes"])) or ["none"]
        only_val = sorted(set(test["classes"]) - set(train["classes"])) or ["none"]
        raise LoadError(f"{root}/train and {root}/val have different class folders (only in train: "
                        f"{', '.join(only_train)}; only in val: {', '.join(only_val)}); give both the same "
                        "class folder names")
    if train["images"].shape[1:] != test["images"].shape[1:]:
        raise LoadError(f"images in {root}/val are not the size of those in {root}/train")
    source = {"dataset": "torchvision.datasets.ImageFolder", "folder": str(root), "classes": train["classes"],
              "sha256": {"train": train["sha256"], "val": test["sha256"]}}
    return Dataset(train["images"], train["labels"], test["images"], test["labels"],
                   num_classes=len(train["classes"]), source=source)


def _read(folder: Path) -> dict:
    """Images (N, 3, H, W) uint8, labels, classes and one sha256 over every file, in ImageFolder's order."""
    import numpy as np
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise LoadError(f"{folder} is not an image folder tree ({exc}); put images in {folder}/<class>/") from None
    digest = hashlib.sha256()
    images, size = [], None
    for path, _ in dataset.samples:
        digest.update(Path(path).relative_to(folder).as_posix().encode() + b"\0" + Path(path).read_bytes())
        try:
            image = dataset.loader(path)  # PIL, converted to RGB by torchvision
        except Exception as exc:
            raise LoadError(f"cannot read the image {path} ({type(exc).__name__}); remove or replace it") from None
        size = size or image.size
        if image.size != size:
            raise LoadError(f"{path} is {image.size[0]}x{image.size[1]} but the first image is "
                            f"{size[0]}x{size[1]}; resize the images to one size, or stream them with --crop N")
        images.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    if not images:
        raise LoadError(f"{folder} holds no images")
    return {"images": np.stack(images), "labels": np.asarray(dataset.targets, dtype=np.int64),
            "classes": list(dataset.classes), "sha256": digest.hexdigest()}
