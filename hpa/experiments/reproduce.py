"""``hpa reproduce``: the training figures of Gamba et al. 2020 and 2019 as built-in studies.

Each figure is a study (:mod:`hpa.experiments.study`) with the named recipe docs/reproducing.md
gives it, run on any executor, then drawn in the paper's layout: ``n_l`` of layers 1–7 and of
layers 8 onwards in separate panels, red ticks at the step decays, the train and validation loss and
accuracy over their maxima below, bands of ± 1 std over the seeds (:func:`hpa.render.study.paper_figure`);
re-initialisation figures as one heatmap per seed and their mean (``hpa reinit``'s own figures).
``--epochs``, ``--seeds`` and ``--subset`` shrink a study for a smoke run, and the caption says so.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from hpa.errors import OptionError, suggest
from hpa.experiments.layout import seed_folder, stats_name
from hpa.experiments.open_run import Run, RunFolder
from hpa.experiments.study import REINIT_FOLDER, StudyReport, run_status, run_study
from hpa.experiments.study_file import CommandOption, Study
from hpa.plugins import registries

PAPER_2020 = "Gamba et al. 2020, Hyperplane Arrangements of Trained ConvNets Are Biased"
PAPER_2019 = "Gamba et al. 2019, On the Geometry of Rectifier Convolutional Neural Networks"
DATASETS = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "mnist": "MNIST/raw/",
            "imagenet": "train/<wnid>/ and val/<wnid>/ (ImageNet)"}


@dataclass(frozen=True)
class Figure:
    """One figure of a paper as a study."""

    name: str  # what 'hpa reproduce NAME' takes
    paper: str
    what: str
    train: dict[str, Any]  # the [train] table (data is added from --data)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    reinit: dict[str, Any] | None = None
    layout: str = "paper"  # paper: n_l 1-7 / 8-16 / training; reinit: heatmaps too; cones: the cone figures
    aliases: tuple[str, ...] = ()
    histograms: str | None = None  # the name of a figure of the trained and initial cosine histograms it also draws

    @property
    def tasks(self) -> list[str]:
        return list(self.grid["plugin"]) if "plugin" in self.grid else [self.train["plugin"]]

    def runs(self, seeds: int | None = None, cells: int | None = None) -> int:
        count = 1
        for values in self.grid.values():
            count *= len(values)
        return (cells or count) * (seeds or len(self.seeds))


_VGG = {"plugin": "cifar10", "arch": "cifar:vgg19"}
# The imagenet task's own recipe: the authors' RandomResizedCrop(224) and flips, Resize(256) + CenterCrop(224).
_ALEXNET_IMAGENET = {"plugin": "imagenet", "arch": "cifar:alexnet", "recipe": "paper"}
_VGG_IMAGENET = {"plugin": "imagenet", "arch": "cifar:vgg19", "recipe": "paper"}
FIGURES = {figure.name: figure for figure in (
    Figure("fig2", PAPER_2020, "re-initialisation heatmaps, VGG-19 on CIFAR-10, step schedule",
           {**_VGG, "recipe": "paper"}, reinit={}, layout="reinit", aliases=("fig23",)),
    Figure("fig5", PAPER_2020, "n_l over epochs, AlexNet on ImageNet; Fig. 4, its cosines at init and trained",
           dict(_ALEXNET_IMAGENET), aliases=("fig4",), histograms="fig4"),
    Figure("fig6", PAPER_2020, "VGG-19 on CIFAR-10, every training label replaced (the code's always-wrong labels)",
           {**_VGG, "recipe": "random-labels"}),
    Figure("fig6-uniform", PAPER_2020, "Fig. 6 as its text reads: labels redrawn uniformly (Zhang et al. 2017)",
           {**_VGG, "recipe": "random-labels-uniform"}),
    Figure("fig7", PAPER_2020, "n_l over epochs, VGG-19 on CIFAR-10, 10 runs", {**_VGG, "recipe": "paper"},
           seeds=tuple(range(10))),
    Figure("fig8", PAPER_2020, "n_l over epochs, VGG-19 on ImageNet", dict(_VGG_IMAGENET)),
    Figure("fig15", PAPER_2020, "VGG-19 from N(0, 0.01), which fails to learn, on ImageNet, 10 epochs",
           {**_VGG_IMAGENET, "recipe": "failing-init", "epochs": 10}),
    Figure("fig15-cifar", PAPER_2020, "VGG-19 from N(0, 0.01), which fails to learn (on CIFAR-10; the paper: "
           "ImageNet), 10 epochs", {**_VGG, "recipe": "failing-init", "epochs": 10}, seeds=(0,)),
    Figure("fig16", PAPER_2020, "VGG-19 on CIFAR-100, smooth schedule: heatmaps and n_l",
           {"plugin": "cifar100", "arch": "cifar:vgg19", "recipe": "exponential"}, reinit={}, layout="reinit",
           aliases=("fig17",)),
    Figure("fig18", PAPER_2020, "re-initialisation heatmaps, AlexNet on ImageNet", dict(_ALEXNET_IMAGENET), reinit={},
           layout="reinit"),
    Figure("fig19", PAPER_2020, "re-initialisation heatmaps, VGG-19 on ImageNet", dict(_VGG_IMAGENET), reinit={},
           layout="reinit"),
    Figure("fig20", PAPER_2020, "VGG-19 on CIFAR-10, each training image's pixels shuffled",
           {**_VGG, "recipe": "pixel-shuffle"}),
    Figure("fig21", PAPER_2020, "the first layer's n_l, smooth schedule: VGG-19 on CIFAR-10 and LeNet on MNIST",
           {"recipe": "exponential"}, grid={"plugin": ["cifar10", "mnist"]}),
    Figure("fig21-unit", PAPER_2020, "Fig. 21's CIFAR10+: pixels in [0, 1], smooth schedule",
           {**_VGG, "recipe": "unit-pixels"}),
    Figure("fig22", PAPER_2020, "step against smooth schedule, VGG-19 on CIFAR-10",
           dict(_VGG), grid={"recipe": ["paper", "exponential"]}),
    Figure("fig21-imagenet", PAPER_2020, "Fig. 21's ImageNet curve: VGG-19, smooth schedule",
           {**_VGG_IMAGENET, "recipe": "exponential"}),
    Figure("fig22-imagenet", PAPER_2020, "Fig. 22's bottom row: step against smooth schedule, VGG-19 on ImageNet",
           {"plugin": "imagenet", "arch": "cifar:vgg19"}, grid={"recipe": ["paper", "exponential"]}),
    Figure("fig24", PAPER_2020, "re-initialisation heatmaps, VGG-19 on CIFAR-10, smooth schedule",
           {**_VGG, "recipe": "exponential"}, reinit={}, layout="reinit"),
    Figure("cones-fig1", PAPER_2019, "cone states every 10 epochs, LeNet-9 on CIFAR-10, 5 runs",
           {"plugin": "cifar10", "arch": "cifar:lenet9", "recipe": "cones-2019", "stat": ["cones"],
            "snapshot_every": 10}, seeds=(0, 1, 2, 3, 4), layout="cones"),
    Figure("cones-supp-d", PAPER_2019, "the same for the VGG-like network (supplement D)",
           {"plugin": "cifar10", "arch": "cifar:vgg9", "recipe": "cones-2019", "stat": ["cones"],
            "snapshot_every": 10}, seeds=(0, 1, 2, 3, 4), layout="cones"),
)}
ALIASES = {alias: figure.name for figure in FIGURES.values() for alias in figure.aliases}


def describe() -> list[dict[str, Any]]:
    """Every training figure of the two papers: its grid, budget (runs x epochs) and data."""
    rows = []
    for figure in FIGURES.values():
        epochs = figure.train.get("epochs", 75 if figure.train.get("recipe") == "cones-2019" else 100)
        grid = {**figure.grid, "seeds": list(figure.seeds)}
        rows.append({"name": figure.name, "aliases": list(figure.aliases), "paper": figure.paper,
                     "what": figure.what, "recipe": figure.train.get("recipe") or ",".join(figure.grid.get("recipe", [])),
                     "grid": grid, "runs": figure.runs(), "epochs": epochs, "reinit": figure.reinit is not None,
                     "data": [DATASETS[task] for task in figure.tasks]})
    return rows


def figure_named(name: str) -> Figure:
    name = ALIASES.get(name, name)
    if name not in FIGURES:
        raise OptionError(f"no built-in figure {name!r}{suggest(name, list(FIGURES) + list(ALIASES))}; "
                          "'hpa reproduce list' lists them")
    return FIGURES[name]


def study_text(figure: Figure, data: str | Path, epochs: int | None, seeds: int | None,
               subset: Mapping[str, str]) -> tuple[str, str]:
    """The study file of ``figure`` (TOML) and what was shrunk, for the caption ("" when nothing)."""
    train = {**figure.train, "data": str(Path(data).expanduser().absolute())}
    shrunk = []
    if epochs is not None:
        train["epochs"] = epochs
        shrunk.append(f"{epochs} epoch{'s' if epochs > 1 else ''}")
    chosen = list(figure.seeds) if seeds is None else list(figure.seeds[:seeds])
    if seeds is not None:
        if not 1 <= seeds:
            raise OptionError(f"--seeds must be 1 or more, not {seeds}")
        shrunk.append(f"{len(chosen)} of {len(figure.seeds)} seeds")
    grid = {k: list(v) for k, v in figure.grid.items()}
    for key, value in subset.items():
        if key not in grid:
            raise OptionError(f"--subset {key}={value}: {figure.name} has no grid field {key!r}"
                              f"{suggest(key, grid)}; its grid is {', '.join(grid) or 'only the seeds'}")
        kept = [v for v in grid[key] if str(v) == value]
        if not kept:
            raise OptionError(f"--subset {key}={value}: {figure.name}'s {key} is one of "
                              f"{', '.join(map(str, grid[key]))}")
        grid[key] = kept
        shrunk.append(f"only {key}={value}")
    lines = ["# hpa reproduce " + figure.name + ": " + figure.what, "[train]"]
    lines += [f"{key} = {_toml(value)}" for key, value in train.items()]
    lines += ["[grid]"] + [f"{key} = {_toml(values)}" for key, values in grid.items()] + [f"seeds = {chosen}"]
    if figure.reinit is not None:
        lines += ["[reinit]"] + [f"{key} = {_toml(value)}" for key, value in figure.reinit.items()]
    note = ("smoke run: " + ", ".join(shrunk) + f" (the paper: {figure.runs()} runs)") if shrunk else ""
    return "\n".join(lines) + "\n", note


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings, integers and lists of them read the same in TOML


def reproduce(name: str, data: str | Path, out: str | Path, executor, train_options: Mapping[str, CommandOption],
              reinit_options: Mapping[str, CommandOption], *, epochs: int | None = None, seeds: int | None = None,
              subset: Mapping[str, str] | None = None, progress: Callable[[str], None] | None = None) -> StudyReport:
    """Run the built-in study of figure ``name`` into ``out`` and draw it in the paper's layout."""
    figure = figure_named(name)
    text, note = study_text(figure, data, epochs, seeds, subset or {})
    with tempfile.TemporaryDirectory(prefix="hpa-reproduce-") as folder:
        study_file = Path(folder) / f"{figure.name}.toml"
        study_file.write_text(text, encoding="utf-8")
        return run_study(study_file, out, executor, train_options, reinit_options, progress=progress,
                         before_summary=lambda path, study: draw_figure(figure, path, study, note))


