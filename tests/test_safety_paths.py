"""Safety code the test machine never reaches by itself, reached by injecting the condition (issue 17 §4).

* Tests run as root, so ``kill(pid, 0)`` never answers EPERM: a leftover of another user's live
  process is made here by answering EPERM for one pid.
* The restricted unpickler of CIFAR batches meets a range of payloads built on different globals,
  each of which would leave a marker file if any of its code ran.  Several are built to get past
  a loosened allow-list (every ``numpy.*`` global, or the module checked without the name).
"""

from __future__ import annotations

import os
import pickle
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import snapshot
from hpa import files
from hpa.files import atomic_directory, atomic_write_text
from test_tasks import write_cifar


# -- a leftover of another user's live process ------------------------------------------------

def _kill_answering(monkeypatch, answers: dict[int, type[OSError]]):
    """``os.kill(pid, 0)`` raises ``answers[pid]`` for those pids and behaves as usual otherwise."""
    real_kill = os.kill
    asked = []

    def kill(pid, sig):
        asked.append(pid)
        if pid in answers and sig == 0:
            raise answers[pid](f"[Errno injected] kill({pid}, 0)")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    return asked


def _free_pid() -> int:
    """A pid that no process has (kill answers ESRCH for it)."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def _leftover(folder: Path, target: str, pid: int, kind: str, token: str = "0000abcd") -> Path:
    path = folder / f".{target}.hpa-{files._HOST_TAG}-{pid}-{token}.{kind}"
    if kind == "tmp":
        path.write_text("half of another user's file")
    else:
        path.mkdir()
        (path / "half.txt").write_text("another user's half-written result")
    return path


def test_leftover_of_another_users_live_process_is_kept_and_reported(tmp_path, monkeypatch):
    foreign_pid, dead_pid = _free_pid(), _free_pid() - 1
    asked = _kill_answering(monkeypatch, {foreign_pid: PermissionError})
    live = _leftover(tmp_path, "out", foreign_pid, "partial")
    dead = _leftover(tmp_path, "out", dead_pid, "partial", token="0000dead")
    before = snapshot(live)
    with pytest.warns(Warning) as caught:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "result.json").write_text("{}")
    assert foreign_pid in asked and dead_pid in asked  # kill(pid, 0) was how both were judged
    assert snapshot(live) == before  # another user's process may still be writing it
    assert not dead.exists()  # while a dead writer's leftover goes
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert live.name in messages[0] and str(foreign_pid) in messages[0] and "another user" in messages[0]
    assert (tmp_path / "out" / "result.json").read_text() == "{}"


def test_temp_file_of_another_users_live_process_is_kept_and_reported(tmp_path, monkeypatch):
    foreign_pid = _free_pid()
    _kill_answering(monkeypatch, {foreign_pid: PermissionError})
    live = _leftover(tmp_path, "run.json", foreign_pid, "tmp")
    with pytest.warns(Warning, match=str(foreign_pid)):
        atomic_write_text(tmp_path / "run.json", "{}")
    assert live.read_text() == "half of another user's file"
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "run.json"])


def test_cli_says_the_leftover_is_kept_on_one_warning_line(tmp_path, monkeypatch, capsys):
    """The real ``hpa scan --out`` (in this process, so that ``os.kill`` answers EPERM for one pid)."""
    from hpa.cli import main

    foreign_pid = _free_pid()
    _kill_answering(monkeypatch, {foreign_pid: PermissionError})
    live = _leftover(tmp_path, "out", foreign_pid, "partial")
    before = snapshot(live)
    with pytest.raises(SystemExit) as exit_:
        main(["scan", "zoo:digits_vgg", "--stat", "projection", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("Warning:")]
    assert len(warned) == 1 and live.name in warned[0] and "another user" in warned[0], err
    assert snapshot(live) == before and (tmp_path / "out" / ".hpa-manifest.json").is_file()


def test_own_process_leftover_is_kept_silently(tmp_path):
    own = _leftover(tmp_path, "out", os.getpid(), "partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "a.txt").write_text("a")
    assert (own / "half.txt").exists()


# -- the restricted unpickler of CIFAR batches ---------------------------------------------------
# Payloads are written opcode by opcode (pickle.dumps would refuse or resolve some of them).

def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _call(function: bytes, *arguments: bytes) -> bytes:
    return function + b"(" + b"".join(arguments) + b"tR"


PROTO2, PROTO4, STOP = b"\x80\x02", b"\x80\x04", b"."


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _object_npy(tmp: Path, marker: Path) -> Path:
    """A .npy of an object array whose pickle runs ``touch marker`` when numpy.load(..., allow_pickle=True) reads it."""
    path = tmp / "object.npy"
    np.save(path, np.array([_Touch(marker)], dtype=object), allow_pickle=True)
    return path


def _payloads(tmp: Path, marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the global the refusal must name); each code-carrying one creates ``marker`` if it
    runs (the numpy.load one reads ``_object_npy(tmp, marker)``)."""
    touch = _text(f"touch {marker}")
    code = _text(f"open({str(marker)!r}, 'w').close()")
    npy = tmp / "object.npy"
    return {
        "os.system": (PROTO2 + _call(_global("os", "system"), touch) + STOP, "os.system"),
        "posix.system": (PROTO2 + _call(_global("posix", "system"), touch) + STOP, "posix.system"),
        "builtins.eval": (PROTO2 + _call(_global("builtins", "eval"), code) + STOP, "builtins.eval"),
        "builtins.exec": (PROTO2 + _call(_global("builtins", "exec"), code) + STOP, "builtins.exec"),
        "__builtin__.eval (Python 2 name)": (PROTO2 + _call(_global("__builtin__", "eval"), code) + STOP,
                                             "__builtin__.eval"),
        "builtins.getattr(__import__('os'), 'system')": (
            PROTO2 + _call(_call(_global("builtins", "getattr"), _call(_global("builtins", "__import__"),
                                                                       _text("os")), _text("system")), touch)
            + STOP, "builtins.getattr"),
        "subprocess.Popen": (PROTO2 + _call(_global("subprocess", "Popen"),
                                            b"(" + _text("touch") + _text(str(marker)) + b"l") + STOP,
                             "subprocess.Popen"),
        "functools.partial(os.system)": (
            PROTO2 + _call(_call(_global("functools", "partial"), _global("os", "system"), touch)) + STOP,
            "functools.partial"),
        "copyreg._reconstructor": (PROTO2 + _call(_global("copyreg", "_reconstructor"), _global("os", "system"),
                                                  _global("builtins", "str"), touch) + STOP,
                                   "copyreg._reconstructor"),
        # numpy globals that are not array reconstructors: each runs code once allowed
        "numpy.load of a pickled object array": (
            PROTO2 + _call(_global("numpy", "load"), _text(str(npy)), b"N", b"\x88") + STOP, "numpy.load"),
        "numpy.testing.runstring": (
            PROTO2 + _call(_global("numpy.testing", "runstring"), code, b"}") + STOP, "numpy.testing.runstring"),
        # protocol 4 resolves dotted names: os.system through a numpy module that imports os
        "numpy module's os.system": (PROTO4 + _call(_global("numpy.lib._npyio_impl", "os.system"), touch) + STOP,
                                     "numpy.lib._npyio_impl.os.system"),
        # an allowed module with another name: eval fetched from the module's own builtins
        "numpy.core.multiarray.__builtins__.get('eval')": (
            PROTO4 + _call(_call(_global("numpy.core.multiarray", "__builtins__.get"), _text("eval")), code) + STOP,
            "numpy.core.multiarray.__builtins__.get"),
        "numpy._core.multiarray.__builtins__.get('exec')": (
            PROTO4 + _call(_call(_global("numpy._core.multiarray", "__builtins__.get"), _text("exec")), code)
            + STOP, "numpy._core.multiarray.__builtins__.get"),
        "numpy.core.multiarray.fromfile": (
            PROTO2 + _call(_global("numpy.core.multiarray", "fromfile"), _text(str(npy))) + STOP,
            "numpy.core.multiarray.fromfile"),
        # an allowed name under another module
        "os._reconstruct": (PROTO2 + _call(_global("os", "_reconstruct"), touch) + STOP, "os._reconstruct"),
        # an allowed global called with a forbidden one as its argument
        "numpy.dtype(os.system)": (PROTO2 + _call(_global("numpy", "dtype"), _global("os", "system")) + STOP,
                                   "os.system"),
        "_reconstruct(subprocess.Popen, ...)": (
            PROTO2 + _call(_global("numpy.core.multiarray", "_reconstruct"), _global("subprocess", "Popen"),
                           b"(K\x00t", _text("b")) + STOP, "subprocess.Popen"),
    }


