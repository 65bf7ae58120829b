"""Data on the training device: the split, the batch order and the augmentation.

The whole split lives on the device as one tensor; a batch is drawn with one
index and augmented with one batched gather, so there are no DataLoader
workers and no per-image Python.  Every random number comes from a CPU
generator seeded by :func:`stream_seed` ``(seed, stream, epoch)`` and is then
moved to the device: CPU and CUDA runs see the same draws, and resuming at
an epoch needs no saved RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hpa.experiments.types import Dataset, Recipe

# Stream identifiers: fixed forever, so a seed means the same draws in every hpa version.
STREAMS = {"split": 1, "init": 2, "shuffle": 3, "augment": 4, "dropout": 5}


def stream_seed(seed: int, stream: str, epoch: int = 0) -> int:
    """A 63-bit seed for one random stream of one epoch, independent across streams and epochs."""
    state = np.random.SeedSequence([int(seed), STREAMS[stream], int(epoch)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(seed: int, stream: str, epoch: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, epoch))


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
        self.scale = 1 / 255 if dataset.train_images.dtype == np.uint8 else 1.0
        channels = dataset.train_images.shape[1]
        self.mean = _per_channel(dataset.mean, channels, device)
        self.std = _per_channel(dataset.std, channels, device)

    def _split(self, images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(images)).to(self.device),
                     torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device))

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw stored pixels -> the network's input: scale to [0, 1], subtract mean, divide by std."""
        return self.standardise(raw.float() * self.scale)

    def standardise(self, unit: torch.Tensor) -> torch.Tensor:
        """Pixels in the [0, 1] scale -> the network's input (the run's per-channel mean and std)."""
        return (unit - self.mean) / self.std

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


def _part_bounds(length: int, world: int, rank: int) -> tuple[int, int]:
    """(start, stop) of ``rank``'s rows when ``length`` rows are split as ``tensor_split`` does."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def augment_draws(batch: int, shift: int, flip: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(dy, dx, flips) of a ``batch``-image batch, drawn from ``gen`` in a fixed order (CPU tensors)."""
    dy = torch.randint(0, 2 * shift + 1, (batch,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (batch,), generator=gen)
    flips = torch.rand(batch, generator=gen) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    return dy, dx, flips


def augment(images: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Flip about half of the images, then shift each by up to ±``shift`` pixels (zero fill), in one gather.

    ``images`` is a float batch (B, C, H, W) in [0, 1] (before normalisation, so the fill is black).
    The random draws come from the CPU generator ``gen`` in a fixed order (:func:`augment_draws`).
    """
    return shift_and_flip(images, shift, augment_draws(len(images), shift, flip, gen))


def shift_and_flip(images: torch.Tensor, shift: int, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """:func:`augment` with given draws (one row of ``draws`` per image)."""
    batch, _, height, width = images.shape
    dy, dx, flips = draws
    if shift == 0 and not bool(flips.any()):
        return images
    device = images.device
    dy, dx, flips = dy.to(device), dx.to(device), flips.to(device)
    padded = F.pad(images, (shift, shift, shift, shift))
    rows = dy[:, None] + torch.arange(height, device=device)  # (B, H) rows of the padded image
    columns = torch.arange(width, device=device).expand(batch, width)
    # Flip first, then shift: a flipped image's column w is the original's W-1-w, so its shift
    # by dx - shift reads padded column (W-1-w) + (2*shift - dx).
    dx = torch.where(flips, 2 * shift - dx, dx)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + dx[:, None]  # (B, W)
    # One flat gather: offset of (image, row, column) in the padded batch, plus each channel's plane.
    plane_rows, plane_cols = padded.shape[2], padded.shape[3]
    image_offset = torch.arange(batch, device=device) * (padded.shape[1] * plane_rows * plane_cols)
    pixel = image_offset[:, None, None] + rows[:, :, None] * plane_cols + columns[:, None, :]  # (B, H, W)
    channel = torch.arange(padded.shape[1], device=device) * (plane_rows * plane_cols)
    return padded.reshape(-1)[pixel[:, None] + channel[None, :, None, None]]


def _per_channel(values, channels: int, device) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} normalisation values for {channels} channels")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, channels, 1, 1)