def draw_figure(figure: Figure, out: Path, study: Study, note: str) -> list[Path]:
    """OUT/figures/FIGURE[-CELL].png in the paper's layout, for every cell with a complete seed (the cone
    figures: OUT/figures/FIGURE[-CELL]/cones_states_epochs.png)."""
    # here, not at the top: the figures import matplotlib
    from hpa.render.study import paper_figure

    written: list[Path] = []
    for cell in study.cells():
        folder = out / cell.name
        complete = [s for s in study.seeds if run_status(seed_folder(folder, s)) == "complete"]
        if not complete:
            continue
        series = Run(folder, {s: RunFolder(seed_folder(folder, s)) for s in complete}).run_series()
        stem = out / "figures" / (figure.name if len(study.cells()) == 1 else f"{figure.name}-{cell.name}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        title = f"{figure.paper.split(',')[0]}, {figure.name}: {series.caption}"
        if figure.layout == "cones":  # the cones statistic's own figures, over the seeds, titled as the paper's
            captioned = dataclasses.replace(series, caption=" · ".join(filter(None, (title, note))))
            stem.mkdir(exist_ok=True)
            written += registries()["statistics"].get("cones").plot_series(captioned, stem, "png")
        else:
            written += paper_figure(series, stem, "png", title, note)
        if figure.layout == "reinit":
            written += sorted((folder / REINIT_FOLDER).glob("heatmap*.png"))
        if figure.histograms:
            name = figure.histograms if len(study.cells()) == 1 else f"{figure.histograms}-{cell.name}"
            written += _histograms(RunFolder(seed_folder(folder, complete[0])), out / "figures" / name,
                                   f"{figure.paper.split(',')[0]}, {figure.histograms}", note)
    return written


def _histograms(run: RunFolder, folder: Path, title: str, note: str) -> list[Path]:
    """The cosines of every layer, trained (the last epoch) against the initialisation (epoch 0), as
    Fig. 4 draws them: the projection statistic's own figures of the last epoch's stored result."""
    # here, not at the top: the result's figures import matplotlib
    from hpa.api import read_result

    last = max(run.snapshot_epochs())
    result = read_result(run.path / stats_name(last))
    record = run.record()["config"]
    caption = " · ".join(filter(None, (title, f"{record['task']}", str(record["arch"]), f"seed {record['seed']}", note)))
    result.graph.source.update(model=caption, weights=f"epoch {last}")
    if result.init is not None:
        result.init.source.update(weights="epoch 0")
    folder.mkdir(parents=True, exist_ok=True)
    return result.plot(folder)  # projection_histograms (Fig. 4) and projection_n_l