def _cifar_with(tmp_path: Path, payload: bytes) -> Path:
    data = tmp_path / "data"
    write_cifar(data, per_batch=4)
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(payload)
    return data


def _refused(capsys, data: Path, out: Path) -> str:
    from hpa.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--plugin", "cifar10", "--data", str(data), "--out", str(out), "--epochs", "1",
              "--arch", "cifar:small_stride", "--stat", "none"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


PAYLOADS = tuple(_payloads(Path("tmp"), Path("tmp/marker")))


@pytest.mark.parametrize("name", PAYLOADS)
def test_unpickling_payload_is_refused_and_runs_nothing(tmp_path, capsys, name):
    marker = tmp_path / "marker"
    _object_npy(tmp_path, marker)
    payload, refused = _payloads(tmp_path, marker)[name]
    data = _cifar_with(tmp_path, payload)
    before = snapshot(data)
    line = _refused(capsys, data, tmp_path / "run")
    assert f"global {refused} is not allowed" in line and "data_batch_1" in line, (name, line)
    assert not marker.exists(), f"{name}: its code ran"
    assert not (tmp_path / "run").exists() and snapshot(data) == before


def test_payloads_would_run_when_unpickled_plainly(tmp_path):
    """The payloads are live: plain pickle runs each code-carrying one (so a refusal is what keeps them out)."""
    marker = tmp_path / "marker"
    _object_npy(tmp_path, marker)
    payloads = _payloads(tmp_path, marker)
    for name in ("os.system", "builtins.eval", "numpy.load of a pickled object array", "numpy.testing.runstring",
                 "numpy module's os.system", "numpy.core.multiarray.__builtins__.get('eval')",
                 "numpy._core.multiarray.__builtins__.get('exec')", "functools.partial(os.system)",
                 "builtins.getattr(__import__('os'), 'system')", "subprocess.Popen"):
        marker.unlink(missing_ok=True)
        try:
            pickle.loads(payloads[name][0])
        except Exception:  # noqa: BLE001 - the call ran; what it returns does not matter
            pass
        deadline = 50
        while not marker.exists() and deadline:  # Popen runs touch in a child
            time.sleep(0.1)
            deadline -= 1
        assert marker.exists(), f"{name} is not a live payload"


