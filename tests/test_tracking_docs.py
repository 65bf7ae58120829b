"""The README's "Tracking your own training" snippets and ``examples/own_loop.py`` run as written and leave the
run folders they promise."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

import hpa

ROOT = Path(__file__).resolve().parent.parent


def _snippets() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tracking your own training\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_three_snippets_of_at_most_25_lines():
    snippets = _snippets()
    assert len(snippets) == 3
    assert [len(s.splitlines()) <= 25 for s in snippets] == [True] * 3
    assert ["hpa.Tracker(" in snippets[0], "integrations.lightning" in snippets[1],
            "integrations.transformers" in snippets[2]] == [True] * 3


@pytest.mark.parametrize("index, folder", [(0, "runs/own-loop"), (1, "runs/lightning"), (2, "runs/hf")])
def test_each_readme_snippet_runs_and_writes_its_run_folder(tmp_path, monkeypatch, index, folder):
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippets()[index], f"README snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    run = hpa.open_run(tmp_path / folder)
    assert run.record["status"] == "complete" and run.epochs() == [0, 1, 2]
    assert run.series["projection.n_l"].notna().sum() == 3 * 2  # two conv layers, three snapshots
    assert (tmp_path / folder / "figures" / "projection_n_l_epochs.png").is_file()


def test_own_loop_example_runs(tmp_path, monkeypatch, capsys):
    """Run as ``python examples/own_loop.py OUT`` runs it, in this process (torch is imported once)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "examples" / "own_loop.py"), str(tmp_path / "out")])
    runpy.run_path(str(ROOT / "examples" / "own_loop.py"), run_name="__main__")
    run = hpa.open_run(tmp_path / "out" / "run")
    assert run.record["status"] == "complete" and run.epochs() == [0, 1, 2, 3]
    assert run.metrics["test_accuracy"].iloc[-1] > 0.5  # it learns
    assert "relative accuracy drop" in capsys.readouterr().out
    assert any((tmp_path / "out" / "run" / "tensorboard").iterdir())
