"""``hpa train --nproc 2``: two gloo processes on CPU reproduce the one-process run, also after a kill.

The processes split every global batch and sum their gradients, so the run differs from
one process only in the order of floating-point sums.  Those differences grow with the
number of steps; with the recipe's batch of 128 (about 20 steps) they stay below 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import assert_bad_input

pytest.importorskip("torch.distributed")

ARGS = ("--plugin", "digits", "--epochs", "2", "--batch-size", "128", "--device", "cpu", "--seed", "3",
        "--stat", "none", "--quiet")
FINAL = "snapshots/epoch-002.safetensors"


def hpa_command(*args):
    return [sys.executable, "-m", "hpa", "train", *map(str, args)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in this process (as ARGS say), without the launch cost of another interpreter."""
    from hpa.experiments.train import train

    return train("digits", out=tmp_path_factory.mktemp("one") / "run", epochs=2, batch_size=128, device="cpu",
                 seed=3, statistics=["none"])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    proc = subprocess.run(hpa_command(*ARGS, "--nproc", "2", "--out", run), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run, proc


def assert_close_snapshots(a, b, tolerance=1e-6):
    first, second = load_file(a), load_file(b)
    assert sorted(first) == sorted(second)
    for name in first:
        np.testing.assert_allclose(second[name], first[name], rtol=0, atol=tolerance, err_msg=name)


def test_two_processes_reproduce_one(one_process, two_processes):
    run, proc = two_processes
    assert_close_snapshots(one_process / FINAL, run / FINAL)
    # The weights did move: equality is not the trivial one of two untouched initialisations.
    assert not np.array_equal(load_file(run / FINAL)["features.0.weight"],
                              load_file(run / "snapshots/epoch-000.safetensors")["features.0.weight"])
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["status"] == "complete"
    one = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in two] == [0, 1, 2]
    for a, b in zip(one[1:], two[1:]):  # train totals are summed over the processes
        assert b["train_accuracy"] == a["train_accuracy"]
        assert abs(b["train_loss"] - a["train_loss"]) < 1e-5
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone talks


