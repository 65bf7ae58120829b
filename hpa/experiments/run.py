"""The run directory: what a training run leaves behind, written so that a crash loses nothing.

::

    run.json                         task, architecture, recipe, seed, dataset files, versions, status
    graph.json                       the traced structure (layers with their ``params`` map), once
    snapshots/epoch-000.safetensors  the weights after each epoch; epoch 0 is the true initialisation
    metrics.jsonl                    one line per epoch: lr, train/validation/test loss and accuracy, seconds
    state/last.pt                    model + optimizer after the last complete epoch, for --resume

Every file is replaced atomically (``hpa.files.atomic_write_bytes``).  Per
epoch the order is snapshot, metrics, state: the state names the last
complete epoch, and on resume anything newer is dropped and redone.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from hpa.errors import HpaError, LoadError
from hpa.files import atomic_write_bytes, atomic_write_text

RUN_JSON = "run.json"
GRAPH_JSON = "graph.json"
METRICS = "metrics.jsonl"
STATE = "state/last.pt"
SNAPSHOTS = "snapshots"


def snapshot_name(epoch: int) -> str:
    return f"{SNAPSHOTS}/epoch-{epoch:03d}.safetensors"


class RunDir:
    """One run folder.  ``create`` refuses an existing folder; ``open`` reads one for resuming."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def check_new(path: str | os.PathLike) -> Path:
        """``path`` if a run may be created there (absent or an empty folder), else an HpaError."""
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise HpaError(f"the run folder {path} is a file, not a folder; choose a new --out")
        if path.exists() and any(path.iterdir()):
            raise HpaError(f"the run folder {path} already exists; continue it with --resume {path}, "
                           "or choose a new --out")
        from hpa.files import check_output_dir

        check_output_dir(path, what="run folder")  # impossible places: under a file, /proc, the cwd, read-only
        return path

    @classmethod
    def create(cls, path: str | os.PathLike) -> RunDir:
        path = cls.check_new(path)
        (path / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        (path / "state").mkdir(exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        path = Path(path).expanduser()
        if not (path / RUN_JSON).is_file():
            raise HpaError(f"{path} is not an hpa run folder (no {RUN_JSON}); give the --out folder of "
                           "an earlier 'hpa train'")
        return cls(path)

    # -- run.json and graph.json ------------------------------------------------------------

    def read_record(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / RUN_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise LoadError(f"{self.path / RUN_JSON} is unreadable ({exc}); the run cannot be resumed") from None

    def write_record(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path / RUN_JSON, json.dumps(record, indent=2, sort_keys=False) + "\n")

    def write_graph(self, graph_record: dict[str, Any]) -> None:
        atomic_write_text(self.path / GRAPH_JSON, json.dumps(graph_record, indent=1) + "\n")

    # -- snapshots, metrics, state ----------------------------------------------------------

    def write_snapshot(self, epoch: int, state_dict) -> str:
        """Save the model's tensors as safetensors; returns the file's name relative to the run."""
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        # One metadata key only: safetensors writes a multi-key map in random order (bytes would vary).
        atomic_write_bytes(self.path / snapshot_name(epoch), save(tensors, metadata={"format": "pt"}))
        return snapshot_name(epoch)

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics lines written so far (an empty list before the first)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append_metrics(self, line: dict[str, Any]) -> None:
        # The whole (small) file is rewritten atomically, so a kill never leaves half a line.
        lines = [m for m in self.metrics() if m["epoch"] < line["epoch"]] + [line]
        atomic_write_text(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in lines))

    def write_state(self, epoch: int, model_state, optimizer_state) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save({"epoch": epoch, "model": model_state, "optimizer": optimizer_state}, buffer)
        atomic_write_bytes(self.path / STATE, buffer.getvalue())

    def read_state(self) -> dict[str, Any]:
        import torch

        path = self.path / STATE
        if not path.is_file():
            raise LoadError(f"{path} is missing: the run stopped before its initial state was saved; "
                            f"delete {self.path} and start again")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoadError(f"{path} is unreadable ({type(exc).__name__}); the run cannot be resumed") from None

    def resume_state(self) -> tuple[dict[str, Any], str | None]:
        """The state to resume from, and a one-line note when it is not simply ``state/last.pt``.

        A damaged file (a truncated copy, a full disk) never stops a resume:
        a damaged snapshot of the state's own epoch is rewritten from the state
        (the same tensors, so nothing changes); an unreadable state falls back to
        the last good snapshot that has its metrics line, with the optimizer's
        momentum starting afresh.  Raises only when no epoch at all is usable.
        """
        try:
            state = self.read_state()
        except LoadError as exc:
            return self._fall_back(str(exc))
        epoch = int(state["epoch"])
        path = self.path / snapshot_name(epoch)
        if path.exists() and not self.snapshot_is_good(epoch):
            self.write_snapshot(epoch, state["model"])
            return state, (f"{path} was damaged; rewrote it from {self.path / STATE} (the same weights) "
                           f"and resumed after epoch {epoch}")
        return state, None

    def snapshot_is_good(self, epoch: int) -> bool:
        """True when the snapshot of ``epoch`` exists and reads back whole."""
        from safetensors.numpy import load_file

        try:
            load_file(str(self.path / snapshot_name(epoch)))
        except Exception:  # missing, truncated or not safetensors at all
            return False
        return True

    def _fall_back(self, reason: str) -> tuple[dict[str, Any], str]:
        from safetensors.torch import load_file

        logged = [m["epoch"] for m in self.metrics() if m.get("snapshot")]
        good = [epoch for epoch in sorted(logged, reverse=True) if self.snapshot_is_good(epoch)]
        if not good:
            raise LoadError(f"{reason}, and no snapshot is readable either; delete {self.path} and start again")
        epoch = good[0]
        state = {"epoch": epoch, "model": load_file(str(self.path / snapshot_name(epoch))), "optimizer": None}
        return state, (f"{self.path / STATE} is unusable; fell back to the last good epoch, {epoch} "
                       "(its snapshot), with the optimizer's momentum restarted, so later epochs differ "
                       "from an uninterrupted run")

    def truncate_to(self, epoch: int) -> None:
        """Drop what a killed run wrote after ``epoch``, the last complete one (all of it hpa's own)."""
        kept = [m for m in self.metrics() if m["epoch"] <= epoch]
        if len(kept) != len(self.metrics()):
            atomic_write_text(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
        for snapshot in (self.path / SNAPSHOTS).glob("epoch-*.safetensors"):
            number = snapshot.name[len("epoch-"):-len(".safetensors")]
            if number.isdigit() and int(number) > epoch:
                snapshot.unlink()
