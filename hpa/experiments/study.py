"""``hpa study run`` and ``hpa study status``: every cell of a grid trained, seeds in parallel, on an executor.

A study folder::

    study.toml, study.json        the study file as given, and as read (what a rerun is compared with)
    <cell>/seeds.json             each cell is an 'hpa train --seeds' folder: open_run(<cell>) reads it
    <cell>/seed-N/                one run per seed (hpa train's run folder)
    <cell>/reinit/                with [reinit]: hpa reinit over the cell's seeds (a heatmap per seed, the mean)
    <cell>/summary.csv, figures/  the cell's mean ± std over its complete seeds
    summary.csv, summary.json     every cell's mean and std per epoch (and layer), and what is missing
    figures/                      one curve per cell, bands of ± 1 std over the seeds
    .study/jobs/, .study/logs/    each job's state (pending, running, complete, failed: why; its SLURM id) and log

Each (cell, seed) is one job of an executor (:mod:`hpa.executors`); a job runs ``hpa train`` in a
child process (``--out`` the first time, ``--resume`` after), so a stopped job resumes from its last
complete epoch.  Rerunning a study skips complete runs and resumes the others; a study file that
differs from the recorded one is refused, naming the first difference.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from hpa.errors import HpaError, OutputError
from hpa.executors import Job, Requeue
from hpa.experiments.config import get_task
from hpa.experiments.layout import RUN_JSON, SEEDS_JSON, SUMMARY_CSV, SUMMARY_JSON, seed_folder
from hpa.experiments.open_run import Run, RunFolder
from hpa.experiments.study_file import CommandOption, Study, first_difference, flags, read_study
from hpa.files import atomic_write_text, check_output_dir, csv_text

STUDY_JSON, STUDY_TOML, BOOKS = "study.json", "study.toml", ".study"
STUDY_FORMAT = 1
REINIT_FOLDER = "reinit"


@dataclass
class StudyReport:
    """What a ``run_study`` did: jobs complete, failed (with why), skipped as done, the files written."""

    out: Path
    complete: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


# -- the folder ---------------------------------------------------------------------------------

def open_study_folder(out: str | Path, study: Study) -> Path:
    """``out`` for this study: new (or empty), or a folder of the same study; refused otherwise, unchanged."""
    out = Path(out).expanduser().absolute()
    if out.is_dir() and (out / STUDY_JSON).exists():
        recorded = _recorded(out)
        difference = first_difference(recorded["study"], study.as_record())
        if difference is not None:
            raise OutputError(f"{study.path} differs from the study {out} was started with: {difference}; rerun "
                              f"with the recorded file ({out / STUDY_TOML}) or give a new --out (nothing was changed)")
        return out
    if out.is_dir() and any(out.iterdir()):
        first = sorted(entry.name for entry in out.iterdir())[0]
        raise OutputError(f"--out {out} is a non-empty folder holding {first}, which hpa did not write and which is "
                          "no study; nothing was changed; move it away or give a new --out folder")
    return check_output_dir(out)


def _recorded(out: Path) -> dict[str, Any]:
    try:
        record = json.loads((out / STUDY_JSON).read_text(encoding="utf-8"))
        if not isinstance(record.get("study"), dict):
            raise ValueError("no study")
        return record
    except (OSError, ValueError) as exc:
        raise HpaError(f"{out / STUDY_JSON} is damaged ({type(exc).__name__}); it records the study this folder "
                       f"holds: restore it, or give a new --out") from None


def _start_folder(out: Path, study: Study) -> None:
    """study.toml, study.json and each cell's seeds.json (once; a rerun finds them)."""
    if (out / STUDY_JSON).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / STUDY_TOML, study.path.read_text(encoding="utf-8"))
    cells = {cell.name: cell.values for cell in study.cells()}
    atomic_write_text(out / STUDY_JSON, json.dumps({"format": STUDY_FORMAT, "study": study.as_record(),
                                                    "cells": cells}, indent=1) + "\n")
    for name in cells:
        (out / name).mkdir(exist_ok=True)
        atomic_write_text(out / name / SEEDS_JSON, json.dumps({"seeds": list(study.seeds)}) + "\n")


# -- the jobs ------------------------------------------------------------------------------------

def job_key(cell: str, seed: int | None) -> str:
    return f"{cell}/seed-{seed}" if seed is not None else f"{cell}/{REINIT_FOLDER}"


def _books(out: Path, key: str, kind: str) -> Path:
    name = key.replace("/", "--")
    return out / BOOKS / kind / (name + (".json" if kind == "jobs" else ".log"))


