"""Data on the training device: the split, the batch order and the one normalisation; and the
data a run trains on (:func:`dataset_as_trained`: its noise applied, its normalisation resolved).

The whole split lives on the device as one tensor; a batch is drawn with one
index and augmented with one batched gather (``hpa.experiments.augment``), so
there are no DataLoader workers and no per-image Python.  Every random number comes from a CPU
generator seeded by :func:`stream_seed` ``(seed, stream, epoch)`` and is then
moved to the device: CPU and CUDA runs see the same draws, and resuming at
an epoch needs no saved RNG state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from hpa.errors import OptionError
from hpa.experiments.noise import NoisyData, channel_moments, corrupt_dataset
from hpa.experiments.rng import generator, stream_seed
from hpa.experiments.types import Dataset, Recipe


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``fraction`` of each class held out, seeded, sorted."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng(stream_seed(seed, "split"))
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        held.append(rng.permutation(members)[:count])
    validation = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train, validation


class Normalisation:
    """The one normalisation: stored pixels -> [0, 1] (uint8 / 255) -> per channel (x - mean) / std.

    ``dataset.mean`` and ``dataset.std`` are the run's (:func:`pixel_normalisation`, in run.json's
    ``normalisation``); ``images`` (default the training images) gives the stored dtype and channels.
    """

    def __init__(self, dataset: Dataset, device, images: np.ndarray | None = None) -> None:
        images = dataset.train_images if images is None else images
        self.scale = 1 / 255 if images.dtype == np.uint8 else 1.0
        channels = images.shape[1]
        self.mean = _per_channel(dataset.mean, channels, device)
        self.std = _per_channel(dataset.std, channels, device)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw stored pixels -> the network's input: scale to [0, 1], subtract mean, divide by std."""
        return self.standardise(self.unit(raw))

    def unit(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw stored pixels in the [0, 1] scale (what the augmentation shifts and flips)."""
        return raw.float() * self.scale

    def standardise(self, unit: torch.Tensor) -> torch.Tensor:
        """Pixels in the [0, 1] scale -> the network's input (the run's per-channel mean and std)."""
        return (unit - self.mean) / self.std


@dataclass
class Split:
    """One split on the device: raw images (as stored) and labels."""

    images: torch.Tensor  # (N, C, H, W) uint8 or float32, on the device
    labels: torch.Tensor  # (N,) int64, on the device

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DeviceData:
    """The train, validation and test splits of a Dataset, resident on ``device``.

    With ``shard=(rank, world)`` (one process of a distributed run) the training split stays
    on the host and each epoch only this rank's part of every global batch is moved to the
    device: the global batches are those of a single process, each rank holds one
    ``tensor_split`` slice of each.
    """

    def __init__(self, dataset: Dataset, recipe: Recipe, seed: int, device: torch.device,
                 shard: tuple[int, int] | None = None, train_labels: np.ndarray | None = None,
                 train_orders: np.ndarray | None = None) -> None:
        # train_labels (label noise): the labels to train on, aligned with dataset.train_labels.  The
        # split is drawn from the stored labels, so validation keeps them and the split never moves.
        # train_orders (pixel noise after augmentation, hpa.experiments.noise.NoisyData): one pixel order
        # for every training image, or one per stored training image.
        train_idx, val_idx = stratified_split(dataset.train_labels, recipe.validation, seed)
        self.device = device
        self.shard = shard
        trained_on = dataset.train_labels if train_labels is None else train_labels
        images, labels = dataset.train_images[train_idx], trained_on[train_idx]
        if shard is None:
            self.train = self._split(images, labels)
        else:  # host tensors: a rank's epoch shard is gathered from them (see train_batches)
            self.train = Split(torch.from_numpy(np.ascontiguousarray(images)),
                               torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        self.orders = None
        if train_orders is not None:
            rows = train_orders if train_orders.ndim == 1 else train_orders[train_idx]
            self.orders = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        self.validation = self._split(dataset.train_images[val_idx], dataset.train_labels[val_idx])
        self.test = self._split(dataset.test_images, dataset.test_labels)
        self.normalisation = Normalisation(dataset, device)

    def _split(self, images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(images)).to(self.device),
                     torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device))

    def permute_pixels(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The pixel noise that follows augmentation: training images ``index`` with their fixed orders."""
        if self.orders is None:
            return images
        batch, channels = images.shape[:2]
        flat = images.reshape(batch, channels, -1)
        if self.orders.ndim == 1:
            return flat[:, :, self.orders.long()].reshape(images.shape)
        order = self.orders[index.to(self.orders.device)].long()
        return flat.gather(2, order[:, None, :].expand(-1, channels, -1)).reshape(images.shape)

    def batch_order(self, seed: int, epoch: int, batch_size: int, device=None) -> list[torch.Tensor]:
        """The epoch's global training batches as index tensors on ``device`` (default: the data's).

        The last batch may be smaller.
        """
        order = torch.randperm(len(self.train), generator=generator(seed, "shuffle", epoch))
        return list(order.to(device or self.device).split(batch_size))

    def train_batches(self, seed: int, epoch: int, batch_size: int):
        """Yield ``Batch``es of this process's part of every global batch of ``epoch``, on the device."""
        if self.shard is None:
            for index in self.batch_order(seed, epoch, batch_size):
                yield Batch(self.train.images[index], self.train.labels[index], len(index), slice(None), index)
            return
        rank, world = self.shard
        order = self.batch_order(seed, epoch, batch_size, device="cpu")
        parts = [index.tensor_split(world)[rank] for index in order]
        # One host gather and one transfer per epoch: the rank's shard, in batch order.
        mine = torch.cat(parts)
        images = self.train.images[mine].to(self.device)
        labels = self.train.labels[mine].to(self.device)
        start = 0
        for index, part in zip(order, parts):
            offsets = _part_bounds(len(index), world, rank)
            yield Batch(images[start:start + len(part)], labels[start:start + len(part)], len(index),
                        slice(*offsets), part)
            start += len(part)


