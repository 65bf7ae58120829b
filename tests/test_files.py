"""hpa/files.py on its own: the output rules every writer shares (issue 7 §1, issue 12 atomicity)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpa import files
from hpa.errors import HpaError, OutputError
from conftest import snapshot
from hpa.files import MANIFEST, atomic_directory, atomic_write_text, check_output_dir, foreign_entry


def write_result(folder: Path, version: int) -> None:
    """A small result with a sub-folder, as a writer inside atomic_directory would make it."""
    (folder / "result.json").write_text(json.dumps({"version": version}))
    (folder / "figures").mkdir()
    (folder / "figures" / f"plot{version}.txt").write_text("x" * version)


def hpa_result(target: Path, version: int = 1) -> Path:
    with atomic_directory(target) as staging:
        write_result(staging, version)
    return target


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(".") and ".hpa-" in name)


# -- check_output_dir ------------------------------------------------------------------------

def _cases():
    def regular_file(tmp):
        (tmp / "taken").write_text("mine")
        return tmp / "taken", "is a file"

    def under_a_file(tmp):
        (tmp / "taken").write_text("mine")
        return tmp / "taken" / "out", "which is a file"

    def foreign_next_to_result(tmp):  # the reproduction
        (tmp / "run1").mkdir()
        (tmp / "run1" / "result.json").write_text("{}")
        (tmp / "run1" / "notes.txt").write_text("log")
        return tmp / "run1", "notes.txt"

    def changed_hpa_file(tmp):
        hpa_result(tmp / "out")
        (tmp / "out" / "figures" / "plot1.txt").write_text("edited by hand")
        return tmp / "out", "figures/plot1.txt was changed"

    def foreign_in_hpa_subfolder(tmp):
        hpa_result(tmp / "out")
        (tmp / "out" / "figures" / "mine.txt").write_text("mine")
        return tmp / "out", "figures/mine.txt"

    def link_inside(tmp):
        hpa_result(tmp / "out")
        (tmp / "out" / "shortcut").symlink_to(tmp)
        return tmp / "out", "shortcut"

    def broken_manifest(tmp):
        hpa_result(tmp / "out")
        (tmp / "out" / MANIFEST).write_text("{not json")
        return tmp / "out", "unreadable"

    def link_as_target(tmp):
        (tmp / "real").mkdir()
        (tmp / "out").symlink_to(tmp / "real")
        return tmp / "out", "symbolic link"

    def proc(tmp):
        return Path("/proc/hpa-test-out"), "cannot create files in /proc"

    return [regular_file, under_a_file, foreign_next_to_result, changed_hpa_file, foreign_in_hpa_subfolder,
            link_inside, broken_manifest, link_as_target, proc]


@pytest.mark.parametrize("case", _cases(), ids=lambda case: case.__name__)
def test_check_output_dir_refuses_with_one_line_and_touches_nothing(case, tmp_path):
    out, words = case(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError) as caught:
        check_output_dir(out)
    message = str(caught.value)
    assert words in message and "\n" not in message
    assert isinstance(caught.value, HpaError)
    assert snapshot(tmp_path) == before


def test_a_read_only_place_is_refused():
    # Tests run as root, for whom chmod does not stop writes; sysfs refuses even root.
    probe = Path("/sys/hpa-test-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here, so there is no read-only place for root to try")
    with pytest.raises(OutputError, match="cannot create files in /sys"):
        check_output_dir(probe / "out")


def test_the_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for out in (".", "..", str(tmp_path), "./"):
        with pytest.raises(OutputError, match="current folder"):
            check_output_dir(out)
    assert check_output_dir("results") == inner / "results"


def test_accepted_places_are_left_as_they_were(tmp_path):
    (tmp_path / "empty").mkdir()
    hpa_result(tmp_path / "earlier")
    before = snapshot(tmp_path)
    for out in ("new", "new/deeper/still", "empty", "earlier"):
        assert check_output_dir(tmp_path / out) == tmp_path / out
    assert snapshot(tmp_path) == before  # the write probe is gone again


# -- the manifest --------------------------------------------------------------------------

def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    target = hpa_result(tmp_path / "out", version=3)
    manifest = json.loads((target / MANIFEST).read_text())
    expected = {}
    for name in ("result.json", "figures/plot3.txt"):
        data = (target / name).read_bytes()
        expected[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["files"] == expected
    assert foreign_entry(target) is None


def test_foreign_entry_tells_foreign_changed_and_missing_apart(tmp_path):
    target = hpa_result(tmp_path / "out")
    (target / "figures" / "plot1.txt").unlink()  # removing hpa's own file is fine
    assert foreign_entry(target) is None
    (target / "result.json").write_text('{"version": 9}')
    assert foreign_entry(target) == ("result.json", "changed")
    (target / "a-user-file").write_text("mine")
    assert foreign_entry(target) == ("a-user-file", "foreign")
    (tmp_path / "empty").mkdir()
    assert foreign_entry(tmp_path / "empty") is None


def test_a_folder_without_manifest_counts_as_foreign(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text("{}")  # what hpa wrote before manifests existed
    assert foreign_entry(tmp_path / "old") == ("result.json", "foreign")


# -- atomic_directory ----------------------------------------------------------------------

def test_replacing_an_earlier_result_leaves_no_stale_files(tmp_path):
    target = hpa_result(tmp_path / "out", version=1)
    hpa_result(target, version=2)
    assert sorted(snapshot(target)) == [MANIFEST, "figures", "figures/plot2.txt", "result.json"]
    assert json.loads((target / "result.json").read_text()) == {"version": 2}
    assert os.listdir(tmp_path) == ["out"]


def test_refusal_deletes_nothing_and_leaves_no_staging(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "result.json").write_text("{}")
    (tmp_path / "run1" / "notes.txt").write_text("log")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="notes.txt"):
        hpa_result(tmp_path / "run1")
    assert snapshot(tmp_path) == before


def test_an_exception_in_the_writer_keeps_the_old_result(tmp_path):
    hpa_result(tmp_path / "deep" / "out")
    before = snapshot(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with atomic_directory(tmp_path / "deep" / "out") as staging:
            write_result(staging, 2)
            1 / 0
    assert snapshot(tmp_path) == before


def test_a_failed_first_write_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a" / "b" / "out") as staging:
            write_result(staging, 1)
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


def test_a_file_added_during_the_write_is_refused_and_kept(tmp_path):
    target = hpa_result(tmp_path / "out")
    with pytest.raises(OutputError, match="late.txt"):
        with atomic_directory(target) as staging:
            write_result(staging, 2)
            (target / "late.txt").write_text("written by someone else meanwhile")
    assert (target / "late.txt").exists() and json.loads((target / "result.json").read_text()) == {"version": 1}
    assert leftovers(tmp_path) == []


def test_a_file_added_at_the_last_moment_is_kept_with_the_old_folder(tmp_path, monkeypatch):
    target = hpa_result(tmp_path / "out")
    real_swap = files._swap_in

    def someone_writes_just_before_the_swap(staging, to):
        (to / "late.txt").write_text("mine")
        return real_swap(staging, to)

    monkeypatch.setattr(files, "_swap_in", someone_writes_just_before_the_swap)
    with pytest.warns(UserWarning, match="kept as"):
        hpa_result(target, 2)
    kept = tmp_path / f"out.kept-{os.getpid()}"
    assert (kept / "late.txt").read_text() == "mine" and json.loads((kept / "result.json").read_text())["version"] == 1
    assert json.loads((target / "result.json").read_text()) == {"version": 2}
    assert sorted(os.listdir(tmp_path)) == ["out", kept.name]


class Faults:
    """Counts the write calls and makes call number ``fail_at`` raise OSError(EIO)."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.count = 0
        self.failed_in = None

    def wrap(self, real, name, is_write=lambda *args, **kwargs: True):
        def call(*args, **kwargs):
            if is_write(*args, **kwargs):
                self.count += 1
                if self.count == self.fail_at:
                    self.failed_in = name
                    raise OSError(errno.EIO, f"injected failure in {name}")
            return real(*args, **kwargs)

        return call

    @contextmanager
    def installed(self, monkeypatch):
        def writes_file(file, mode="r", *args, **kwargs):
            return any(flag in mode for flag in "wxa+")

        def writes_fd(path, flags, *args, **kwargs):
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

        with monkeypatch.context() as patch:
            for name in ("mkdir", "fsync", "rename", "replace"):
                patch.setattr(os, name, self.wrap(getattr(os, name), name))
            patch.setattr(os, "open", self.wrap(os.open, "os.open", writes_fd))
            patch.setattr(builtins, "open", self.wrap(builtins.open, "open", writes_file))
            patch.setattr(io, "open", self.wrap(io.open, "io.open", writes_file))
            patch.setattr(files, "_exchange", self.wrap(files._exchange, "exchange"))
            yield self


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_failure_at_every_write_step_leaves_old_or_new_never_a_mix(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(files, "_renameat2", lambda: None)
    dry = Faults()
    hpa_result(tmp_path / "dry" / "out", 1)
    with dry.installed(monkeypatch):
        hpa_result(tmp_path / "dry" / "out", 2)
    new = snapshot(tmp_path / "dry" / "out")
    assert dry.count > 10  # mkdirs, opens, fsyncs, the swap...
    outcomes = set()
    for fail_at in range(1, dry.count + 1):
        base = tmp_path / f"fail-{fail_at}"
        hpa_result(base / "out", 1)
        old = snapshot(base)
        faults = Faults(fail_at)
        try:
            with faults.installed(monkeypatch):
                hpa_result(base / "out", 2)
        except OutputError as exc:
            assert "injected failure" in str(exc)
            assert snapshot(base) == old, faults.failed_in
            outcomes.add("old")
        else:
            assert snapshot(base / "out") == new and os.listdir(base) == ["out"], faults.failed_in
            outcomes.add("new")
    assert "old" in outcomes


def test_with_exchange_the_target_never_disappears(tmp_path):
    if files._renameat2() is None:
        pytest.skip("renameat2 is not available on this system")
    target = hpa_result(tmp_path / "out")
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not os.path.isfile(target / "result.json"):
                missing.append(time.monotonic())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for version in range(2, 40):
            hpa_result(target, version)
    finally:
        stop.set()
        watcher.join()
    assert missing == []


def test_umask_decides_the_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        target = hpa_result(tmp_path / "parent" / "out")
        atomic_write_text(tmp_path / "run.json", "{}")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "parent", target, target / "figures"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for file in (target / "result.json", target / MANIFEST, tmp_path / "run.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file

    previous = os.umask(0o077)
    try:
        private = hpa_result(tmp_path / "private")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / MANIFEST).stat().st_mode) == 0o600


