"""``hpa train``: the digits science bar, every real dataset format, the run folder and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import assert_bad_input
from test_tasks import write_cifar, write_imagefolder, write_mnist


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_digits_learns_and_the_run_folder_records_everything(run_hpa, tmp_path):
    run = tmp_path / "digits"
    proc = run_hpa("train", "--plugin", "digits", "--epochs", "4", "--snapshot-every", "2", "--device", "cpu",
                   "--out", run)
    assert proc.returncode == 0, proc.stderr
    lines = metrics(run)
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3, 4]
    assert lines[0]["val_accuracy"] < 0.3  # an untrained net is near chance (0.1)
    assert lines[-1]["val_accuracy"] > 0.6 and lines[-1]["test_accuracy"] > 0.6
    assert len(proc.stderr.strip().splitlines()) == 5  # one plain progress line per epoch, stderr not a tty
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "epoch-000.safetensors", "epoch-002.safetensors", "epoch-004.safetensors"]
    assert [m["snapshot"] for m in lines] == ["snapshots/epoch-000.safetensors", None,
                                              "snapshots/epoch-002.safetensors", None,
                                              "snapshots/epoch-004.safetensors"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["config"]["recipe"]["epochs"] == 4 and record["config"]["recipe"]["momentum"] == 0.9
    assert record["config"]["arch"] == "cifar:small_max" and record["config"]["seed"] == 0
    assert record["split"]["n_train"] + record["split"]["n_validation"] == 1347
    assert record["command"].startswith("hpa train --plugin digits")
    assert "torch" in record["versions"] and record["dataset"]["name"] == "sklearn.datasets.load_digits"
    graph = json.loads((run / "graph.json").read_text())
    init = load_file(run / "snapshots" / "epoch-000.safetensors")
    assert {layer["name"] + ".weight" for layer in graph["layers"]} <= set(init)
    # Kaiming normal, fan-out mode: std sqrt(2 / (out * k * k)); zero biases.
    weight = init["features.3.weight"]
    assert abs(weight.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.05
    assert all(not init[k].any() for k in init if k.endswith(".bias"))
    final = load_file(run / "snapshots" / "epoch-004.safetensors")
    assert not np.array_equal(final["features.3.weight"], weight)


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    from hpa.experiments.train import train

    def final(seed, name):
        folder = train("digits", out=tmp_path / name, seed=seed, epochs=1, device="cpu")
        return (folder / "snapshots" / "epoch-001.safetensors").read_bytes()

    first = final(0, "a")
    assert final(0, "b") == first
    assert final(1, "c") != first


@pytest.mark.parametrize("task", ["cifar10", "mnist", "imagefolder"])
def test_one_epoch_from_real_format_fixtures(run_hpa, tmp_path, task):
    data = tmp_path / "data"
    if task == "cifar10":
        write_cifar(data)
        n_test = 40
    elif task == "mnist":
        write_mnist(data)
        n_test = 50
    else:
        write_imagefolder(data)
        n_test = 36
    run = tmp_path / "run"
    proc = run_hpa("train", "--plugin", task, "--data", data, "--arch", "cifar:small_max", "--epochs", "1",
                   "--device", "cpu", "--quiet", "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet
    last = metrics(run)[-1]
    assert last["epoch"] == 1 and np.isfinite(last["train_loss"])
    record = json.loads((run / "run.json").read_text())
    assert record["split"]["n_test"] == n_test
    assert record["dataset"]["folder"].startswith(str(data))


def test_a_foreign_out_folder_is_refused_naming_its_file_without_a_resume_hint(run_hpa, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    for seeds in ((), ("--seeds", "0,1")):
        line = assert_bad_input(run_hpa("train", "--plugin", "digits", *seeds, "--out", run), "notes.txt")
        assert "--resume" not in line  # it is not a run: there is nothing to resume
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_architecture_that_does_not_fit_the_task(run_hpa, tmp_path):
    assert_bad_input(run_hpa("train", "--plugin", "digits", "--arch", "cifar:vgg19_cifar", "--out", tmp_path / "r"),
                     "does not fit", "1x8x8")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,words", [("--schedule", "cosine", ("step", "exponential")),
                                              ("--epochs", "0", ("--epochs",)),
                                              ("--validation", "1.5", ("--validation",)),
                                              ("--device", "tpu9", ("--device",))])
def test_bad_recipe_values(run_hpa, tmp_path, flag, value, words):
    assert_bad_input(run_hpa("train", "--plugin", "digits", flag, value, "--out", tmp_path / "r"), *words)
    assert not (tmp_path / "r").exists()


def test_nan_loss_stops_keeps_finished_epochs_and_marks_the_run_failed(run_hpa, tmp_path):
    run = tmp_path / "run"
    proc = run_hpa("train", "--plugin", "digits", "--lr", "1e30", "--epochs", "3", "--device", "cpu", "--out", run)
    line = assert_bad_input(proc.__class__(proc.args, proc.returncode, proc.stdout,
                                           "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("epoch"))),
                            "loss became", "--lr")
    assert "epoch 1" in line
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "loss became" in record["failure"]
    assert [m["epoch"] for m in metrics(run)] == [0]
    assert (run / "snapshots" / "epoch-000.safetensors").exists()


def test_series_n_l_equals_numpy_on_the_saved_snapshot_and_moves_from_init(run_hpa, tmp_path):
    """The science bar: n_l in series.csv is c_i <= 0 counted straight from the snapshot file."""
    import csv

    run = tmp_path / "run"
    proc = run_hpa("train", "--plugin", "digits", "--epochs", "6", "--device", "cpu", "--quiet", "--out", run)
    assert proc.returncode == 0, proc.stderr
    with open(run / "series.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Linear layers are not analysed by default: their cells are empty (stats/*.json says why).
    n_l = {(int(r["epoch"]), r["layer"]): float(r["projection.n_l"]) for r in rows if r["projection.n_l"]}
    assert {epoch for epoch, _ in n_l} == set(range(7))
    graph = json.loads((run / "graph.json").read_text())
    # features.9 sees a 1x1 map (a fully-connected layer in disguise), which projection skips by default.
    convs = [layer for layer in graph["layers"] if layer["kind"] == "conv2d" and (0, layer["name"]) in n_l]
    assert len(convs) == 3
    for epoch in (0, 6):
        state = load_file(run / "snapshots" / f"epoch-{epoch:03d}.safetensors")
        for layer in convs:
            weight = state[layer["params"]["weight"]].reshape(layer["out_channels"], -1).astype(np.float64)
            live = np.linalg.norm(weight, axis=1) > 0
            expected = float(np.mean(weight[live].sum(axis=1) <= 0))  # the sign of c_i is that of sum(w_i)
            assert n_l[(epoch, layer["name"])] == pytest.approx(expected, abs=1e-12)
    later = [layer["name"] for layer in convs[1:]]
    assert max(n_l[(6, name)] - n_l[(0, name)] for name in later) > 0.1  # toward 1, as in Gamba et al. 2020
    stats = json.loads((run / "stats" / "epoch-006.json").read_text())
    assert stats["layers"][1]["statistics"]["projection"]["distance_from_init"]["relative_l2"] > 0


def test_seeds_run_in_sub_folders_with_a_mean_std_summary(run_hpa, tmp_path):
    import csv
    import shutil

    out = tmp_path / "runs"
    proc = run_hpa("train", "--plugin", "digits", "--epochs", "1", "--seeds", "0,1", "--device", "cpu", "--quiet",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr

    def series(folder):
        with open(folder / "series.csv", newline="") as handle:
            return {(r["epoch"], r["layer"]): r for r in csv.DictReader(handle)}

    first, second = series(out / "seed-0"), series(out / "seed-1")
    with open(out / "summary.csv", newline="") as handle:
        summary = {(r["epoch"], r["layer"]): r for r in csv.DictReader(handle)}
    key = ("1", "features.3")
    values = [float(first[key]["projection.n_l"]), float(second[key]["projection.n_l"])]
    assert float(summary[key]["projection.n_l.mean"]) == pytest.approx(np.mean(values))
    assert float(summary[key]["projection.n_l.std"]) == pytest.approx(np.std(values))
    assert first[key]["projection.n_l"] != second[key]["projection.n_l"] or \
        first[key]["projection.mean"] != second[key]["projection.mean"]  # the seeds differ
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert [m["n_seeds"] for m in metrics] == [2, 2]
    # --resume starts a seed that never ran, with the recorded configuration: same bytes as before.
    final = (out / "seed-1" / "snapshots" / "epoch-001.safetensors").read_bytes()
    shutil.rmtree(out / "seed-1")
    proc = run_hpa("train", "--resume", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "seed-1" / "snapshots" / "epoch-001.safetensors").read_bytes() == final


def test_unknown_or_unbuildable_architecture(run_hpa, tmp_path):
    assert_bad_input(run_hpa("train", "--plugin", "digits", "--arch", "cifar:small_mx", "--out", tmp_path / "r"),
                     "did you mean", "cifar:small_max")
    assert_bad_input(run_hpa("train", "--plugin", "digits", "--stat", "projektion", "--out", tmp_path / "r"),
                     "did you mean", "projection")
    assert not (tmp_path / "r").exists()
