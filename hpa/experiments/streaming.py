"""The streaming data path: a :class:`FileDataset`'s images decoded and transformed as training goes,
by ``torch.utils.data.DataLoader`` workers (torchvision's decoders and ``transforms.v2``), beside the
in-memory path of :mod:`hpa.experiments.data`; and which of the two a run takes.

The same guarantees as the in-memory path.  The batch order is the in-memory path's (the
"shuffle" stream of (seed, epoch)); each image's crop, flip and shift are drawn from its own
generator of (seed, epoch, stored index) (:func:`hpa.experiments.rng.sample_generator`), so no draw
depends on the number of workers, processes or the rank.  A rank's loader reads only its rows of
each global batch.  Workers return uint8 crops; scaling and normalisation happen on the device
(:class:`~hpa.experiments.data.Normalisation`).  Host memory holds the file list (one numpy bytes
array per split, shared by the workers) and the batches in flight, never the decoded set.

An image that cannot be decoded stops the run with one line naming it, or with
``skip_unreadable`` counts as a skipped sample: label :data:`SKIPPED_LABEL` (ignored by the loss and
the accuracy; its batch's loss stays divided by the batch's size, in every process), its path and
reason recorded in run.json's ``data.skipped``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpa.errors import LoadError, OptionError, TrainingError
from hpa.experiments.data import Batch, Normalisation, _part_bounds, pixel_normalisation
from hpa.experiments.data import stratified_split
from hpa.experiments.image_tree import unreadable_files
from hpa.experiments.rng import generator, sample_generator, stream_seed
from hpa.experiments.types import Dataset, FileDataset, Recipe

#: The label of a skipped image: cross_entropy's ignore_index, so it adds nothing to loss or accuracy.
SKIPPED_LABEL = -100
#: The random resized crop's aspect-ratio range (torchvision's default, as the authors' code used it).
RATIO = (3 / 4, 4 / 3)
#: Rows of one evaluation batch of streamed images (decoded crops, so far fewer than the in-memory path's).
EVAL_ROWS = 256
#: Environment variable: the memory budget in bytes that decides imagefolder's path (default: half of
#: the available host memory, and of the free GPU memory on CUDA).
BUDGET_VARIABLE = "HPA_MEMORY_BUDGET"


# -- which path -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Streamed:
    """The run's streamed dataset, with what the trainer reads of a Dataset (sizes, labels, source)."""

    files: FileDataset
    input_size: tuple[int, int, int]  # (C, H, W) of the network's input
    mean: tuple[float, ...]  # the run's normalisation (recipe.pixels resolved)
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return self.files.num_classes

    @property
    def train_labels(self) -> np.ndarray:
        return self.files.train_labels

    @property
    def test_labels(self) -> np.ndarray:
        return self.files.test_labels

    @property
    def source(self) -> dict[str, Any]:
        return self.files.source


@dataclass(frozen=True)
class TaskData:
    """What a run trains on: a Dataset (in memory) or a Streamed set, and run.json's ``data`` record."""

    dataset: Dataset | None
    streamed: Streamed | None
    record: dict[str, Any]


def training_data(task, data_dir, download: bool, config, device) -> TaskData:
    """The data of ``config``'s run of ``task``, on the path it takes (recorded, with why).

    Every refusal here is bad input, found before the run folder exists.
    """
    recipe = config.recipe
    path, why, files = choose_path(task, data_dir, recipe, device)
    if files is None:
        dataset, subset = class_subset(task.dataset(data_dir, download), recipe.classes, recipe.class_seed)
        return TaskData(dataset, None, {"path": "in-memory", "chosen_by": why, "classes": subset})
    if download:
        raise OptionError(f"the {task.name} task reads local files only and downloads nothing; leave out --download")
    _refuse_in_memory_only(config)
    files, subset = class_subset(files, recipe.classes, recipe.class_seed)
    files, skipped = _without_non_images(files, recipe.skip_unreadable)
    mean, std = pixel_normalisation(files, recipe.pixels, None)
    streamed = Streamed(files, input_size(files, recipe), mean, std)
    record = {"path": "streaming", "chosen_by": why, "classes": subset, "transforms": describe_views(recipe),
              "skipped": {"count": len(skipped), "files": skipped}}
    return TaskData(None, streamed, record)


