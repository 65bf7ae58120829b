"""hpa/executors.py: jobs in processes of their own, here (local) and through submitit's real LocalExecutor.

The job functions below are module-level so that they pickle by reference; each job's process
imports this file again (spawn for ``local``; PYTHONPATH for submitit's job processes).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from hpa.errors import OptionError
from hpa.executors import (EXECUTORS, Job, LocalExecutor, Requeue, SubmititExecutor, make_executor,
                           visible_gpus)

TESTS = Path(__file__).resolve().parent


# -- the jobs (run in other processes) ---------------------------------------------------------

def timed_sleep(record: str, seconds: float) -> str:
    """Sleep, recording when it started and ended (wall clock, comparable across processes)."""
    started = time.time()
    time.sleep(seconds)
    Path(record).write_text(json.dumps([started, time.time()]))
    return Path(record).name


def environment(*names: str) -> dict:
    """The job's environment, and whether torch had been imported before the job ran."""
    return {"env": {name: os.environ.get(name) for name in names}, "torch_loaded": "torch" in sys.modules,
            "pid": os.getpid()}


def fail(message: str) -> None:
    raise ValueError(message)


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def say(text: str) -> int:
    print(text, flush=True)
    print("to stderr: " + text, file=sys.stderr, flush=True)
    return len(text)


def stopped_once(marker: str) -> str:
    """Stopped (Requeue) the first time it runs; done the second."""
    path = Path(marker)
    path.write_text(path.read_text() + "x" if path.exists() else "x")
    if len(path.read_text()) == 1:
        raise Requeue("pre-empted")
    return f"ran {len(path.read_text())} times"


def always_stopped() -> None:
    raise Requeue("pre-empted")


class Counter:
    """Counts to ``upto``, one step per 0.2 s, keeping its count in ``state``; a requeued run resumes it.

    ``stop`` (what the executor's checkpoint calls) records that it was asked to stop."""

    def __init__(self, state: str) -> None:
        self.state = Path(state)

    def __call__(self, upto: int) -> dict:
        count = json.loads(self.state.read_text())["count"] if self.state.exists() else 0
        starts = self.state.with_suffix(".starts")
        starts.write_text(starts.read_text() + "s" if starts.exists() else "s")
        while count < upto:
            time.sleep(0.2)
            count += 1
            temporary = self.state.with_suffix(".tmp")
            temporary.write_text(json.dumps({"count": count, "pid": os.getpid()}))
            temporary.replace(self.state)
        return {"count": count, "starts": len(starts.read_text())}

    def stop(self) -> None:
        self.state.with_suffix(".stopped").write_text("yes")


# -- local ----------------------------------------------------------------------------------------

def test_local_runs_two_jobs_at_once_each_in_a_fresh_process(tmp_path):
    jobs = [Job(f"sleep{i}", timed_sleep, (str(tmp_path / f"t{i}.json"), 1.5)) for i in range(2)]
    outcomes = list(LocalExecutor(jobs=2, cpu_threads=2, gpus=[]).run(jobs))
    assert sorted(o.name for o in outcomes) == ["sleep0", "sleep1"] and all(o.ok for o in outcomes)
    (a0, a1), (b0, b1) = (json.loads((tmp_path / f"t{i}.json").read_text()) for i in range(2))
    assert a0 < b1 and b0 < a1, "the two jobs did not overlap in time"


def test_local_one_at_a_time_runs_them_in_turn(tmp_path):
    jobs = [Job(f"sleep{i}", timed_sleep, (str(tmp_path / f"t{i}.json"), 0.3)) for i in range(2)]
    assert all(o.ok for o in LocalExecutor(jobs=1, cpu_threads=2, gpus=[]).run(jobs))
    (a0, a1), (b0, b1) = (json.loads((tmp_path / f"t{i}.json").read_text()) for i in range(2))
    assert a1 <= b0 or b1 <= a0


def test_local_splits_the_cpu_threads_and_sets_them_before_any_import():
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HPA_CPU_THREADS", "CUDA_VISIBLE_DEVICES")
    jobs = [Job(f"env{i}", environment, names) for i in range(3)]
    outcomes = list(LocalExecutor(jobs=3, cpu_threads=7, gpus=[]).run(jobs))
    assert [o.value["env"]["OMP_NUM_THREADS"] for o in outcomes] == ["2"] * 3  # 7 // 3, never more than 7 in all
    assert all(o.value["env"]["HPA_CPU_THREADS"] == "2" for o in outcomes)
    assert not any(o.value["torch_loaded"] for o in outcomes)
    assert len({o.value["pid"] for o in outcomes} | {os.getpid()}) == 4


def test_local_pins_each_job_to_its_own_gpu():
    jobs = [Job(f"env{i}", environment, ("CUDA_VISIBLE_DEVICES",)) for i in range(2)]
    outcomes = list(LocalExecutor(jobs=2, gpus=["0", "1"]).run(jobs))
    assert sorted(o.value["env"]["CUDA_VISIBLE_DEVICES"] for o in outcomes) == ["0", "1"]


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_a_failed_or_killed_job_never_stops_the_others(tmp_path):
    jobs = [Job("bad", fail, ("no such cell",)), Job("killed", kill_myself),
            Job("good", say, ("hello",), log=tmp_path / "logs" / "good.log")]
    outcomes = {o.name: o for o in LocalExecutor(jobs=2, cpu_threads=2, gpus=[]).run(jobs)}
    assert outcomes["bad"].error == "ValueError: no such cell" and not outcomes["bad"].ok
    assert outcomes["killed"].error == "its process was killed by SIGKILL"
    assert outcomes["good"].ok and outcomes["good"].value == 5
    assert (tmp_path / "logs" / "good.log").read_text().splitlines() == ["hello", "to stderr: hello"]


