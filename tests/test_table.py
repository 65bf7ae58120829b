"""The terminal report of ``hpa scan``: header line, layer table, skipped block, notes and reprs."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn

import hpa
from hpa.graph import ConvGraph, Layer
from hpa.render.table import WIDTH, render_scan, shorten_middle, skipped_block


def _table_lines(text: str) -> list[str]:
    """The layer table's rows (they start with the layer index)."""
    return [line for line in text.splitlines()
            if line.strip()[:1].isdigit() and any(f"  {kind}" in line for kind in ("conv", "linear"))]


# -- the header line and the notes, through the real command ----------------------------------

def test_header_names_model_weights_input_and_statistics_not_run(tmp_path, run_hpa):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
    torch.save(net, tmp_path / "net.pt")
    proc = run_hpa("scan", tmp_path / "net.pt", "--input-size", "3,16,16", "--trust-pickle")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert str(tmp_path / "net.pt") in header and "input=3x16x16" in header and "2 layers" in header
    assert "statistics: projection" in header
    # both convs have stride 2, so a default scan leaves the cone statistic out and says why in the header
    assert "not run: cones (no two stacked stride-1 2-D convs" in header
    data = json.loads(run_hpa("scan", tmp_path / "net.pt", "--input-size", "3,16,16", "--trust-pickle",
                              "--json").stdout)
    assert data["statistics_not_run"]["cones"] in header


def test_a_bare_state_dict_gets_the_inferred_structure_note(tmp_path, run_hpa):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    torch.save(net.state_dict(), tmp_path / "bare.pth")
    torch.save(net, tmp_path / "whole.pt")
    bare = run_hpa("scan", tmp_path / "bare.pth")
    assert bare.returncode == 0, bare.stderr
    notes = [line for line in bare.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "inferred from tensor names" in notes[0]
    assert "torchvision:NAME --weights FILE" in notes[0] and "timm:NAME --weights FILE" in notes[0]
    whole = run_hpa("scan", tmp_path / "whole.pt", "--input-size", "3,8,8", "--trust-pickle")
    assert whole.returncode == 0, whole.stderr
    assert "inferred from tensor names" not in whole.stdout  # traced from code: nothing to note


def test_header_says_which_weight_set_of_a_checkpoint_was_scanned(tmp_path, run_hpa):
    torch.manual_seed(0)
    first, second = (nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict() for _ in range(2))
    torch.save({"model": first, "model_ema": second, "epoch": 3}, tmp_path / "ckpt.pth")
    chosen = run_hpa("scan", tmp_path / "ckpt.pth", "-o", "checkpoint_key=model_ema")
    assert chosen.returncode == 0, chosen.stderr
    header = chosen.stdout.splitlines()[0]
    assert "weight set 'model_ema'" in header and "'model'" in header and "-o checkpoint_key" in header
    single = tmp_path / "single.pth"
    torch.save({"state_dict": first}, single)
    assert "weight set 'state_dict'" in run_hpa("scan", single).stdout.splitlines()[0]


# -- columns and width -----------------------------------------------------------------------

def _conv_net(groups: int = 1, dead: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=groups))
    if dead:
        with torch.no_grad():
            net[2].weight[3].zero_()
    return net


def _header_row(text: str) -> list[str]:
    return next(line for line in text.splitlines() if line.startswith("#")).split()


def test_groups_and_dead_columns_appear_only_where_they_matter():
    plain = render_scan(hpa.scan(_conv_net(), statistics=["projection"], input_size=(4, 8, 8)))
    assert "groups" not in _header_row(plain) and "dead" not in _header_row(plain)
    grouped = render_scan(hpa.scan(_conv_net(groups=4), statistics=["projection"], input_size=(4, 8, 8)))
    header = _header_row(grouped)
    assert "groups" in header
    column = header.index("groups")  # the cells before it hold no spaces
    assert [line.split()[column] for line in _table_lines(grouped)] == ["1", "4"]
    dead = render_scan(hpa.scan(_conv_net(dead=True), statistics=["projection"], input_size=(4, 8, 8)))
    assert "dead" in _header_row(dead)
    assert _table_lines(dead)[1].split()[-1] == "1"  # one all-zero filter in the second conv


class _Deep(nn.Module):
    """Convs under very long module names, as generated architectures have them."""

    def __init__(self) -> None:
        super().__init__()
        name = "encoder_stage_with_a_remarkably_long_descriptive_name_" * 2
        self.add_module(name + "first", nn.Conv2d(3, 4, 3, padding=1))
        self.add_module(name + "second", nn.Conv2d(4, 4, 3, padding=1))
        self.names = [name + "first", name + "second"]

    def forward(self, x):
        for name in self.names:
            x = torch.relu(getattr(self, name)(x))
        return x


def test_long_names_are_shortened_from_the_middle_and_kept_whole_in_json():
    model = _Deep()
    result = hpa.scan(model, statistics=["projection"], input_size=(3, 8, 8))
    text = render_scan(result)
    table = text.split("\n\n")[1].splitlines()
    assert max(len(line) for line in table) <= WIDTH
    rows = _table_lines(text)
    for row, name in zip(rows, model.names):
        shown = row.split()[1]
        assert "…" in shown and name.startswith(shown.split("…")[0]) and name.endswith(shown.split("…")[1])
    assert [layer["name"] for layer in json.loads(result.to_json())["layers"]] == model.names
    assert shorten_middle("abcdefghij", 5) == "ab…ij" and shorten_middle("abc", 5) == "abc"