def choose_path(task, data_dir, recipe: Recipe, device) -> tuple[str, str, FileDataset | None]:
    """(path, why, the task's files when streaming): the recipe's ``data_path``, else the task's choice."""
    cropping = recipe.crop is not None or recipe.resize is not None
    if task.files is None:
        if recipe.data_path == "streaming" or cropping:
            flag = "--data-path streaming" if recipe.data_path == "streaming" else "--crop and --resize"
            raise OptionError(f"the {task.name} task trains in memory only; leave out {flag}")
        return "in-memory", "the task's only path", None
    if recipe.data_path == "in-memory":
        if cropping:
            raise OptionError("--crop and --resize are transforms of the streaming path; leave them out with "
                              "--data-path in-memory")
        files = task.files(data_dir)  # checked (its layout), and refused when the task always streams
        if files.streaming_only:
            raise OptionError(f"the {task.name} task always streams its files; leave out --data-path in-memory")
        return "in-memory", "--data-path in-memory", None
    files = task.files(data_dir)
    if recipe.data_path == "streaming":
        return "streaming", "--data-path streaming", files
    if files.streaming_only:
        return "streaming", f"the {task.name} task always streams", files
    if cropping:
        return "streaming", "--crop/--resize (per-image transforms of the streaming path)", files
    decoded, differ = decoded_bytes(files)
    if differ:
        raise OptionError(f"the images of {files.root} differ in size ({differ}); give --crop N (and --resize N "
                          "for validation and test), or --recipe imagenet")
    budget = memory_budget(device)
    if decoded > budget:
        return "streaming", f"decoded, the images take {decoded / 2**30:.2f} GiB, over the memory budget of " \
                            f"{budget / 2**30:.2f} GiB", files
    return "in-memory", f"decoded, the images take {decoded / 2**30:.2f} GiB, within the memory budget of " \
                        f"{budget / 2**30:.2f} GiB", None


def decoded_bytes(files: FileDataset) -> tuple[int, str | None]:
    """(bytes of every image decoded to uint8 RGB, a note when two images differ in size), from headers only."""
    first, total = None, 0
    for split in (files.train_files, files.test_files):
        for rel in split:
            size = _header_size(files, rel)
            if first is None:
                first = (rel, size)
            elif size != first[1]:
                return total, f"{rel.decode()} is {size[0]}x{size[1]}, {first[0].decode()} {first[1][0]}x{first[1][1]}"
            total += files.channels * size[0] * size[1]
    return total, None


def _header_size(files: FileDataset, rel: bytes) -> tuple[int, int]:
    from PIL import Image

    path = os.path.join(files.root, rel.decode())
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as exc:  # PIL raises many kinds; the file is named either way
        raise LoadError(f"cannot read the image {path} ({type(exc).__name__}); remove or replace it") from None


def memory_budget(device) -> int:
    """Bytes the in-memory path may fill: $HPA_MEMORY_BUDGET, else half the available host memory (and half
    the free memory of a CUDA device)."""
    given = os.environ.get(BUDGET_VARIABLE)
    if given:
        try:
            return int(float(given))
        except ValueError:
            raise OptionError(f"${BUDGET_VARIABLE}={given!r} is not a number of bytes") from None
    budget = _available_host_memory() // 2
    device = torch.device(device)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    return budget


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _refuse_in_memory_only(config) -> None:
    """What the streaming path cannot do (yet): pixel and label noise, standardised pixels."""
    noise = config.noise
    if noise.label_noise or noise.pixel_corruption:
        raise OptionError("label and pixel noise need the in-memory path; leave out the noise flags, or choose "
                          "--data-path in-memory for a task that has it")
    if config.recipe.pixels == "standardised":
        raise OptionError("--pixels standardised measures the decoded training set, which the streaming path "
                          "never holds; choose --pixels dataset, symmetric or unit")