def test_a_stopped_job_is_requeued_and_one_stopped_too_often_fails(tmp_path):
    marker = tmp_path / "marker"
    outcomes = {o.name: o for o in LocalExecutor(jobs=2, cpu_threads=2, gpus=[], max_requeue=2).run(
        [Job("once", stopped_once, (str(marker),)), Job("always", always_stopped)])}
    assert outcomes["once"].ok and outcomes["once"].value == "ran 2 times" and outcomes["once"].requeued == 1
    assert not outcomes["always"].ok and outcomes["always"].requeued == 2
    assert outcomes["always"].error == "stopped 3 times (pre-empted); not requeued again"


def test_local_refuses_to_oversubscribe_the_cpu():
    with pytest.raises(OptionError, match="--jobs 3 on 2 CPU threads"):
        LocalExecutor(jobs=3, cpu_threads=2, gpus=[])


# -- make_executor: the flags ---------------------------------------------------------------------

def test_an_unknown_executor_is_refused_with_the_list(tmp_path):
    with pytest.raises(OptionError) as refused:
        make_executor({"executor": "slurmm"}, tmp_path)
    assert "did you mean 'slurm'" in str(refused.value) or "did you mean slurm" in str(refused.value)
    assert all(name in str(refused.value) for name in EXECUTORS)
    assert list(tmp_path.iterdir()) == []


def test_slurm_without_submitit_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(OptionError, match=r"needs submitit.*pip install"):
        make_executor({"executor": "slurm"}, tmp_path / "submitit")
    assert not (tmp_path / "submitit").exists()


def test_slurm_without_sbatch_on_the_path_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("submitit")  # installed by the test extra; this test is about sbatch
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OptionError, match="sbatch on the PATH"):
        make_executor({"executor": "slurm"}, tmp_path / "submitit")
    assert not (tmp_path / "submitit").exists()


def test_sbatch_options_are_key_value(tmp_path):
    with pytest.raises(OptionError, match="--sbatch expects KEY=VALUE"):
        make_executor({"executor": "submitit-local", "sbatch": ("qos",)}, tmp_path)


def test_make_executor_gives_local_its_jobs(tmp_path):
    executor = make_executor({"executor": "local", "jobs": 2, "cpu_threads_total": 4}, tmp_path)
    assert isinstance(executor, LocalExecutor) and executor.jobs == 2


# -- submitit's LocalExecutor: the slurm code path -----------------------------------------------

@pytest.fixture
def submitit_local(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return SubmititExecutor(folder=tmp_path / "submitit", cluster="local", time_minutes=5, poll_seconds=0.2)


def test_submitit_local_runs_the_jobs_and_isolates_a_failure(submitit_local, tmp_path):
    jobs = [Job("good", say, ("hi",), log=tmp_path / "good.log"), Job("bad", fail, ("broken",))]
    submitted = []
    outcomes = {o.name: o for o in submitit_local.run(jobs, on_submit=lambda name, jid: submitted.append(name))}
    assert submitted == ["good", "bad"]
    assert outcomes["good"].ok and outcomes["good"].value == 2
    assert not outcomes["bad"].ok and outcomes["bad"].error == "ValueError: broken"
    assert "hi" in (tmp_path / "good.log").read_text().splitlines()


def test_submitit_checkpoints_a_preempted_job_and_requeues_it(submitit_local, tmp_path):
    state = tmp_path / "counter.json"
    outcomes = submitit_local.run([Job("count", Counter(str(state)), (15,))])
    deadline = time.monotonic() + 60
    while not (state.exists() and json.loads(state.read_text())["count"] >= 3):
        assert time.monotonic() < deadline, "the job never started counting"
        time.sleep(0.05)
    os.kill(json.loads(state.read_text())["pid"], signal.SIGUSR2)  # what SLURM sends before a timeout or pre-emption (submitit's --signal)
    (outcome,) = list(outcomes)
    assert outcome.ok, outcome.error
    assert outcome.value == {"count": 15, "starts": 2}
    assert state.with_suffix(".stopped").read_text() == "yes"


def cuda_seen() -> dict:
    import torch

    return {"count": torch.cuda.device_count(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


@pytest.mark.skipif(not visible_gpus(), reason="needs a GPU (nvidia-smi or CUDA_VISIBLE_DEVICES)")
def test_on_a_gpu_machine_each_local_job_sees_exactly_its_own_gpu():
    gpus = visible_gpus()
    jobs = [Job(f"gpu{i}", cuda_seen) for i in range(len(gpus))]
    outcomes = list(LocalExecutor(jobs=len(gpus)).run(jobs))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert all(o.value["count"] == 1 for o in outcomes)
    assert sorted(o.value["visible"] for o in outcomes) == sorted(gpus)
