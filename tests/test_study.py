"""``hpa study run`` and ``hpa study status``: real ``hpa train`` runs (the embedded digits task) on the
local executor with two jobs and on submitit's real LocalExecutor; stopped and killed studies resume
to the same bytes; bad study files are refused in one line with nothing written.

Every run is two short epochs on one CPU thread (``cpu_threads = 1``), so a run is bitwise
reproducible whatever the executor and however many jobs share the machine.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_bad_input, snapshot

BASE = """[train]
plugin = "digits"
epochs = 2
batch-size = 16
device = "cpu"
cpu_threads = 1
"""
STUDY = BASE + """[grid]
lr = [0.01, 0.05]
seeds = [0]
"""
CELLS = ("lr=0.01", "lr=0.05")


def write_study(folder: Path, text: str = STUDY, name: str = "study.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def comparable_metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def assert_same_run(run: Path, reference: Path) -> None:
    """Every snapshot, the metrics (less wall-clock seconds) and the series: the same bytes."""
    snapshots = sorted(p.name for p in (reference / "snapshots").iterdir())
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == snapshots
    for name in snapshots:
        assert (run / "snapshots" / name).read_bytes() == (reference / "snapshots" / name).read_bytes(), name
    assert comparable_metrics(run) == comparable_metrics(reference)
    assert (run / "series.csv").read_bytes() == (reference / "series.csv").read_bytes()
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The two-cell study, uninterrupted, on the local executor with two jobs at once."""
    folder = tmp_path_factory.mktemp("reference")
    study = write_study(folder)
    proc = subprocess.run([sys.executable, "-m", "hpa", "study", "run", str(study), "--out", str(folder / "out"),
                           "--jobs", "2", "--cpu-threads", "2"], capture_output=True, text=True, timeout=600,
                          cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "out", proc


def test_two_local_jobs_train_every_cell_and_summarise_them(reference):
    out, proc = reference
    assert "local: 2 at once, 1 CPU threads each" in proc.stderr
    for cell in CELLS:
        record = json.loads((out / cell / "seed-0" / "run.json").read_text())
        assert record["status"] == "complete" and record["config"]["seed"] == 0
        assert record["config"]["recipe"]["lr"] == float(cell.split("=")[1])
        assert record["config"]["recipe"]["epochs"] == 2 and record["config"]["recipe"]["batch_size"] == 16
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for cell in CELLS:  # one seed per cell: the mean is the run's own value, the std 0
        series = list(csv.DictReader(open(out / cell / "seed-0" / "series.csv", newline="")))
        mine = [r for r in rows if r["cell"] == cell]
        assert len(mine) == len(series) and {r["lr"] for r in mine} == {cell.split("=")[1]}
        by_key = {(r["epoch"], r["layer"]): r for r in mine}
        for expected in series:
            row = by_key[(expected["epoch"], expected["layer"])]
            if not expected["projection.n_l"]:  # a layer the statistic does not measure: no mean either
                assert row["projection.n_l.mean"] == ""
                continue
            assert float(row["projection.n_l.mean"]) == float(expected["projection.n_l"])
            assert float(row["projection.n_l.std"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == [] and [c["cell"] for c in summary["cells"]] == list(CELLS)
    metrics = comparable_metrics(out / "lr=0.05" / "seed-0")
    cell = next(c for c in summary["cells"] if c["cell"] == "lr=0.05")
    assert [m["val_accuracy.mean"] for m in cell["metrics"]] == [m["val_accuracy"] for m in metrics]
    assert (out / "figures" / "compare-training.png").stat().st_size > 0
    assert (out / "figures" / "compare-n_l.png").stat().st_size > 0


def test_status_shows_every_job_and_touches_nothing(reference, run_hpa):
    out, _ = reference
    before = snapshot(out)
    proc = run_hpa("study", "status", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [[f"{c}/seed-0", "complete"] for c in CELLS]
    assert lines[-1] == "2 complete" and "epochs 2/2" in lines[0]
    assert snapshot(out) == before


def test_a_rerun_skips_the_complete_runs_and_a_changed_study_is_refused(reference, run_hpa, tmp_path):
    out, _ = reference
    runs = {cell: snapshot(out / cell / "seed-0") for cell in CELLS}
    proc = run_hpa("study", "run", out / "study.toml", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "0 jobs done now, 2 were complete, 0 failed of 2" in proc.stdout
    assert {cell: snapshot(out / cell / "seed-0") for cell in CELLS} == runs
    before = snapshot(out)
    changed = write_study(tmp_path, STUDY.replace("epochs = 2", "epochs = 3"))
    line = assert_bad_input(run_hpa("study", "run", changed, "--out", out), "[train] epochs is 3, recorded 2")
    assert "nothing was changed" in line and snapshot(out) == before


def _wait_for(condition, what: str, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _state(out: Path, key: str) -> dict:
    path = out / ".study" / "jobs" / (key.replace("/", "--") + ".json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _epochs_written(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def test_a_stopped_job_is_requeued_and_a_killed_study_finishes_with_the_same_bytes(reference, tmp_path):
    """One job at a time.  The first run's hpa train gets SIGTERM mid-epoch (as a pre-empted SLURM job
    does): it stops cleanly and is requeued.  Then the whole study's process group gets SIGKILL while
    the second run trains, and the study is run again.  Both runs equal the uninterrupted ones."""
    ref, _ = reference
    study, out = write_study(tmp_path), tmp_path / "out"
    command = [sys.executable, "-m", "hpa", "study", "run", str(study), "--out", str(out), "--jobs", "1"]
    first, second = (out / cell / "seed-0" for cell in CELLS)
    proc = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _epochs_written(first) >= 1 and _state(out, "lr=0.01/seed-0").get("pid"), "epoch 0")
        os.kill(_state(out, "lr=0.01/seed-0")["pid"], signal.SIGTERM)  # training epoch 1 now
        _wait_for(lambda: _epochs_written(second) >= 2, "the second run's epoch 1")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    resumed = json.loads((first / "run.json").read_text()).get("resumed", [])
    assert resumed and resumed[0]["from_epoch"] < 2, "the SIGTERM'd run was not stopped and resumed"
    assert json.loads((second / "run.json").read_text())["status"] == "running"  # killed: no chance to say more
    status = subprocess.run([sys.executable, "-m", "hpa", "study", "status", str(out)], capture_output=True,
                            text=True, timeout=120).stdout.splitlines()
    assert status[0].split()[:2] == ["lr=0.01/seed-0", "complete"]
    assert status[1].split()[:2] == ["lr=0.05/seed-0", "stopped"] and "its process is gone" in status[1]
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "1 jobs done now, 1 were complete" in again.stdout
    for cell in CELLS:
        assert_same_run(out / cell / "seed-0", ref / cell / "seed-0")
    with open(out / "summary.csv", newline="") as a, open(ref / "summary.csv", newline="") as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))


def test_submitit_local_executor_trains_the_same_runs(reference, tmp_path, run_hpa):
    pytest.importorskip("submitit")
    ref, _ = reference
    study = write_study(tmp_path, BASE + "[grid]\nlr = [0.05]\nseeds = [0]\n")
    proc = run_hpa("study", "run", study, "--out", tmp_path / "out", "--executor", "submitit-local", "--time", "10")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path / "out" / "lr=0.05" / "seed-0", ref / "lr=0.05" / "seed-0")
    assert list((tmp_path / "out" / ".study" / "submitit").glob("*_0_log.out"))


def test_a_failed_cell_never_stops_the_others_and_the_summary_names_it(tmp_path, run_hpa):
    """An architecture no loader has is a string the study cannot judge; hpa train refuses it, and only
    that cell fails, with hpa train's reason."""
    study = write_study(tmp_path, BASE.replace("epochs = 2", 'epochs = 1\nstat = "none"') +
                        '[grid]\narch = ["cifar:small_max", "cifar:no_such_net"]\nseeds = [0]\n')
    proc = run_hpa("study", "run", study, "--out", tmp_path / "out", "--jobs", "2", "--cpu-threads", "2")
    assert proc.returncode == 1, proc.stderr
    assert "arch=cifar-no_such_net/seed-0 failed: " in proc.stderr and "no_such_net" in proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(m["cell"], m["state"]) for m in summary["missing"]] == [("arch=cifar-no_such_net", "failed")]
    assert "no_such_net" in summary["missing"][0]["reason"]
    good = tmp_path / "out" / "arch=cifar-small_max" / "seed-0" / "run.json"
    assert json.loads(good.read_text())["status"] == "complete"
    status = run_hpa("study", "status", tmp_path / "out").stdout
    assert "failed" in status and "1 complete, 1 failed" in status


def test_a_reinit_study_draws_a_heatmap_per_seed_and_their_mean(tmp_path, run_hpa):
    study = write_study(tmp_path, BASE.replace("epochs = 2", 'epochs = 1\nstat = "none"') +
                        "[grid]\nseeds = [0, 1]\n[reinit]\nepochs = \"0,1\"\n")
    proc = run_hpa("study", "run", study, "--out", tmp_path / "out", "--jobs", "2", "--cpu-threads", "2")
    assert proc.returncode == 0, proc.stderr
    reinit = tmp_path / "out" / "base" / "reinit"
    assert sorted(p.name for p in reinit.glob("heatmap*.png")) == ["heatmap-mean.png", "heatmap-seed-0.png",
                                                                   "heatmap-seed-1.png"]
    result = json.loads((reinit / "reinit.json").read_text())
    assert json.dumps(result).count("seed-1") > 0 and "base/reinit" in run_hpa("study", "status", tmp_path / "out").stdout


# -- bad input: one line, exit 2, nothing written -----------------------------------------------

BAD = {
    "unknown field": (BASE.replace("epochs", "epoch") + "[grid]\nseeds = [0]\n", ["unknown [train] field 'epoch'",
                                                                                 "did you mean"]),
    "unknown grid field": (BASE + "[grid]\nschedul = ['step']\n", ["unknown [grid] field 'schedul'", "schedule"]),
    "wrong type in the grid": (BASE + "[grid]\nlr = [0.01, \"fast\"]\n", ['[grid] lr = "fast" is not a number']),
    "not a choice": (BASE + "[grid]\nprecision = ['fp32', 'fp64']\n", ['"fp64" is not one of', '"bf16"']),
    "empty grid": (BASE + "[grid]\n", ["the grid is empty"]),
    "no grid": (BASE, ["the grid is empty"]),
    "an empty list": (BASE + "[grid]\nlr = []\n", ["[grid] lr is an empty list"]),
    "a value, not a list": (BASE + "[grid]\nlr = 0.1\n", ["[grid] lr must be a list"]),
    "seed, not seeds": (BASE + "seed = 3\n[grid]\nseeds = [0]\n", ["[train] seed is not a study field",
                                                                 "seeds = [0, 1, 2]"]),
    "no task": (BASE.replace('plugin = "digits"\n', "") + "[grid]\nseeds = [0]\n", ["needs plugin = TASK"]),
    "unknown table": (BASE + "[grids]\nseeds = [0]\n", ["unknown table [grids]", "did you mean"]),
    "unknown reinit field": (BASE + "[grid]\nseeds = [0]\n[reinit]\ndraw = 2\n", ["unknown [reinit] field 'draw'",
                                                                                "draws"]),
    "not TOML": ("[train\n", ["is not valid TOML"]),
}


def hpa_here(capsys, *args) -> subprocess.CompletedProcess:
    """The hpa command run in this process (the study file is refused before any job starts)."""
    from hpa.cli import main

    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exited.value.code, captured.out, captured.err)


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_study_file_is_refused_in_one_line_with_nothing_written(case, tmp_path, capsys):
    text, words = BAD[case]
    study = write_study(tmp_path, text)
    assert_bad_input(hpa_here(capsys, "study", "run", study, "--out", tmp_path / "out"), str(study), *words)
    assert not (tmp_path / "out").exists()


def test_missing_data_is_refused_before_anything_is_written(tmp_path, capsys):
    """One cell's task finds no files in its --data: one line for the whole study, not a failed cell each."""
    text = BASE.replace('plugin = "digits"\n', "") + f"data = {json.dumps(str(tmp_path / 'empty'))}\n" + \
        "[grid]\nplugin = ['digits', 'mnist']\nseeds = [0]\n"
    study = write_study(tmp_path, text)
    assert_bad_input(hpa_here(capsys, "study", "run", study, "--out", tmp_path / "out"), "MNIST files missing from",
                     "--download")
    assert not (tmp_path / "out").exists()


def test_an_out_holding_foreign_files_is_refused_and_left_alone(tmp_path, capsys):
    study, out = write_study(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_bad_input(hpa_here(capsys, "study", "run", study, "--out", out), "holding notes.txt", "which hpa did not write")
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_an_unknown_executor_is_refused_with_the_list(tmp_path, capsys):
    study = write_study(tmp_path)
    assert_bad_input(hpa_here(capsys, "study", "run", study, "--out", tmp_path / "out", "--executor", "slurmm"),
                     "no executor named 'slurmm'", "local, slurm, submitit-local")
    assert not (tmp_path / "out").exists()


def test_slurm_without_sbatch_or_without_submitit_says_what_to_install(tmp_path, run_hpa):
    study, out = write_study(tmp_path), tmp_path / "out"
    no_sbatch = {"PATH": str(tmp_path / "empty-bin")}
    assert_bad_input(run_hpa("study", "run", study, "--out", out, "--executor", "slurm", env=no_sbatch),
                     "sbatch on the PATH")
    # submitit made unimportable, as when it is not installed (a package shadowing it that raises ImportError)
    shadow = tmp_path / "shadow" / "submitit"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'submitit'\")\n")
    hidden = {"PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    assert_bad_input(run_hpa("study", "run", study, "--out", out, "--executor", "slurm", env=hidden),
                     "needs submitit", "pip install")
    assert not out.exists()


def test_status_of_a_folder_that_is_no_study(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert_bad_input(hpa_here(capsys, "study", "status", tmp_path / "plain"), "is not a study folder")
