"""``hpa reproduce``: the papers' training figures as built-in studies, on fixture data in the real formats.

Every built-in study is checked against the real ``hpa train``/``hpa reinit`` options and recipes.
End to end (one epoch, one seed, tiny CIFAR-10/100 python batches and MNIST idx files): Fig. 7 (the
paper's layout) always; every other built-in under the ``studies`` mark, which ``make test-studies`` runs (each trains a VGG-19 or LeNet,
some reset it layer by layer too: 30 s to 2 min each on a shared 2-core machine, and about 1 GB of
snapshots each).  tests/test_study.py runs a [reinit] study on the small digits network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_bad_input
from test_streaming import write_tree
from test_tasks import write_cifar, write_mnist

from hpa.experiments.reproduce import FIGURES, study_text
from hpa.experiments.study_file import read_study
from hpa.experiments.types import NAMED_RECIPES

ALWAYS = ("fig7",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, per_batch=4)  # 20 training images (none left for validation): a VGG-19 epoch in a second
    write_cifar(root, classes=100, per_batch=40)
    write_mnist(root, train=40, test=10)
    write_tree(root, per_class=4, val_per_class=2)  # train/<wnid>/ and val/<wnid>/ beside them: the imagenet task's
    return root


def _options():
    from hpa.cli import _command_options, reinit, train

    return _command_options(train), _command_options(reinit)


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_built_in_study_is_a_valid_study_with_a_named_recipe(name, tmp_path):
    figure = FIGURES[name]
    text, note = study_text(figure, tmp_path, None, None, {})
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    study = read_study(path, *_options())
    assert note == ""
    assert study.seeds == figure.seeds
    recipes = study.grid.get("recipe", [study.train.get("recipe")])
    assert recipes and all(recipe in NAMED_RECIPES for recipe in recipes)
    assert (study.reinit is not None) == (figure.reinit is not None)
    assert len(study.cells()) * len(study.seeds) == figure.runs()


def test_the_list_shows_every_training_figure_with_its_grid_budget_and_data(run_hpa):
    proc = run_hpa("reproduce", "list")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for name in FIGURES:
        assert f"\n{name} " in "\n" + text, name
    assert "10 runs x 100 epochs · grid seeds=0,1,2,3,4,5,6,7,8,9 · recipe paper · data cifar-10-batches-py/" in text
    assert "6 runs x 100 epochs · grid plugin=cifar10,mnist seeds=0,1,2 · recipe exponential" in text
    assert "3 runs x 100 epochs + reinit · grid seeds=0,1,2 · recipe paper · data train/<wnid>/ and val/<wnid>/" in text


def test_a_shrunk_study_says_so(tmp_path):
    text, note = study_text(FIGURES["fig22"], tmp_path, 2, 1, {"recipe": "exponential"})
    assert note == "smoke run: 2 epochs, 1 of 3 seeds, only recipe=exponential (the paper: 6 runs)"
    assert 'recipe = ["exponential"]' in text and "seeds = [0]" in text and "epochs = 2" in text


def test_missing_data_an_unknown_figure_and_a_bad_subset_are_refused(run_hpa, tmp_path):
    assert_bad_input(run_hpa("reproduce", "fig8", "--data", tmp_path, "--out", tmp_path / "o"), "DIR/train/<wnid>/")
    assert_bad_input(run_hpa("reproduce", "fig7", "--data", tmp_path, "--out", tmp_path / "o"),
                     "CIFAR10 files missing")
    assert_bad_input(run_hpa("reproduce", "fig77"), "did you mean 'fig7'")
    assert_bad_input(run_hpa("reproduce", "fig21", "--data", tmp_path, "--out", tmp_path / "o", "--subset",
                             "plugin=imagenet"), "fig21's plugin is one of cifar10, mnist")
    assert not (tmp_path / "o").exists()


def _end_to_end(name: str, data: Path, tmp_path: Path, run_hpa) -> Path:
    out = tmp_path / "out"
    proc = run_hpa("reproduce", name, "--data", data, "--out", out, "--epochs", "1", "--seeds", "1", "--jobs", "2",
                   "--cpu-threads", "2")
    assert proc.returncode == 0, proc.stderr
    figure = FIGURES[name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == [] and all(cell["complete"] == [0] for cell in summary["cells"])
    assert (out / "summary.csv").stat().st_size > 0
    for cell in summary["cells"]:
        record = json.loads((out / cell["cell"] / "seed-0" / "run.json").read_text())
        assert record["config"]["recipe"]["epochs"] == 1
        expected = figure.grid.get("recipe", [figure.train.get("recipe")])
        assert record["config"]["recipe_name"] in expected
        stem = name if len(summary["cells"]) == 1 else f"{name}-{cell['cell']}"
        if figure.layout == "cones":
            assert (out / "figures" / stem / "cones_states_epochs.png").stat().st_size > 0
        else:
            assert (out / "figures" / f"{stem}.png").stat().st_size > 0
        if figure.histograms:  # Fig. 4: the cosines of the last epoch against the initialisation
            assert (out / "figures" / figure.histograms / "projection_histograms.png").stat().st_size > 0
        if figure.reinit is not None:  # one seed: one heatmap
            assert (out / cell["cell"] / "reinit" / "heatmap.png").stat().st_size > 0
    assert "figures: " in proc.stdout
    return out


@pytest.mark.parametrize("name", ALWAYS)
def test_a_built_in_study_runs_end_to_end(name, data, tmp_path, run_hpa):
    _end_to_end(name, data, tmp_path, run_hpa)


@pytest.mark.slow
@pytest.mark.studies  # not in make test (its CI budget): 'make test-studies' runs them
@pytest.mark.parametrize("name", [name for name in FIGURES if name not in ALWAYS])
def test_every_other_built_in_study_runs_end_to_end(name, data, tmp_path, run_hpa):
    _end_to_end(name, data, tmp_path, run_hpa)
