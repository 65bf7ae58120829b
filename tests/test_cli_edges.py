"""Both sides of every bound that hpa train, hpa reinit and hpa analyse-run check, through the real CLI.

A value just outside is one stderr line, exit 2, no traceback, and nothing written (the --out folder
is not created; a run folder is left byte for byte as it was).  A value exactly at the edge works.
The CLI runs in-process (``hpa.cli.main``, what the ``hpa`` script calls) to keep this cheap; the
network is the tiny one of test_recipe_fields behind its in-process loader, the data CIFAR batches.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import pytest

from conftest import snapshot
from test_recipe_fields import TinyLoader, write_distinct_cifar

ARCH = "tiny:net"


@pytest.fixture(scope="module")
def loader():
    from hpa import plugins

    plugins.register(TinyLoader(), "tiny-loader-edges")
    yield
    plugins.unregister("tiny-loader-edges")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_distinct_cifar(root, per_batch=8)  # labels 0..7, five images of each
    return root


@pytest.fixture
def hpa_cli(capsys, monkeypatch, loader):
    """Run ``hpa ARGS`` in this process; returns (exit status, stdout, stderr).  An exception that escapes
    main() (what a user sees as a traceback) fails the test."""
    from hpa.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own

    def run(*args) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as stopped:
            main([str(arg) for arg in args])
        out = capsys.readouterr()
        return stopped.value.code or 0, out.out, out.err

    return run


def assert_refused(result, *words: str) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def train_args(cifar, out, *extra):
    return ("train", "--plugin", "cifar10", "--data", cifar, "--arch", ARCH, "--device", "cpu", "--stat", "none",
            "--quiet", "--epochs", "1", "--out", out, *extra)


# -- hpa train: each bound, just outside ---------------------------------------------------------

OUTSIDE = [
    (("--epochs", "0"), "--epochs"), (("--batch-size", "0"), "--batch-size"), (("--step-epochs", "0"), "--step-epochs"),
    (("--lr", "0"), "--lr"), (("--lr", "-1e-9"), "--lr"), (("--lr", "inf"), "--lr"), (("--lr", "nan"), "--lr"),
    (("--momentum", "-0.001"), "--momentum"), (("--momentum", "inf"), "--momentum"),
    (("--weight-decay", "-1e-9"), "--weight-decay"), (("--weight-decay", "nan"), "--weight-decay"),
    (("--step-factor", "0"), "--step-factor"), (("--step-factor", "-0.5"), "--step-factor"),
    (("--gamma", "0"), "--gamma"), (("--gamma", "inf"), "--gamma"),
    (("--init", "normal", "--init-std", "0"), "--init-std"), (("--init-std", "inf"), "--init-std"),
    (("--validation", "-0.01"), "--validation"), (("--validation", "1"), "--validation"),
    (("--validation", "0.95"), "none is left"),  # round(0.95 * 5) = 5: every image of every class held out
    (("--shift", "-1"), "--shift"),
    (("--label-noise", "-0.01"), "--label-noise"), (("--label-noise", "1.01"), "--label-noise"),
    (("--label-noise-mode", "sometimes"), "uniform"), (("--shuffle-pixels", "--random-pixels"), "only one"),
    (("--random-labels", "--label-noise", "0.5"), "conflicts"),
    (("--schedule", "cosine"), "exponential"), (("--init", "he"), "kaiming_normal"), (("--pixels", "raw"), "symmetric"),
    (("--snapshot-every", "0"), "--snapshot-every"), (("--cpu-threads", "0"), "--cpu-threads"),
    (("--seed", "-1"), "--seed"), (("--noise-seed", "-1", "--label-noise", "0.5"), "--noise-seed"),
    (("--precision", "tf32"), "cuda"), (("--recipe", "papr"), "paper"),
]


@pytest.mark.parametrize("extra,words", OUTSIDE, ids=[" ".join(e) for e, _ in OUTSIDE])
def test_a_value_just_outside_its_bound_is_refused_before_anything_is_written(hpa_cli, cifar, tmp_path, extra, words):
    assert_refused(hpa_cli(*train_args(cifar, tmp_path / "run", *extra)), words)
    assert not (tmp_path / "run").exists()


def test_negative_seeds_are_refused_before_anything_is_written(hpa_cli, cifar, tmp_path):
    assert_refused(hpa_cli(*train_args(cifar, tmp_path / "runs"), "--seeds", "0,-1"), "--seeds")
    assert not (tmp_path / "runs").exists()


def test_values_exactly_at_their_bounds_train(hpa_cli, cifar, tmp_path):
    """epochs, batch size, step epochs, snapshot interval and threads 1; momentum, weight decay, shift,
    validation and label noise 0, label noise 1, seeds 0; a tiny positive rate, step factor and gamma."""
    edges = ("--batch-size", "1", "--step-epochs", "1", "--snapshot-every", "1", "--cpu-threads", "1",
             "--momentum", "0", "--weight-decay", "0", "--shift", "0", "--validation", "0", "--label-noise", "1.0",
             "--seed", "0", "--noise-seed", "0", "--lr", "1e-12", "--step-factor", "1e-9", "--gamma", "1e-9",
             "--init", "normal", "--init-std", "1e-6")
    code, _, err = hpa_cli(*train_args(cifar, tmp_path / "a", *edges))
    assert code == 0, err
    saved = json.loads((tmp_path / "a" / "run.json").read_text())
    assert saved["status"] == "complete" and saved["split"]["n_train"] == 40
    assert saved["config"]["noise"]["label_noise"] == 1.0 and saved["config"]["recipe"]["batch_size"] == 1
    # the largest fraction that leaves an image of each class: round(0.85 * 5) = 4 of 5 held out
    code, _, err = hpa_cli(*train_args(cifar, tmp_path / "b", "--validation", "0.85", "--label-noise", "0"))
    assert code == 0, err
    split = json.loads((tmp_path / "b" / "run.json").read_text())["split"]
    assert (split["n_train"], split["n_validation"]) == (8, 32)


@pytest.mark.parametrize("label,accepted", [(9, True), (10, False), (-1, False)])
def test_a_cifar_label_must_name_one_of_the_classes(hpa_cli, tmp_path, label, accepted):
    """CIFAR-10's meta file names 10 classes: label 9 is the last one, 10 and -1 are none."""
    root = tmp_path / "data"
    write_distinct_cifar(root, per_batch=8)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    entry = pickle.loads(batch.read_bytes())
    entry["labels"][2] = label
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    result = hpa_cli(*train_args(root, tmp_path / "run", "--validation", "0"))
    if accepted:
        assert result[0] == 0, result[2]
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    else:
        assert_refused(result, "data_batch_3", "10 classes")
        assert not (tmp_path / "run").exists()


