"""hpa/experiments/rng.py: the one table of random streams, whose numbers are fixed forever."""

from __future__ import annotations

import numpy as np
import torch

from hpa.experiments.rng import STREAMS, generator, noise_generator, stream_seed


def test_stream_numbers_are_the_published_ones():
    # Changing one would change every run's draws: these are the numbers runs were trained with.
    assert STREAMS == {"split": 1, "init": 2, "shuffle": 3, "augment": 4, "dropout": 5, "classes": 6,
                       "labels": 1, "shuffle_pixels": 2, "random_pixels": 3, "gaussian": 4}


def test_the_trainer_streams_seed_by_seed_stream_and_epoch():
    state = np.random.SeedSequence([7, 4, 3]).generate_state(2, np.uint64)
    assert stream_seed(7, "augment", 3) == int(state[0] >> np.uint64(1))
    expected = torch.Generator().manual_seed(int(state[0] >> np.uint64(1))).initial_seed()
    assert generator(7, "augment", 3).initial_seed() == expected
    assert len({stream_seed(7, name, epoch) for name in ("split", "init", "shuffle", "augment", "dropout")
                for epoch in range(3)}) == 15


def test_the_noise_streams_seed_numpy_by_seed_stream_and_split():
    drawn = noise_generator(5, "random_pixels", 1).random(4)
    np.testing.assert_array_equal(drawn, np.random.default_rng(np.random.SeedSequence([5, 3, 1])).random(4))
