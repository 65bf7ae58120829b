"""``--plugin imagefolder``: classes are matched between train/ and val/ by name, never by count or position.

The README says class names are the sub-folder names, sorted, and must be the same in
both splits.  Each class here has its own colour, so a label that lands on another
class's images is visible pixel by pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import snapshot
from hpa.errors import HpaError

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200), "fox": (200, 200, 30)}


def write_tree(root: Path, train: dict[str, int], val: dict[str, int], colours=COLOURS) -> None:
    """``root/SPLIT/CLASS/NNN.png`` filled with ``colours[CLASS]`` (plus a little noise); ``train``/``val``: counts."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("val", val)):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colours[name]) + rng.integers(-20, 20, size=(8, 8, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i:03d}.png")


def colour_class(images: np.ndarray) -> list[str]:
    """The class each (N, 3, H, W) image was painted with, read back from its mean colour."""
    means = images.reshape(len(images), 3, -1).mean(axis=2)
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=float)
    return [names[int(np.argmin(((table - m) ** 2).sum(axis=1)))] for m in means]


def load(root: Path):
    from hpa.experiments.config import get_task

    return get_task("imagefolder").dataset(root, False)


def test_labels_name_the_same_class_in_train_and_val(tmp_path):
    # Equal counts everywhere, val's folders created in another order: only the names can pair them.
    write_tree(tmp_path, {"cat": 4, "dog": 4, "eel": 4}, {"eel": 4, "cat": 4, "dog": 4})
    dataset = load(tmp_path)
    classes = dataset.source["classes"]
    assert classes == ["cat", "dog", "eel"]  # sorted names, as documented
    for images, labels in ((dataset.train_images, dataset.train_labels), (dataset.test_images, dataset.test_labels)):
        assert [classes[label] for label in labels] == colour_class(images)


def test_counts_that_differ_per_class_do_not_move_labels(tmp_path):
    write_tree(tmp_path, {"cat": 2, "dog": 5, "eel": 3}, {"cat": 5, "dog": 3, "eel": 2})
    dataset = load(tmp_path)
    assert [dataset.source["classes"][label] for label in dataset.test_labels] == colour_class(dataset.test_images)
    assert np.bincount(dataset.test_labels).tolist() == [5, 3, 2]


@pytest.mark.parametrize("val", [
    {"cat": 4, "dog": 4, "fox": 4},  # one class renamed, every count the same
    {"cat": 4, "dog": 4},  # one class missing
    {"cat": 4, "dog": 4, "eel": 4, "fox": 4},  # one class more
])
def test_class_folders_that_differ_by_name_are_refused(tmp_path, val):
    write_tree(tmp_path, {"cat": 4, "dog": 4, "eel": 4}, val)
    with pytest.raises(HpaError, match="different class folders") as error:
        load(tmp_path)
    message = str(error.value)
    only_train = sorted({"cat", "dog", "eel"} - set(val)) or ["none"]
    only_val = sorted(set(val) - {"cat", "dog", "eel"}) or ["none"]
    assert f"only in train: {', '.join(only_train)}" in message and f"only in val: {', '.join(only_val)}" in message


def test_renamed_class_is_refused_through_the_cli_with_nothing_written(tmp_path, capsys):
    from hpa.cli import main

    data = tmp_path / "data"
    write_tree(data, {"cat": 3, "dog": 3}, {"cat": 3, "fox": 3})
    before = snapshot(data)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--plugin", "imagefolder", "--data", str(data), "--out", str(tmp_path / "run"),
              "--arch", "cifar:small_stride", "--epochs", "1", "--stat", "none"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "only in train: dog" in lines[0] and "only in val: fox" in lines[0]
    assert not (tmp_path / "run").exists() and snapshot(data) == before
