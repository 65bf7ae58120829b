"""Damaged run folders (issue 18 §5): each file of a run damaged in turn, every command run on it.

One small run (digits, 2 epochs, ``--stat projection``) and one ``--seeds`` run are trained once
per module; every case damages a copy: the file deleted, truncated (mid-line for text) or
corrupted (a block of 0xFF bytes in its middle, as a bad sector leaves it).  The outcome of a
command is one of:

- refused: one line naming the damaged file and a fix, exit 2, the folder byte for byte as before;
- repaired: one ``Warning:`` line naming the file, and results equal to the undamaged run's;
- unaffected: the command reads none of those files: results equal, no warning.

Refusals are cheap (every check comes before any work) and run for every kind of damage; a
repair is exercised once per file with the corruption, the hardest to tell, and the matrix of
the checks themselves (:func:`test_the_reader_finds_every_kind_of_damage`) covers every kind.
Commands run in this process through ``hpa.cli.main``, as the real CLI does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import hpa
from conftest import assert_bad_input, snapshot
from hpa.errors import HpaWarning

EPOCHS = 2
FILES = ["run.json", "graph.json", "metrics.jsonl", "state/last.pt", "snapshots/epoch-000.safetensors",
         "snapshots/epoch-001.safetensors", "snapshots/epoch-002.safetensors", "stats/epoch-001.json",
         "stats/finished.jsonl", "series.csv"]
KINDS = ["deleted", "truncated", "corrupted"]
COMMANDS = ["resume", "analyse-projection", "analyse-cones", "scan", "reinit", "open_run.metrics",
            "open_run.series", "open_run.graph", "open_run.plot"]

R, A = "refused", "repaired"
# file -> command -> outcome; a command left out reads none of the file (see the "unaffected" tests).
EXPECTED = {
    "run.json": dict.fromkeys(COMMANDS, R),
    "metrics.jsonl": dict.fromkeys(COMMANDS, R),
    "graph.json": {"resume": A, "analyse-projection": R, "analyse-cones": R, "scan": R, "open_run.graph": R,
                   "open_run.plot": R},
    "state/last.pt": {"resume": A},
    "snapshots/epoch-000.safetensors": {"resume": A, "analyse-projection": R, "analyse-cones": R, "scan": R,
                                        "reinit": R},
    "snapshots/epoch-001.safetensors": {"resume": R, "analyse-projection": R, "analyse-cones": R, "scan": R,
                                        "reinit": R, "open_run.graph": R},
    "snapshots/epoch-002.safetensors": {"resume": A, "analyse-projection": R, "analyse-cones": R, "reinit": R},
    "stats/epoch-001.json": {"resume": A, "analyse-projection": A, "analyse-cones": A, "open_run.plot": R},
    "stats/finished.jsonl": {"resume": A, "analyse-projection": A, "analyse-cones": A},
    "series.csv": {"resume": A, "analyse-projection": A, "analyse-cones": A, "open_run.series": A,
                   "open_run.plot": A},
}
FIXES = ("restore it from a backup", "hpa train --resume")


# -- the runs, trained once ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from hpa.experiments.train import train

    return train("digits", out=tmp_path_factory.mktemp("damaged") / "run", epochs=EPOCHS, device="cpu",
                 statistics=("projection",))


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    """What each command gives on the undamaged run: the standard every repaired result is held to.

    A resume or an analyse-run --stat projection of the complete run changes none of its files (but
    run.json and figures/), and open_run.plot draws the figures training drew: those are read from
    the run itself; the others are run on a copy.
    """
    work = tmp_path_factory.mktemp("reference")
    results = {"resume": files_of(pristine), "open_run.plot": sorted(p.name for p in (pristine / "figures").iterdir()),
               "analyse-projection": {"series": (pristine / "series.csv").read_text(), "stats": stats_values(pristine)}}
    for name in [c for c in COMMANDS if c not in results]:
        folder = copy_run(pristine, work / name.replace(".", "-"))
        outcome = run_command(name, folder, work / f"{name}-out")
        assert outcome.returncode == 0 and not warning_lines(outcome), (name, outcome.stderr)
        results[name] = result_of(name, folder, outcome, work / f"{name}-out")
    return results


def copy_run(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)  # copy2: times kept, as a copy made by a person keeps them
    return to


def damage(path: Path, kind: str) -> None:
    if kind == "deleted":
        path.unlink()
        return
    data = path.read_bytes()
    if kind == "truncated":
        cut = len(data) // 2
        while data[cut - 1:cut] == b"\n":  # mid-line: a cut at a line's end leaves a shorter file, not half a line
            cut -= 1
        path.write_bytes(data[:cut])
    else:
        size = max(1, min(64, len(data) // 4))
        start = int(len(data) * 0.4)
        path.write_bytes(data[:start] + b"\xff" * size + data[start + size:])
    assert path.read_bytes() != data


# -- running a command --------------------------------------------------------------------------

def run_command(name: str, folder: Path, out: Path, seed: int | None = None) -> subprocess.CompletedProcess:
    """``name`` on ``folder``: the CLI in this process, or an ``hpa.open_run`` call (an HpaError: exit 2)."""
    if name.startswith("open_run."):
        return _library(name, folder, out, seed)
    inside = folder if seed is None else folder / f"seed-{seed}"
    argv = {"resume": ["train", "--resume", folder, "--quiet"],
            "analyse-projection": ["analyse-run", folder, "--stat", "projection", "--quiet"],
            "analyse-cones": ["analyse-run", folder, "--stat", "cones", "--quiet"],
            "scan": ["scan", f"run:{inside}@1", "--compare-init", "--stat", "projection", "--json"],
            "reinit": ["reinit", folder, "--quiet", "--out", out]}[name]
    return hpa_cli(*argv)


def hpa_cli(*argv) -> subprocess.CompletedProcess:
    from hpa.cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("always")  # every warning shown, as in a fresh process
        try:
            main([str(arg) for arg in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _library(name: str, folder: Path, out: Path, seed: int | None) -> subprocess.CompletedProcess:
    """An ``hpa.open_run`` access as a process would end: its value, or the error's one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = hpa.open_run(folder)
            value = {"open_run.metrics": lambda: run.metrics, "open_run.series": lambda: run.series,
                     "open_run.graph": lambda: run.graph(1, seed=seed), "open_run.plot": lambda: run.plot(out)}[name]()
            code, err = 0, ""
        except hpa.HpaError as exc:
            value, code, err = None, 2, f"Error: {exc}\n"
    err = "".join(f"Warning: {w.message}\n" for w in caught if issubclass(w.category, HpaWarning)) + err
    outcome = subprocess.CompletedProcess(name, code, "", err)
    outcome.value = value
    return outcome


