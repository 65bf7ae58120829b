"""TorchScript archives with control flow, written by the real exporter (torch.jit.script and torch.jit.trace).

A voice-activity model picks one of two sub-networks by sample rate with an
``if`` on an argument; others repeat a block in a ``for`` loop or call traced
submodules from scripted code.  Every conv in every block is found, named and
grouped by its branch like the ONNX reader does, and its numbers equal the
eager module's, computed here with numpy from the module's own parameters.
"""

from __future__ import annotations

import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import hpa
from conftest import assert_bad_input


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Weights with a clear sign bias per filter (n_l far from 0.5), and BatchNorms with real statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) + 0.4 * torch.randn(
                    m.weight.shape[0], *([1] * (m.weight.ndim - 1)), generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return module.eval()


def eager_numbers(conv: nn.Module, bn: nn.Module | None = None) -> tuple[float, np.ndarray]:
    """(n_l, cosines) of one eager conv, BatchNorm folded, by docs/statistics.md in plain numpy."""
    w = conv.weight.detach().double().numpy()
    if bn is not None:
        scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    flat = w.reshape(w.shape[0], -1)
    cosines = flat.sum(1) / (np.linalg.norm(flat, axis=1) * np.sqrt(flat.shape[1]))
    return float(np.mean(cosines <= 0)), cosines


def assert_numbers(graph, name: str, conv: nn.Module, bn: nn.Module | None = None) -> None:
    got = hpa.analyse(graph, statistics=["projection"], with_linear=True).statistics["projection"].layers[name]
    n_l, cosines = eager_numbers(conv, bn)
    assert got["n_l"] == pytest.approx(n_l, abs=1e-6), name
    np.testing.assert_allclose(np.array(got["cosines"], float), cosines, atol=1e-6, err_msg=name)


def scripted_file(tmp_path, module: nn.Module, name: str):
    path = tmp_path / f"{name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation note
        torch.jit.save(torch.jit.script(module), str(path))
    return path


# -- `if` on an argument, nested ---------------------------------------------------------------------

class PerRate(nn.Module):
    """One front end per sample rate, as a voice-activity model ships; the 16 kHz one has two variants."""

    def __init__(self):
        super().__init__()
        self.fast = nn.Sequential(nn.Conv1d(1, 6, 9), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 5, 3))
        self.long = nn.Sequential(nn.Conv1d(1, 6, 17), nn.ReLU(), nn.Conv1d(6, 5, 5))
        self.slow = nn.Sequential(nn.Conv1d(1, 6, 5), nn.ReLU(), nn.Conv1d(6, 5, 3))
        self.head = nn.Conv1d(5, 4, 3)

    def forward(self, x, sr: int):
        if sr == 16000:
            if x.shape[-1] > 512:
                y = self.long(x)
            else:
                y = self.fast(x)
        else:
            y = self.slow(x)
        return self.head(torch.relu(y))


@pytest.fixture(scope="module")
def per_rate(tmp_path_factory):
    model = randomize(PerRate(), seed=1)
    return model, scripted_file(tmp_path_factory.mktemp("per_rate"), model, "vad")


def test_convs_inside_if_blocks_are_found_in_their_branches(per_rate):
    _, path = per_rate
    graph = hpa.load(str(path))
    outer, inner = "If_0/then_branch", "If_0/then_branch/If_0"
    assert {layer.name: layer.branch for layer in graph} == {
        f"{inner}/then_branch/long.0": f"{inner}/then_branch", f"{inner}/then_branch/long.2": f"{inner}/then_branch",
        f"{inner}/else_branch/fast.0": f"{inner}/else_branch", f"{inner}/else_branch/fast.3": f"{inner}/else_branch",
        "If_0/else_branch/slow.0": "If_0/else_branch", "If_0/else_branch/slow.2": "If_0/else_branch",
        "head": None}
    assert graph.source["branches"] == [outer, "If_0/else_branch", f"{inner}/then_branch", f"{inner}/else_branch"]
    fast = graph[f"{inner}/else_branch/fast.0"]
    assert fast.bn_folded and fast.activation == "relu" and fast.params["bn.running_var"] == "fast.1.running_var"
    assert graph[f"{inner}/then_branch/long.0"].params == {"weight": "long.0.weight", "bias": "long.0.bias"}
    assert graph[f"{inner}/else_branch/fast.3"].predecessors == (f"{inner}/else_branch/fast.0",)
    assert set(graph["head"].predecessors) == {f"{inner}/then_branch/long.2", f"{inner}/else_branch/fast.3",
                                               "If_0/else_branch/slow.2"}
    assert set(graph["head"].via["If_0/else_branch/slow.2"]) == {"if", "relu"}


def test_every_alternative_copy_has_the_eager_modules_numbers(per_rate):
    model, path = per_rate
    graph = hpa.load(str(path))
    inner = "If_0/then_branch/If_0"
    assert_numbers(graph, f"{inner}/else_branch/fast.0", model.fast[0], model.fast[1])
    assert_numbers(graph, f"{inner}/else_branch/fast.3", model.fast[3])
    assert_numbers(graph, f"{inner}/then_branch/long.0", model.long[0])
    assert_numbers(graph, f"{inner}/then_branch/long.2", model.long[2])
    assert_numbers(graph, "If_0/else_branch/slow.0", model.slow[0])
    assert_numbers(graph, "If_0/else_branch/slow.2", model.slow[2])
    assert_numbers(graph, "head", model.head)