@dataclass
class Batch:
    """This process's rows of one global training batch."""

    images: torch.Tensor  # raw stored pixels, on the device
    labels: torch.Tensor
    total: int  # rows of the global batch (all processes together)
    part: slice  # which rows of the global batch these are (for the augmentation draws)
    index: torch.Tensor  # the rows' positions in the training split (for per-image pixel noise)
    augmented: bool = False  # True: images are the network's augmented uint8 input (the streaming path)


def _part_bounds(length: int, world: int, rank: int) -> tuple[int, int]:
    """(start, stop) of ``rank``'s rows when ``length`` rows are split as ``tensor_split`` does."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _per_channel(values, channels: int, device) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} normalisation values for {channels} channels")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, channels, 1, 1)


# -- the data a run trains on ------------------------------------------------------------------------

def dataset_as_trained(dataset: Dataset, config) -> NoisyData:
    """``dataset`` as ``config`` trains on it: its noise applied, its normalisation resolved.

    Returns :class:`hpa.experiments.noise.NoisyData`, whose dataset's ``mean`` and ``std`` are
    the per-channel values the network's input is normalised with (``recipe.pixels``).  Labels are
    corrupted on the training part of the seeded validation split only; pixels as ``config.noise``
    says.  Deterministic, so a resumed run (or ``hpa reinit``) rebuilds exactly the data the run saw.
    """
    train_index, _ = stratified_split(dataset.train_labels, config.recipe.validation, config.seed)
    if len(train_index) == 0:
        raise OptionError(f"--validation {config.recipe.validation} holds out all {len(dataset.train_labels)} "
                          "training images, so none is left to train on; choose a smaller fraction")
    seed = config.seed if config.noise.noise_seed is None else config.noise.noise_seed
    noisy = corrupt_dataset(dataset, config.noise, train_index, seed)
    mean, std = pixel_normalisation(dataset, config.recipe.pixels, train_index)
    return dataclasses.replace(noisy, dataset=dataclasses.replace(noisy.dataset, mean=mean, std=std))


def pixel_normalisation(dataset, pixels: str, train_index) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in the [0, 1] scale of the stored pixels, for ``pixels`` (types.PIXELS).

    "standardised" measures the stored images of the training part (the validation images are
    held out of it); the clean images, so a corruption that keeps the channel moments keeps them.
    """
    if pixels == "symmetric":
        return (0.5,), (0.5,)
    if pixels == "unit":
        return (0.0,), (1.0,)
    if pixels == "dataset":
        return tuple(map(float, dataset.mean)), tuple(map(float, dataset.std))
    scale = 1 / 255 if dataset.train_images.dtype.name == "uint8" else 1.0
    mean, std = channel_moments(dataset.train_images[train_index])
    if not all(value > 0 for value in std):
        raise OptionError("--pixels standardised needs pixels that vary in every channel, but a channel of the "
                          "training images is constant; choose --pixels symmetric or unit")
    return tuple(float(m * scale) for m in mean), tuple(float(v * scale) for v in std)