def warning_lines(outcome) -> list[str]:
    return [line for line in outcome.stderr.splitlines() if line.startswith("Warning:")]


def result_of(name: str, folder: Path, outcome, out: Path):
    """What counts as the command's result, to compare with the undamaged run's."""
    if name == "resume":
        return files_of(folder)
    if name.startswith("analyse"):
        return {"series": (folder / "series.csv").read_text(), "stats": stats_values(folder)}
    if name == "scan":
        return [(layer["name"], layer["statistics"]) for layer in json.loads(outcome.stdout)["layers"]]
    if name == "reinit":
        return json.loads((out / "reinit.json").read_text())["cells"]
    if name == "open_run.graph":
        return [(layer.name, layer.weight.tolist(), layer.bias.tolist()) for layer in outcome.value]
    if name == "open_run.plot":
        return sorted(path.name for path in outcome.value)
    frame = outcome.value
    return frame.astype(object).where(frame.notna(), None).to_dict("list")  # NaN compares unequal to itself


def stats_values(folder: Path) -> dict[str, object]:
    """Each stats file's statistics and their values per layer (its "model" source names the caller)."""
    out = {}
    for path in sorted((folder / "stats").glob("epoch-*.json")):
        data = json.loads(path.read_text())
        out[path.name] = (sorted(data["statistics"]), [(e["name"], e["statistics"]) for e in data["layers"]])
    return out


def files_of(folder: Path) -> dict[str, object]:
    """Every file a resume of a complete run must leave as it was: all but run.json (its resumed list),
    figures/ (redrawn) and finished.jsonl (compared by its epochs: a rebuilt one has the stats files' times)."""
    found = {key: value for key, value in snapshot(folder).items()
             if key != "run.json" and not key.startswith("figures") and key != "stats/finished.jsonl"}
    finished = folder / "stats" / "finished.jsonl"
    found["finished epochs"] = [json.loads(line)["epoch"] for line in finished.read_text().splitlines()]
    return found


