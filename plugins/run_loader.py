"""``run:DIR@EPOCH``: one saved epoch of an ``hpa train`` run, rebound to the run's traced structure.

``DIR`` is a run folder (for several seeds, one ``seed-N`` folder inside
it); ``@EPOCH`` picks a saved snapshot, and without it the last one.  No
model is built and nothing is traced: ``graph.json`` and the snapshot are
read with numpy (see :func:`hpa.rebind`).

Weights (``--weights``): omitted, the snapshot of ``EPOCH``; ``none`` (what
``--compare-init`` asks for), the run's own epoch 0, its true
initialisation; a path, another snapshot of the same run.
"""

from __future__ import annotations

from pathlib import Path

from hpa import LoadOptions, Loader, OptionError, SpecError, hookimpl

PREFIX = "run"


@hookimpl
def register_loaders(register):
    register(Loader(
        prefix=PREFIX,
        load=load,
        builds_init=True,  # weights="none" is the run's epoch 0, its true initialisation
        description="a saved epoch of an 'hpa train' run: run:DIR@EPOCH (default: the last saved epoch)",
    ))


def parse(name: str) -> tuple[Path, int | None]:
    """``DIR@EPOCH`` -> (folder, epoch); ``DIR`` alone -> (folder, None)."""
    folder, sep, epoch = name.rpartition("@")
    if not sep:
        return Path(name).expanduser(), None
    if not epoch.strip().isdigit():
        raise SpecError(f"run:{name}: the epoch after '@' must be a whole number, as in run:{folder}@10")
    return Path(folder).expanduser(), int(epoch)


def load(name: str, options: LoadOptions):
    from hpa.experiments.layout import seed_folder  # here with open_run: the plugin stays light to import
    from hpa.experiments.open_run import open_run

    folder, epoch = parse(name)
    if not options.fold_bn:
        raise OptionError("a run: graph is rebound from a structure traced with BatchNorm folded; drop "
                          "--no-fold-bn, or scan the snapshot file with the architecture's own loader")
    run = open_run(folder)
    if len(run.seeds) > 1:
        raise SpecError(f"{folder} holds several seeds; name one, as in run:{seed_folder(folder, run.seeds[0])}"
                        f"@{epoch if epoch is not None else 0}")
    if options.random_init:
        epoch = 0
    elif not options.default_weights:
        return _other_snapshot(run, Path(options.weights))
    elif epoch is None:
        epoch = max(run.epochs(), default=0)
    graph = run.graph(epoch)
    _check_size(graph, options)
    return graph


def _other_snapshot(run, path: Path):
    """``--weights FILE`` (as ``--init FILE`` passes it): a snapshot file of this run."""
    for epoch, snapshot in run.snapshots().items():
        if snapshot.resolve() == path.expanduser().resolve():
            return run.graph(epoch)
    raise OptionError(f"{path} is not a snapshot of the run {run.path}; give one of its "
                      "snapshots/epoch-NNN.safetensors, or use --compare-init for its epoch 0")


def _check_size(graph, options: LoadOptions) -> None:
    if options.input_size is not None and tuple(options.input_size) != tuple(graph.input_shape or ()):
        shown = "x".join(map(str, graph.input_shape or ()))
        raise OptionError(f"the run was trained on {shown} inputs; drop --input-size (a run's structure is fixed)")
