"""``hpa train --resume``: after ``kill -9`` at any moment the finished run is bitwise the uninterrupted one.

A real ``hpa train`` subprocess is killed with SIGKILL: mid-epoch (at a
random moment while it trains), and mid-write (a wrapper makes the file
writer write half of a chosen file's bytes, then kills its own process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_bad_input

# Small batches: more optimizer steps (so momentum matters) and epochs long enough to kill inside.
# Two threads on any machine: multi-threaded CPU reductions must reproduce at a fixed thread count.
ARGS = ("--plugin", "digits", "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--seed", "7",
        "--cpu-threads", "2")

# Runs the real CLI, but the N-th atomic write whose target ends with $KILL_TARGET writes half
# its bytes to the temporary file and then kills the whole process with SIGKILL.
KILLER = """
import os, signal, sys
import hpa.files as files
from hpa.cli import main
real = files._write_new_file
target, seen = os.environ["KILL_TARGET"], [0]
def write(path, data):
    if path.name.startswith("." + target + "."):
        seen[0] += 1
        if seen[0] == int(os.environ.get("KILL_NTH", "1")):
            real(path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
files._write_new_file = write
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with the same arguments."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run([sys.executable, "-m", "hpa", "train", *ARGS, "--out", str(run)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run


def comparable_metrics(run):
    """Every metrics value except the wall-clock seconds, which no two runs share."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def assert_same_as_reference(run, reference):
    final = "snapshots/epoch-003.safetensors"
    assert (run / final).read_bytes() == (reference / final).read_bytes()
    assert comparable_metrics(run) == comparable_metrics(reference)
    assert (run / "series.csv").read_bytes() == (reference / "series.csv").read_bytes()
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == sorted(
        p.name for p in (reference / "snapshots").iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def resume(run_hpa, run):
    proc = run_hpa("train", "--resume", run)
    assert proc.returncode == 0, proc.stderr
    return proc


# Late kills, so that the resumed state carries SGD momentum (writes: snapshot, metrics, state per epoch).
@pytest.mark.parametrize("target,nth", [("epoch-003.safetensors", 1), ("last.pt", 3), ("metrics.jsonl", 3),
                                        ("series.csv", 3), ("run.json", 2)])
def test_kill_mid_write_then_resume_is_bitwise_identical(run_hpa, tmp_path, reference, target, nth):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLER, "train", *ARGS, "--out", str(run)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, KILL_TARGET=target, KILL_NTH=str(nth)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in run.rglob(".*") if p.is_file()]
    assert leftovers, "the kill should have left a half-written temporary file"
    resume(run_hpa, run)
    assert_same_as_reference(run, reference)
    assert not [p for p in run.rglob(".*") if p.is_file()]  # hpa removed its own leftovers


def test_kill_mid_epoch_then_resume_is_bitwise_identical(run_hpa, tmp_path, reference):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "hpa", "train", *ARGS, "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 2:
            time.sleep(0.05)
        time.sleep(0.2)  # inside epoch 2 (after epoch 1's state): an epoch takes seconds
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert len(_lines(run / "metrics.jsonl")) in (2, 3), "the kill should land inside epoch 2"
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    resume(run_hpa, run)
    assert_same_as_reference(run, reference)


def _lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_resume_refuses_different_arguments(run_hpa, reference):
    line = assert_bad_input(run_hpa("train", "--resume", reference, "--lr", "0.5"), "--lr", "0.05")
    assert "0.5" in line
    assert_bad_input(run_hpa("train", "--resume", reference, "--seed", "8"), "--seed", "7")
    assert_bad_input(run_hpa("train", "--resume", reference, "--plugin", "mnist"), "--plugin", "digits")
    assert_bad_input(run_hpa("train", "--resume", reference, "--cpu-threads", "1"), "--cpu-threads", "2")


def test_resume_of_a_complete_run_changes_nothing(run_hpa, reference):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != "run.json"}
    resume(run_hpa, reference)
    after = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != "run.json"}
    assert after == before


def test_resume_of_a_folder_that_is_not_a_run(run_hpa, tmp_path):
    assert_bad_input(run_hpa("train", "--resume", tmp_path), "not an hpa run folder")
