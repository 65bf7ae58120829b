"""``hpa analyse-run``: statistics over the saved snapshots of a finished run (or of each seed)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from hpa.errors import LoadError, OptionError
from hpa.experiments.config import check_statistics
from hpa.experiments.open_run import open_run, read_seeds, warn
from hpa.experiments.seeds import write_summary
from hpa.experiments.stats import EpochStatistics, plan_statistics_repair


def analyse_run(folder: str | Path, statistics: list[str] | tuple[str, ...],
                progress: Callable[[str], None] | None = None) -> dict[str, list[int]]:
    """Run ``statistics`` over every saved snapshot of a run (or of each seed), skipping epochs done.

    An epoch is done when its ``stats/epoch-NNN.json`` already holds every one of
    ``statistics``; otherwise it is analysed again with those and the statistics it
    already had, so each stats file stays one coherent result.  Every file read is
    checked first, for every seed, before anything is written: a damaged snapshot or
    graph.json is refused (RunFolderError, naming the fix); a damaged stats file is
    recomputed with every statistic it held, series.csv made again from stats/.
    ``stats/`` and ``series.csv`` are rewritten atomically after each epoch (a kill
    loses at most the epoch in hand), then a ``--seeds`` summary and the figures.
    Returns ``{"analysed": [...], "already_done": [...]}`` (epochs, over all seeds).
    """
    statistics = tuple(dict.fromkeys(statistics))
    if not statistics:
        raise OptionError("name a statistic with --stat (hpa plugins lists them)")
    check_statistics(statistics)
    read_seeds(Path(folder).expanduser(), repair=True)  # a --seeds folder's damaged seeds.json: made again
    run = open_run(folder)
    plans = {seed: _plan_seed(run.reader(seed), statistics) for seed in run.seeds}  # all checks first
    report: dict[str, list[int]] = {"analysed": [], "already_done": []}
    for seed, (structure, repair, todo) in plans.items():
        repair.apply(structure, None, warn)
        report["analysed"] += sorted(repair.stats)
        _analyse_seed(run, seed, structure, todo, set(repair.stats), report, progress or (lambda line: None))
    if len(run.seeds) > 1:
        write_summary(run.path, run.seeds)
    run.plot()
    return report


def _plan_seed(reader, statistics: tuple[str, ...]):
    """(structure, the repair of its statistics files, epoch -> statistics to run) of one run folder."""
    snapshots = reader.snapshot_epochs()
    if 0 not in snapshots:
        raise LoadError(f"{reader.path} has no snapshot of epoch 0 (the initialisation statistics compare with)")
    for epoch in snapshots:
        reader.check_snapshot(epoch)  # missing or damaged: refused, naming the fix
    structure = reader.structure()
    repair = plan_statistics_repair(reader, snapshots, also=statistics)
    todo = {}
    for epoch in snapshots:
        held = reader.statistics_of(epoch)
        if epoch not in repair.stats and not set(statistics) <= held:
            todo[epoch] = tuple(dict.fromkeys(statistics + tuple(sorted(held))))
    return structure, repair, todo


def _analyse_seed(run, seed: int, structure, todo: dict[int, tuple[str, ...]], repaired: set[int], report,
                  progress) -> None:
    folder = run.folders[seed]
    snapshots = run.snapshots(seed)
    report["already_done"] += [epoch for epoch in snapshots if epoch not in todo and epoch not in repaired]
    if not todo:
        return
    worker = EpochStatistics(folder, structure, None, ())
    worker.resume(max(snapshots))  # epoch 0 as the init, and the series rows so far
    for epoch, names in todo.items():
        worker.statistics = names
        worker.record(epoch, snapshots[epoch])
        report["analysed"].append(epoch)
        progress(f"{folder.name if len(run.seeds) > 1 else folder}: epoch {epoch} ({', '.join(names)})")
