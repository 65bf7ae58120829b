"""``hpa reinit``: which layers are critical (Gamba et al. 2020 §3.3 and Fig. 2, after Zhang, Bengio and Singer 2019).

For every chosen layer and checkpoint, the trained model's layer is set to the
checkpoint's tensors, the model is evaluated on the task's test split, and the
layer is restored.  The model is built once and every checkpoint's tensors are
read once into memory (on the device); a cell is then two in-place ``copy_``
calls and one evaluation pass, never a retrace or a reload.

The layer-to-tensor map is ``Layer.params`` of the traced structure (the
run's ``graph.json`` structure, traced again from the same architecture),
so a layer is exactly the tensors the statistics read: weight, bias and,
with ``reset_bn``, the BatchNorm folded into it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import hpa
from hpa.backends.torch_files import read_state_dict
from hpa.errors import LoadError, OptionError, ReinitError, suggest
from hpa.experiments.config import config_from_record, get_task, resolve_device
from hpa.experiments.data import Normalisation, Split, dataset_as_trained
from hpa.experiments.layout import RUN_JSON, TRACKER, is_seed_folder, seed_folder
from hpa.experiments.loop import EVAL_BATCH, evaluate
from hpa.experiments.model import build_model, initialise, unwrapped
from hpa.experiments.open_run import RunFolder, read_seeds
from hpa.experiments.streaming import EVAL_ROWS, FileData, default_workers, memory_budget, training_data
from hpa.files import atomic_directory, check_model_file, check_output_dir
from hpa.rebind import rebind
from hpa.render.reinit import plot_reinit
from hpa.render.style import FigureOptions, drawing

#: The roles of a layer's own tensors, and those of the BatchNorm folded into it (``reset_bn``).
LAYER_ROLES = ("weight", "bias", "channel_bias")
BN_ROLES = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
#: What a freshly built BatchNorm holds (``nn.BatchNorm*.reset_parameters``), per role.
_FRESH_BN = {"bn.weight": 1.0, "bn.bias": 0.0, "bn.running_mean": 0.0, "bn.running_var": 1.0}


# -- what is measured ----------------------------------------------------------------------------

@dataclass
class _Subject:
    """One trained model with its checkpoints: one seed of a run, or a model file with a fresh init."""

    label: str  # "seed-0", or the spec
    seed: int
    model: Any  # the nn.Module, trained tensors loaded, on the device
    structure: Any  # ConvGraph of the architecture (Layer.params: the state keys of each layer)
    dataset: Any  # hpa.experiments.Dataset
    task: str
    init: str  # the run's init scheme (types.INIT_SCHEMES): how --rerandomize draws a layer
    checkpoints: dict[int, Callable[[], dict]] = field(default_factory=dict)  # epoch -> its weights, read when asked
    init_std: float = 0.01  # the std of init "normal"
    evaluate: Callable[[Any], Any] | None = None  # a tracker run's: the caller's evaluation, instead of a test split
    test: Any = None  # (split, normalisation) of the test split as the run saw it; None: ``dataset``'s, in memory
    test_note: str = "in memory"  # how the test split is held, for reinit.json


def reinit(run_or_spec: str | os.PathLike, *, epochs: list[int] | None = None, layers: list[str] | None = None,
           with_linear: bool = False, rerandomize: bool = False, draws: int = 1, reset_bn: bool = False,
           device: str = "cpu", weights: str | None = None, plugin: str | None = None,
           data: str | os.PathLike | None = None, seed: int = 0, batch_size: int = EVAL_BATCH,
           progress: Callable[[str], None] | None = None, model: Any = None,
           evaluate: Callable[[Any], Any] | None = None, workers: int | None = None) -> ReinitResult:
    """Reset each layer of a trained model to each checkpoint, evaluate on the test split; returns a ReinitResult.

    ``run_or_spec``: an ``hpa train`` run folder (several seeds: every ``seed-N``), or a loader
    spec whose module is built with ``weights`` (a file) for the trained model and a fresh
    init seeded by ``seed`` as the only checkpoint (epoch 0); the test split is then that of
    task ``plugin`` (with ``data``).  ``epochs``: checkpoints to reset to (default: every saved
    one).  ``layers``: layer names (default: every conv, and linear with ``with_linear``).
    ``rerandomize``: draw each layer fresh from the architecture's initialiser instead,
    ``draws`` times, seeded; the cells then have epoch None.  ``reset_bn``: reset the
    BatchNorm folded into the layer as well.  A run recorded by :class:`hpa.Tracker` needs
    ``model`` (a module of its architecture; a copy is swept, the final snapshot loaded into
    it) and ``evaluate(module) -> accuracy`` or ``(accuracy, loss)``, the caller's own test.
    A run's test split is the one it was evaluated on: its class subset, and for a streamed run
    its files through the run's own transforms, decoded by ``workers`` DataLoader workers (once,
    when the decoded split fits the memory budget; else again for every cell).
    Raises ReinitError / OptionError for bad input.
    """
    if draws < 1:
        raise OptionError(f"--draws must be a positive number of draws, not {draws}")
    if seed < 0:
        raise OptionError(f"--seed must be zero or a positive integer, not {seed}")
    if rerandomize and epochs is not None:
        raise OptionError("--epochs does not apply with --rerandomize (layers are drawn fresh, not reset to a "
                          "checkpoint); leave out one of them")
    progress = progress or (lambda line: None)
    device = _device(device)
    if workers is not None and workers < 0:
        raise OptionError(f"--workers must be zero or a positive number of processes, not {workers}")
    subjects = _subjects(run_or_spec, weights=weights, plugin=plugin, data=data, seed=seed, device=device,
                         epochs=[] if rerandomize else epochs, own=(model, evaluate),
                         workers=default_workers() if workers is None else workers)
    rows, trained, n_l, held = [], {}, {}, {}
    with torch.no_grad():  # not inference_mode: --rerandomize initialises copies of modules in place
        for make_subject in subjects:  # one model in memory at a time
            subject = make_subject()
            sweep = _Sweep(subject, epochs, layers, with_linear, rerandomize, draws, reset_bn, device, batch_size,
                           draw_seed=seed)
            rows += sweep.run(progress, len(subjects) > 1)
            trained[subject.label] = sweep.trained
            n_l[subject.label] = sweep.final_n_l()
            held[subject.label] = subject.test_note
    options = {"rerandomize": rerandomize, "draws": draws if rerandomize else None, "reset_bn": reset_bn,
               "with_linear": with_linear, "device": str(device), "seed": seed,
               "test_split": held if len(set(held.values())) > 1 else next(iter(held.values()), None)}
    return ReinitResult(source=str(run_or_spec), rows=rows, trained=trained, n_l=n_l, options=options)


def _device(name: str):
    return torch.device(resolve_device(name))


def parse_epochs(text: str | None) -> list[int] | None:
    """``"0,5,10"`` -> [0, 5, 10]; None stays None (every saved epoch)."""
    if text is None:
        return None
    try:
        epochs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        epochs = []
    if not epochs or min(epochs) < 0:
        raise OptionError(f"--epochs takes comma-separated epoch numbers such as 0,5,10, not {text!r}")
    return epochs


def result_folder(run_or_spec, out) -> Path:
    """``out``, else ``RUN_DIR/reinit`` for a run folder; checked before anything expensive runs."""
    if out is None:
        if not Path(run_or_spec).expanduser().is_dir():
            raise OptionError(f"{run_or_spec} is not a folder, so there is no default result folder; give an "
                              "'hpa train' run folder, or a spec with --weights FILE --plugin TASK --out DIR")
        _run_readers(Path(run_or_spec).expanduser())  # a folder that is no run: refused before the probe below
        out = Path(run_or_spec).expanduser() / "reinit"
    return check_output_dir(out)


# -- the subjects: run folders or a spec ---------------------------------------------------------

def _subjects(run_or_spec, *, weights, plugin, data, seed, device, epochs=None,
              own=(None, None), workers: int = 0) -> list[Callable[[], _Subject]]:
    """One maker per model to sweep (seeds of a run, or the spec), so that only one is built at a time.

    A run folder's files are all checked here, before any model is built or any progress shown.
    ``own``: (module, evaluate) of a run recorded by hpa.Tracker.
    """
    path = Path(run_or_spec).expanduser()
    if path.is_dir():
        if weights is not None or plugin is not None:
            raise OptionError(f"{path} is a run folder: its task and snapshots are recorded; leave out "
                              "--weights and --plugin")
        folders = _run_folders(path, epochs)
        if _tracked(folders[0]) or own != (None, None):
            return [partial(_subject_from_tracker, folder, device, *own) for folder in folders]
        return [partial(_subject_from_run, folder, device, data, workers) for folder in folders]
    if plugin is None:
        raise OptionError(f"{run_or_spec} is neither a run folder nor usable without a task; give an "
                          "'hpa train' run folder, or a spec with --weights FILE --plugin TASK")
    return [partial(_subject_from_spec, str(run_or_spec), weights, plugin, data, seed, device)]


def _run_readers(path: Path) -> list:
    """The checked reader (open_run.RunFolder) of each run in ``path``: the run, or each seed of a --seeds folder."""
    seeds = read_seeds(path)
    if seeds is not None:
        missing = [seed_folder(path, s).name for s in seeds if not (seed_folder(path, s) / RUN_JSON).is_file()]
        if missing:  # refused rather than left out of the mean silently
            raise ReinitError(f"{path} lists {', '.join(missing)} but holds no run there; finish them with "
                              f"'hpa train --resume {path}', or give one seed-N folder")
        return [RunFolder.open(seed_folder(path, s), resume_target=path) for s in seeds]
    if not (path / RUN_JSON).exists() and not RunFolder(path).holds_run_files():
        raise ReinitError(f"{path} is not an hpa run folder (no {RUN_JSON}); give the --out folder of "
                          "'hpa train', or a spec with --weights FILE --plugin TASK")
    return [RunFolder.open(path)]


def _run_folders(path: Path, epochs: list[int] | None = None) -> list[Path]:
    """The run folders of ``path``, with the snapshots the sweep reads checked: those of ``epochs``
    (None: every saved one) and the last (the trained model)."""
    readers = _run_readers(path)
    for reader in readers:
        saved = reader.snapshot_epochs()
        if not any(file.exists() for file in reader.snapshots().values()):
            lost = f", though its metrics.jsonl records {len(saved)}; restore them from a backup" if saved else (
                "; train with 'hpa train' until at least one epoch is saved")
            raise ReinitError(f"{reader.path} holds no snapshots (snapshots/epoch-NNN.safetensors){lost}")
        for epoch in epochs or []:
            if epoch not in saved:
                raise ReinitError(f"epoch {epoch} was not saved in {reader.path}; the saved epochs are "
                                  f"{', '.join(map(str, saved))}")
        for epoch in sorted(set(saved if epochs is None else epochs) | {max(saved)}):
            reader.check_snapshot(epoch)  # missing or damaged: one line naming the file and the fix
    return [reader.path for reader in readers]


def _subject_from_run(folder: Path, device, data, workers: int = 0) -> _Subject:
    reader = RunFolder.open(folder)  # checked by _run_folders, as are the snapshots
    record = reader.record()
    saved = reader.snapshots()
    config = record["config"]
    task = get_task(config["task"])
    data = data if data is not None else record.get("data_dir")
    dataset, test, note = _run_test_split(task, None if data is None else Path(data).expanduser(), record, device,
                                          workers)
    recipe = config_from_record(record).recipe
    model, structure = build_model(config["arch"], dataset, config["seed"], recipe.init, task.name, recipe.init_std)
    final = max(saved)
    _load_state(model, reader.snapshot_state(final), saved[final])
    return _Subject(label=folder.name if is_seed_folder(folder) else seed_folder(folder, config["seed"]).name,
                    seed=int(config["seed"]), model=model.to(device), structure=structure, dataset=dataset,
                    task=task.name, init=recipe.init, init_std=recipe.init_std, checkpoints=_readers(reader),
                    test=test, test_note=note)


def _run_test_split(task, data_dir, record: dict, device, workers: int):
    """(the dataset, (test split, normalisation), how it is held): the run's data as it was trained on.

    The path (in memory or streamed) and the class subset are the recorded ones, drawn again and
    checked against run.json; the recorded noise is applied to an in-memory set.  A streamed test
    split is decoded once into the device's memory when it fits the memory budget, and read from
    its files again for every cell when it does not.
    """
    config = config_from_record(record)
    trained_on = record.get("data") or {}
    # The path taken (the trainer records it as the recipe's data_path; runs older than the streaming path: in memory).
    path = trained_on.get("path") or config.recipe.data_path or "in-memory"
    config = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, data_path=path))
    loaded = training_data(task, data_dir, False, config, device)
    if (loaded.record.get("classes") or None) != (trained_on.get("classes") or None):
        raise ReinitError(f"the {task.name} data found now holds other classes than the run trained on (run.json's "
                          "data.classes); give the --data folder the run was trained with")
    if loaded.streamed is None:
        dataset = _as_trained(loaded.dataset, record)
        return dataset, _test_split(dataset, task.name, device), "in memory"
    streamed = loaded.streamed
    if len(streamed.test_labels) == 0:
        raise ReinitError(f"the {task.name} task has no test split to evaluate on; use a task with test images")
    files = FileData(streamed, config.recipe, config.seed, device, workers=workers, skip=config.recipe.skip_unreadable)
    decoded = len(files.test) * math.prod(streamed.input_size)
    budget = memory_budget(device)
    if decoded > budget:
        note = (f"streamed: {len(files.test)} images read again for every cell ({decoded / 2**30:.2f} GiB "
                f"decoded, over the memory budget of {budget / 2**30:.2f} GiB)")
        return streamed, (files.test, files.normalisation), note
    images, labels = zip(*files.test.batches(EVAL_ROWS))  # the labels of skipped images are the ignored label
    held = Split(torch.cat(images), torch.cat(labels))
    return streamed, (held, files.normalisation), f"streamed: {len(held)} images decoded once, held on the device"


def _tracked(folder: Path) -> bool:
    return RunFolder.open(folder).record().get("writer") == TRACKER


def _subject_from_tracker(folder: Path, device, model, evaluate) -> _Subject:
    """A run hpa.Tracker recorded: the caller's module (a copy, the final snapshot loaded) and evaluation."""
    if not _tracked(folder):
        raise OptionError(f"model= and evaluate= are for runs recorded by hpa.Tracker; {folder} was trained by "
                          "hpa train, whose task is recorded: leave them out")
    if model is None or not callable(evaluate):
        raise ReinitError(f"{folder} was recorded by hpa.Tracker from your own module, which hpa cannot rebuild; "
                          f"call hpa.reinit({str(folder)!r}, model=MODULE, evaluate=FUNCTION) in Python, with "
                          "evaluate(module) returning the test accuracy (or accuracy, loss)")
    reader = RunFolder.open(folder)
    config, saved = reader.record()["config"], reader.snapshots()
    module = copy.deepcopy(unwrapped(model))
    final = max(saved)
    _load_state(module, reader.snapshot_state(final), saved[final])
    return _Subject(label=seed_folder(folder, config["seed"]).name, seed=int(config["seed"]), model=module.to(device),
                    structure=reader.structure(), dataset=None, task=str(config["arch"]), init="default",
                    checkpoints=_readers(reader), evaluate=evaluate, test_note="the caller's evaluate(module)")