def test_rows_are_grouped_by_control_flow_branch():
    rng = np.random.default_rng(0)
    layers = [Layer(name=name, index=i, kind="conv2d", weight=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                    branch=branch)
              for i, (name, branch) in enumerate([("stem", None), ("a", "If_0/then_branch"),
                                                  ("b", "If_0/then_branch"), ("c", "If_0/else_branch")])]
    result = hpa.analyse(ConvGraph(layers, source={"spec": "model.onnx"}), statistics=["projection"])
    lines = render_scan(result).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-"))
    body = [line.split()[1] if line.strip()[:1].isdigit() else line for line in lines[start + 1:start + 8]]
    assert body == ["[top level]", "stem", "[If_0/then_branch]", "a", "b", "[If_0/else_branch]", "c"]


def test_a_model_that_is_mostly_linear_says_so_in_one_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), *[nn.Linear(32, 32) for _ in range(12)])
    result = hpa.scan(model, input_size=(3, 8, 8))
    text = render_scan(result)
    assert len(_table_lines(text)) == 1  # only the conv has results
    hidden = [line for line in text.splitlines() if line.startswith("(+12 layers without results")]
    assert len(hidden) == 1 and "12 linear" in hidden[0]
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "1 conv and 12 linear layers" in notes[0] and "--with-linear" in notes[0]
    shown = render_scan(hpa.scan(model, input_size=(3, 8, 8), with_linear=True))
    assert len(_table_lines(shown)) == 13 and "note:" not in shown


def test_a_model_without_convs_is_refused_in_one_line(tmp_path, run_hpa):
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), tmp_path / "mlp.pth")
    from conftest import assert_bad_input

    assert_bad_input(run_hpa("scan", tmp_path / "mlp.pth"), "no conv layers", "2 linear",
                     "convolutional networks")


# -- the skipped block ------------------------------------------------------------------------

def test_skipped_block_groups_alike_reasons_with_a_count_and_examples():
    entries = [{"name": f"blocks.{i}.conv_dw -> blocks.{i}.conv_pw", "statistic": "cones",
                "reason": f"blocks.{i}.conv_dw has stride {s}x{s} (cone pairs need stride 1)"}
               for i, s in enumerate([2, 2, 3, 2, 2])]
    entries += [{"name": f"fc{i}", "statistic": "projection",
                 "reason": "linear layer; pass --with-linear to include linear layers"} for i in range(7)]
    entries += [{"name": f"blocks.{i}.conv_dw", "statistic": "cones",
                 "reason": f"in no cone pair; as upper: blocks.{i}.conv_dw has stride 2x2"} for i in range(3)]
    entries.append({"name": "odd", "reason": "a tensor group that is not a layer (running_mean only)"})
    lines = skipped_block(entries)
    assert lines[0] == "" and "16 entries in 4 groups" in lines[1]
    groups = [line for line in lines[2:] if not line.startswith("       ")]  # continuation lines are indented
    assert [int(line.split()[0]) for line in groups] == [7, 5, 3, 1]
    text = " ".join(" ".join(lines).split())  # wrapped lines read as one
    assert "pass --with-linear to include linear layers: fc0, fc1, fc2, ... (+4)" in text  # advice is kept
    assert "[cones] <layer> has stride N: blocks.0.conv_dw -> blocks.0.conv_pw" in text
    assert "in no cone pair; details in the JSON" in text
    assert "a tensor group that is not a layer (running_mean only): odd" in text  # a single entry keeps it all
    assert all(len(line) <= WIDTH for line in lines)
    assert skipped_block([]) == []


# -- notebooks -----------------------------------------------------------------------------------

def test_scan_result_repr_is_a_short_summary_and_html_a_table():
    result = hpa.scan(_conv_net(dead=True), input_size=(4, 8, 8), compare_init=False)
    text = repr(result)
    assert "\n" not in text and len(text) < 200 and "array" not in text
    assert text.startswith("<ScanResult") and "2 layers" in text
    assert all(name in text for name in result.statistics)
    html = result._repr_html_()
    assert html.count("<tr>") == 1 + len(result.graph)  # the header row and one per layer
    for layer in result.graph:
        assert f"<td>{layer.name}</td>" in html
    assert "<caption>" in html and "n_l" in html


def test_the_cone_report_fits_100_columns_and_keeps_std_for_the_files():
    """Long pair names are shortened, stds go to pairs.csv; the means shown are the JSON's."""
    model = _Deep()
    result = hpa.scan(model, statistics=["cones"], input_size=(3, 8, 8), compare_init=True)
    text = render_scan(result)
    report = text[text.index("cone pairs"):].split("\n\n")[0].splitlines()
    assert max(len(line) for line in report) <= 100
    (pair,) = result.to_dict()["pairs"]
    row = next(line for line in report if "->" in line and "…" in line)
    assert row.split()[-1] == f"{pair['rotation']['mean']:.3f}"
    assert "±" not in "\n".join(report)
    tables = result.extra_tables()
    assert any("rotation.std" in key or "std" in key for key in tables["pairs.csv"][0])