@pytest.mark.parametrize("case", ["top level", "as the data"])
def test_codecs_encode_is_only_a_bytes_spelling(tmp_path, capsys, case):
    """``_codecs.encode`` is allowed (protocol-2 pickles spell bytes with it); it can only make bytes."""
    encoded = _call(_global("_codecs", "encode"), _text(f"touch {tmp_path / 'marker'}"), _text("rot13"))
    if case == "top level":
        payload, expected = PROTO2 + encoded + STOP, "a pickled dict expected"
    else:
        payload = PROTO2 + b"}(" + _text("data") + encoded + _text("labels") + b"]u" + STOP
        expected = "does not hold CIFAR image rows"
    data = _cifar_with(tmp_path, payload)
    before = snapshot(data)
    line = _refused(capsys, data, tmp_path / "run")
    assert expected in line and "data_batch_1" in line, line
    assert not (tmp_path / "marker").exists() and not (tmp_path / "run").exists() and snapshot(data) == before


def test_the_allowed_reconstructors_still_read_a_real_batch(tmp_path):
    """The allow-list is not so tight that numpy arrays in protocols 2 to 5 are refused."""
    from hpa_plugins.cifar_task import _unpickle

    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"batch{protocol}"
        path.write_bytes(pickle.dumps({"data": rows, "labels": [0, 1], "n": np.int64(2)}, protocol=protocol))
        entry = _unpickle(path, path.name)
        np.testing.assert_array_equal(entry["data"], rows)
        assert entry["labels"] == [0, 1] and entry["n"] == 2
