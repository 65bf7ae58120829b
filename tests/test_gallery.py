"""hpa gallery: specs expanded by the loaders' own lists, each model isolated, resumable, the table
checked against numbers recomputed here (numpy, scipy), the cache and the executor path."""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from conftest import assert_bad_input, snapshot
from hpa.errors import OptionError, OutputError, SpecError
from hpa.gallery.entries import expand
from hpa.gallery.run import run_gallery
from hpa.gallery.summary import holm


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "gallery.csv", newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def _record(out: Path, key: str) -> dict:
    return json.loads((out / "models" / key / "model.json").read_text())


def _n_l(weight: np.ndarray) -> tuple[int, int]:
    """(negative cosines, live filters) of one conv weight, from the definition (docs/statistics.md §1)."""
    rows = weight.reshape(len(weight), -1).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    live = norms > 0
    cos = rows.sum(axis=1)[live] / (norms[live] * np.sqrt(rows.shape[1]))
    return int((cos <= 0).sum()), int(live.sum())


def _holm_by_hand(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1)
        self.conv2 = nn.Conv2d(24, 40, 3, padding=1)
        self.conv3 = nn.Conv2d(40, 16, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


@pytest.fixture
def model_folder(tmp_path):
    """A folder of real model files: a torch state_dict, a real ONNX export, a corrupt ONNX file, a README."""
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    torch.manual_seed(3)
    saved = Small()
    with torch.no_grad():
        saved.conv2.weight[:30] -= 0.05  # most of conv2's filters negative: a layer far from 0.5
    torch.save(saved.state_dict(), folder / "small.pt")
    torch.manual_seed(4)
    exported = Small().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(exported, torch.randn(1, 3, 8, 8), str(folder / "sub" / "small.onnx"), dynamo=False)
    (folder / "broken.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (folder / "README.txt").write_text("not a model\n")
    weights = {"small.pt": saved, "sub/small.onnx": exported}
    return folder, {name: [m.weight.detach().numpy() for m in (model.conv1, model.conv2, model.conv3)]
                    for name, model in weights.items()}


def test_loader_wildcards_expand_through_the_loaders_own_lists():
    import timm
    import torchvision

    names = [e.name for e in expand(["torchvision:squeezenet*", "timm:resnet1?t"], pretrained=False).entries]
    expected = sorted(fnmatch.filter(torchvision.models.list_models(module=torchvision.models), "squeezenet*"))
    assert names == expected + sorted(timm.list_models("resnet1?t"))
    # pretrained: timm offers one name per weight set, the architecture's tags
    tagged = [e.name for e in expand(["timm:resnet10t*"], pretrained=True).entries]
    assert tagged == sorted(timm.list_models("resnet10t*", pretrained=True)) and all("." in n for n in tagged)


def test_a_gallery_of_seeded_inits_scans_every_match(tmp_path):
    out = tmp_path / "g"
    report = run_gallery(["torchvision:squeezenet1_1", "timm:resnet1?t"], out, weights="none")
    rows = _rows(out)
    assert sorted(rows) == ["resnet10t", "resnet14t", "squeezenet1_1"]
    assert report.coverage == "3 of 3 conv models scanned"
    assert all(row["status"] == "ok" and row["weights"] == "none" for row in rows.values())
    # n_l of each layer from the seeded torchvision model itself (torchvision builds it the same way)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None)
    convs = [m.weight.detach().numpy() for m in model.modules() if isinstance(m, nn.Conv2d)]
    layers = _record(out, "torchvision-squeezenet1_1")["layers"]
    assert [(layer["negative"], layer["filters"]) for layer in layers] == [_n_l(w) for w in convs]
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["all_models.png", "families.png"]


def test_a_folder_of_model_files_with_a_corrupt_one(tmp_path, model_folder):
    folder, weights = model_folder
    out = tmp_path / "g"
    report = run_gallery([str(folder)], out)
    rows = {Path(name).relative_to(folder).as_posix(): row for name, row in _rows(out).items()}
    assert sorted(rows) == ["broken.onnx", "small.pt", "sub/small.onnx"]
    assert rows["broken.onnx"]["status"] == "failed" and rows["broken.onnx"]["reason"]
    assert report.coverage == "2 of 3 conv models scanned; 1 failed: 1 load error"
    assert report.ignored == [str(folder / "README.txt")]
    for name, convs in weights.items():
        row = rows[name]
        counts = [_n_l(w) for w in convs]
        n_l = [k / n for k, n in counts]
        assert row["layers_analysed"] == "3" and row["weights"] == "file"
        assert float(row["n_l_mean"]) == pytest.approx(np.mean(n_l))
        assert (float(row["n_l_min"]), float(row["n_l_max"])) == pytest.approx((min(n_l), max(n_l)))
        assert float(row["share_far"]) == pytest.approx(np.mean([abs(v - 0.5) > 0.2 for v in n_l]))
        # three layers sit at relative depths 1/6, 1/2, 5/6: the first, middle and last fifths
        depth = [row[f"n_l_depth_{a}_{b}"] for a, b in (("00", "20"), ("20", "40"), ("40", "60"), ("60", "80"),
                                                        ("80", "100"))]
        assert depth[1] == depth[3] == "" and [float(depth[i]) for i in (0, 2, 4)] == pytest.approx(n_l)
        adjusted = _holm_by_hand([binomtest(k, n, 0.5).pvalue for k, n in counts])
        assert float(row["binom_min_p_holm"]) == pytest.approx(min(adjusted))
        assert int(row["binom_significant"]) == sum(p <= 0.05 for p in adjusted)
    assert int(rows["small.pt"]["binom_significant"]) >= 1  # conv2 was pushed negative: the test sees it
    assert (out / "coverage.txt").read_text().splitlines()[0] == report.coverage


def test_resume_keeps_what_is_scanned_and_retries_failures_only_when_asked(tmp_path, model_folder):
    folder, _ = model_folder
    out = tmp_path / "g"
    run_gallery([str(folder)], out)
    before = snapshot(out / "models")
    planned = []
    report = run_gallery([str(folder)], out, on_plan=lambda todo, kept: planned.append((todo, kept)))
    assert planned == [(0, 3)] and report.scanned_now == 0
    assert snapshot(out / "models") == before  # nothing rescanned, nothing rewritten
    seen = []
    run_gallery([str(folder)], out, retry_failed=True, progress=lambda record: seen.append(record["name"]))
    assert seen == [str(folder / "broken.onnx")]


def test_not_cached_weights_are_listed_with_the_command_then_scanned_once_cached(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    out = tmp_path / "g"
    report = run_gallery(["torchvision:squeezenet1_1"], out)
    url = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert report.coverage == "0 of 1 conv models scanned; 1 failed: 1 not cached"
    assert (out / "not_cached.txt").read_text().splitlines()[1] == f"torchvision:squeezenet1_1\twget -P {folder} {url}"
    folder.mkdir(parents=True)
    torch.manual_seed(7)
    cached = torchvision.models.squeezenet1_1(weights=None)
    torch.save(cached.state_dict(), folder / os.path.basename(url))
    report = run_gallery(["torchvision:squeezenet1_1"], out)  # a not-cached model is looked at again
    assert report.coverage == "1 of 1 conv models scanned"
    layers = _record(out, "torchvision-squeezenet1_1")["layers"]
    convs = [m.weight.detach().numpy() for m in cached.modules() if isinstance(m, nn.Conv2d)]
    assert [(layer["negative"], layer["filters"]) for layer in layers] == [_n_l(w) for w in convs]


def test_bad_input_is_refused_before_anything_is_written(tmp_path, run_hpa):
    proc = run_hpa("gallery", "torchvision:zzz*", "--out", tmp_path / "new")
    assert "matches 'zzz*'" in assert_bad_input(proc, "no torchvision model")
    assert not (tmp_path / "new").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(foreign)
    assert_bad_input(run_hpa("gallery", "torchvision:squeezenet1_1", "--weights", "none", "--out", foreign),
                     "notes.txt", "did not write")
    assert snapshot(foreign) == before
    with pytest.raises(SpecError, match="holds no model file"):
        run_gallery([str(tmp_path / "mine")], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_gallery_refuses_other_settings_and_foreign_files_later(tmp_path, model_folder):
    folder, _ = model_folder
    out = tmp_path / "g"
    run_gallery([str(folder / "small.pt")], out)
    with pytest.raises(OptionError, match="--seed 0, not 1"):
        run_gallery([str(folder / "small.pt")], out, seed=1)
    (out / "models" / "stray.txt").write_text("x")
    with pytest.raises(OutputError, match="stray.txt"):
        run_gallery([str(folder / "small.pt")], out)


def test_holm_matches_the_step_down_by_hand():
    p = list(np.random.default_rng(1).uniform(0, 0.1, 12)) + [0.5, 0.001, 0.001]
    assert holm(p) == pytest.approx(_holm_by_hand(p))


@pytest.mark.parametrize("executor", [("--jobs", "2"), ("--executor", "submitit-local")], ids=["local", "submitit"])
def test_the_executor_path_gives_the_same_table(executor, tmp_path, run_hpa):
    """Two worker processes (hpa.executors, --jobs 2), or submitit's LocalExecutor (SLURM's code path), give
    the table a scan in this process gives."""
    specs = ["torchvision:squeezenet1_0", "torchvision:squeezenet1_1"]
    run_gallery(specs, tmp_path / "here", weights="none")
    parallel = run_hpa("gallery", *specs, "--weights", "none", "--quiet", *executor, "--out", tmp_path / "jobs")
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.splitlines()[0] == "2 of 2 conv models scanned"
    strip = lambda rows: {n: {k: v for k, v in r.items() if k != "seconds"} for n, r in rows.items()}  # noqa: E731
    assert strip(_rows(tmp_path / "jobs")) == strip(_rows(tmp_path / "here"))
    assert parallel.stderr == ""  # --quiet