def check_data(study: Study) -> None:
    """Refuse, before anything is written, a study whose data is missing for a task that can say so
    (``Task.present``); a cell with ``download`` fetches its own."""
    seen = set()
    for cell in study.cells():
        values = {**study.train, **cell.values}
        key = (values.get("plugin"), values.get("data"))
        if not key[0] or values.get("download") or key in seen:  # no task: the cells' hpa train says so
            continue
        seen.add(key)
        task = get_task(key[0])
        if task.present is not None:
            task.present(None if key[1] is None else Path(str(key[1])).expanduser())


def training_jobs(out: Path, study: Study, train_options: Mapping[str, CommandOption]) -> tuple[list[Job], list[str]]:
    """A job per (cell, seed) not yet complete, and the keys of those complete."""
    jobs, done = [], []
    for cell in study.cells():
        for seed in study.seeds:
            key = job_key(cell.name, seed)
            run = seed_folder(out / cell.name, seed)
            if run_status(run) == "complete":
                done.append(key)
                continue
            new = flags({**study.train, **cell.values}, train_options) + ["--seed", str(seed)]
            spec = {"key": key, "study": str(out), "run": str(run), "new": new, "log": str(_books(out, key, "logs"))}
            jobs.append(Job(key, TrainRun(), (spec,), log=_books(out, key, "logs")))
    return jobs, done


def reinit_jobs(out: Path, study: Study, reinit_options: Mapping[str, CommandOption]) -> list[Job]:
    """With [reinit]: a job per cell whose seeds are all complete and whose reinit is not written yet."""
    if study.reinit is None:
        return []
    jobs = []
    for cell in study.cells():
        folder = out / cell.name
        if (folder / REINIT_FOLDER / "reinit.json").exists():
            continue
        if all(run_status(seed_folder(folder, seed)) == "complete" for seed in study.seeds):
            key = job_key(cell.name, None)
            spec = {"key": key, "study": str(out), "cell": str(folder), "log": str(_books(out, key, "logs")),
                    "flags": flags(study.reinit, reinit_options)}
            jobs.append(Job(key, ReinitCell(), (spec,), log=_books(out, key, "logs")))
    return jobs


