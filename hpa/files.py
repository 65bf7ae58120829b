"""File checks and safe output: hpa never loses or overwrites a user's data.

The rules for every writer (``hpa scan --out`` today, run folders later) live here:

* An output folder is replaced only when every entry in it is listed, unchanged, in the
  manifest hpa wrote there (:data:`MANIFEST`: size and sha256 of each file).  Anything
  else is refused with one line naming the foreign or changed file; nothing is deleted.
* A folder is written into a hidden sibling staging folder and swapped in whole, so at
  every instant readers see either the complete old or the complete new result.
* On any exception, Ctrl-C (SIGINT) or SIGTERM nothing half-written stays behind.  After
  ``kill -9`` a staging folder may remain; its name (``.NAME.hpa-HOST-PID-TOKEN.partial``)
  makes it recognisably hpa's, and the next write of the same target removes it once that
  process is dead.  Nothing else is ever cleaned.
* Files and folders get the user's umask (never ``mkdtemp``'s 0700), so collaborators can read them.
"""

from __future__ import annotations

import csv
import ctypes
import errno
import functools
import hashlib
import io
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from hpa.errors import HpaWarning, LoadError, OutputError

MANIFEST = ".hpa-manifest.json"  # inside every folder hpa writes: {"files": {relative path: {size, sha256}}}
_MANIFEST_FORMAT = 1
# The host tag keeps two machines sharing a file system from judging each other's pids.
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.hpa-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.(?:partial|old|tmp)")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_model_file(path: str | os.PathLike, what: str = "model file") -> Path:
    """Return ``path`` if it is a readable, non-empty file, else raise a LoadError saying why."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{what} {p} does not exist; check the path")
    if p.is_dir():
        raise LoadError(f"{what} {p} is a directory; give the path of the file inside it")
    if p.stat().st_size == 0:
        raise LoadError(f"{what} {p} is empty (0 bytes); the download or save was probably interrupted")
    if not os.access(p, os.R_OK):
        raise LoadError(f"{what} {p} is not readable; check its permissions")
    return p


# -- checking a destination -----------------------------------------------------------

def check_output_dir(path: str | os.PathLike, what: str = "--out", nested: bool = False) -> Path:
    """Return ``path`` as an absolute Path if hpa may write a result folder there, else raise OutputError.

    Cheap enough to call before anything expensive.  Refused: the current folder or one
    of its parents, a symbolic link, an existing non-folder, a path under a regular file,
    a place where no folder and file can be created (``/proc``, read-only file systems,
    missing permissions; tried with a probe that is removed at once), and an existing
    folder holding anything hpa did not write (see :func:`foreign_entry`).  ``what``
    names the destination in messages ("--out", "run folder"); ``nested``: see :func:`foreign_entry`.
    """
    if not str(path).strip():
        raise OutputError(f"{what} is empty; give a folder path, e.g. {what} results")
    try:
        return _check_place(Path(path).expanduser().absolute(), path, what, nested)
    except OSError as exc:  # e.g. a name too long, a loop of links, an unreadable folder
        raise OutputError(f"{what} {path}: {exc.strerror or exc}; give another folder path") from None


def _check_place(target: Path, path, what: str, nested: bool = False) -> Path:
    real = Path(os.path.realpath(target))
    here = Path(os.path.realpath(os.getcwd()))
    if real == here or real in here.parents:
        raise OutputError(f"{what} {path} is the current folder or one of its parents; "
                          f"give a new sub-folder, e.g. {what} results")
    if target.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link; give the folder it points to, or a new path")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; give a new folder path")
    if target.is_dir():
        _refuse_foreign(target, path, what, nested)
    _probe_writable(target, path, what)
    return target


def foreign_entry(folder: str | os.PathLike, nested: bool = False) -> tuple[str, str] | None:
    """The first entry of ``folder`` hpa may not replace, as (relative path, why); None if there is none.

    ``why`` is "foreign" (not in the manifest, or a link), "changed" (size or sha256
    differ from the manifest) or "manifest" (the manifest itself is unreadable).  An
    empty folder, or one holding only what its manifest lists, gives None.  ``nested`` (a folder
    that grows by whole sub-folders, as ``hpa gallery``'s): a sub-folder the manifest does not list is
    hpa's too when it holds a manifest of its own that checks out the same way, and so is an hpa
    leftover (a write a killed process left, removed by the next write of its target).
    """
    folder = Path(folder)
    listed = _read_manifest(folder)
    if listed is None:
        return MANIFEST, "manifest"
    listed_folders = {str(parent) for name in listed for parent in Path(name).parents} - {"."}
    vouched: set[str] = set()  # nested sub-folders checked by their own manifest, and leftovers
    for path in sorted(_entries_under(folder)):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST or any(parent in vouched for parent in map(str, Path(name).parents)):
            continue
        if nested and name not in listed and name not in listed_folders and not path.is_symlink():
            if _LEFTOVER.fullmatch(path.name):
                vouched.add(name)
                continue
            if path.is_dir() and (path / MANIFEST).is_file():
                inner = foreign_entry(path, nested=True)
                if inner is not None:
                    return f"{name}/{inner[0]}", inner[1]
                vouched.add(name)
                continue
        if path.is_symlink() or (name not in listed and name not in listed_folders):
            return name, "foreign"
        if name in listed and (not path.is_file() or _fingerprint(path) != listed[name]):
            return name, "changed"
    return None


def _refuse_foreign(folder: Path, shown, what: str, nested: bool = False) -> None:
    found = foreign_entry(folder, nested)
    if found is None:
        return
    name, why = found
    fix = f"nothing was changed; move it away or give a new {what} folder"
    if why == "manifest":
        raise OutputError(f"{what} {shown}: its {MANIFEST} is unreadable, so hpa cannot tell its own files; {fix}")
    if why == "changed":
        raise OutputError(f"{what} {shown}: {name} was changed after hpa wrote it; {fix}")
    raise OutputError(f"{what} {shown} is a non-empty folder holding {name}, which hpa did not write; {fix}")


def _probe_writable(target: Path, shown, what: str) -> None:
    """Create and remove a folder and a file where ``target`` will go: the only honest test (root ignores modes)."""
    anchor = target.parent
    while not os.path.lexists(anchor):
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(f"{what} {shown} is under {anchor}, which is a file, not a folder; give another path")
    probe = _leftover_path(anchor / target.relative_to(anchor).parts[0], "partial")
    try:
        os.mkdir(probe)
        with open(probe / "probe", "wb"):
            pass
    except OSError as exc:
        raise OutputError(f"{what} {shown}: cannot create files in {anchor} ({exc.strerror or exc}); "
                          "give a writable folder on a regular disk") from None
    finally:
        _remove_tree(probe)


# -- the manifest -----------------------------------------------------------------------

def write_manifest(folder: str | os.PathLike) -> Path:
    """List every file under ``folder`` (size, sha256) in ``folder/MANIFEST``; returns the manifest.

    Each file is fsynced on the way, so that the manifest never describes data still in flight.
    """
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): _fingerprint(path, sync=True)
             for path in sorted(_entries_under(folder)) if path.is_file() and path.name != MANIFEST}
    text = json.dumps({"format": _MANIFEST_FORMAT, "written_by": "hpa", "files": files}, indent=1) + "\n"
    manifest = folder / MANIFEST
    _write_new_file(manifest, text.encode())
    return manifest


def replace_manifest(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """Atomically rewrite ``folder``'s manifest to list ``names`` (files hpa just wrote there, relative
    paths), for a folder that grows in place, as ``hpa gallery``'s top level; see :func:`foreign_entry`."""
    folder = Path(folder)
    files = {name: _fingerprint(folder / name, sync=True) for name in sorted(names)}
    text = json.dumps({"format": _MANIFEST_FORMAT, "written_by": "hpa", "files": files}, indent=1) + "\n"
    return atomic_write_bytes(folder / MANIFEST, text.encode())


