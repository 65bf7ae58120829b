"""File checks and atomic output shared by loaders and the CLI."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hpa.errors import HpaError, LoadError


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


_MARKER = "result.json"


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``target`` only if the block succeeds.

    ``target`` may exist if it is empty or holds an earlier hpa result;
    anything else is refused rather than overwritten.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise HpaError(f"--out {target} is a file; give a folder path")
        if any(target.iterdir()) and not (target / _MARKER).exists():
            raise HpaError(f"--out {target} is a non-empty folder that does not hold an hpa result; "
                           "choose a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.{os.getpid()}.old"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
