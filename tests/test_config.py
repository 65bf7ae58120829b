"""hpa/experiments/config.py: what a run's configuration resolves on its own."""

from __future__ import annotations

import os


def test_cpu_threads_default_to_the_usable_cores_per_local_process(monkeypatch):
    from hpa.experiments.config import default_cpu_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_cpu_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's processes on this node share the cores
    assert default_cpu_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert default_cpu_threads() == 1
