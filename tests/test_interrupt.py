"""Ctrl-C during ``hpa train`` (one process): the run is marked interrupted, exit 130, one line says how to
continue, and ``--resume`` then completes it.  A real ``hpa train`` subprocess gets SIGINT once its first
epoch's line is on stderr (inside epoch 2 of 2: an epoch takes seconds)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

ARGS = ("--plugin", "digits", "--epochs", "2", "--device", "cpu", "--seed", "3", "--cpu-threads", "1")


def test_ctrl_c_marks_the_run_interrupted_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hpa", "train", *ARGS, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("epoch 1/2:") for line in seen):
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "".join(seen)
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr
    after = [line for line in rest.splitlines() if line.strip()]
    assert len(after) == 1, stderr  # one line after the progress, no "Aborted." and no traceback
    assert f"hpa train --resume {run}" in after[0] and "Ctrl-C" in after[0]
    assert "Traceback" not in stderr and "wrote" not in stdout
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted"
    kept = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kept == [0, 1]  # epoch 1's writes were let finish; epoch 2 never finished

    from hpa.experiments.train import train

    train(resume=run)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["resumed"][-1]["from_epoch"] == 1
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert (run / "snapshots" / "epoch-002.safetensors").is_file()
