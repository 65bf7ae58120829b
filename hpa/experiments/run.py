"""Writing a run folder: what a training run leaves behind, written so that a crash loses nothing.

The files are named in :mod:`hpa.experiments.layout`; they are read back, with
checks, by :class:`hpa.experiments.open_run.RunFolder`.  Every file is replaced
atomically (``hpa.files.atomic_write_bytes``).  Per epoch the order is snapshot,
metrics, state: the state names the last complete epoch, and on resume anything
newer is dropped and redone.  Each snapshot's sha256 is recorded in its metrics
line and the state holds a sha256 of its own tensors, so that a damaged copy is
told from a good one.

A resume first checks the whole folder and then repairs what can be made again
exactly (:class:`ResumeRepair`): the last snapshot from the state, epoch 0 from
the seeded initialisation, graph.json by tracing again, statistics from their
snapshots.  What cannot (run.json, metrics.jsonl, an intermediate snapshot) is
refused before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpa.errors import HpaError, LoadError
from hpa.experiments.layout import (GRAPH_JSON, METRICS, RUN_JSON, SEEDS_JSON, SNAPSHOTS, STATE, snapshot_files,
                                    snapshot_name)
from hpa.experiments.open_run import RunFolder, _FIX_METRICS, warn
from hpa.experiments.stats import plan_statistics_repair
from hpa.files import atomic_write_bytes, atomic_write_text, check_output_dir

__all__ = ["GRAPH_JSON", "METRICS", "RUN_JSON", "SNAPSHOTS", "STATE", "ResumeRepair", "RunDir", "snapshot_name"]


class RunDir:
    """One run folder, for writing.  ``create`` refuses an existing folder; ``open`` one to resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: dict[int, str] = {}  # epoch -> sha256 of the snapshot this process wrote

    @staticmethod
    def check_new(path: str | os.PathLike) -> Path:
        """``path`` if a run may be created there (absent or an empty folder), else an HpaError."""
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise HpaError(f"the run folder {path} is a file, not a folder; choose a new --out")
        entries = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
        if entries and ((path / RUN_JSON).exists() or (path / SEEDS_JSON).exists()):
            raise HpaError(f"the run folder {path} already exists; continue it with --resume {path}, "
                           "or choose a new --out")
        if entries:
            raise HpaError(f"the run folder {path} is not empty and is not an hpa run: it holds {entries[0]}; "
                           "choose a new --out (nothing was changed)")

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
        """The run in ``path`` for resuming; an HpaError when it is no run, or its run.json is damaged."""
        return cls(RunFolder.open(path).path)

    def reader(self) -> RunFolder:
        """A fresh checked reader of this folder (nothing cached from before a write)."""
        return RunFolder(self.path)

    # -- run.json and graph.json ------------------------------------------------------------

    def read_record(self) -> dict[str, Any]:
        return self.reader().record()

    def write_record(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path / RUN_JSON, json.dumps(record, indent=2, sort_keys=False) + "\n")

    def write_graph(self, graph_record: dict[str, Any]) -> None:
        atomic_write_text(self.path / GRAPH_JSON, json.dumps(graph_record, indent=1) + "\n")

    # -- snapshots, metrics, state ----------------------------------------------------------

    def write_snapshot(self, epoch: int, state_dict) -> str:
        """Save the model's tensors as safetensors; returns the file's name relative to the run."""
        data = snapshot_bytes(state_dict)
        atomic_write_bytes(self.path / snapshot_name(epoch), data)
        self._written[epoch] = hashlib.sha256(data).hexdigest()  # recorded by the epoch's metrics line
        return snapshot_name(epoch)

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics lines written so far (an empty list before the first); damaged: a RunFolderError."""
        return self.reader().metrics()

    def append_metrics(self, line: dict[str, Any]) -> None:
        if line.get("snapshot") and line["epoch"] in self._written:
            line = {**line, "snapshot_sha256": self._written[line["epoch"]]}
        # The whole (small) file is rewritten atomically, so a kill never leaves half a line.
        lines = [m for m in self.metrics() if m["epoch"] < line["epoch"]] + [line]
        atomic_write_text(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in lines))

    def write_state(self, epoch: int, model_state, optimizer_state) -> None:
        import torch

        buffer = io.BytesIO()
        tensors = {"model": model_state, "optimizer": optimizer_state}
        torch.save({"epoch": epoch, **tensors, "sha256": tensor_digest(tensors)}, buffer)
        atomic_write_bytes(self.path / STATE, buffer.getvalue())

    def read_state(self) -> dict[str, Any]:
        """state/last.pt, its tensors checked against the sha256 it was saved with; else a LoadError."""
        import torch

        path = self.path / STATE
        if not path.is_file():
            raise LoadError(f"{path} is missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            epoch = int(state["epoch"])
            recorded = state.get("sha256")  # absent in states written before it was recorded
        except Exception as exc:
            raise LoadError(f"{path} is unreadable ({type(exc).__name__})") from None
        if recorded is not None and tensor_digest({"model": state["model"], "optimizer": state["optimizer"]}) != recorded:
            raise LoadError(f"{path} is damaged (its tensors are not those it was saved with)")
        state["epoch"] = epoch
        return state

    def resume_state(self, reader: RunFolder, last_epoch: int | None = None) -> tuple[dict[str, Any], str | None]:
        """The state to resume from, and a one-line note when it is not simply ``state/last.pt``.

        An unusable state (missing, truncated, damaged) falls back to the last whole snapshot that
        has its metrics line, with the optimizer's momentum starting afresh.  Writes nothing; raises
        only when no epoch at all is usable.  ``last_epoch``: the recipe's, to say what follows.
        """
        try:
            return self.read_state(), None
        except LoadError as exc:
            reason = str(exc)
        if not reader.metrics():
            raise LoadError(f"{self.path} stopped before its initial state was saved ({reason}); delete "
                            f"{self.path} and start again")
        good = [epoch for epoch in reversed(reader.snapshot_epochs()) if reader.snapshot_problem(epoch) is None]
        if not good:
            raise LoadError(f"{reason}, and no snapshot is whole either; delete {self.path} and start again")
        epoch = good[0]
        state = {"epoch": epoch, "model": reader.snapshot_state(epoch), "optimizer": None}
        if last_epoch is not None and epoch >= last_epoch:
            after = "the run is complete, so nothing is trained again"
        elif epoch == 0:
            after = "as at the start of training"
        else:
            after = "with the optimizer's momentum restarted, so later epochs differ from an uninterrupted run"
        return state, f"{reason}; fell back to the last good epoch, {epoch} (its snapshot), {after}"

    def plan_repair(self, reader: RunFolder, state: dict[str, Any], initial_state) -> ResumeRepair:
        """What a resume from ``state`` must rewrite first (see :class:`ResumeRepair`); writes nothing.

        ``initial_state``: the model's state_dict as built for this run (its epoch 0).  Raises a
        RunFolderError naming the first file that cannot be made again, and the fix.
        """
        done = int(state["epoch"])
        lines = reader.metrics()
        if done >= len(lines):
            raise reader.damaged(METRICS, f"ends at epoch {len(lines) - 1}, but {STATE} is after epoch {done}: "
                                          "the lines in between are lost", _FIX_METRICS)
        epochs = [epoch for epoch in reader.snapshot_epochs() if epoch <= done]  # later ones are redone
        repair = ResumeRepair(self, graph=reader.graph_problem())
        for epoch in epochs:
            problem = reader.snapshot_problem(epoch)
            if problem is not None:
                repair.snapshots[epoch] = self._snapshot_again(reader, epoch, problem, done, state, initial_state)
        repair.statistics = plan_statistics_repair(reader, epochs)
        return repair

    def _snapshot_again(self, reader: RunFolder, epoch: int, problem: str, done: int, state, initial_state):
        """(problem, bytes, how) of a damaged snapshot made again, or a RunFolderError when it cannot be."""
        if epoch == done:
            data, how = snapshot_bytes(state["model"]), f"rewrote it from {self.path / STATE} (the same weights)"
        elif epoch == 0:
            data, how = snapshot_bytes(initial_state), "rebuilt it (epoch 0 is the seeded initialisation)"
        else:
            raise reader.damaged(snapshot_name(epoch), problem, reader.snapshot_fix(epoch))
        recorded = reader.recorded_sha256(epoch)
        if recorded is None:
            how += "; the run records no sha256 to check it against"
        elif hashlib.sha256(data).hexdigest() != recorded:
            raise reader.damaged(snapshot_name(epoch), problem, "what hpa would write again differs from what "
                                 f"{METRICS} recorded (sha256), so it cannot be rebuilt: restore it from a backup")
        return problem, data, how

    def truncate_to(self, epoch: int) -> None:
        """Drop what a killed run wrote after ``epoch``, the last complete one (all of it hpa's own)."""
        kept = [m for m in self.metrics() if m["epoch"] <= epoch]
        if len(kept) != len(self.metrics()):
            atomic_write_text(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
        for number, snapshot in snapshot_files(self.path).items():
            if number > epoch:
                snapshot.unlink()


@dataclass
class ResumeRepair:
    """The files a resume rewrites before it trains, each with one warning line (from :meth:`RunDir.plan_repair`)."""

    run: RunDir
    graph: str | None = None  # graph.json's problem: traced again
    snapshots: dict[int, tuple[str, bytes, str]] = field(default_factory=dict)  # epoch -> (problem, bytes, how)
    statistics: Any = None  # stats.StatisticsRepair

    def apply(self, graph_record: dict[str, Any], structure, model) -> None:
        """Rewrite: snapshots first (the statistics read them), graph.json, then the statistics files."""
        for epoch, (problem, data, how) in sorted(self.snapshots.items()):
            atomic_write_bytes(self.run.path / snapshot_name(epoch), data)
            warn(f"{self.run.path / snapshot_name(epoch)} {problem}; {how}")
        if self.graph:
            self.run.write_graph(graph_record)
            warn(f"{self.run.path / GRAPH_JSON} {self.graph}; traced the architecture again and rewrote it")
        if self.statistics:
            self.statistics.apply(structure, model, warn)


def snapshot_bytes(state_dict) -> bytes:
    """The safetensors bytes of a model's tensors, as every snapshot is written."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # One metadata key only: safetensors writes a multi-key map in random order (bytes would vary).
    return save(tensors, metadata={"format": "pt"})


def tensor_digest(tree) -> str:
    """sha256 over every tensor (dtype, shape, bytes) and value of nested dicts and lists, with their keys."""
    import torch

    digest = hashlib.sha256()

    def walk(value, key: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}/{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{key}/{index}")
        else:
            digest.update(f"{key}={value!r};".encode())

    walk(tree, "")
    return digest.hexdigest()
