"""``hpa.Tracker``: a run folder from the caller's own loop that never changes the training, read back by
hpa's own readers, against ``hpa train``'s series, and its bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hpa
from conftest import snapshot
from hpa.errors import HpaError, OptionError


class SmallNet(nn.Module):
    """Conv, BatchNorm (running statistics: the mode matters) and dropout (the global RNG matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _data():
    draws = torch.Generator().manual_seed(1)
    return torch.randn(48, 3, 8, 8, generator=draws), torch.randint(0, 4, (48,), generator=draws)


def _train(epochs: int, out=None, **tracker_options):
    """A plain loop that draws from every generator the caller owns: torch (shuffle, dropout), numpy, Python."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = SmallNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    images, labels = _data()
    tracker = None if out is None else hpa.Tracker(model, out=out, input_size=(3, 8, 8), figures=False,
                                                   **tracker_options)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(labels)).split(16):
            flip = np.random.rand() < 0.5  # numpy's global generator
            scale = 1 + random.random() / 10  # Python's
            x = images[batch].flip(3) if flip else images[batch]
            loss = nn.functional.cross_entropy(model(x * scale), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if tracker is not None:
            tracker.epoch(epoch, metrics={"train_loss": loss.item()})
    if tracker is not None:
        tracker.close()
    return model, optimizer


def _everything(model, optimizer):
    """What the training left: parameters, buffers, gradients, modes, optimizer state, every generator."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
            "modes": [m.training for m in model.modules()],
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_training_is_bit_identical_with_and_without_the_tracker(tmp_path):
    plain = _everything(*_train(3))
    tracked = _everything(*_train(3, out=tmp_path / "run"))
    assert _same(plain, tracked)
    # the comparison can fail: one more batch of training changes it
    model, optimizer = _train(4)
    assert not _same(plain, _everything(model, optimizer))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"


def test_the_run_folder_is_read_by_hpas_readers_and_holds_the_weights(tmp_path, run_hpa):
    out = tmp_path / "run"
    model, _ = _train(2, out=out)
    run = hpa.open_run(out)
    assert run.epochs() == [0, 1, 2]
    assert list(run.metrics["epoch"]) == [0, 1, 2] and run.metrics["train_loss"].notna().tolist() == [False, True, True]
    final = load_file(str(run.snapshots()[2]))
    assert final.keys() == model.state_dict().keys()
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    init = SmallNet().state_dict()  # the seeded construction: epoch 0 is the true initialisation
    assert all(torch.equal(load_file(str(run.snapshots()[0]))[k], v) for k, v in init.items())
    # n_l of the final conv weight, from the array: the fraction of filters whose sum is <= 0
    weight = final["features.3.weight"].double().reshape(8, -1)
    by_hand = float((weight.sum(1) <= 0).double().mean())
    rows = {(r["epoch"], r["layer"]): r for r in run.series.to_dict("records")}
    assert rows[(2, "features.3")]["projection.n_l"] == pytest.approx(by_hand)
    scanned = run_hpa("scan", f"run:{out}@2", "--json", "--stat", "projection")
    assert scanned.returncode == 0, scanned.stderr
    layers = {entry["name"]: entry for entry in json.loads(scanned.stdout)["layers"]}
    assert layers["features.3"]["statistics"]["projection"]["n_l"] == pytest.approx(by_hand)


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """hpa train, two epochs of digits, with --log tensorboard."""
    from hpa.experiments.train import train

    return train("digits", out=tmp_path_factory.mktemp("digits") / "run", epochs=2, device="cpu",
                 log=["tensorboard"])


def test_hpa_train_log_tensorboard_holds_series_and_metrics(trained_digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_digits / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    series = list(csv.DictReader(io.StringIO((trained_digits / "series.csv").read_text())))
    expected = {(f"hpa/projection/{row['layer']}/{column.split('.', 1)[1]}", int(row["epoch"])): float(cell)
                for row in series for column, cell in row.items() if "." in column and cell not in ("", "nan")}
    assert len(expected) > 3 * 5 * 5
    assert {key: logged.get(key) for key in expected} == pytest.approx(expected, rel=1e-6)
    metrics = [json.loads(line) for line in (trained_digits / "metrics.jsonl").read_text().splitlines()]
    for line in metrics:
        assert logged[("val_accuracy", line["epoch"])] == pytest.approx(line["val_accuracy"], rel=1e-6)
    assert logged[("train_loss", 2)] == pytest.approx(metrics[2]["train_loss"], rel=1e-6)
    assert ("train_loss", 0) not in logged  # epoch 0 has no training loss: nothing is made up


def test_tracker_and_hpa_train_give_the_same_series(trained_digits, tmp_path):
    """The same model, seed and recipe: hpa train's snapshots replayed through a tracker, epoch by epoch."""
    from hpa.experiments.model import build_model
    from hpa.experiments.config import config_from_record, get_task

    record = json.loads((trained_digits / "run.json").read_text())
    config = config_from_record(record)
    dataset = get_task("digits").dataset(None, False)
    model, _ = build_model(config.arch, dataset, config.seed, config.recipe.init, "digits", config.recipe.init_std)
    snapshots = sorted((trained_digits / "snapshots").glob("epoch-*.safetensors"))
    assert len(snapshots) == 3
    model.load_state_dict(load_file(str(snapshots[0])))
    with hpa.Tracker(model, out=tmp_path / "tracked", input_size=dataset.input_size, figures=False) as tracker:
        for epoch, path in enumerate(snapshots[1:], 1):
            model.load_state_dict(load_file(str(path)))
            tracker.epoch(epoch)
    ours = list(csv.DictReader(io.StringIO((tmp_path / "tracked" / "series.csv").read_text())))
    theirs = list(csv.DictReader(io.StringIO((trained_digits / "series.csv").read_text())))
    assert len(ours) == len(theirs) == 3 * 5
    assert ours == theirs


def test_epochs_left_out_every_and_the_metrics_lines(tmp_path):
    model = SmallNet()
    with hpa.Tracker(model, out=tmp_path / "run", input_size=(3, 8, 8), every=2, figures=False) as tracker:
        tracker.epoch(1, metrics={"acc": torch.tensor(0.5), "steps": 3})
        tracker.epoch(2)
        tracker.epoch(5, metrics={"acc": np.float32(0.75)})
        tracker.epoch(6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3, 4, 5, 6]
    assert [m["snapshot"] for m in lines] == ["snapshots/epoch-000.safetensors", None,
                                              "snapshots/epoch-002.safetensors", None, None, None,
                                              "snapshots/epoch-006.safetensors"]
    assert lines[3] == {"epoch": 3, "tracked": False, "snapshot": None} and lines[4]["tracked"] is False
    assert lines[1]["acc"] == 0.5 and lines[1]["steps"] == 3 and lines[5]["acc"] == 0.75
    assert hpa.open_run(tmp_path / "run").epochs() == [0, 2, 6]


def test_a_run_that_dies_without_close_is_incomplete_and_readable(tmp_path):
    out = tmp_path / "run"
    script = f"""
import torch, hpa
from torch import nn
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
tracker = hpa.Tracker(model, out={str(out)!r}, input_size=(1, 8, 8), figures=False)
with torch.no_grad():
    model[0].weight.add_(1.0)
tracker.epoch(1, metrics={{"loss": 1.5}})
raise RuntimeError("the caller's loop crashed")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "the caller's loop crashed" in proc.stderr
    run = hpa.open_run(out)
    assert run.record["status"] == "incomplete"
    assert run.epochs() == [0, 1] and run.metrics["loss"].tolist()[1] == 1.5
    assert float(run.graph(1)["0"].weight.mean() - run.graph(0)["0"].weight.mean()) == pytest.approx(1.0)


def test_a_with_block_that_raises_marks_the_run_incomplete(tmp_path):
    with pytest.raises(KeyError):
        with hpa.Tracker(SmallNet(), out=tmp_path / "run", input_size=(3, 8, 8), figures=False) as tracker:
            tracker.epoch(1)
            raise KeyError("boom")
    assert hpa.open_run(tmp_path / "run").record["status"] == "incomplete"
    assert hpa.open_run(tmp_path / "run").epochs() == [0, 1]


# -- bad input ------------------------------------------------------------------------------------

def test_a_module_without_conv_layers_is_refused_naming_what_it_holds(tmp_path):
    with pytest.raises(HpaError, match=r"no conv layers \(found: 2 linear layers\)"):
        hpa.Tracker(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), out=tmp_path / "run",
                    input_size=(1, 4))
    assert not (tmp_path / "run").exists()
    with pytest.raises(OptionError, match=r"^input_size= must be"):
        hpa.Tracker(SmallNet(), out=tmp_path / "run", input_size=(4,))


@pytest.mark.parametrize("existing", ["user_file", "hpa_run"])
def test_an_out_folder_that_holds_something_is_refused_and_left_alone(tmp_path, existing):
    out = tmp_path / "out"
    if existing == "user_file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        _train(1, out=out)
    before = snapshot(out)
    with pytest.raises(HpaError, match="already holds an hpa run" if existing == "hpa_run" else "holds notes.txt"):
        hpa.Tracker(SmallNet(), out=out, input_size=(3, 8, 8))
    assert snapshot(out) == before


def test_epoch_numbers_that_go_backwards_or_repeat_are_refused(tmp_path):
    with hpa.Tracker(SmallNet(), out=tmp_path / "run", input_size=(3, 8, 8), figures=False) as tracker:
        with pytest.raises(OptionError, match="epoch 0 is the initialisation"):
            tracker.epoch(0)
        tracker.epoch(2)
        for wrong in (2, 1):
            with pytest.raises(OptionError, match=r"go forward and epoch 2 is recorded already; pass 3"):
                tracker.epoch(wrong)
        for wrong in (2.5, "3", True):
            with pytest.raises(OptionError, match="whole epoch number"):
                tracker.epoch(wrong)
        with pytest.raises(OptionError, match="must be a number"):
            tracker.epoch(3, metrics={"loss": "low"})
        with pytest.raises(OptionError, match="hpa's own"):
            tracker.epoch(3, metrics={"snapshot": 1.0})
        tracker.epoch(3)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3]  # the refused calls left nothing behind


def test_a_nan_metric_is_recorded_as_null_and_warned_once(tmp_path):
    from hpa.errors import HpaWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hpa.Tracker(SmallNet(), out=tmp_path / "run", input_size=(3, 8, 8), figures=False) as tracker:
            tracker.epoch(1, metrics={"loss": float("nan"), "acc": 0.5})
            tracker.epoch(2, metrics={"loss": torch.tensor(float("inf")), "acc": 0.6})
    ours = [str(w.message) for w in caught if issubclass(w.category, HpaWarning)]
    assert ours == ["metrics['loss'] is nan at epoch 1; recorded as null (warned once)"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("loss", "absent") for m in lines[1:]] == [None, None]
    assert [m["acc"] for m in lines[1:]] == [0.5, 0.6]


def test_hpa_train_resume_and_hpa_reinit_refuse_a_tracker_run_in_one_line(tmp_path, run_hpa):
    from conftest import assert_bad_input

    _train(1, out=tmp_path / "run")
    assert_bad_input(run_hpa("train", "--resume", tmp_path / "run"), "hpa.Tracker", "your own training loop")
    assert_bad_input(run_hpa("reinit", tmp_path / "run"), "hpa.Tracker", "model=MODULE, evaluate=FUNCTION")


def test_reinit_of_a_tracker_run_with_the_callers_module_and_evaluation(tmp_path):
    out = tmp_path / "run"
    model, _ = _train(2, out=out)
    images, labels = _data()
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    def accuracy(module):
        return float((module(images).argmax(1) == labels).double().mean())

    result = hpa.reinit(out, model=model, evaluate=accuracy, epochs=[0])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the caller's module untouched
    # one cell by hand: the final model with features.0 (conv + folded BatchNorm's conv tensors) set to epoch 0
    init = load_file(str(out / "snapshots" / "epoch-000.safetensors"))
    by_hand = SmallNet()
    by_hand.load_state_dict(trained)
    by_hand.features[0].weight.data.copy_(init["features.0.weight"])
    by_hand.features[0].bias.data.copy_(init["features.0.bias"])
    with torch.no_grad():
        expected = accuracy(by_hand.eval())
    cells = {(row["layer"], row["epoch"]): row for row in result.rows}
    assert cells[("features.0", 0)]["accuracy"] == expected
    with torch.no_grad():
        assert result.trained["seed-0"]["accuracy"] == accuracy(_loaded(trained))
    with pytest.raises(hpa.HpaError, match="must return the test accuracy"):
        hpa.reinit(out, model=model, evaluate=lambda module: "good")
    drawn = hpa.reinit(out, model=model, evaluate=lambda module: (accuracy(module), 1.25), rerandomize=True,
                       draws=2)
    assert {row["loss"] for row in drawn.rows} == {1.25}  # the caller's loss, averaged over the draws
    assert all(0 <= row["accuracy"] <= 1 and row["epoch"] is None for row in drawn.rows)
    no_loss = hpa.reinit(out, model=model, evaluate=accuracy, rerandomize=True, draws=2)
    assert {row["loss"] for row in no_loss.rows} == {None}
    assert [row["accuracy"] for row in no_loss.rows] == [row["accuracy"] for row in drawn.rows]


def _loaded(state):
    model = SmallNet()
    model.load_state_dict(state)
    return model.eval()


_RANK = """
import os, sys, torch, torch.distributed as dist
from torch import nn
import hpa
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                                          nn.Linear(4 * 6 * 6, 3)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
draws = torch.Generator().manual_seed(rank)  # each rank its own rows
x, y = torch.randn(8, 1, 8, 8, generator=draws), torch.randint(0, 3, (8,), generator=draws)
with hpa.Tracker(model, out=sys.argv[1], input_size=(1, 8, 8), figures=False) as tracker:
    for epoch in (1, 2):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()  # gradients averaged over the ranks: every rank holds the same weights
        optimizer.step()
        tracker.epoch(epoch, metrics={"loss": loss.item()})
torch.save(model.module.state_dict(), f"{sys.argv[1]}-rank{rank}.pt")
dist.destroy_process_group()
"""


def test_under_ddp_every_rank_calls_it_and_rank_0_alone_writes(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    env = {**dict(__import__("os").environ), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(out)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)
        assert rank.returncode == 0, stderr
    run = hpa.open_run(out)
    assert run.record["status"] == "complete" and run.record["processes"] == 2 and run.epochs() == [0, 1, 2]
    final = load_file(str(run.snapshots()[2]))  # the unwrapped module's names, no "module." prefix
    for rank in (0, 1):
        state = torch.load(f"{out}-rank{rank}.pt")
        assert final.keys() == state.keys() and all(torch.equal(final[k], v) for k, v in state.items())
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3  # one line per epoch: rank 1 wrote none of its own


@pytest.mark.parametrize("failing, full", [(2, False), (4, False), (2, True)])  # 4: the failure surfaces in close()
def test_a_full_disk_warns_once_and_never_stops_or_changes_the_training(tmp_path, monkeypatch, failing, full):
    """The snapshot of epoch ``failing`` cannot be written; ``full``: nor anything after it (run.json too)."""
    import errno

    from hpa import files
    from hpa.errors import HpaWarning

    plain = _everything(*_train(4))
    write_new_file, refused = files._write_new_file, []

    def disk_full(path, data):  # hpa's own lowest write (its temp file), as a full disk fails it
        if f".epoch-{failing:03d}.safetensors." in path.name or (full and refused):
            refused.append(path.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_new_file(path, data)

    monkeypatch.setattr(files, "_write_new_file", disk_full)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracked = _everything(*_train(4, out=out))
    assert _same(plain, tracked)  # training ran all 4 epochs, bit for bit as without the tracker
    ours = [str(w.message) for w in caught if issubclass(w.category, HpaWarning)]
    assert len(ours) == 1 + full, ours
    assert f"stopped recording {out} at epoch {failing} (" in ours[0] and "No space left on device" in ours[0]
    assert "training goes on" in ours[0]
    run = hpa.open_run(out)
    if full:  # run.json could not be marked either: the second line says so, and it is not marked complete
        assert ours[1].startswith(f"hpa.Tracker could not mark {out / 'run.json'} failed")
        assert run.record["status"] == "running" and any(name.startswith(".run.json.") for name in refused)
    else:
        assert run.record["status"] == "failed" and "No space left on device" in run.record["failure"]
    before = list(range(failing))  # what was written before the failing epoch, and nothing after it
    assert run.epochs() == before and run.metrics["epoch"].tolist() == before
    assert sorted(set(run.series["epoch"])) == before and sorted(p.name for p in (out / "stats").glob("epoch-*")) == [
        f"epoch-{epoch:03d}.json" for epoch in before]
    assert [p.name for p in (out / "snapshots").iterdir() if p.name.startswith(".")] == []  # no temp file left
    one = load_file(str(run.snapshots()[1]))
    assert all(torch.equal(one[k], v) for k, v in _train(1)[0].state_dict().items())  # epoch 1's weights
