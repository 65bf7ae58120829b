"""``hpa reinit`` on runs that did not train on a whole in-memory dataset: streamed runs (the imagenet
task, Gamba et al. 2020 Figs. 18 and 19) and runs on a seeded ``--classes`` subset.

Each sweep is checked against an independent evaluation: torchvision's own ``ImageFolder`` over the
val/ tree with ``transforms.v2`` (Resize, then CenterCrop), the recorded normalisation, and a model
with the checkpoint's layer copied in by hand; and against the trainer's own test evaluation, which
the trained model's accuracy and loss must equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_bad_input
from test_streaming import write_tree
from test_tasks import write_cifar

TRAIN = ("--arch", "cifar:small_max", "--crop", "16", "--resize", "20", "--batch-size", "8", "--device", "cpu",
         "--cpu-threads", "1", "--stat", "none", "--quiet", "--workers", "0", "--lr", "0.05")


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A streamed imagenet run of 3 epochs on a JPEG tree of mixed sizes, and its tree."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("streamed")
    tree = write_tree(root / "tree", per_class=8, val_per_class=3)
    run = root / "run"
    proc = subprocess.run([sys.executable, "-m", "hpa", "train", "--plugin", "imagenet", "--data", str(tree),
                           "--epochs", "3", "--out", str(run), *TRAIN], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run, tree


def _last_test(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return lines[-1]


def _reference_cells(run: Path, tree: Path, layer_keys: dict[str, list[str]], epoch: int) -> dict[str, tuple]:
    """(accuracy, loss) with each layer set to ``epoch``'s tensors: ImageFolder + transforms.v2, by hand."""
    from torchvision.datasets import ImageFolder
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    from hpa.experiments.model import build_model

    record = json.loads((run / "run.json").read_text())
    views = v2.Compose([v2.Resize(20, antialias=True), v2.CenterCrop(16)])
    val = ImageFolder(str(tree / "val"), loader=lambda path: decode_image(path, mode=ImageReadMode.RGB),
                      transform=views)
    images = torch.stack([image for image, _ in val]).float() / 255
    labels = torch.tensor(val.targets)
    mean = torch.tensor(record["normalisation"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(record["normalisation"]["std"]).view(1, 3, 1, 1)
    images = (images - mean) / std

    class Sizes:  # what build_model reads of a dataset
        num_classes, input_size = record["num_classes"], tuple(record["input_size"])

    model, _ = build_model(record["config"]["arch"], Sizes(), 0, "default", "imagenet")
    final = max(int(p.stem.split("-")[1]) for p in (run / "snapshots").glob("epoch-*.safetensors"))
    trained = load_file(str(run / "snapshots" / f"epoch-{final:03d}.safetensors"))
    old = load_file(str(run / "snapshots" / f"epoch-{epoch:03d}.safetensors"))
    out = {}
    model.eval()
    for layer, keys in [(None, [])] + list(layer_keys.items()):
        state = dict(trained)
        state.update({key: old[key] for key in keys})
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(images)
        out[layer] = (float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels)))
    return out


def _reinit(run_hpa, run: Path, out: Path, *extra, env=None) -> dict:
    proc = run_hpa("reinit", run, "--epochs", "0,3", "--out", out, "--workers", "0", *extra, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "reinit.json").read_text())


def test_a_streamed_run_is_swept_on_its_own_test_split(streamed, run_hpa, tmp_path):
    run, tree = streamed
    result = _reinit(run_hpa, run, tmp_path / "reinit")
    assert result["options"]["test_split"] == "streamed: 9 images decoded once, held on the device"
    trained = result["trained"]["seed-0"]
    last = _last_test(run)  # the trainer's own evaluation of the trained model
    assert trained["accuracy"] == last["test_accuracy"]
    assert trained["loss"] == pytest.approx(last["test_loss"], rel=1e-6)

    graph = json.loads((run / "graph.json").read_text())
    keys = {layer["name"]: [layer["params"][role] for role in ("weight", "bias") if role in layer["params"]]
            for layer in graph["layers"] if layer["kind"].startswith("conv")}
    assert result["layers"] == list(keys)
    reference = _reference_cells(run, tree, keys, 0)
    assert reference[None][0] == pytest.approx(trained["accuracy"]) and \
        reference[None][1] == pytest.approx(trained["loss"], rel=1e-4)
    cells = {cell["layer"]: cell for cell in result["cells"] if cell["epoch"] == 0}
    for layer in keys:
        assert cells[layer]["accuracy"] == pytest.approx(reference[layer][0]), layer
        assert cells[layer]["loss"] == pytest.approx(reference[layer][1], rel=1e-4), layer
    assert len({round(cell["loss"], 6) for cell in cells.values()}) > 1  # the layers' resets differ


def test_over_the_memory_budget_the_test_split_is_read_again_for_each_cell_with_the_same_numbers(
        streamed, run_hpa, tmp_path):
    run, _ = streamed
    held = _reinit(run_hpa, run, tmp_path / "held")
    read = _reinit(run_hpa, run, tmp_path / "read", env={"HPA_MEMORY_BUDGET": "1000"})
    assert read["options"]["test_split"].startswith("streamed: 9 images read again for every cell")
    assert read["cells"] == held["cells"] and read["trained"] == held["trained"]


def test_a_class_subset_run_is_swept_on_the_subsets_test_images(tmp_path, run_hpa):
    write_cifar(tmp_path / "data", per_batch=12)
    run = tmp_path / "run"
    proc = run_hpa("train", "--plugin", "cifar10", "--data", tmp_path / "data", "--arch", "cifar:small_max",
                   "--classes", "3", "--class-seed", "1", "--epochs", "2", "--batch-size", "16", "--cpu-threads", "1",
                   "--stat", "none", "--quiet", "--out", run)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["num_classes"] == 3 and record["split"]["n_test"] < 12
    result = _reinit(run_hpa, run, tmp_path / "reinit", "--epochs", "0")
    last = _last_test(run)
    assert result["options"]["test_split"] == "in memory"
    assert result["trained"]["seed-0"]["accuracy"] == last["test_accuracy"]
    assert result["trained"]["seed-0"]["loss"] == pytest.approx(last["test_loss"], rel=1e-6)


def test_data_that_draws_other_classes_is_refused(tmp_path, run_hpa):
    classes = tuple(f"n{i:08d}" for i in range(5))
    tree = write_tree(tmp_path / "tree", per_class=3, val_per_class=1, classes=classes)
    run = tmp_path / "run"
    proc = run_hpa("train", "--plugin", "imagenet", "--data", tree, "--classes", "2", "--epochs", "1", "--out", run,
                   *TRAIN)
    assert proc.returncode == 0, proc.stderr
    other = write_tree(tmp_path / "other", per_class=3, val_per_class=1, classes=classes[:4])
    out = tmp_path / "reinit"
    assert_bad_input(run_hpa("reinit", run, "--data", other, "--out", out), "other classes than the run trained on")
    assert not out.exists()


def test_reinit_workers_must_not_be_negative(streamed, run_hpa, tmp_path):
    run, _ = streamed
    assert_bad_input(run_hpa("reinit", run, "--workers", "-1", "--out", tmp_path / "o"), "--workers")
    assert not (tmp_path / "o").exists()
