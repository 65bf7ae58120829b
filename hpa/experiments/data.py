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
    """The train, validation and test splits of a Dataset, resident on ``device``."""

    def __init__(self, dataset: Dataset, recipe: Recipe, seed: int, device: torch.device) -> None:
        train_idx, val_idx = stratified_split(dataset.train_labels, recipe.validation, seed)
        self.device = device
        self.train = self._split(dataset.train_images[train_idx], dataset.train_labels[train_idx])
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
        return (raw.float() * self.scale - self.mean) / self.std

    def batch_order(self, seed: int, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """The epoch's training batches as index tensors on the device (the last may be smaller)."""
        order = torch.randperm(len(self.train), generator=generator(seed, "shuffle", epoch))
        return list(order.to(self.device).split(batch_size))


def augment(images: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Flip about half of the images, then shift each by up to ±``shift`` pixels (zero fill), in one gather.

    ``images`` is a float batch (B, C, H, W) in [0, 1] (before normalisation, so the fill is black).
    The random draws come from the CPU generator ``gen`` in a fixed order.
    """
    batch, _, height, width = images.shape
    dy = torch.randint(0, 2 * shift + 1, (batch,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (batch,), generator=gen)
    flips = torch.rand(batch, generator=gen) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    if shift == 0 and not flip:
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
