"""Run a Python snippet in a fresh process and report its wall time and peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import time

_WRAPPER = """
import json, sys, time
start = time.perf_counter()
try:
{body}
except SystemExit:
    pass
elapsed = time.perf_counter() - start
# VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across fork+exec.
peak_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.stderr.write("\\n@@" + json.dumps({{"seconds": elapsed, "peak_mb": peak_kb / 1024}}) + "\\n")
"""


def run_python(body: str) -> dict[str, float]:
    """Peak RSS (MB) and in-process seconds of ``body`` run in a new interpreter."""
    code = _WRAPPER.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    marker = [line for line in proc.stderr.splitlines() if line.startswith("@@")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")
    return json.loads(marker[-1][2:])


def wall(argv: list[str], repeat: int = 5) -> float:
    """Median wall time of a whole command."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
