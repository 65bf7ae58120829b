"""``hpa train --plugin digits``: scikit-learn's 8x8 digits, shipped inside scikit-learn (offline).

The 1797 images are split once into a fixed stratified 75 % / 25 % train/test
split (``random_state=0``, the split the zoo models were trained on); the
trainer then holds out its seeded validation fraction from the 75 %.
Pixels 0..16 become float32 in [0, 1].  The default recipe is Gamba et al. 2020's,
scaled to 8x8 images: shifts of ±1 pixel (4/32 of the side, as ±4 on 32x32),
no flips (a mirrored digit is another symbol), and the zoo's 30 epochs of
batches of 64 at learning rate 0.05 (1211 training images make only 10
batches of 128 per epoch), with the step decay every 10 epochs.  The default
architecture is Milisavljevic's (Exploring Convolutional Networks) small CNN with max pooling.
"""

from __future__ import annotations

import hashlib

from hpa import hookimpl
from hpa.experiments import Dataset, Recipe, Task

TEST_SIZE = 0.25
SPLIT_SEED = 0


@hookimpl
def register_experiments(register):
    register(Task(
        name="digits", dataset=load_digits_dataset, architecture="cifar:small_max", input_size=(1, 8, 8),
        num_classes=10, recipe=Recipe(epochs=30, batch_size=64, lr=0.05, step_epochs=10, shift=1, flip=False),
        description="scikit-learn's 8x8 digits (1797 images, 10 classes); offline",
    ))


def load_digits_dataset(data_dir, download: bool) -> Dataset:
    """The digits as a Dataset; ``data_dir`` and ``download`` do not apply (the data ships with sklearn)."""
    import numpy as np
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=TEST_SIZE,
                                                        random_state=SPLIT_SEED, stratify=labels)
    source = {
        "name": "sklearn.datasets.load_digits", "version": sklearn.__version__,
        "sha256": hashlib.sha256(digits.images.tobytes() + digits.target.tobytes()).hexdigest(),
        "test_split": {"function": "sklearn.model_selection.train_test_split", "test_size": TEST_SIZE,
                       "random_state": SPLIT_SEED, "stratify": "target"},
    }
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, source=source)
