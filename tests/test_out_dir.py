"""``hpa scan --out`` through the real command: no lost files, no partial output (issue 7 §1, issue 12).

Every bad ``--out`` gives one stderr line and exit 2, deletes and changes nothing, and
leaves no partial folder.  The bad-input cases use a model spec that would fail to load,
so the ``--out`` message proves that the destination is checked before the model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import assert_bad_input, snapshot

MANIFEST = ".hpa-manifest.json"
UNLOADABLE = "no-such-model.pt"  # loading this fails; a bad --out must be reported first


@pytest.fixture(scope="module")
def earlier_result(tmp_path_factory):
    """A real result of ``hpa scan zoo:digits_cnn --out``, written once and copied into each test."""
    folder = tmp_path_factory.mktemp("earlier")
    proc = subprocess.run([sys.executable, "-m", "hpa", "scan", "zoo:digits_cnn", "--out", "result"],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return folder / "result"


def copy_result(earlier: Path, to: Path) -> Path:
    shutil.copytree(earlier, to, symlinks=True)
    return to


# -- the bad-input corpus ------------------------------------------------------------------
# Each case prepares tmp_path and returns (the --out argument, words the message must hold).

def foreign_next_to_result(tmp, earlier):  # the issue's reproduction
    (tmp / "run1").mkdir()
    (tmp / "run1" / "result.json").write_text("{}")
    (tmp / "run1" / "notes.txt").write_text("log")
    return "run1", ["--out run1", "notes.txt", "hpa did not write"]


def users_own_folder(tmp, earlier):
    (tmp / "thesis").mkdir()
    (tmp / "thesis" / "thesis.tex").write_text("do not delete")
    return "thesis", ["thesis.tex", "hpa did not write"]


def result_from_before_manifests(tmp, earlier):
    (tmp / "old").mkdir()
    (tmp / "old" / "result.json").write_text("{}")
    return "old", ["result.json", "hpa did not write"]


def foreign_file_added_to_hpa_result(tmp, earlier):
    copy_result(earlier, tmp / "result")
    (tmp / "result" / "my-notes.md").write_text("observations")
    return "result", ["my-notes.md"]


def hidden_foreign_file(tmp, earlier):
    copy_result(earlier, tmp / "result")
    (tmp / "result" / ".DS_Store").write_bytes(b"\0\1")
    return "result", [".DS_Store"]


def foreign_subfolder(tmp, earlier):
    copy_result(earlier, tmp / "result")
    (tmp / "result" / "extra").mkdir()
    (tmp / "result" / "extra" / "table.csv").write_text("a,b\n")
    return "result", ["extra"]


def edited_result_json(tmp, earlier):
    copy_result(earlier, tmp / "result")
    data = json.loads((tmp / "result" / "result.json").read_text())
    data["note"] = "hand edit"
    (tmp / "result" / "result.json").write_text(json.dumps(data))
    return "result", ["result.json was changed"]


def truncated_figure(tmp, earlier):
    copy_result(earlier, tmp / "result")
    figure = next((tmp / "result").glob("*.png"))
    figure.write_bytes(figure.read_bytes()[:100])
    return "result", [f"{figure.name} was changed"]


def same_size_edit(tmp, earlier):  # only the hash can tell
    copy_result(earlier, tmp / "result")
    path = tmp / "result" / "layers.csv"
    data = bytearray(path.read_bytes())
    data[-2] = ord("7") if data[-2] != ord("7") else ord("8")
    path.write_bytes(bytes(data))
    return "result", ["layers.csv was changed"]


def file_replaced_by_folder(tmp, earlier):
    copy_result(earlier, tmp / "result")
    (tmp / "result" / "filters.csv").unlink()
    (tmp / "result" / "filters.csv").mkdir()
    return "result", ["filters.csv"]


def link_inside_result(tmp, earlier):
    copy_result(earlier, tmp / "result")
    (tmp / "data").mkdir()
    (tmp / "data" / "precious.bin").write_bytes(b"data")
    (tmp / "result" / "data").symlink_to(tmp / "data")
    return "result", ["data", "hpa did not write"]


def corrupt_manifest(tmp, earlier):
    copy_result(earlier, tmp / "result")
    (tmp / "result" / MANIFEST).write_text("{")
    return "result", [MANIFEST, "unreadable"]


def hand_written_manifest(tmp, earlier):  # a manifest hpa did not write is not a licence to delete
    (tmp / "result").mkdir()
    (tmp / "result" / "notes.txt").write_text("log")
    (tmp / "result" / MANIFEST).write_text(json.dumps({"files": {"notes.txt": {}}}))
    return "result", [MANIFEST, "unreadable"]


def out_is_a_file(tmp, earlier):
    (tmp / "result").write_text("a file of the user's")
    return "result", ["--out result", "is a file"]


def out_under_a_file(tmp, earlier):
    (tmp / "notes.txt").write_text("log")
    return "notes.txt/result", ["notes.txt", "which is a file"]


def out_in_proc(tmp, earlier):
    return "/proc/hpa-result", ["/proc", "cannot create files"]


def out_in_read_only_sysfs(tmp, earlier):
    try:
        Path("/sys/hpa-test-probe").mkdir()
    except OSError:
        return "/sys/hpa-result", ["/sys", "cannot create files"]
    Path("/sys/hpa-test-probe").rmdir()
    pytest.skip("/sys is writable here, so there is no read-only place for root (chmod does not stop root)")


def out_is_current_folder(tmp, earlier):
    (tmp / "data.csv").write_text("1,2\n")
    return ".", ["current folder"]


def out_is_parent_folder(tmp, earlier):
    return "..", ["current folder"]


def out_is_cwd_spelled_absolute(tmp, earlier):
    (tmp / "data.csv").write_text("1,2\n")
    return str(tmp), ["current folder"]


def out_is_a_link(tmp, earlier):
    copy_result(earlier, tmp / "real")
    (tmp / "result").symlink_to(tmp / "real")
    return "result", ["symbolic link"]


def out_is_a_dangling_link(tmp, earlier):
    (tmp / "result").symlink_to(tmp / "nowhere")
    return "result", ["symbolic link"]


def out_is_empty(tmp, earlier):  # once silently ignored: no result written, and no word about it
    (tmp / "data.csv").write_text("1,2\n")
    return "", ["is empty"]


def out_name_too_long(tmp, earlier):
    return "r" * 300, ["file name too long"]


CORPUS = [foreign_next_to_result, users_own_folder, result_from_before_manifests, foreign_file_added_to_hpa_result,
          hidden_foreign_file, foreign_subfolder, edited_result_json, truncated_figure, same_size_edit,
          file_replaced_by_folder, link_inside_result, corrupt_manifest, hand_written_manifest, out_is_a_file,
          out_under_a_file, out_in_proc, out_in_read_only_sysfs, out_is_current_folder, out_is_parent_folder,
          out_is_cwd_spelled_absolute, out_is_a_link, out_is_a_dangling_link, out_is_empty, out_name_too_long]


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.__name__)
def test_bad_out_is_refused_before_loading_and_changes_nothing(case, earlier_result, run_hpa, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out, words = case(work, earlier_result)
    before = snapshot(tmp_path)
    line = assert_bad_input(run_hpa("scan", UNLOADABLE, "--out", out, cwd=work), "--out", *words)
    assert UNLOADABLE not in line  # the model was never tried
    assert snapshot(tmp_path) == before  # nothing deleted, changed or left behind


def test_the_issues_reproduction_with_a_real_model(run_hpa, tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "result.json").write_text("{}\n")
    (tmp_path / "run1" / "notes.txt").write_text("log\n")
    before = snapshot(tmp_path)
    assert_bad_input(run_hpa("scan", "zoo:digits_cnn", "--out", "run1"), "notes.txt")
    assert snapshot(tmp_path) == before


# -- replacing an earlier result -------------------------------------------------------------

def test_an_earlier_result_is_replaced_whole(earlier_result, run_hpa, tmp_path):
    copy_result(earlier_result, tmp_path / "result")
    assert any(p.suffix == ".png" for p in (tmp_path / "result").iterdir())
    proc = run_hpa("scan", "zoo:digits_cnn", "--stat", "projection", "--format", "svg", "--out", "result")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "result").iterdir())
    assert names == sorted([MANIFEST, "filters.csv", "layers.csv", "projection_histograms.svg",
                            "projection_n_l.svg", "result.json"])  # no png, no cones file of the old result
    listed = json.loads((tmp_path / "result" / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(set(names) - {MANIFEST})
    for name, entry in listed.items():
        data = (tmp_path / "result" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((tmp_path / "result" / "result.json").read_text())["statistics"] == ["projection"]
    assert os.listdir(tmp_path) == ["result"]


def test_results_are_readable_by_collaborators_under_umask_022(tmp_path):
    command = [sys.executable, "-m", "hpa", "scan", "zoo:digits_cnn", "--stat", "projection", "--out", "shared/run"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    for path in [tmp_path / "shared", *(tmp_path / "shared").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


# -- interrupted writes ---------------------------------------------------------------------

SLOW_PLUGIN = '''
"""A statistic whose figure takes long: it writes a file, says so, then waits to be killed."""
import time
from pathlib import Path

from hpa import Statistic, StatisticResult, hookimpl

READY = Path({ready!r})


def compute(graph, context):
    return StatisticResult()


def plot(result, folder, format):
    (folder / "half-written.txt").write_text("half")
    READY.write_text(str(folder))
    time.sleep(300)
    return []


@hookimpl
def register_statistics(register):
    register(Statistic(name="slowplot", compute=compute, plot=plot))
'''


@pytest.fixture
def slow_plugin(tmp_path):
    """A third-party plugin package, installed through a real entry point on PYTHONPATH."""
    site = tmp_path / "site"
    (site / "hpa_slowplot-0.1.dist-info").mkdir(parents=True)
    ready = tmp_path / "ready"
    (site / "hpa_slowplot.py").write_text(textwrap.dedent(SLOW_PLUGIN).format(ready=str(ready)))
    (site / "hpa_slowplot-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hpa-slowplot\nVersion: 0.1\n")
    (site / "hpa_slowplot-0.1.dist-info" / "entry_points.txt").write_text("[hpa]\nslowplot = hpa_slowplot\n")
    env = dict(os.environ, HPA_DISABLE_PLUGIN_AUTOLOAD="0",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return env, ready


def start_slow_scan(work: Path, env: dict[str, str], ready: Path) -> tuple[subprocess.Popen, Path]:
    """Start a scan whose write blocks inside its staging folder; returns it once it is there."""
    command = [sys.executable, "-m", "hpa", "scan", "zoo:digits_cnn", "--stat", "projection", "--stat", "slowplot",
               "--out", "result"]
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the scan ended before its write: {proc.communicate()}")
        assert time.monotonic() < deadline, "the scan never reached its write"
        time.sleep(0.05)
    staging = work / ready.read_text()  # as the plugin saw it, relative to the scan's folder or absolute
    assert staging.parent == work and staging.name.endswith(".partial") and (staging / "half-written.txt").exists()
    return proc, staging


# Ctrl-C ends as click's "Aborted." with status 1; SIGTERM ends the process by the signal, as if hpa had no handler.
@pytest.mark.parametrize("signum, returncode", [(signal.SIGINT, 1), (signal.SIGTERM, -signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_write_keeps_the_old_result(signum, returncode, slow_plugin, earlier_result, tmp_path):
    env, ready = slow_plugin
    work = tmp_path / "work"
    copy_result(earlier_result, work / "result")
    before = snapshot(work)
    proc, staging = start_slow_scan(work, env, ready)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == returncode, stderr
    # The layer table may already be on stdout (results are shown as soon as they are ready),
    # but nothing may claim that the folder was written.
    assert "Traceback" not in stderr and "wrote" not in stdout
    assert not staging.exists()
    assert snapshot(work) == before  # the old result, whole; nothing half-written visible


def test_after_kill_9_the_next_scan_cleans_up(slow_plugin, earlier_result, run_hpa, tmp_path):
    env, ready = slow_plugin
    work = tmp_path / "work"
    copy_result(earlier_result, work / "result")
    before = snapshot(work / "result")
    proc, staging = start_slow_scan(work, env, ready)
    proc.kill()
    proc.communicate(timeout=60)
    assert staging.exists()  # nothing can clean up after SIGKILL at once...
    assert snapshot(work / "result") == before  # ...but the old result is whole
    again = run_hpa("scan", "zoo:digits_cnn", "--stat", "projection", "--out", "result", cwd=work)
    assert again.returncode == 0, again.stderr
    assert os.listdir(work) == ["result"]  # the dead scan's staging folder is gone
