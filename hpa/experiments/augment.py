"""The augmentation the trainer runs, in one place: its random draws, the batched shift-and-flip
gather, and the composition of one training batch's input (:func:`training_inputs`).

Per batch: the stored pixels in [0, 1]; flipped and shifted (zero fill, so black); then the pixel
noise that follows augmentation (``pixel_noise_order="augment_then_permute"``); then the run's
normalisation.  Every process of a distributed run draws the global batch's augmentation and
keeps its rows, so the draws never depend on the number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpa.experiments.data import Batch, DeviceData
from hpa.experiments.rng import generator
from hpa.experiments.types import Recipe


def epoch_draws(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's augmentation draws (the "augment" stream)."""
    return generator(seed, "augment", epoch)


def training_inputs(data: DeviceData, batch: Batch, recipe: Recipe, draws: torch.Generator) -> torch.Tensor:
    """The network's input for ``batch``: shifted and flipped by ``recipe``, pixel noise, normalised."""
    if batch.augmented:  # the streaming path's workers augmented each image already
        return data.normalisation(batch.images)
    rows = [d[batch.part] for d in augment_draws(batch.total, recipe.shift, recipe.flip, draws)]
    shifted = shift_and_flip(data.normalisation.unit(batch.images), recipe.shift, rows)
    return data.normalisation.standardise(data.permute_pixels(shifted, batch.index))


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