# -- hpa reinit and hpa analyse-run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(loader, cifar, tmp_path_factory):
    from hpa.experiments.train import train

    return train("cifar10", out=tmp_path_factory.mktemp("runs") / "run", data=cifar, arch=ARCH, seed=0,
                 device="cpu", statistics=["none"], epochs=1, validation=0.0)


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


REINIT_OUTSIDE = [
    (("--rerandomize", "--draws", "0"), "--draws"), (("--epochs", "-1"), "--epochs"), (("--epochs", "x"), "--epochs"),
    (("--epochs", ","), "--epochs"), (("--epochs", "2"), "epoch 2 was not saved"),
    (("--rerandomize", "--epochs", "0"), "--epochs"), (("--rerandomize", "--seed", "-1"), "--seed"),
    (("--layer", "nope"), "nope"), (("--device", "tpu9"), "--device"),
]


@pytest.mark.parametrize("extra,words", REINIT_OUTSIDE, ids=[" ".join(e) for e, _ in REINIT_OUTSIDE])
def test_reinit_refuses_values_outside_their_bounds_and_writes_nothing(hpa_cli, run_copy, extra, words):
    before = snapshot(run_copy)
    assert_refused(hpa_cli("reinit", run_copy, "--quiet", *extra), words)
    assert snapshot(run_copy) == before  # no reinit/ folder, nothing changed


def test_reinit_at_its_edges_works(hpa_cli, run_copy):
    """--epochs 0 (the first saved checkpoint), --draws 1, --seed 0."""
    code, _, err = hpa_cli("reinit", run_copy, "--quiet", "--epochs", "0")
    assert code == 0, err
    saved = json.loads((run_copy / "reinit" / "reinit.json").read_text())
    assert saved["epochs"] == [0] and [cell["epoch"] for cell in saved["cells"]] == [0]
    code, _, err = hpa_cli("reinit", run_copy, "--quiet", "--rerandomize", "--draws", "1", "--seed", "0",
                           "--out", run_copy / "fresh")
    assert code == 0, err
    assert json.loads((run_copy / "fresh" / "reinit.json").read_text())["options"]["draws"] == 1


@pytest.mark.parametrize("args,words", [(("--stat", "projectoin"), "projection"), ((), "--stat")])
def test_analyse_run_refuses_an_unknown_statistic_and_writes_nothing(hpa_cli, run_copy, args, words):
    before = snapshot(run_copy)
    assert_refused(hpa_cli("analyse-run", run_copy, *args), words)
    assert snapshot(run_copy) == before


def test_analyse_run_refuses_a_folder_that_is_no_run(hpa_cli, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    before = snapshot(tmp_path / "notes")
    assert_refused(hpa_cli("analyse-run", tmp_path / "notes", "--stat", "projection"), "run.json")
    assert snapshot(tmp_path / "notes") == before