def run_status(run: Path) -> str | None:
    """run.json's status ("complete", "running", "interrupted", "failed"), or None before it exists."""
    try:
        return json.loads((run / RUN_JSON).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


_CHILD: list[subprocess.Popen] = []  # the hpa command a job process runs now (one at most)


class _ChildJob:
    """A job that runs one ``hpa`` command in a child process, in the same process group (a SIGKILL of the
    group reaches it).  SIGTERM and SIGUSR1 are passed on to it: ``hpa train`` finishes its current write
    and stops, and the job asks to be requeued.  ``stop`` is what submitit calls on pre-emption."""

    def command(self, spec: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def done(self, spec: dict[str, Any]) -> bool:
        raise NotImplementedError

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.done(spec):
            return {"state": "complete"}
        command = [sys.executable, "-m", "hpa", *self.command(spec)]
        previous = {sig: signal.signal(sig, _pass_on) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
            _CHILD[:] = [child]
            write_job_state(spec, "running", pid=child.pid)
            try:
                code = child.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the child too: let it finish its current write
                child.wait()
                raise
        finally:
            _CHILD.clear()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._finished(spec, code)

    def _finished(self, spec: dict[str, Any], code: int) -> dict[str, Any]:
        if code == 0 and self.done(spec):
            write_job_state(spec, "complete")
            return {"state": "complete"}
        if code == 130 or code == -signal.SIGTERM:  # stopped cleanly (SIGTERM, SIGUSR1, pre-emption)
            write_job_state(spec, "stopped", reason="stopped by a signal; it resumes from its last complete epoch")
            raise Requeue(f"{spec['key']} was stopped")
        reason = _error_line(Path(spec["log"])) or (f"killed by {signal.Signals(-code).name}" if code < 0 else
                                                    f"exited with status {code}; see {spec['log']}")
        write_job_state(spec, "failed", reason=reason)
        raise HpaError(reason)

    def stop(self) -> None:
        """On submitit's checkpoint (pre-emption, timeout): stop the child cleanly and wait for it."""
        for child in list(_CHILD):
            child.send_signal(signal.SIGTERM)
            while True:  # not child.wait(): the interrupted wait below us holds its lock
                pid, _ = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.1)


def _pass_on(signum, frame) -> None:
    for child in list(_CHILD):
        child.send_signal(signum)


class TrainRun(_ChildJob):
    """One seed of one cell: ``hpa train --out RUN`` the first time, ``hpa train --resume RUN`` after."""

    def done(self, spec: dict[str, Any]) -> bool:
        return run_status(Path(spec["run"])) == "complete"

    def command(self, spec: dict[str, Any]) -> list[str]:
        run = Path(spec["run"])
        if (run / RUN_JSON).exists():
            return ["train", "--resume", str(run)]
        _clear_unstarted(run)
        return ["train", *spec["new"], "--out", str(run)]


class ReinitCell(_ChildJob):
    """``hpa reinit`` over every seed of a cell, into CELL/reinit/."""

    def done(self, spec: dict[str, Any]) -> bool:
        return (Path(spec["cell"]) / REINIT_FOLDER / "reinit.json").exists()

    def command(self, spec: dict[str, Any]) -> list[str]:
        cell = Path(spec["cell"])
        return ["reinit", str(cell), "--out", str(cell / REINIT_FOLDER), *spec["flags"]]


def _clear_unstarted(run: Path) -> None:
    """A run killed before its run.json leaves the empty snapshots/ and state/ hpa made: removed (only those)."""
    if not run.is_dir():
        return
    for name in ("snapshots", "state"):
        try:
            (run / name).rmdir()  # only when empty: nothing else is touched
        except OSError:
            pass


def _error_line(log: Path) -> str | None:
    """The last 'Error: ...' line an hpa command wrote to the job's log."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [line[len("Error: "):] for line in lines if line.startswith("Error: ")]
    return errors[-1] if errors else None


def write_job_state(spec: dict[str, Any], state: str, **details: Any) -> None:
    path = _books(Path(spec["study"]), spec["key"], "jobs")
    previous = read_job_state(path)
    entry = {"state": state, "host": socket.gethostname(), "time": time.time(), **details}
    if previous.get("job_id") and "job_id" not in details:
        entry["job_id"] = previous["job_id"]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(entry) + "\n")


def read_job_state(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


# -- running -----------------------------------------------------------------------------------

def run_study(study_file: str | Path, out: str | Path, executor, train_options: Mapping[str, CommandOption],
              reinit_options: Mapping[str, CommandOption], progress: Callable[[str], None] | None = None,
              before_summary: Callable[[Path, Study], list[Path]] | None = None) -> StudyReport:
    """Train every cell of ``study_file`` into ``out`` on ``executor``, then write the summary and figures.

    ``before_summary`` (hpa reproduce) draws more figures from the finished folder; their paths are reported.
    """
    say = progress or (lambda line: None)
    study = read_study(study_file, train_options, reinit_options)
    study.cells()  # two cells in one folder are refused before anything is written
    check_data(study)
    out = open_study_folder(out, study)
    _start_folder(out, study)
    report = StudyReport(out)
    jobs, report.skipped = training_jobs(out, study, train_options)
    cells = len(study.cells())
    say(f"{out}: {cells} cells x {len(study.seeds)} seeds; {len(report.skipped)} runs complete, "
        f"{len(jobs)} to train ({executor.describe()})")
    _run_jobs(out, executor, jobs, report, say)
    _run_jobs(out, executor, reinit_jobs(out, study, reinit_options), report, say)
    report.written = write_study_summary(out, study)
    if before_summary is not None:
        report.written += before_summary(out, study)
    return report


def _run_jobs(out: Path, executor, jobs: list[Job], report: StudyReport, say: Callable[[str], None]) -> None:
    if not jobs:
        return
    specs = {job.name: job.args[0] for job in jobs}
    for job in jobs:
        write_job_state(specs[job.name], "pending")

    def submitted(name: str, job_id: str | None) -> None:
        if job_id is not None:
            write_job_state(specs[name], "submitted", job_id=job_id)

    done = 0
    for outcome in executor.run(jobs, on_submit=submitted):
        done += 1
        if outcome.ok:
            report.complete.append(outcome.name)
            say(f"[{done}/{len(jobs)}] {outcome.name}: complete")
            continue
        report.failed[outcome.name] = outcome.error or "failed"
        state = read_job_state(_books(out, outcome.name, "jobs"))
        if state.get("state") != "failed":  # the job could not say it (killed, lost): said here
            write_job_state(specs[outcome.name], "failed", reason=outcome.error,
                            **({"job_id": outcome.job_id} if outcome.job_id else {}))
        say(f"[{done}/{len(jobs)}] {outcome.name}: failed: {outcome.error}")


# -- status ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobStatus:
    key: str
    state: str  # pending, running, complete, failed, stopped
    reason: str | None = None
    job_id: str | None = None
    epochs: str | None = None  # "3/10" epochs done


def study_status(out: str | Path) -> list[JobStatus]:
    """Each job's state, read from the folder alone (nothing is written)."""
    out = Path(out).expanduser()
    if not (out / STUDY_JSON).exists():
        raise OutputError(f"{out} is not a study folder (it has no {STUDY_JSON}); give the --out of 'hpa study run'")
    record = _recorded(out)
    seeds = record["study"]["grid"]["seeds"]
    found = []
    for cell in record["cells"]:
        for seed in seeds:
            found.append(_job_status(out, job_key(cell, seed), seed_folder(out / cell, seed)))
        if record["study"].get("reinit") is not None:
            key = job_key(cell, None)
            state = "complete" if (out / cell / REINIT_FOLDER / "reinit.json").exists() else None
            found.append(_job_status(out, key, None, state))
    return found


def _job_status(out: Path, key: str, run: Path | None, known: str | None = None) -> JobStatus:
    books = read_job_state(_books(out, key, "jobs"))
    epochs = _epochs_done(run) if run is not None else None
    if known == "complete" or (run is not None and run_status(run) == "complete"):
        return JobStatus(key, "complete", job_id=books.get("job_id"), epochs=epochs)
    state = books.get("state", "pending")
    if state == "running" and not _alive(books):
        state = "stopped"
        books = {**books, "reason": "its process is gone (killed, or the machine stopped); rerun the study to resume"}
    if state == "submitted":
        state = "pending"
    return JobStatus(key, state, books.get("reason"), books.get("job_id"), epochs)


def _alive(books: dict[str, Any]) -> bool:
    """A running job's process still exists (judged on its own host only; elsewhere it is believed)."""
    if books.get("host") != socket.gethostname() or "pid" not in books:
        return True
    try:
        os.kill(int(books["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path(f"/proc/{books['pid']}/status").exists() or "zombie" not in \
        Path(f"/proc/{books['pid']}/status").read_text()


def _epochs_done(run: Path) -> str | None:
    try:
        record = json.loads((run / RUN_JSON).read_text(encoding="utf-8"))
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return None
    trained = max((json.loads(line).get("epoch", 0) for line in lines if line.strip()), default=0)
    return f"{trained}/{record['config']['recipe']['epochs']}"


# -- the summary -------------------------------------------------------------------------------

def write_study_summary(out: Path, study: Study) -> list[Path]:
    """Each cell's summary (over its complete seeds), the study's summary.csv and .json, the comparison figures."""
    # here, not at the top: seeds imports numpy, the figures matplotlib
    from hpa.experiments.seeds import write_summary
    from hpa.render.study import comparison_figures

    rows, cells, missing, series = [], [], [], {}
    for cell in study.cells():
        folder = out / cell.name
        complete = [s for s in study.seeds if run_status(seed_folder(folder, s)) == "complete"]
        for seed in study.seeds:
            if seed not in complete:
                status = _job_status(out, job_key(cell.name, seed), seed_folder(folder, seed))
                missing.append({"cell": cell.name, "seed": seed, "state": status.state, "reason": status.reason})
        entry = {"cell": cell.name, "values": cell.values, "seeds": list(study.seeds), "complete": complete}
        if complete:
            write_summary(folder, complete)
            summary = json.loads((folder / SUMMARY_JSON).read_text(encoding="utf-8"))
            entry["metrics"] = summary["metrics"]
            rows += [{"cell": cell.name, **{k: _plain(v) for k, v in cell.values.items()}, **row}
                     for row in _csv_rows(folder / SUMMARY_CSV)]
            series[cell.name] = Run(folder, {s: RunFolder(seed_folder(folder, s)) for s in complete}).run_series()
        cells.append(entry)
    atomic_write_text(out / SUMMARY_CSV, csv_text(rows))
    atomic_write_text(out / SUMMARY_JSON, json.dumps({"study": study.as_record(), "cells": cells,
                                                      "missing": missing}, indent=1) + "\n")
    written = [out / SUMMARY_CSV, out / SUMMARY_JSON]
    if series:
        written += comparison_figures(series, out / "figures", "png", caption=_caption(study, missing))
    return written


def _caption(study: Study, missing: list[dict[str, Any]]) -> str:
    grid = ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in study.grid.items())
    lost = f" · missing: {len(missing)} runs (summary.json)" if missing else ""
    return f"{study.path.name}: {grid or 'one cell'} · seeds {', '.join(map(str, study.seeds))}{lost}"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _plain(value: Any) -> Any:
    return "+".join(map(str, value)) if isinstance(value, list) else value
