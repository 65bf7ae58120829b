"""``hpa study run`` on the local executor: a 4-cell study with --jobs 1 against --jobs 2 (issue 21).

Each cell is one ``hpa train`` run of the embedded digits task on one CPU thread
(``cpu_threads = 1``), so two jobs on two cores should take at most 0.6x the wall time of one
job at a time.  Reported: the wall time of each, the CPU time of the study and its children
(user + system), and the ratio.  On a machine with GPUs the jobs are pinned one per GPU instead,
and cells per hour is what to read.  The machine may be shared: the numbers say what it gave.

Run: .venv/bin/python benchmarks/bench_study.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """[train]
plugin = "digits"
epochs = 3
device = "cpu"
cpu_threads = 1
stat = "none"
[grid]
lr = [0.01, 0.02, 0.05, 0.1]
seeds = [0]
"""
TARGET = 0.6


def run_study(jobs: int, folder: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this study's processes) of the 4-cell study with ``jobs`` at once."""
    study = folder / "study.toml"
    study.write_text(STUDY)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpa", "study", "run", str(study), "--out", str(folder / "out"),
                    "--jobs", str(jobs), "--cpu-threads", str(jobs), "--quiet"], check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    results = {}
    for jobs in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            results[jobs] = run_study(jobs, Path(folder))
        wall, cpu = results[jobs]
        print(f"4-cell digits study, --jobs {jobs}: {wall:.1f} s wall, {cpu:.1f} s CPU "
              f"({4 * 3600 / wall:.0f} cells per hour)")
    ratio = results[2][0] / results[1][0]
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"--jobs 2 / --jobs 1 wall time: {ratio:.2f} on {cores} usable cores ({verdict} the {TARGET} target; "
          "the machine may be shared with other work)")


if __name__ == "__main__":
    main()