def class_subset(dataset, count: int | None, seed: int):
    """(``dataset`` restricted to ``count`` classes drawn by the "classes" stream of ``seed``, the record).

    The kept classes are relabelled 0..count-1 in their original order.  Works on a Dataset (arrays)
    and a FileDataset (files); ``count`` None keeps every class (record None).
    """
    if count is None:
        return dataset, None
    total = int(dataset.num_classes)
    if count > total:
        raise OptionError(f"--classes {count} is more than the task's {total} classes")
    rng = np.random.default_rng(stream_seed(seed, "classes"))
    chosen = np.sort(rng.choice(total, size=count, replace=False))
    relabel = np.full(total, -1, dtype=np.int64)
    relabel[chosen] = np.arange(count)
    train, test = np.isin(dataset.train_labels, chosen), np.isin(dataset.test_labels, chosen)
    names = dataset.classes if isinstance(dataset, FileDataset) else dataset.source.get("classes")
    record = {"count": count, "of": total, "class_seed": seed, "indices": chosen.tolist(),
              "names": None if names is None else [names[i] for i in chosen]}
    common = {"train_labels": relabel[dataset.train_labels[train]], "test_labels": relabel[dataset.test_labels[test]]}
    if isinstance(dataset, FileDataset):
        subset = dataclasses.replace(dataset, train_files=dataset.train_files[train],
                                     test_files=dataset.test_files[test],
                                     classes=tuple(dataset.classes[i] for i in chosen), **common)
    else:
        subset = dataclasses.replace(dataset, train_images=dataset.train_images[train],
                                     test_images=dataset.test_images[test], num_classes=count, **common)
    return subset, record


def _without_non_images(files: FileDataset, skip: bool) -> tuple[FileDataset, dict[str, str]]:
    """``files`` without those that are no image (headers checked); refused, or dropped and returned with skip."""
    root = os.fspath(files.root)
    found = {}
    for split in (files.train_files, files.test_files):
        found.update(unreadable_files(Path(root), [rel.decode() for rel in split]))
    if not found:
        return files, {}
    if not skip:
        rel, why = next(iter(found.items()))
        more = f" (and {len(found) - 1} more files)" if len(found) > 1 else ""
        raise LoadError(f"{os.path.join(root, rel)} {why}{more}; remove or replace it, or pass --skip-unreadable "
                        "to skip such files (each is recorded in run.json)")
    bad = {rel.encode() for rel in found}
    keep_train = np.array([rel not in bad for rel in files.train_files], dtype=bool)
    keep_test = np.array([rel not in bad for rel in files.test_files], dtype=bool)
    kept = dataclasses.replace(files, train_files=files.train_files[keep_train],
                               train_labels=files.train_labels[keep_train], test_files=files.test_files[keep_test],
                               test_labels=files.test_labels[keep_test])
    return kept, {os.path.join(root, rel): why for rel, why in found.items()}


def input_size(files: FileDataset, recipe: Recipe) -> tuple[int, int, int]:
    """(C, H, W) of the network's input: the crop, else the first training image's size (all must share it)."""
    if recipe.crop is not None:
        return files.channels, int(recipe.crop), int(recipe.crop)
    if recipe.resize is not None:
        raise OptionError("--resize needs --crop N: a resized image keeps its aspect ratio, so the batch needs "
                          "a crop of one size")
    width, height = _header_size(files, files.train_files[0])
    return files.channels, height, width


# -- the per-image transforms --------------------------------------------------------------------------