# -- signals -------------------------------------------------------------------------------

def test_sigint_during_the_write_keeps_the_old_result(tmp_path):
    target = hpa_result(tmp_path / "out")
    before = snapshot(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            write_result(staging, 2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here, long before the sleep ends
    assert snapshot(tmp_path) == before
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.fixture
def sigterm_calls():
    """A SIGTERM handler of the program's own, which hpa must hand the signal on to."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_write_keeps_the_old_result_and_reaches_the_program(tmp_path, sigterm_calls):
    target = hpa_result(tmp_path / "out")
    before = snapshot(tmp_path)
    own_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(OutputError, match="interrupted by SIGTERM"):
        with atomic_directory(target) as staging:
            write_result(staging, 2)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert snapshot(tmp_path) == before
    assert sigterm_calls == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is own_handler


def test_a_signal_during_the_swap_waits_until_the_swap_is_complete(tmp_path, monkeypatch, sigterm_calls):
    target = hpa_result(tmp_path / "out")
    real_swap = files._swap_in

    def swap_after_a_signal(staging, to):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_swap(staging, to)

    monkeypatch.setattr(files, "_swap_in", swap_after_a_signal)
    hpa_result(target, 2)
    assert json.loads((target / "result.json").read_text()) == {"version": 2}
    assert sigterm_calls == [signal.SIGTERM] and leftovers(tmp_path) == []


def test_outside_the_main_thread_no_handlers_are_touched(tmp_path):
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(hpa_result(tmp_path / "out")))
    thread.start()
    thread.join()
    assert seen == [tmp_path / "out"] and foreign_entry(tmp_path / "out") is None
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# -- kill -9 and stale leftovers -----------------------------------------------------------

KILLED_WRITER = """
import sys, time
from pathlib import Path
from hpa.files import atomic_directory
with atomic_directory(sys.argv[1]) as staging:
    (staging / "half.txt").write_text("half")
    print(staging, flush=True)
    time.sleep(120)
"""


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_after_kill_9_the_next_write_removes_only_dead_hpa_staging(tmp_path):
    target = hpa_result(tmp_path / "out")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    staging = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    writer.stdout.close()
    assert staging.parent == tmp_path and (staging / "half.txt").exists()  # kill -9 cannot be cleaned up at once
    assert json.loads((target / "result.json").read_text()) == {"version": 1}

    tag, dead = files._HOST_TAG, dead_pid()
    other_tag = "0" * 8 if tag != "0" * 8 else "1" * 8
    kept = [f".out.hpa-{tag}-{os.getpid()}-0000abcd.partial",  # a live process (this one)
            f".out.hpa-{other_tag}-{dead}-0000abcd.partial",  # another machine's, on a shared disk
            f".other.hpa-{tag}-{dead}-0000abcd.partial",  # another target
            ".out.backup", f"out.hpa-{tag}-{dead}-0000abcd.partial", f".out.hpa-{tag}-{dead}-xyz.partial"]
    for name in kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("not hpa's to delete")
    stale_file = tmp_path / f".out.hpa-{tag}-{dead}-0000abcd.old"
    stale_file.mkdir()
    before = snapshot(tmp_path)
    hpa_result(target, 2)
    after = snapshot(tmp_path)
    for name in kept:
        assert after[f"{name}/keep.txt"] == before[f"{name}/keep.txt"]
    assert not staging.exists() and not stale_file.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out"])


# -- atomic_write_bytes / atomic_write_text -------------------------------------------------

def test_atomic_write_replaces_a_file(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["run.json"]


@pytest.mark.parametrize("step", ["open", "fsync", "replace"])
def test_atomic_write_failure_keeps_the_old_file(step, tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(OutputError, match="No space left"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]


def test_atomic_write_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "run.json").mkdir()
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write_text(tmp_path / "run.json", "{}")
    assert os.listdir(tmp_path) == ["run.json"]


def test_atomic_write_removes_a_dead_writers_temp_file(tmp_path):
    stale = tmp_path / f".run.json.hpa-{files._HOST_TAG}-{dead_pid()}-0000abcd.tmp"
    stale.write_text("half")
    atomic_write_text(tmp_path / "run.json", "{}")
    assert os.listdir(tmp_path) == ["run.json"]
