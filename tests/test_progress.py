"""Progress on stderr: bars on a terminal, one plain line per stage elsewhere, quiet when asked;
the cone statistic's estimate up front, and the layer table before the cone statistic ends."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
import torch.nn as nn

import hpa
from hpa.render.progress import StageProgress, format_seconds

_STAGE_LINE = re.compile(r"^(.+?)(?: \((\d+) steps\))?: (\d+(?:\.\d)? s|\d+ min \d\d s)$")


class _Clock:
    """A clock that advances by the given steps, so that stage times are known exactly."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_plain_line_per_stage_with_its_time_when_not_a_terminal():
    stream = io.StringIO()
    progress = StageProgress(stream, clock=_Clock(0.0, 2.5, 2.5, 74.0))
    progress("loading model", 0, 1)
    for done in range(4):
        progress("projection", done, 4)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    assert text.splitlines() == ["loading model: 2.5 s", "projection (4 steps): 1 min 12 s"]


def test_a_statistic_announced_by_analyse_and_its_steps_are_one_stage():
    stream = io.StringIO()
    with StageProgress(stream, clock=_Clock(0.0, 1.0)) as progress:
        progress("statistic cones", 0, 1)
        progress("cones", 0, 3)
        progress("cones", 3, 3)
    assert stream.getvalue().splitlines() == ["cones (3 steps): 1.0 s"]


def test_on_a_terminal_a_bar_runs_and_each_stage_still_ends_in_one_line():
    stream = _Terminal()
    with StageProgress(stream) as progress:
        for done in range(3):
            progress("cones", done, 3)
        progress.note("a note between stages")
    text = stream.getvalue()
    assert "cones: 2/3" in text and "\r" in text  # tqdm's bar, redrawn in place
    finished = [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1]]
    assert _STAGE_LINE.match(finished[0]) and finished[0].startswith("cones (3 steps): ")
    assert finished[1] == "a note between stages"


def test_format_seconds():
    assert [format_seconds(s) for s in (0.04, 9.96, 12.4, 59.4, 61, 3725)] == \
        ["0.0 s", "10.0 s", "12 s", "59 s", "1 min 01 s", "62 min 05 s"]


def test_cone_estimate_counts_the_pairs_and_their_work():
    from hpa_plugins import cones

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 5, padding=2), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1, groups=2))
    graph = hpa.load(model, input_size=(3, 16, 16))
    pairs, seconds = cones.estimate(graph)
    assert pairs == len(cones.find_pairs(graph)[0]) == 2
    # (cone, predecessor) pairs, each with upper taps x candidate shifts of the rotation, counted by hand
    first = (6 * 8 * 3) * (cones.SECONDS_PER_CONE_PREDECESSOR + (5 * 5) * min((5 + 3 - 1) ** 2, 256)
                           * cones.SECONDS_PER_SHIFT_TAP)
    second = (4 * 3 * 8) * (cones.SECONDS_PER_CONE_PREDECESSOR + (3 * 3) * min((3 + 5 - 1) ** 2, 256)
                            * cones.SECONDS_PER_SHIFT_TAP)
    assert seconds == pytest.approx(first + second + 2 * cones.SECONDS_PER_PAIR)
    _, without = cones.estimate(graph, {"cones_rotation": False})
    assert without < seconds


def _run(*args: str) -> subprocess.CompletedProcess:
    """The real command, with stderr and stdout in one pipe in the order they were written."""
    return subprocess.run([sys.executable, "-m", "hpa", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_the_layer_table_comes_before_the_cone_statistic_and_its_estimate(run_hpa):
    proc = _run("scan", "zoo:digits_cnn", "--progress")
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert "\r" not in proc.stdout
    table_row = next(i for i, line in enumerate(lines) if line.startswith("3  conv4"))
    estimate = next(i for i, line in enumerate(lines) if line.startswith("cones: 2 layer pairs, "))
    cones_done = next(i for i, line in enumerate(lines) if line.startswith("cones (2 steps): "))
    pairs_report = next(i for i, line in enumerate(lines) if line.startswith("cone pairs (2)"))
    assert table_row < estimate < cones_done < pairs_report
    assert "--stat projection skips it" in lines[estimate]
    assert "statistics: projection, cones" in next(line for line in lines if line.startswith("zoo:digits_cnn |"))
    assert sum(line.startswith("#  layer") for line in lines) == 1  # the table is printed once


def test_stage_lines_on_stderr_and_quiet_silences_them(run_hpa):
    shown = run_hpa("scan", "zoo:digits_cnn", "--progress")
    assert shown.returncode == 0, shown.stderr
    stages = [line for line in shown.stderr.splitlines() if not line.startswith("cones: 2 layer pairs")]
    assert [_STAGE_LINE.match(line).group(1) for line in stages] == ["loading model", "projection", "cones"]
    quiet = run_hpa("scan", "zoo:digits_cnn", "--progress", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == shown.stdout
    assert run_hpa("scan", "zoo:digits_cnn", "--no-progress").stderr == ""


def test_json_is_printed_once_at_the_end(run_hpa):
    proc = run_hpa("scan", "zoo:digits_cnn", "--json", "--progress")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert data["statistics"] == ["cones", "projection"] and len(data["pairs"]) == 2
    assert list(data["statistic_extra_keys"]) == ["cones", "projection"]  # the usual order, whatever ran first