@dataclass(frozen=True)
class Views:
    """The training and evaluation transforms of one run, applied to one decoded uint8 (C, H, W) image."""

    size: tuple[int, int, int]  # (C, H, W) every view returns
    crop: int | None
    resize: int | None
    scale: tuple[float, float]
    flip: bool
    shift: int

    @classmethod
    def of(cls, recipe: Recipe, size: tuple[int, int, int]) -> Views:
        return cls(tuple(size), recipe.crop, recipe.resize, (recipe.scale_min, recipe.scale_max), bool(recipe.flip),
                   int(recipe.shift))

    def train(self, image: torch.Tensor, draws: torch.Generator) -> torch.Tensor:
        """Random resized crop (with a crop), then a flip, then a shift; the draws in this fixed order."""
        from torchvision.transforms.v2 import functional as F

        if self.crop is not None:
            top, left, height, width = crop_box(image.shape[-2], image.shape[-1], self.scale, RATIO, draws)
            image = F.resized_crop(image, top, left, height, width, [self.crop, self.crop], antialias=True)
        flipped = bool(torch.rand(1, generator=draws) < 0.5)
        if self.flip and flipped:
            image = F.horizontal_flip(image)
        if self.shift and tuple(image.shape) == self.size:
            dy, dx = (int(v) for v in torch.randint(0, 2 * self.shift + 1, (2,), generator=draws))
            padded = torch.nn.functional.pad(image, (self.shift,) * 4)
            image = padded[:, dy:dy + self.size[1], dx:dx + self.size[2]]
        return image

    def evaluate(self, image: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side (with a resize), then a centre crop (with a crop)."""
        from torchvision.transforms.v2 import functional as F

        if self.resize is not None:
            image = F.resize(image, [self.resize], antialias=True)
        if self.crop is not None:
            image = F.center_crop(image, [self.crop, self.crop])
        return image


def crop_box(height: int, width: int, scale, ratio, draws: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of ``scale`` of the area and aspect ratio in ``ratio``
    (log-uniform): up to ten tries, then the whole image cut to the nearest ratio in range, centred."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=draws))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=draws)))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=draws))
            left = int(torch.randint(0, width - w + 1, (1,), generator=draws))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def describe_views(recipe: Recipe) -> dict[str, Any]:
    """The transforms, as run.json records them (torchvision's names, this run's values)."""
    train = []
    if recipe.crop is not None:
        train.append(f"RandomResizedCrop({recipe.crop}, scale=({recipe.scale_min}, {recipe.scale_max}), "
                     f"ratio=(3/4, 4/3), antialias)")
    if recipe.flip:
        train.append("RandomHorizontalFlip(0.5)")
    if recipe.shift:
        train.append(f"shift up to ±{recipe.shift} pixels, zero fill")
    evaluation = ([f"Resize({recipe.resize}, antialias)"] if recipe.resize is not None else []) + \
                 ([f"CenterCrop({recipe.crop})"] if recipe.crop is not None else [])
    return {"decoder": "torchvision.io.decode_image (RGB)", "train": train, "evaluation": evaluation,
            "draws": "per image: a generator of (seed, epoch, stored index)"}


# -- the DataLoader ---------------------------------------------------------------------------------------

class Images(torch.utils.data.Dataset):
    """One split's image files; item ``(epoch, index)`` -> (uint8 image, label, problem or "").

    ``epoch`` None gives the evaluation view.  An image that cannot be decoded (or has the wrong size)
    comes back as zeros with :data:`SKIPPED_LABEL` and its problem; the main process decides.
    """

    def __init__(self, root: str, files: np.ndarray, labels: np.ndarray, seed: int, views: Views) -> None:
        self.root, self.files, self.labels, self.seed, self.views = root, files, labels, seed, views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int | None, int]):
        from torchvision.io import ImageReadMode, decode_image, read_file

        epoch, index = key
        path = os.path.join(self.root, self.files[index].decode())
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError) as exc:
            return self._failed(path, _reason(exc))
        if epoch is None:
            image = self.views.evaluate(image)
        else:
            image = self.views.train(image, sample_generator(self.seed, "augment", epoch, index))
        if tuple(image.shape) != self.views.size:
            _, height, width = self.views.size
            return self._failed(path, f"it is {image.shape[-1]}x{image.shape[-2]}, not {width}x{height} like the "
                                      "first image; give --crop N to crop every image to one size")
        return image, int(self.labels[index]), ""

    def _failed(self, path: str, reason: str):
        return torch.zeros(self.views.size, dtype=torch.uint8), SKIPPED_LABEL, f"{path}\0{reason}"


def _reason(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text.rsplit(", ", 1)[-1] if "csrc" in text else text  # torchvision prefixes its C++ source line


class _Batches:
    """The batch sampler of one loader: the index lists of the pass about to run (set before each pass)."""

    def __init__(self) -> None:
        self.batches = iter(())  # an iterable of index lists, consumed once

    def __iter__(self):
        return iter(self.batches)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a worker decodes one image at a time; the cores are the workers'


class _Loader:
    """A DataLoader over ``images`` whose batches are set per pass; its workers persist between passes."""

    def __init__(self, images: Images, workers: int, device: torch.device) -> None:
        self.sampler = _Batches()
        self.loader = torch.utils.data.DataLoader(images, batch_sampler=self.sampler, num_workers=workers,
                                                  persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                                  worker_init_fn=_one_thread if workers else None)

    def run(self, batches):
        self.sampler.batches = batches
        return iter(self.loader)


class _Rows:
    """The training split's positions (len() is what the loop counts)."""

    def __init__(self, index: np.ndarray) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)