def _as_trained(dataset, record: dict):
    """The dataset as the run saw it (its recorded noise applied); only the test split's pixels matter here."""
    return dataset_as_trained(dataset, config_from_record(record)).dataset


def _subject_from_spec(spec: str, weights, plugin: str, data, seed: int, device) -> _Subject:
    """A model file against a fresh seeded init of its architecture (the only checkpoint, epoch 0)."""
    if weights is None or str(weights).lower() == "none":
        raise OptionError(f"give the trained weights of {spec} with --weights FILE; the reference "
                          "checkpoint is a fresh init")
    task = get_task(plugin)
    dataset = task.dataset(None if data is None else Path(data).expanduser(), False)
    fresh, structure = build_model(spec, dataset, seed, "default", task.name)
    trained = _with_weights(fresh, weights)
    return _Subject(label=spec, seed=seed, model=trained.to(device), structure=structure, dataset=dataset,
                    task=task.name, init="default",
                    checkpoints={0: partial(dict, {k: v.detach().clone() for k, v in fresh.state_dict().items()})})


def _with_weights(fresh, weights) -> Any:
    """A second module of the architecture with the weights file's tensors (read without unpickling code).

    Loaded here rather than through the loader's ``build``, whose contract is a fresh module.
    """
    path = check_model_file(weights, "--weights")
    state = read_state_dict(path)
    model = copy.deepcopy(fresh)
    tensors = {key: value if torch.is_tensor(value) else torch.tensor(np.array(value)) for key, value in state.items()}
    _load_state(model, tensors, path)
    return model