def _read_manifest(folder: Path) -> dict[str, dict] | None:
    """The manifest's files ({} when there is none), or None when it exists but is not one of ours."""
    path = folder / MANIFEST
    if not os.path.lexists(path):
        return {}
    try:
        data = json.loads(path.read_bytes())
        files = data["files"]
        if data.get("written_by") != "hpa" or not isinstance(files, dict):
            return None
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fingerprint(path: Path, sync: bool = False) -> dict:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
        if sync:
            os.fsync(handle.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _entries_under(folder: Path) -> Iterator[Path]:
    """Every file, folder and link below ``folder``; links are not followed, an unreadable folder raises."""
    for root, dirs, files in os.walk(folder, onerror=_raise):
        for name in dirs + files:
            yield Path(root, name)


# -- writing ------------------------------------------------------------------------------

@contextmanager
def atomic_directory(target: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``target`` as a whole when the block succeeds.

    ``target`` must pass :func:`check_output_dir` (checked before and again right before
    the swap).  Everything written into the staging folder is listed in its manifest.
    The swap is atomic where the OS can exchange two folders (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); elsewhere the old folder is renamed aside for a moment.  On any
    exception, SIGINT or SIGTERM the staging folder (and any parent folder created for it)
    is removed and ``target`` is left as it was; raises OutputError for file-system errors.
    """
    target = check_output_dir(target, what)
    _remove_stale_leftovers(target)
    with _signals_as_exceptions(f"{what} {target}") as guard:
        created: list[Path] = []
        staging = _leftover_path(target, "partial")
        try:
            _make_parents(target.parent, created)
            os.mkdir(staging)
            yield staging
            write_manifest(staging)
            guard.hold()  # from here on the swap and its cleanup run to the end; a signal waits
            check_output_dir(target, what)  # the folder may have changed during the write
            old = _swap_in(staging, target)
        except BaseException as exc:
            guard.hold()
            _remove_tree(staging)
            for folder in reversed(created):
                _rmdir_quietly(folder)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {what} {target}: {exc.strerror or exc}") from exc
            raise
        if old is not None:
            _discard_old(old, target, what)
        _fsync_folder(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a hidden temp file in the same folder (user's umask), are fsynced and
    replace ``path`` in one rename.  On any failure, SIGINT or SIGTERM the temp file is
    removed and ``path`` is unchanged; file-system errors raise OutputError.
    """
    path = Path(path).absolute()
    _remove_stale_leftovers(path)
    with _signals_as_exceptions(str(path)) as guard:
        temp = _leftover_path(path, "tmp")
        try:
            _write_new_file(temp, data)
            guard.hold()
            os.replace(temp, path)
        except BaseException as exc:
            guard.hold()
            _remove_tree(temp)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
            raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with mode 0666 less the umask, write ``data``, fsync."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with open(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _make_parents(folder: Path, created: list[Path]) -> None:
    """mkdir -p with the umask, appending each folder it creates to ``created`` (outermost first)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        os.mkdir(each)
        created.append(each)


def _swap_in(staging: Path, target: Path) -> Path | None:
    """Put ``staging`` at ``target``; returns where the old target now is, or None if there was none."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return None
    if _exchange(staging, target):
        return staging
    aside = _leftover_path(target, "old")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or libc, or e.g. some network file systems
        return False
    raise OSError(code, os.strerror(code), str(second))


@functools.lru_cache(maxsize=None)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _raise(error: OSError) -> None:
    raise error


def _discard_old(old: Path, target: Path, what: str) -> None:
    """Remove the replaced result, unless something foreign slipped into it since the last check."""
    try:
        found = foreign_entry(old)
    except OSError:
        found = ("", "unreadable")
    if found is None:
        _remove_tree(old)
        return
    kept = old.with_name(f"{target.name}.kept-{os.getpid()}")
    os.rename(old, kept)
    warnings.warn(f"{what} {target}: a file appeared in the old result during the write; "
                  f"the old folder is kept as {kept}", HpaWarning, stacklevel=3)


# -- leftovers ----------------------------------------------------------------------------

def _leftover_path(target: Path, kind: str) -> Path:
    """A hidden sibling of ``target`` named so that hpa recognises it as its own (kind: partial, old, tmp)."""
    return target.with_name(f".{target.name}.hpa-{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _remove_stale_leftovers(target: Path) -> None:
    """Remove this host's leftovers of ``target`` from processes that are gone (e.g. after kill -9)."""
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if not (match and match["name"] == target.name and match["host"] == _HOST_TAG):
            continue
        pid = int(match["pid"])
        state = _process_state(pid)
        if state == "gone":
            _remove_tree(Path(entry.path))
        elif pid != os.getpid():  # this process's own are in use; another's stays, and the user hears of it
            owner = " (another user's)" if state == "foreign" else ""
            warnings.warn(f"kept {entry.path}: process {pid}{owner}, which wrote it, is still running; the next "
                          "write removes it once that process has ended, or delete it yourself if that "
                          "process is not hpa", HpaWarning, stacklevel=2)


def _process_state(pid: int) -> str:
    """"gone", "running" (ours to signal) or "foreign" (running as another user: ``kill`` answers EPERM)."""
    if pid == os.getpid():
        return "running"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "foreign"
    except OSError:  # any other answer: assume it may be alive, never delete what might be in use
        return "running"
    return "running"


def _remove_tree(path: Path) -> None:
    """Remove a file or folder tree if it exists; never follows links, never raises."""
    if os.path.islink(path) or os.path.isfile(path):
        _unlink_quietly(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _unlink_quietly(Path(root, name))
        for name in dirs:
            child = Path(root, name)
            _unlink_quietly(child) if child.is_symlink() else _rmdir_quietly(child)
    _rmdir_quietly(path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; some file systems cannot fsync a folder, which is fine."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# -- signals -------------------------------------------------------------------------------

class _Signalled(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives during a write, so that cleanup runs."""


class _Guard:
    """The first signal raises _Signalled unless held; every later one only waits to be re-delivered."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.held = False

    def handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if not self.held:
            self.held = True
            raise _Signalled(signum)

    def hold(self) -> None:
        self.held = True


@contextmanager
def _signals_as_exceptions(what: str) -> Iterator[_Guard]:
    """Turn SIGINT and SIGTERM into an exception during a write, then hand them on.

    When the block ends the previous handlers are restored and a signal that arrived is
    re-delivered to them, so SIGTERM still ends the process and Ctrl-C still raises
    KeyboardInterrupt.  If the process survives that, an interrupted write raises
    OutputError.  Signal handlers can only be set in the main thread; elsewhere this
    does nothing.  Ignored signals stay ignored.
    """
    guard = _Guard()
    previous = {}
    interrupted = False
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    previous[signum] = signal.signal(signum, guard.handle)
        yield guard
    except _Signalled:
        interrupted = True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if guard.received is not None:
            signal.raise_signal(guard.received)
    if interrupted:
        raise OutputError(f"writing {what} was interrupted by {signal.Signals(guard.received).name}; "
                          "nothing was changed")


def csv_text(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV, the columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
