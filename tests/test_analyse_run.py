"""hpa/experiments/analyse_run.py: ``hpa analyse-run`` over a finished run's snapshots."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file

import hpa
from test_open_run import EPOCHS, _train, numpy_n_l


def test_analyse_run_gives_what_training_with_the_statistic_gives(tmp_path, run_hpa):
    with_stats = _train(tmp_path / "with", statistics=("projection",))
    without = _train(tmp_path / "without", statistics=("none",))
    assert not (without / "series.csv").exists()
    proc = run_hpa("analyse-run", without, "--stat", "projection")
    assert proc.returncode == 0, proc.stderr
    assert f"analysed {EPOCHS + 1} snapshots" in proc.stdout
    assert (without / "series.csv").read_text() == (with_stats / "series.csv").read_text()
    final = load_file(without / "snapshots" / f"epoch-{EPOCHS:03d}.safetensors")
    last = [r for r in hpa.open_run(without).series.to_dict("records") if r["epoch"] == EPOCHS]
    assert {r["layer"]: r["projection.n_l"] for r in last}["features.3"] == numpy_n_l(final["features.3.weight"])
    assert (without / "figures" / "projection_n_l_epochs.png").is_file()
    # again: every epoch is done, nothing changes
    before = (without / "series.csv").read_bytes()
    proc = run_hpa("analyse-run", without, "--stat", "projection")
    assert f"analysed 0 snapshots; {EPOCHS + 1} already done" in proc.stdout
    assert (without / "series.csv").read_bytes() == before
    # a statistic added later joins the ones already there
    proc = run_hpa("analyse-run", without, "--stat", "cones")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((without / "stats" / "epoch-001.json").read_text())
    assert sorted(stats["statistics"]) == ["cones", "projection"]
    np.testing.assert_array_equal(hpa.open_run(without).series["projection.n_l"].to_numpy(dtype=float),
                                  hpa.open_run(with_stats).series["projection.n_l"].to_numpy(dtype=float))
