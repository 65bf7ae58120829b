"""``hpa train --seeds 0,1,2``: one run per seed in ``OUT/seed-N/``, then a mean ± std summary.

``OUT/seeds.json`` lists the seeds, so ``--resume OUT`` continues every run
that is unfinished and starts the ones never started, with the recorded
configuration.  ``summary.csv`` has one row per (epoch, layer) with the mean
and standard deviation over seeds of every numeric ``series.csv`` column;
``summary.json`` holds the same for ``metrics.jsonl`` per epoch.  The seeds run
one after another in one process: several processes (``--nproc``, torchrun)
train one run at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hpa.errors import HpaError, OptionError, TrainingInterrupted
from hpa.experiments.layout import (RUN_JSON, SEEDS_JSON, SUMMARY_CSV, SUMMARY_JSON, finite_number,
                                    seed_folder, seed_folders)
from hpa.experiments.open_run import RunFolder, open_run, read_seeds, warn
from hpa.experiments.run import RunDir
from hpa.files import atomic_write_text, csv_text

__all__ = ["SEEDS_JSON", "ONE_PROCESS", "is_multi_seed", "parse_seeds", "resume_seeds", "train_seeds",
           "write_summary"]

#: Why --seeds is refused with several processes; the same line for --nproc and for torchrun.
ONE_PROCESS = "--nproc and torchrun train one run at a time; give --seed N instead of --seeds"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"--seeds takes comma-separated integers such as 0,1,2, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise OptionError(f"--seeds needs distinct integers of zero or more such as 0,1,2, not {text!r}")
    return seeds


def is_multi_seed(folder: str | Path) -> bool:
    """True for a ``--seeds`` folder, also one whose seeds.json is missing (its seed-N folders tell)."""
    folder = Path(folder).expanduser()
    return (folder / SEEDS_JSON).exists() or (not (folder / RUN_JSON).exists() and bool(seed_folders(folder)))


def train_seeds(seeds: list[int], out: str | Path, **options: Any) -> Path:
    """Train one run per seed into ``out/seed-N`` and write the summary; returns ``out``."""
    from hpa.experiments.train import train  # here, not at the top: it imports torch; the summary needs none

    _refuse_several_processes()
    options = {k: v for k, v in options.items() if k not in ("seed", "resume")}
    out = RunDir.check_new(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SEEDS_JSON, json.dumps({"seeds": seeds}) + "\n")
    with _interrupted_in(out):
        for seed in seeds:
            train(out=seed_folder(out, seed), seed=seed, **options)
    write_summary(out, seeds)
    return out


def resume_seeds(folder: str | Path, **given: Any) -> Path:
    """Continue every seed's run in ``folder`` (starting those never started), then rewrite the summary."""
    from hpa.experiments.train import train  # here, not at the top: it imports torch; the summary needs none

    _refuse_several_processes()
    given = {k: v for k, v in given.items() if k not in ("out", "resume")}
    out = Path(folder).expanduser()
    seeds = read_seeds(out, repair=True)  # a damaged seeds.json is made again from the seed-N folders
    started = [s for s in seeds if (seed_folder(out, s) / RUN_JSON).is_file()]
    if not started:
        raise HpaError(f"no run in {out} has started; delete {out} and start again with --seeds")
    for seed in started:  # every run.json checked before any seed trains
        RunFolder.open(seed_folder(out, seed), resume_target=out)
    with _interrupted_in(out):
        for seed in seeds:
            run = seed_folder(out, seed)
            if seed in started:
                train(resume=run, **given)
            else:
                train(out=run, seed=seed, **{**_recorded_options(seed_folder(out, started[0])), **_given(given)})
    write_summary(out, seeds)
    return out


def _refuse_several_processes() -> None:
    """Under torchrun every process would train every seed, racing for the folders: refused, as --nproc is."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HpaError(ONE_PROCESS)


class _interrupted_in:
    """Ctrl-C in one seed's run: say how to continue the whole ``--seeds`` folder, not the one seed."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, TrainingInterrupted):
            raise TrainingInterrupted.of(self.out) from None
        return False


def _recorded_options(folder: Path) -> dict[str, Any]:
    record = RunFolder(folder).record()
    config = record["config"]
    return {"task": config["task"], "arch": config["arch"], "device": config["device"],
            "snapshot_every": config["snapshot_every"], "statistics": config.get("statistics", ()),
            "data": record.get("data_dir"), "recipe_name": config.get("recipe_name"),
            "precision": config.get("precision"), "compiled": config.get("compiled"),
            "cpu_threads": config.get("cpu_threads"), **config.get("noise", {}),
            **config["recipe"]}


def _given(given: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None and k not in ("seed", "resume", "out")}


def write_summary(out: Path, seeds: list[int]) -> None:
    """summary.csv, summary.json and figures/ of a ``--seeds`` folder, from each seed's series and metrics.

    Both summaries are made of the seeds' files alone; one found damaged is said to be rewritten.
    """
    readers = {seed: RunFolder(seed_folder(out, seed), resume_target=out) for seed in seeds}
    rows = {seed: reader.series_rows() for seed, reader in readers.items() if (reader.path / RUN_JSON).exists()}
    metrics = {seed: [{k: v for k, v in line.items() if k not in ("snapshot", "snapshot_sha256")}
                      for line in reader.metrics()] for seed, reader in readers.items()
               if (reader.path / RUN_JSON).exists()}
    damaged = [name for name in (SUMMARY_CSV, SUMMARY_JSON) if _unreadable(out / name)]
    atomic_write_text(out / SUMMARY_CSV, csv_text(_mean_std(rows, ("epoch", "layer"))))
    summary = {"seeds": seeds, "metrics": _mean_std(metrics, ("epoch",))}
    atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")
    for name in damaged:
        warn(f"{out / name} was damaged; rewrote it from the seeds' series.csv and metrics.jsonl")
    _write_figures(out)


def _unreadable(path: Path) -> bool:
    """True when an existing summary file is not whole (a summary never written is not damaged)."""
    import csv
    import io

    if not path.exists():
        return False
    try:
        text = path.read_bytes().decode("utf-8")
        if "\x00" in text:
            return True
        if path.suffix == ".json":
            return not isinstance(json.loads(text).get("metrics"), list)
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        header_ok = not text.strip() or text.startswith("epoch,")  # no statistic ran: a header without columns
        return not header_ok or any(None in row or None in row.values() for row in rows)
    except (ValueError, AttributeError):
        return True


def _write_figures(out: Path) -> None:
    """OUT/figures/: each curve's mean over the seeds with a ±1 std band (Gamba et al. 2020 Fig. 7)."""
    open_run(out).plot()


def _mean_std(per_seed: dict[int, list[dict[str, Any]]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows keyed by ``keys``; every other numeric column as ``NAME.mean`` and ``NAME.std`` over seeds."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for rows in per_seed.values():
        for row in rows:
            grouped.setdefault(tuple(str(row[k]) for k in keys), []).append(row)
    out = []
    for key, rows in grouped.items():
        summary: dict[str, Any] = dict(zip(keys, key))
        summary["n_seeds"] = len(rows)
        for column in [c for c in rows[0] if c not in keys]:
            values = [finite_number(row.get(column)) for row in rows]
            if all(v is not None for v in values):
                summary[f"{column}.mean"] = float(np.mean(values))
                summary[f"{column}.std"] = float(np.std(values))
        out.append(summary)
    return sorted(out, key=lambda r: (int(r["epoch"]), *[str(r[k]) for k in keys[1:]]))