class FileSplit:
    """A validation or test split of files; :meth:`batches` yields (uint8 images, labels) on the device."""

    def __init__(self, data: FileData, images: Images, index: np.ndarray) -> None:
        self.data, self.index = data, index
        self.labels = torch.from_numpy(np.asarray(images.labels[index], dtype=np.int64)).to(data.device)
        self._images = images
        self._loader = None

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, batch_size: int):
        if self._loader is None:
            self._loader = _Loader(self._images, self.data.workers, self.data.device)
        rows = min(batch_size, EVAL_ROWS)
        chunks = [self.index[start:start + rows] for start in range(0, len(self.index), rows)]
        for images, labels, problems in self._loader.run([[(None, int(i)) for i in chunk] for chunk in chunks]):
            self.data.check(problems)
            yield images.to(self.data.device, non_blocking=True), labels.to(self.data.device, non_blocking=True)


class FileData:
    """The train, validation and test splits of a Streamed set, read by DataLoader workers (DeviceData's
    interface: ``train``, ``validation``, ``test``, ``normalisation``, :meth:`train_batches`).

    With ``shard=(rank, world)`` each rank's loader reads only its ``tensor_split`` rows of every
    global batch, the batches of one process.
    """

    def __init__(self, streamed: Streamed, recipe: Recipe, seed: int, device: torch.device,
                 shard: tuple[int, int] | None = None, workers: int = 0, skip: bool = False) -> None:
        files = streamed.files
        self.size = tuple(streamed.input_size)
        self.device, self.shard, self.workers, self.skip = torch.device(device), shard, int(workers), skip
        train_index, val_index = stratified_split(files.train_labels, recipe.validation, seed)
        views = Views.of(recipe, streamed.input_size)
        train_images = Images(files.root, files.train_files, files.train_labels, seed, views)
        self.train = _Rows(train_index)
        self.validation = FileSplit(self, train_images, val_index)
        self.test = FileSplit(self, Images(files.root, files.test_files, files.test_labels, seed, views),
                              np.arange(len(files.test_files)))
        self._train_loader = _Loader(train_images, self.workers, self.device)
        stored = np.zeros((1, streamed.input_size[0], 1, 1), dtype=np.uint8)
        self.normalisation = Normalisation(streamed, self.device, images=stored)
        self.skipped: dict[str, str] = {}  # path -> reason, in this process, since the last take_skipped

    def batch_order(self, seed: int, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """The epoch's global batches as positions in the training split: the in-memory path's order."""
        return list(torch.randperm(len(self.train), generator=generator(seed, "shuffle", epoch)).split(batch_size))

    def train_batches(self, seed: int, epoch: int, batch_size: int):
        """Yield ``Batch``es (augmented uint8 images) of this process's rows of every global batch of ``epoch``."""
        rank, world = self.shard or (0, 1)
        order = self.batch_order(seed, epoch, batch_size)
        parts = [index.tensor_split(world)[rank] for index in order]
        positions = self.train.index
        # A generator: the loader takes the next index lists as it goes, so nothing of the size of the
        # training split but the order itself is held.
        loaded = self._train_loader.run([(epoch, int(positions[p])) for p in part.tolist()]
                                        for part in parts if len(part))
        for index, part in zip(order, parts):
            offsets = _part_bounds(len(index), world, rank)
            if not len(part):  # a last global batch smaller than the world: nothing for this rank
                empty = torch.zeros((0, *self.size), dtype=torch.uint8)
                yield Batch(empty.to(self.device), torch.zeros(0, dtype=torch.int64, device=self.device),
                            len(index), slice(*offsets), part, augmented=True)
                continue
            images, labels, problems = next(loaded)
            self.check(problems)
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                        len(index), slice(*offsets), part, augmented=True)

    def permute_pixels(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return images  # no pixel noise on the streaming path

    def check(self, problems) -> None:
        """Stop at an image that could not be used, or (skip_unreadable) note it and go on."""
        for problem in problems:
            if not problem:
                continue
            path, reason = problem.split("\0", 1)
            if not self.skip:
                raise TrainingError(f"cannot decode the image {path} ({reason}); remove or replace it, or pass "
                                    "--skip-unreadable to skip such files (each is recorded in run.json)")
            self.skipped[path] = reason

    def take_skipped(self) -> dict[str, str]:
        taken, self.skipped = self.skipped, {}
        return taken


def default_workers() -> int:
    """DataLoader workers per process: the usable cores (at most 8) shared among the local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