def test_the_scan_groups_layers_by_branch(per_rate, run_hpa):
    _, path = per_rate
    proc = run_hpa("scan", path, "--stat", "projection")
    assert proc.returncode == 0, proc.stderr
    headings = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert headings == ["[If_0/then_branch/If_0/then_branch]", "[If_0/then_branch/If_0/else_branch]",
                        "[If_0/else_branch]", "[top level]"]


# -- a for loop over a ModuleList, and a loop over a step count --------------------------------------

class Refine(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
        self.step = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x, steps: int):
        x = torch.relu(self.stem(x))
        for block in self.blocks:  # unrolled by the compiler
            x = torch.relu(block(x))
        for _ in range(steps):  # a prim::Loop
            x = torch.relu(self.step(x))
            for inner in self.blocks:
                x = x + inner(x)
        return self.head(x)


def test_convs_in_loops_are_found_once_per_body(tmp_path):
    model = randomize(Refine(), seed=2)
    graph = hpa.load(str(scripted_file(tmp_path, model, "refine")))
    body = "Loop_0/body"
    assert [layer.name for layer in graph] == ["stem", "blocks.0", "blocks.1", "blocks.2", f"{body}/step.0",
                                               f"{body}/blocks.0", f"{body}/blocks.1", f"{body}/blocks.2", "head"]
    assert graph.source["branches"] == [body]
    assert graph[f"{body}/step.0"].branch == body and graph["blocks.2"].branch is None
    assert graph[f"{body}/step.0"].predecessors == ("blocks.2",)
    assert graph[f"{body}/step.0"].via["blocks.2"] == ("relu", "loop")
    assert graph[f"{body}/step.0"].bn_folded and graph[f"{body}/step.0"].activation == "relu"
    # the residual sums carry every block of the body (and the step before them) to the head
    assert set(graph["head"].predecessors) == {f"{body}/step.0"} | {f"{body}/blocks.{i}" for i in range(3)}
    for name, conv in [("stem", model.stem), ("head", model.head)] + [
            (f"{prefix}blocks.{i}", model.blocks[i]) for i in range(3) for prefix in ("", f"{body}/")]:
        assert_numbers(graph, name, conv)
    assert_numbers(graph, f"{body}/step.0", model.step[0], model.step[1])


# -- a scripted module that calls traced submodules ------------------------------------------------

class TracedBranches(nn.Module):
    def __init__(self):
        super().__init__()
        example = torch.randn(1, 3, 12, 12)
        narrow = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=3)
        wide = randomize(nn.Sequential(nn.Conv2d(3, 4, 5, padding=1), nn.ReLU()), seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.narrow = torch.jit.trace(narrow, example)
            self.wide = torch.jit.trace(wide, example)
        self.eager = {"narrow": narrow, "wide": wide}  # not a submodule: the test's own copies
        self.head = randomize(nn.Conv2d(4, 2, 3), seed=5)

    def forward(self, x, wide: bool):
        if wide:
            y = self.wide(x)
        else:
            y = self.narrow(x)
        return self.head(y)


def test_traced_submodules_called_from_branches(tmp_path):
    model = TracedBranches().eval()
    graph = hpa.load(str(scripted_file(tmp_path, model, "mixed")))
    assert [(layer.name, layer.branch) for layer in graph] == [
        ("If_0/then_branch/wide.0", "If_0/then_branch"), ("If_0/else_branch/narrow.0", "If_0/else_branch"),
        ("head", None)]
    narrow = graph["If_0/else_branch/narrow.0"]
    assert narrow.bn_folded and narrow.activation == "relu"
    assert graph["If_0/then_branch/wide.0"].padding == ((1, 1), (1, 1))
    assert_numbers(graph, "If_0/then_branch/wide.0", model.eager["wide"][0])
    assert_numbers(graph, "If_0/else_branch/narrow.0", model.eager["narrow"][0], model.eager["narrow"][1])
    assert_numbers(graph, "head", model.head)


def test_a_condition_the_archive_fixes_reads_only_the_branch_that_runs(tmp_path):
    """``if self.mode == "wide"`` on a module attribute: no scope, no dead copy."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.mode = "wide"
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 5)

        def forward(self, x):
            if self.mode != "wide":
                return self.a(x)
            return self.b(x)

    graph = hpa.load(str(scripted_file(tmp_path, Fixed(), "fixed")))
    assert [(layer.name, layer.branch) for layer in graph] == [("b", None)]
    assert "branches" not in graph.source


# -- bad archives ----------------------------------------------------------------------------------

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x, flag: bool):
        if flag:
            return self.conv(x)
        return self.gate(x)


def _edited_archive(tmp_path, edit) -> str:
    """A real archive whose top-level code is rewritten by ``edit`` (bytes -> bytes), as a damaged copy is."""
    good = scripted_file(tmp_path, Gate(), "good")
    bad = tmp_path / "bad.pt"
    edited = 0
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if "/code/" in name and name.endswith(".py") and b"class Gate" in data:
                data, edited = edit(data), edited + 1
            target.writestr(name, data)
    assert edited == 1
    good.unlink()
    return bad


@pytest.mark.parametrize("edit", [
    lambda code: code.replace(b"gate = self.gate", b"gate = self.missing"),  # an undeclared attribute
    lambda code: code.replace(b"  gate : __torch__", b"  extra : __torch__.torch.nn.modules.conv.Conv2d\n"
                                                     b"  gate : __torch__").replace(b"self.gate", b"self.extra"),
], ids=["undeclared", "declared-but-not-stored"])
def test_archive_whose_code_reads_a_missing_attribute_is_one_line(tmp_path, run_hpa, edit):
    path = _edited_archive(tmp_path, edit)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_bad_input(run_hpa("scan", path, "--out", tmp_path / "out"), "bad.pt", "TorchScript",
                     "torch.jit.save")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
