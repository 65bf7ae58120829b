"""Shared fixtures.  Entry-point autoloading is off in tests unless a test is about it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HPA_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def deliverable_ctrl_c():
    """Tests send SIGINT.  A runner started in the background (nohup, ``&``) ignores it, and so would
    every hpa subprocess (an ignored signal stays ignored across exec): give Python's handler back."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture
def run_hpa(tmp_path):
    """Run the real ``hpa`` command in a subprocess; returns CompletedProcess (text)."""

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "hpa", *map(str, args)], capture_output=True, text=True,
                              env=full_env, cwd=cwd or tmp_path, timeout=600)

    return run


@pytest.fixture
def temporary_plugin():
    """Register an in-process plugin for one test and always unregister it."""
    from hpa import plugins

    names = []

    def register(plugin, name: str):
        plugins.register(plugin, name)
        names.append(name)

    yield register
    for name in names:
        plugins.unregister(name)


def assert_bad_input(proc, *words: str) -> str:
    """One stderr line, exit 2, no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, object]:
    """Everything below ``root``: file bytes, "dir" for folders, ("link", target) for links."""
    found: dict[str, object] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder, name)
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            else:
                found[key] = "dir" if path.is_dir() else path.read_bytes()
    return found