# -- the checks themselves, every file x every kind ---------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FILES)
def test_the_reader_finds_every_kind_of_damage(pristine, tmp_path, name, kind):
    """RunFolder (and RunDir.read_state for the state) names the damaged file, whatever the damage."""
    from hpa.experiments.open_run import RunFolder, RunFolderError
    from hpa.experiments.run import RunDir

    folder = copy_run(pristine, tmp_path / "run")
    damage(folder / name, kind)
    reader = RunFolder(folder)
    if name == "state/last.pt":
        with pytest.raises(hpa.LoadError, match="last.pt"):
            RunDir(folder).read_state()
        return
    if name in ("stats/finished.jsonl", "series.csv"):  # their repairs are planned from the problem's words
        problem = (reader.finished_problem if name.startswith("stats") else reader.series_problem)()
        assert problem is not None and problem.startswith("is ") and "\n" not in problem
        return
    checks = {"run.json": reader.record, "metrics.jsonl": reader.metrics, "graph.json": reader.structure,
              "stats/epoch-001.json": lambda: reader.stats(1)}
    if name.startswith("snapshots/"):
        epoch = int(name[len("snapshots/epoch-"):-len(".safetensors")])
        checks[name] = lambda: reader.check_snapshot(epoch)
    with pytest.raises(RunFolderError) as error:
        checks[name]()
    line = str(error.value)
    assert str(folder / name) in line and "\n" not in line
    assert any(fix in line for fix in FIXES), line


def test_the_undamaged_run_passes_every_check(pristine):
    from hpa.experiments.open_run import RunFolder
    from hpa.experiments.run import RunDir

    reader = RunFolder(pristine)
    assert [m["epoch"] for m in reader.metrics()] == list(range(EPOCHS + 1))
    assert all(len(m["snapshot_sha256"]) == 64 for m in reader.metrics())
    assert [reader.snapshot_problem(epoch) for epoch in range(EPOCHS + 1)] == [None] * (EPOCHS + 1)
    assert reader.graph_problem() is None and reader.series_problem() is None
    assert reader.finished_problem() is None and reader.stats_problem(1) is None
    assert RunDir(pristine).read_state()["epoch"] == EPOCHS


def test_series_made_again_from_stats_is_the_file_byte_for_byte(pristine):
    from hpa.files import csv_text
    from hpa.experiments.open_run import RunFolder

    assert csv_text(RunFolder(pristine).series_from_stats()) == (pristine / "series.csv").read_text()


# -- every command on every damaged file ----------------------------------------------------------

REFUSALS = [(name, kind, command) for name in FILES for kind in KINDS for command, outcome in
            EXPECTED[name].items() if outcome == R]
REPAIRS = [(name, command) for name in FILES for command, outcome in EXPECTED[name].items() if outcome == A]


@pytest.mark.parametrize("name, kind, command", REFUSALS, ids=["-".join(case) for case in REFUSALS])
def test_refused_in_one_line_naming_the_file_and_the_fix_with_nothing_changed(pristine, tmp_path, name, kind,
                                                                             command):
    folder = copy_run(pristine, tmp_path / "run")
    damage(folder / name, kind)
    before = snapshot(folder)
    outcome = run_command(command, folder, tmp_path / "out")
    line = assert_bad_input(outcome, name)
    assert any(fix in line for fix in FIXES), line
    assert snapshot(folder) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, command", REPAIRS, ids=["-".join(case) for case in REPAIRS])
def test_repaired_with_one_warning_and_the_undamaged_results(pristine, reference, tmp_path, name, command):
    folder = copy_run(pristine, tmp_path / "run")
    damage(folder / name, "corrupted")
    outcome = run_command(command, folder, tmp_path / "out")
    assert outcome.returncode == 0, outcome.stderr
    warned = warning_lines(outcome)
    assert len(warned) == 1 and name in warned[0], outcome.stderr
    assert [line for line in outcome.stderr.splitlines() if line.strip()] == warned  # nothing else on stderr
    expected = reference[command]
    result = result_of(command, folder, outcome, tmp_path / "out")
    if command == "resume" and name == "state/last.pt":  # fell back to the last epoch: the state stays as found
        expected, result = dict(expected), dict(result)
        assert result.pop(name) != expected.pop(name)
        assert "fell back to the last good epoch, 2" in warned[0] and "complete" in warned[0]
    assert result == expected
    if command == "resume":
        assert json.loads((folder / "run.json").read_text())["status"] == "complete"