def _readers(reader: RunFolder) -> dict[int, Callable[[], dict]]:
    """Each snapshot's weights, read through the run folder's reader when the sweep reaches its epoch."""
    return {epoch: partial(reader.snapshot_state, epoch) for epoch in reader.snapshot_epochs()}


def _load_state(model, state: dict, path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise LoadError(f"{path} does not fit the run's architecture ({first})") from None


# -- one subject's sweep -----------------------------------------------------------------------------

class _Sweep:
    """The cells of one subject: every chosen layer x every chosen checkpoint (or draws)."""

    def __init__(self, subject: _Subject, epochs, layers, with_linear, rerandomize, draws, reset_bn, device,
                 batch_size, draw_seed: int = 0) -> None:
        self.subject, self.device, self.batch_size = subject, device, batch_size
        self.rerandomize, self.draws, self.draw_seed = rerandomize, draws, draw_seed
        self.layers = _choose_layers(subject.structure, layers, with_linear)
        self.roles = LAYER_ROLES + (BN_ROLES if reset_bn else ())
        self.epochs = [] if rerandomize else _choose_epochs(subject, epochs)
        self.test = None
        if subject.evaluate is None:
            self.test = subject.test or _test_split(subject.dataset, subject.task, device)
        self.live = subject.model.state_dict()  # shares storage with the parameters: copy_ changes the model
        self.trained_tensors = {key: self.live[key].clone() for key in self._keys()}

    def _keys(self) -> list[str]:
        return [key for layer in self.layers for key in self.layer_keys(layer).values()]

    def layer_keys(self, layer) -> dict[str, str]:
        """role -> state key of the tensors that make up ``layer`` in this sweep."""
        return {role: layer.params[role] for role in self.roles if role in layer.params}

    def run(self, progress, with_label: bool) -> list[dict[str, Any]]:
        self.subject.model.eval()
        accuracy, loss = self._evaluate()
        self.trained = {"accuracy": accuracy, "loss": loss}
        columns = ["random"] if self.rerandomize else self.epochs
        total = len(columns) * len(self.layers)
        prefix = f"{self.subject.label}: " if with_label else ""
        what = f"{self.draws} random draws" if self.rerandomize else f"{len(columns)} checkpoints"
        progress(f"{prefix}{total} cells: {len(self.layers)} layers x {what}; "
                 f"trained test accuracy {accuracy:.4f}")
        rows, started = [], time.perf_counter()
        for done, column in enumerate(columns, 1):
            rows += self._random_cells() if self.rerandomize else self._checkpoint_cells(column)
            elapsed = time.perf_counter() - started
            left = elapsed / done * (len(columns) - done)
            name = "random draws" if self.rerandomize else f"epoch {column}"
            progress(f"{prefix}{name}: {done * len(self.layers)}/{total} cells, {elapsed:.1f}s, "
                     f"about {left:.1f}s left")
        return rows

    def _checkpoint_cells(self, epoch: int) -> list[dict[str, Any]]:
        state = self._checkpoint_tensors(epoch)
        rows = []
        for layer in self.layers:
            keys = self.layer_keys(layer)
            accuracy, loss = self._evaluate_with({key: state[key] for key in keys.values()})
            rows.append(self._row(layer, epoch, accuracy, loss))
        return rows

    def _checkpoint_tensors(self, epoch: int) -> dict:
        """The chosen layers' tensors at ``epoch``, on the device; each snapshot file is read once."""
        state = self.subject.checkpoints[epoch]()
        missing = [key for key in self._keys() if key not in state]
        if missing:
            raise LoadError(f"the epoch-{epoch} checkpoint has no {missing[0]!r}; it is not a state of this "
                            "architecture")
        return {key: state[key].to(self.device) for key in self._keys()}

    def _random_cells(self) -> list[dict[str, Any]]:
        rows = []
        for index, layer in enumerate(self.layers):
            results = [self._evaluate_with(self._fresh_tensors(layer, index, draw)) for draw in range(self.draws)]
            accuracies = [a for a, _ in results]
            row = self._row(layer, None, _mean(accuracies), _mean([l for _, l in results]))
            row["accuracy_std"] = _std(accuracies)
            rows.append(row)
        return rows

    def _fresh_tensors(self, layer, index: int, draw: int) -> dict:
        """``layer`` drawn fresh from the architecture's initialiser; seeded by (run seed, --seed, layer, draw)."""
        keys = self.layer_keys(layer)
        owner_path = keys["weight"].rsplit(".", 1)[0]
        owner = copy.deepcopy(self.subject.model.get_submodule(owner_path))
        seed = int(np.random.SeedSequence([self.subject.seed, self.draw_seed, index, draw]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):  # the module's own initialiser draws from the global RNG
            torch.manual_seed(seed)
            _initialise(owner, self.subject.init, seed, self.subject.init_std)
        own = owner.state_dict()
        fresh = {}
        for role, key in keys.items():
            if role in _FRESH_BN:
                fresh[key] = torch.full_like(self.live[key], _FRESH_BN[role])
            else:
                fresh[key] = own[key[len(owner_path) + 1:]].to(self.device)
        return fresh

    def _evaluate_with(self, tensors: dict) -> tuple[float, float]:
        """Copy ``tensors`` into the model, evaluate, restore the trained tensors (in place, no rebuild)."""
        for key, value in tensors.items():
            self.live[key].copy_(value)
        try:
            return self._evaluate()
        finally:
            for key in tensors:
                self.live[key].copy_(self.trained_tensors[key])

    def _evaluate(self) -> tuple[float, float | None]:
        """(accuracy, loss) of the model as it is now: on the task's test split, or by the caller's evaluate."""
        if self.subject.evaluate is None:
            return _evaluate(self.subject.model, self.test, self.batch_size)
        return _own_result(self.subject.evaluate(self.subject.model))

    def _row(self, layer, epoch, accuracy: float, loss: float) -> dict[str, Any]:
        trained = self.trained["accuracy"]
        return {"seed": self.subject.label, "layer": layer.name, "kind": layer.kind, "epoch": epoch,
                "accuracy": accuracy, "loss": loss, "absolute_drop": trained - accuracy,
                "relative_drop": (trained - accuracy) / trained if trained > 0 else None}

    def final_n_l(self) -> dict[str, float | None]:
        """Each chosen layer's n_l in the trained model, from the projection statistic on its rebound graph."""
        state = {key: value.detach().cpu() for key, value in self.live.items()}
        try:
            graph = rebind(self.subject.structure, state)
        except LoadError:  # a layer computed in the forward pass: trace the trained module instead
            size = self.subject.structure.input_shape if self.subject.dataset is None else \
                self.subject.dataset.input_size
            graph = hpa.load(self.subject.model, input_size=size)
        # with_linear: a swept layer gets its n_l even where scans skip it by default (a linear
        # layer, or a conv on a 1x1 plane, which acts as one).
        result = hpa.analyse(graph, statistics=["projection"], with_linear=True)
        rows = {row["name"]: row.get("projection.n_l") for row in result.layer_rows()}
        return {layer.name: rows.get(layer.name) for layer in self.layers}


def _own_result(value) -> tuple[float, float | None]:
    """The caller's evaluate() result as (accuracy, loss): a number, or a pair of numbers."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, None)
    try:
        accuracy, loss = float(pair[0]), None if len(pair) < 2 or pair[1] is None else float(pair[1])
    except (TypeError, ValueError, IndexError):
        accuracy = loss = math.nan
    if len(pair) > 2 or not math.isfinite(accuracy) or (loss is not None and not math.isfinite(loss)):
        raise ReinitError(f"evaluate(module) must return the test accuracy, or (accuracy, loss), as finite "
                          f"numbers; it returned {value!r}")
    return accuracy, loss


def _initialise(module, init: str, seed: int, std: float) -> None:
    """What the trainer did to this layer at epoch 0 (recipe ``init``); "default": its own reset_parameters()."""
    if init != "default":
        initialise(module, init, seed, std)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        raise ReinitError(f"{type(module).__name__} has no reset_parameters(), so --rerandomize cannot draw "
                          "it fresh; reset it to a checkpoint instead (leave out --rerandomize)")


def _choose_layers(structure, names: list[str] | None, with_linear: bool) -> list:
    available = [layer for layer in structure if layer.params.get("weight")]
    if names:
        by_name = {layer.name: layer for layer in available}
        for name in names:
            if name not in by_name:
                known = [layer.name for layer in structure]
                tail = suggest(name, known) or f"; the layers are {', '.join(known)}"
                raise ReinitError(f"no layer named {name!r} in the model{tail}")
        return [by_name[name] for name in names]
    chosen = [layer for layer in available if layer.kind != "linear" or with_linear]
    if not chosen:
        raise ReinitError("the model has no conv layer with recorded tensors to reset; add --with-linear for "
                          "linear layers")
    return chosen


def _choose_epochs(subject: _Subject, epochs: list[int] | None) -> list[int]:
    saved = sorted(subject.checkpoints)
    if epochs is None:
        return saved
    for epoch in epochs:
        if epoch not in subject.checkpoints:
            shown = ", ".join(map(str, saved))
            raise ReinitError(f"epoch {epoch} was not saved in {subject.label}; the saved epochs are {shown}")
    return sorted(set(epochs))


def _test_split(dataset, task: str, device):
    """(the task's test split on the device, the trainer's normalisation of it)."""
    if dataset.test_labels is None or len(dataset.test_labels) == 0:
        raise ReinitError(f"the {task} task has no test split to evaluate on; use a task with test images")
    images = torch.from_numpy(np.ascontiguousarray(dataset.test_images)).to(device)
    labels = torch.from_numpy(np.asarray(dataset.test_labels, dtype=np.int64)).to(device)
    return Split(images, labels), Normalisation(dataset, device, images=dataset.test_images)


def _evaluate(model, test, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``test``: the trainer's evaluation pass, at torch's
    global precision settings as they are."""
    loss, accuracy = evaluate(model, *test, precision=None, batch_size=batch_size)
    return accuracy, loss


def _mean(values: list[float | None]) -> float | None:
    """The mean; None when a value is (a tracker run's evaluate may give no loss)."""
    return None if None in values else sum(values) / len(values)


def _std(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# -- the result ----------------------------------------------------------------------------------

@dataclass
class ReinitResult:
    """Every cell of every seed, the trained accuracies, and each layer's final n_l."""

    source: str
    rows: list[dict[str, Any]]  # seed, layer, kind, epoch, accuracy, loss, absolute_drop, relative_drop
    trained: dict[str, dict[str, float]]  # seed label -> accuracy and loss of the trained model
    n_l: dict[str, dict[str, float | None]]  # seed label -> layer -> final n_l
    options: dict[str, Any]

    @property
    def seeds(self) -> list[str]:
        return list(self.trained)

    def layers(self) -> list[str]:
        return list(dict.fromkeys(row["layer"] for row in self.rows))

    def epochs(self) -> list[int | None]:
        return list(dict.fromkeys(row["epoch"] for row in self.rows))

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def heatmap(self, seed: str | None = None, value: str = "relative_drop"):
        """(epochs x layers) numpy array of ``value`` for one seed, or the mean over seeds when None."""
        layers, epochs = self.layers(), self.epochs()
        seeds = [seed] if seed is not None else self.seeds
        grid = np.full((len(seeds), len(epochs), len(layers)), np.nan)
        for row in self.rows:
            if row["seed"] in seeds and row[value] is not None:
                grid[seeds.index(row["seed"]), epochs.index(row["epoch"]), layers.index(row["layer"])] = row[value]
        return grid.mean(axis=0)

    def criticality(self) -> dict[str, float]:
        """Per layer, the relative drop of a reset to the earliest checkpoint (or the random draws), seed mean.

        The earliest checkpoint is the initialisation by default: Zhang et al.'s re-initialisation
        robustness, the row of Fig. 2 that separates critical from ambient layers.
        """
        first = self.heatmap()[0]
        return {layer: None if math.isnan(value) else float(value) for layer, value in zip(self.layers(), first)}

    def correlation(self) -> dict[str, Any]:
        """Spearman correlation of the criticality with the final n_l and with |n_l - 0.5|, over layers."""
        from scipy.stats import spearmanr

        critical = self.criticality()
        layers = [name for name in self.layers() if self._mean_n_l(name) is not None and critical[name] is not None]
        n_l = [self._mean_n_l(name) for name in layers]
        drops = [critical[name] for name in layers]
        out: dict[str, Any] = {"layers": len(layers), "criticality": "relative drop at the earliest checkpoint"}
        for key, values in (("n_l", n_l), ("bias", [abs(v - 0.5) for v in n_l])):
            if len(layers) < 3 or len(set(values)) < 2 or len(set(drops)) < 2:
                out[key] = {"rho": None, "p": None, "reason": "fewer than 3 layers or a constant value"}
                continue
            rho, p = spearmanr(values, drops)
            out[key] = {"rho": float(rho), "p": float(p)}
        return out

    def _mean_n_l(self, layer: str) -> float | None:
        values = [per_seed.get(layer) for per_seed in self.n_l.values()]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return _mean(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "options": self.options, "trained": self.trained,
                "layers": self.layers(), "epochs": self.epochs(),
                "final_n_l": {layer: self._mean_n_l(layer) for layer in self.layers()},
                "n_l_source": "projection statistic of the trained model (BatchNorm folded), mean over seeds",
                "per_seed_n_l": self.n_l, "criticality": self.criticality(),
                # Layers the projection statistic gives no n_l (e.g. a conv on a 1x1 plane): left out
                # of the correlation, listed so that nothing is dropped silently.
                "n_l_missing": [layer for layer in self.layers() if self._mean_n_l(layer) is None],
                "spearman": self.correlation(), "cells": self.rows}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_plain)

    def plot(self, folder: str | os.PathLike, fmt: str = "png") -> list[Path]:
        """Heatmaps (one per seed, and their mean with several) and the n_l-vs-criticality figure."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        with drawing(FigureOptions(format=fmt)):
            return plot_reinit(self, Path(folder), fmt)

    def save(self, folder: str | os.PathLike, fmt: str = "png") -> Path:
        """Write reinit.json, reinit.csv and the figures into the new or hpa-written ``folder``, atomically."""
        with atomic_directory(folder) as staging:
            (staging / "reinit.json").write_text(self.to_json() + "\n")
            self.to_pandas().to_csv(staging / "reinit.csv", index=False)
            self.plot(staging, fmt)
        return Path(folder)


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