def test_killed_two_process_run_resumes_and_matches(tmp_path, one_process, two_processes):
    run = tmp_path / "run"
    # A session of its own, so that the whole group (launcher, torchrun, ranks) can be killed at once.
    launcher = subprocess.Popen(hpa_command(*ARGS, "--nproc", "2", "--out", run), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 2:
            time.sleep(0.02)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    assert len(_lines(run / "metrics.jsonl")) == 2, "the kill should land inside epoch 2"
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    proc = subprocess.run(hpa_command("--resume", run, "--nproc", "2", "--quiet"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run / "run.json").read_text())
    # Killed at once after epoch 1's metrics line: before or after its state was saved.
    assert record["status"] == "complete" and record["resumed"][0]["from_epoch"] in (0, 1)
    # Resuming restores the exact state: the same bytes as the uninterrupted two-process run.
    assert (run / FINAL).read_bytes() == (two_processes[0] / FINAL).read_bytes()
    assert_close_snapshots(one_process / FINAL, run / FINAL)


def _lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_two_gpus_follow_one_gpu(tmp_path):
    """NCCL on two GPUs against one GPU (rounding differs more on GPUs: cuDNN picks its own sums)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    args = [a if a != "cpu" else "cuda" for a in ARGS]
    for name, extra in (("one", ()), ("two", ("--nproc", "2"))):
        proc = subprocess.run(hpa_command(*args, *extra, "--out", tmp_path / name), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
    assert_close_snapshots(tmp_path / "one" / FINAL, tmp_path / "two" / FINAL, tolerance=1e-4)


def test_nproc_refuses_bad_input_before_launching(run_hpa, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not hpa's")
    line = assert_bad_input(run_hpa("train", "--plugin", "digits", "--nproc", "2", "--out", taken), "notes.txt")
    assert "--resume" not in line  # not a run: nothing to resume
    assert (taken / "notes.txt").read_text() == "not hpa's"
    assert_bad_input(run_hpa("train", "--resume", tmp_path, "--nproc", "2"), "not an hpa run folder")
    assert_bad_input(run_hpa("train", "--plugin", "digits", "--nproc", "2", "--seeds", "0,1", "--out",
                             tmp_path / "new"), "--seeds")


def _refusal(capsys, *argv) -> str:
    """``hpa train ARGV`` in this process: its one stderr line, after exit status 2."""
    from hpa.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", *map(str, argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("rank", [0, 1])
def test_seeds_under_torchrun_are_refused_as_with_nproc(capsys, tmp_path, rank):
    """Every process torchrun starts would train every seed and race for the folders: refused, in the
    same line as --nproc 2 --seeds, before any folder is made.  One process with the environment
    torchrun gives each of its processes (a process that waited for the other would time out)."""
    from hpa.experiments.distributed import _free_port

    args = ("--plugin", "digits", "--epochs", "1", "--device", "cpu", "--seeds", "0,1")
    with_nproc = _refusal(capsys, *args, "--nproc", "2", "--out", tmp_path / "nproc")
    env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run(hpa_command(*args, "--out", tmp_path / "torchrun"), capture_output=True, text=True,
                          env=env, timeout=120)
    assert assert_bad_input(proc, "--seeds") == with_nproc and "--seed N" in with_nproc
    assert not (tmp_path / "torchrun").exists() and not (tmp_path / "nproc").exists()


def test_bad_input_found_by_every_rank_is_one_line(run_hpa, tmp_path):
    """Both ranks find the dataset missing: the user sees hpa's one line once, not a launcher's report."""
    proc = run_hpa("train", "--plugin", "cifar10", "--data", tmp_path / "missing", "--device", "cpu",
                   "--nproc", "2", "--out", tmp_path / "run")
    assert_bad_input(proc, "CIFAR10 files missing", "--data")
    assert not (tmp_path / "run").exists()


def rank_one_joins_by(tmp_path, body: str) -> dict[str, str]:
    """The environment that makes rank 1's ``join(device)`` run ``body`` instead (through sitecustomize)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import hpa.experiments.distributed as distributed\n"
        "    from hpa.errors import OptionError\n\n"
        "    def join(device):\n"
        f"        {body}\n\n"
        "    distributed.join = join\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_a_failure_of_another_rank_is_reported_once_and_stops_rank_0(run_hpa, tmp_path):
    """Rank 1 alone refuses to start; rank 0 waits for it in the rendezvous until the launcher stops it."""
    env = rank_one_joins_by(tmp_path, 'raise OptionError("rank one cannot use its device; pick another with --device")')
    started = time.monotonic()
    proc = run_hpa("train", *ARGS, "--nproc", "2", "--out", tmp_path / "run", env=env)
    assert_bad_input(proc, "rank one cannot use its device", "--device")
    assert time.monotonic() - started < 120  # rank 0 was stopped, not left waiting for its peer
    assert not (tmp_path / "run").exists()


def test_a_rank_that_crashes_is_named_with_its_signal(run_hpa, tmp_path):
    """Rank 1 crashes (as a segfault or a C++ abort would) before it joins; rank 0 waits in the rendezvous."""
    env = rank_one_joins_by(tmp_path, "os.abort()")
    proc = run_hpa("train", *ARGS, "--nproc", "2", "--out", tmp_path / "run", env=env)
    assert proc.returncode == 128 + signal.SIGABRT
    assert proc.stderr.splitlines() == ["Error: process 1 of --nproc was killed by SIGABRT (it printed nothing); run "
                                        "with --nproc 1 to see whether one process fails the same way"]
    assert not (tmp_path / "run").exists()


# Two ranks join, trace a model as the trainer does (which imports torch._dynamo), sum once and
# close.  Gloo's worker threads must be gone then: threads that outlive the group can still be
# finishing a collective when the interpreter exits, which aborts the process (exit 134).
CLOSE_ENDS_GLOO_THREADS = """
import os
import torch
import hpa
from hpa.experiments.distributed import join

world = join("cpu")
hpa.load(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), input_size=(3, 8, 8))
world.sum(torch.ones(3))
world.close()
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print(sorted(name for name in names if "gloo" in name))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux's /proc")
def test_closing_the_group_ends_its_worker_threads(tmp_path):
    from hpa.experiments.distributed import _free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", CLOSE_ENDS_GLOO_THREADS], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "pt_gloo_runloop" not in out, out
        assert out.strip().startswith("[")  # the script got as far as listing its threads