UNAFFECTED = {command: [name for name in FILES if command not in EXPECTED[name]] for command in COMMANDS}


@pytest.mark.parametrize("command", [c for c in COMMANDS if UNAFFECTED[c]])
def test_a_command_reads_none_of_the_files_it_does_not_need(pristine, reference, tmp_path, command):
    """Every file the command should not read deleted at once: the same result, and no warning."""
    folder = copy_run(pristine, tmp_path / "run")
    for name in UNAFFECTED[command]:
        damage(folder / name, "deleted")
    outcome = run_command(command, folder, tmp_path / "out")
    assert outcome.returncode == 0 and not outcome.stderr.strip(), outcome.stderr
    assert result_of(command, folder, outcome, tmp_path / "out") == reference[command]


# -- the five failures of the issue, as it describes them ------------------------------------------

def test_resume_without_snapshots_folder_names_the_lost_epoch_and_changes_nothing(pristine, tmp_path):
    folder = copy_run(pristine, tmp_path / "run")
    shutil.rmtree(folder / "snapshots")
    before = snapshot(folder)
    line = assert_bad_input(hpa_cli("train", "--resume", folder), "epoch-001.safetensors", "restore")
    assert "Traceback" not in line and snapshot(folder) == before


def test_resume_with_metrics_cut_mid_line_is_one_line(pristine, tmp_path):
    folder = copy_run(pristine, tmp_path / "run")
    damage(folder / "metrics.jsonl", "truncated")
    before = snapshot(folder)
    assert_bad_input(hpa_cli("train", "--resume", folder), "metrics.jsonl", "cut off", "restore")
    assert snapshot(folder) == before


def test_analyse_run_with_a_truncated_snapshot_writes_nothing(pristine, tmp_path):
    folder = copy_run(pristine, tmp_path / "run")
    damage(folder / "snapshots/epoch-001.safetensors", "truncated")
    before = snapshot(folder)
    outcome = hpa_cli("analyse-run", folder, "--stat", "cones")
    assert not outcome.stdout and "epoch 0" not in outcome.stderr  # no epoch analysed before the refusal
    assert_bad_input(outcome, "epoch-001.safetensors", "truncated")
    assert snapshot(folder) == before


def test_analyse_run_keeps_the_projection_values_of_a_corrupt_stats_file(pristine, reference, tmp_path):
    folder = copy_run(pristine, tmp_path / "run")
    (folder / "stats" / "epoch-001.json").write_text("garbage\n")
    outcome = hpa_cli("analyse-run", folder, "--stat", "cones")
    assert outcome.returncode == 0, outcome.stderr
    assert len(warning_lines(outcome)) == 1 and "stats/epoch-001.json" in outcome.stderr
    kept = json.loads((folder / "stats" / "epoch-001.json").read_text())
    assert sorted(kept["statistics"]) == ["cones", "projection"]
    # series.csv equals an undamaged run's after the same command: epoch 1's projection values included
    assert (folder / "series.csv").read_text() == reference["analyse-cones"]["series"]
    assert "projection.n_l" in (folder / "series.csv").read_text().splitlines()[0]


def test_a_deleted_last_snapshot_is_written_again_by_resume(pristine, tmp_path):
    folder = copy_run(pristine, tmp_path / "run")
    last = folder / f"snapshots/epoch-{EPOCHS:03d}.safetensors"
    last.unlink()
    outcome = hpa_cli("train", "--resume", folder)
    assert outcome.returncode == 0, outcome.stderr
    warned = warning_lines(outcome)
    assert len(warned) == 1 and last.name in warned[0] and "last.pt" in warned[0]
    assert last.read_bytes() == (pristine / last.relative_to(folder)).read_bytes()


