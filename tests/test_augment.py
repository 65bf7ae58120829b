"""hpa/experiments/augment.py: the shift-and-flip gather against a per-image computation."""

from __future__ import annotations

import numpy as np
import torch

from hpa.experiments.augment import augment, epoch_draws, training_inputs
from hpa.experiments.data import DeviceData
from hpa.experiments.types import Dataset, Recipe


def test_augment_equals_a_per_image_shift_and_flip():
    images = torch.rand(16, 3, 6, 7)
    shift = 2
    out = augment(images, shift, True, torch.Generator().manual_seed(5))
    # The same draws, in augment's documented order, then an independent per-image computation.
    draws = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 2 * shift + 1, (16,), generator=draws)
    dx = torch.randint(0, 2 * shift + 1, (16,), generator=draws)
    flips = torch.rand(16, generator=draws) < 0.5
    for i in range(16):
        image = images[i].numpy()
        if flips[i]:
            image = image[:, :, ::-1]
        padded = np.pad(image, ((0, 0), (shift, shift), (shift, shift)))
        expected = padded[:, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7]
        np.testing.assert_array_equal(out[i].numpy(), expected)
    assert flips.any() and not flips.all()


def test_training_inputs_are_the_stored_pixels_flipped_shifted_permuted_and_normalised():
    """What the trainer feeds the network, against a per-image computation in the documented order."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 2, 5, 5), dtype=np.uint8)
    dataset = Dataset(images, np.arange(12) % 3, images[:2], np.arange(2) % 3, num_classes=3,
                      mean=(0.25, 0.5), std=(0.5, 0.25))
    orders = np.stack([rng.permutation(25) for _ in range(12)])  # pixel noise after augmentation, per image
    recipe = Recipe(shift=1, flip=True, validation=0.0, batch_size=5)
    data = DeviceData(dataset, recipe, 3, torch.device("cpu"), train_orders=orders)
    batches = list(data.train_batches(3, 2, recipe.batch_size))
    draws = epoch_draws(3, 2)
    seen = torch.cat([training_inputs(data, batch, recipe, draws) for batch in batches])
    expected_draws = epoch_draws(3, 2)  # the same stream, drawn again in the documented order
    expected = []
    for batch in batches:
        dy = torch.randint(0, 3, (batch.total,), generator=expected_draws)
        dx = torch.randint(0, 3, (batch.total,), generator=expected_draws)
        flips = torch.rand(batch.total, generator=expected_draws) < 0.5
        for row, position in enumerate(batch.index.tolist()):
            image = images[position].astype(np.float64) / 255
            image = image[:, :, ::-1] if flips[row] else image
            padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
            shifted = padded[:, dy[row]:dy[row] + 5, dx[row]:dx[row] + 5].reshape(2, -1)[:, orders[position]]
            normalised = (shifted.reshape(2, 5, 5) - np.array([0.25, 0.5])[:, None, None]) / \
                np.array([0.5, 0.25])[:, None, None]
            expected.append(normalised)
    np.testing.assert_allclose(seen.numpy(), np.stack(expected), rtol=0, atol=1e-5)
