"""Dashboards: a tracker's values in TensorBoard, W&B (offline) and MLflow (file store), read back with each
project's own reader and compared with series.csv, metrics.jsonl and the stats files; a failing one only warns."""

from __future__ import annotations

import csv
import io
import json
import struct
import warnings

import pytest
import torch
from torch import nn

import hpa


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB_PROJECT": "hpa-tests",
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _tracked_run(folder, log):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 4 * 4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    images, labels = torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))
    with hpa.Tracker(model, out=folder, input_size=(2, 6, 6), log=log, figures=False) as tracker:
        for epoch in (1, 2):
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tracker.epoch(epoch, metrics={"train_loss": loss.item(), "val_accuracy": 0.25 * epoch})
    return folder


def _expected(folder):
    """tag -> {epoch: value}: series.csv's statistics and metrics.jsonl's numbers, read with csv and json."""
    wanted: dict[str, dict[int, float]] = {}
    for row in csv.DictReader(io.StringIO((folder / "series.csv").read_text())):
        for column, cell in row.items():
            if "." in column and cell not in ("", "nan"):
                statistic, value = column.split(".", 1)
                wanted.setdefault(f"hpa/{statistic}/{row['layer']}/{value}", {})[int(row["epoch"])] = float(cell)
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key in ("train_loss", "val_accuracy"):
            if entry.get(key) is not None:
                wanted.setdefault(key, {})[entry["epoch"]] = entry[key]
    return wanted


def _cosines(folder, epoch: int, layer: str) -> list[float]:
    result = json.loads((folder / "stats" / f"epoch-{epoch:03d}.json").read_text())
    entry = next(e for e in result["layers"] if e["name"] == layer)
    return [c for c in entry["statistics"]["projection"]["cosines"] if c is not None]


def test_tensorboard_wandb_and_mlflow_hold_what_the_run_folder_holds(tmp_path, offline):
    folder = _tracked_run(tmp_path / "run", ["tensorboard", "wandb", "mlflow"])
    wanted = _expected(folder)
    assert "hpa/projection/0/n_l" in wanted and "hpa/projection/2/distance_from_init.relative_l2" in wanted
    assert sorted(wanted["hpa/projection/2/n_l"]) == [0, 1, 2] and sorted(wanted["train_loss"]) == [1, 2]

    tensorboard, histograms = _tensorboard(folder)
    assert _only(tensorboard, wanted) == pytest.approx(_flat(wanted), rel=1e-6)
    assert histograms[("hpa/projection/2/cosines", 2)] == (len(_cosines(folder, 2, "2")),
                                                           pytest.approx(sum(_cosines(folder, 2, "2"))))
    wandb_values, wandb_histograms = _wandb(folder)
    assert _only(wandb_values, wanted) == pytest.approx(_flat(wanted), rel=1e-9)
    assert sum(wandb_histograms[("hpa/projection/0/cosines", 1)]) == len(_cosines(folder, 1, "0"))
    assert _only(_mlflow(folder), wanted) == pytest.approx(_flat(wanted), rel=1e-9)


def _only(logged, wanted):
    """Flat {(tag, epoch): value} of ``logged`` at the keys of ``wanted`` (pytest.approx compares flat dicts)."""
    return {(tag, epoch): logged.get(tag, {}).get(epoch) for tag, epochs in wanted.items() for epoch in epochs}


def _flat(wanted):
    return {(tag, epoch): value for tag, epochs in wanted.items() for epoch, value in epochs.items()}


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        scalars[tag] = {event.step: event.value for event in events.Scalars(tag)}
    histograms = {(tag, event.step): (event.histogram_value.num, event.histogram_value.sum)
                  for tag in events.Tags()["histograms"] for event in events.Histograms(tag)}
    return scalars, histograms


def _wandb(folder):
    """The offline run's history records: wandb's own protobuf Record, in its LevelDB-log framed .wandb file."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    scalars: dict[str, dict[int, float]] = {}
    histograms = {}
    for raw in _leveldb_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = items["_step"]
        for key, value in items.items():
            if key.endswith("/_type") and value == "histogram":  # a histogram's fields come as KEY/_type, KEY/values
                histograms[(key[:-len("/_type")], step)] = items[key[:-len("_type")] + "values"]
            elif isinstance(value, (int, float)) and not key.startswith("_"):
                scalars.setdefault(key, {})[step] = value
    return scalars, histograms


def _leveldb_records(data: bytes):
    """W&B's transaction log: a 7-byte header, then LevelDB log blocks of 32 KiB (records FULL/FIRST/MIDDLE/LAST)."""
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's zero-padded tail
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            pieces = (b"" if kind == 2 else pieces) + chunk
        elif kind == 4:
            yield pieces + chunk


def _mlflow(folder):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("hpa").experiment_id])
    assert run.info.status == "FINISHED"
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}


def test_a_failing_logger_warns_once_and_training_goes_on(tmp_path, offline, monkeypatch):
    (tmp_path / "not-a-folder").write_text("a file where MLflow wants its store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "not-a-folder" / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = _tracked_run(tmp_path / "run", ["mlflow", "tensorboard"])
    failures = [str(w.message) for w in caught if "logger failed" in str(w.message)]
    assert len(failures) == 1 and failures[0].startswith("the mlflow logger failed")
    run = hpa.open_run(folder)
    assert run.record["status"] == "complete" and run.epochs() == [0, 1, 2]
    assert _only(_tensorboard(folder)[0], _expected(folder)) == pytest.approx(_flat(_expected(folder)), rel=1e-6)


def test_an_unknown_logger_or_a_missing_package_is_refused_before_anything_is_written(tmp_path):
    from hpa.errors import OptionError

    with pytest.raises(OptionError, match="unknown logger 'neptune'; choose from tensorboard, wandb, mlflow"):
        hpa.Tracker(nn.Conv2d(1, 2, 3), out=tmp_path / "run", input_size=(1, 5, 5), log=["neptune"])
    assert not (tmp_path / "run").exists()