# -- a --seeds folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    from hpa.experiments.seeds import train_seeds

    return train_seeds([0, 1], tmp_path_factory.mktemp("seeds") / "seeds", task="digits", epochs=1, device="cpu",
                       statistics=("projection",))


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_seeds_json_is_made_again_from_the_seed_folders(seeds_run, tmp_path, kind):
    from hpa.experiments.open_run import read_seeds

    folder = copy_run(seeds_run, tmp_path / "seeds")
    damage(folder / "seeds.json", kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_seeds(folder) == [0, 1]
    assert len(caught) == 1 and "seeds.json" in str(caught[0].message) and "0, 1" in str(caught[0].message)


@pytest.mark.parametrize("command", ["resume", "analyse-projection"])
def test_a_seeds_folder_rewrites_its_seeds_json_and_summaries(seeds_run, tmp_path, command):
    folder = copy_run(seeds_run, tmp_path / "seeds")
    damage(folder / "seeds.json", "corrupted")
    damage(folder / "summary.csv", "truncated")
    damage(folder / "summary.json", "corrupted")
    outcome = run_command(command, folder, tmp_path / "out")
    assert outcome.returncode == 0, outcome.stderr
    warned = warning_lines(outcome)
    assert len(warned) == 3 and [name in line for name, line in zip(("seeds.json", "summary.csv", "summary.json"),
                                                                    warned)] == [True] * 3, outcome.stderr
    for name in ("seeds.json", "summary.csv", "summary.json"):
        assert (folder / name).read_bytes() == (seeds_run / name).read_bytes(), name


@pytest.mark.parametrize("command", ["scan", "reinit", "open_run.graph"])
def test_a_seeds_folder_without_its_summaries_reads_as_before(seeds_run, tmp_path, command):
    """No command but resume and analyse-run reads the summaries; open_run and reinit take the seeds from
    seeds.json, which, damaged, is read from the seed-N folders with one warning."""
    folder = copy_run(seeds_run, tmp_path / "seeds")
    for name in ("summary.csv", "summary.json"):
        damage(folder / name, "deleted")
    if command != "scan":
        damage(folder / "seeds.json", "truncated")
    before = snapshot(folder)
    outcome = run_command(command, folder, tmp_path / "out", seed=0)
    assert outcome.returncode == 0, outcome.stderr
    assert len(warning_lines(outcome)) == (command != "scan"), outcome.stderr
    assert snapshot(folder) == before  # read, not repaired: only resume and analyse-run write the folder
    if command == "reinit":
        assert json.loads((tmp_path / "out" / "reinit.json").read_text())["trained"].keys() == {"seed-0", "seed-1"}
    if command == "open_run.graph":
        from safetensors.numpy import load_file

        expected = load_file(seeds_run / "seed-0" / "snapshots" / "epoch-001.safetensors")["features.0.weight"]
        np.testing.assert_array_equal(outcome.value["features.0"].weight, expected)


def test_a_missing_seeds_json_is_still_a_seeds_folder(seeds_run, tmp_path):
    folder = copy_run(seeds_run, tmp_path / "seeds")
    (folder / "seeds.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = hpa.open_run(folder)
    assert run.seeds == [0, 1] and "is missing" in str(caught[0].message)


# -- issue 18 §6: an existing --out, and hpa reinit's messages ---------------------------------------

def test_train_out_on_an_existing_run_suggests_resume(pristine):
    before = snapshot(pristine)
    assert_bad_input(hpa_cli("train", "--plugin", "digits", "--out", pristine), f"--resume {pristine}")
    assert snapshot(pristine) == before


def test_reinit_names_the_run_for_an_epoch_it_did_not_save(pristine, tmp_path):
    line = assert_bad_input(hpa_cli("reinit", pristine, "--epochs", "99", "--out", tmp_path / "out"),
                            "epoch 99 was not saved", str(pristine), "0, 1, 2")
    assert "seed-" not in line  # a run of one seed has no seed-N folder


def test_reinit_of_a_folder_that_is_no_run_changes_nothing_there(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    os.utime(folder, ns=(10**18, 10**18))  # a modification time no probe inside it could leave
    before = snapshot(folder)
    assert_bad_input(hpa_cli("reinit", folder), "not an hpa run folder")
    assert folder.stat().st_mtime_ns == 10**18 and snapshot(folder) == before


def test_reinit_of_a_damaged_snapshot_prints_one_line_with_the_fix_and_no_progress(pristine, tmp_path):
    folder = copy_run(pristine, tmp_path / "run")
    damage(folder / "snapshots/epoch-001.safetensors", "corrupted")
    before = snapshot(folder)
    assert_bad_input(hpa_cli("reinit", folder), "epoch-001.safetensors", "restore it from a backup")  # progress on
    assert snapshot(folder) == before
