"""Nothing is dropped silently: every skip reason hpa can emit is checked by a test.

The first tests check reasons whose loss the audit of issue 12 did not catch.
The meta-test at the end finds every reason *site* in ``hpa/`` and
``plugins/`` by reading their syntax trees, and holds a table that maps each
site to a test that makes hpa emit it and checks its text in ``skipped`` (or, for
a statistic's ``applies``, in ``statistics_not_run``).  A new reason without a
row in the table fails the meta-test (like datasette's "every hook has a test").
"""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hpa
import mcn_export as mcn

ROOT = Path(__file__).resolve().parents[1]


# -- reasons the audit saw dropped -------------------------------------------------------------------

def test_matconvnet_bnorm_without_moments_is_listed(tmp_path):
    """A bnorm layer with no moments cannot be folded (MatConvNet then uses batch statistics): listed."""
    conv, bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
    layer = {"name": "bn", "type": "bnorm",
             "weights": mcn.cell([mcn.column(bn.weight, 3, 1), mcn.column(bn.bias, 3, 0)])}  # no moments
    path = tmp_path / "bn.mat"
    mcn.export_simplenn([conv, layer], path, input_size=(2, 8, 8))
    graph = hpa.load(path)
    assert not graph["conv1"].bn_folded
    np.testing.assert_array_equal(graph["conv1"].weight, conv.weight.detach().numpy())
    reasons = {s.name: s.reason for s in graph.skipped}
    assert "bnorm layer has no moments" in reasons["bn"] and "not folded" in reasons["bn"]


def cone_skips(model, input_size):
    result = hpa.scan(model, statistics=["cones"], input_size=input_size)
    return {s["name"]: s["reason"] for s in result.to_dict()["skipped"] if s.get("statistic") == "cones"}


def test_a_statistic_that_does_not_apply_says_why():
    """A default scan leaves out a statistic that does not apply, and lists it with its reason."""
    one_conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
    reasons = hpa.scan(one_conv, input_size=(2, 5, 5)).to_dict()["statistics_not_run"]
    assert reasons == {"cones": "no two stacked stride-1 2-D convs on the same plane"}


def test_cones_list_linear_and_1d_layers():
    """docs/statistics.md §2: "Every layer that cannot take part is listed with a reason"."""
    torch.manual_seed(0)
    with_linear = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1),
                                nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    reasons = cone_skips(with_linear, (2, 5, 5))
    assert set(reasons) == {"4"}
    assert "a linear layer: cone pairs are formed between 2-D convs only" in reasons["4"]
    one_d = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv1d(3, 3, 3, padding=1))
    reasons = cone_skips(one_d, (2, 9))
    assert set(reasons) == {"0", "2"}
    assert all("a conv1d layer: cone pairs are formed between 2-D convs only" in r for r in reasons.values())


# -- the meta-test ---------------------------------------------------------------------------------

#: Calls whose reason argument is not a literal (or is a literal that wraps a produced reason: the row
#: then wins over the literal), and where that reason comes from.  Keys are
#: ``path:function:expression`` (fnmatch patterns for path and function, so a module split keeps its
#: rows).  A producer, looked for in every module of the caller's folder, is a function (its returned
#: string literals are reasons), ``raise NAME`` (the messages of that exception), a module-level dict
#: (its string values), or ``.attr`` (string literals assigned to that attribute).
INDIRECT = {
    "plugins/cones.py:find_pairs:reason": ("_lower_of", "_pair_plane"),
    "plugins/cones.py:find_pairs:_why_alone(graph, layer, upper_reason)": ("_why_alone", "_lower_of", "_pair_plane"),
    "plugins/projection.py:compute:reason": ("_skip_reason",),
    "hpa/backends/matconvnet.py:_run_op:_skip_reason(op)": ("_skip_reason", ".problem", "_conv_layer"),
    "hpa/backends/state_dict.py:*:_why_not_a_layer(tensors)": ("_why_not_a_layer",),
    "hpa/backends/state_dict.py:_skipped_group:_why_not_a_layer(rest)": ("_why_not_a_layer",),
    "hpa/backends/state_dict.py:graph_from_state_dict:not_affine": ("_not_an_affine_layer",),
    "hpa/backends/state_dict.py:_skipped_group:reason": ("_input_vector",),
    # a literal that wraps a produced reason: the producer's texts are the sites (tests check both parts)
    "hpa/backends/state_dict.py:_fold_batchnorms:f'{why}; not folded ({ARCHITECTURE_HINT})'": ("_refusal",),
    "hpa/backends/onnx*:_layer_entry:f'{node.op_type}: {skip}'": ("raise _Skip", "raise Skip"),
    "hpa/backends/onnx*:_note_unknown:f'{op}: {_WEIGHTED_UNSUPPORTED[op]}'": ("_WEIGHTED_UNSUPPORTED",),
    "hpa/backends/onnx*:_note_unknown:f'{op}: {WEIGHTED_UNSUPPORTED[op]}'": ("WEIGHTED_UNSUPPORTED",),
    # a result read back from JSON: it re-creates reasons a scan emitted, it emits none of its own
    "hpa/result.py:_restore_skipped:entry['reason']": (),
    # a run's graph.json read back: it re-creates the loader's reasons, it emits none of its own
    "hpa/experiments/open_run.py:structure_from_record:s['reason']": (),
}

#: Reason site -> (test that makes hpa emit it and checks it in ``skipped``, text that test checks).
#: A site is ``producer: template``, the template being the literal with ``{}`` for each value.
COVERED = {
    "_lower_of: a {} layer: cone pairs are formed between 2-D convs only":
        ("tests/test_skip_reasons.py::test_cones_list_linear_and_1d_layers", "cone pairs are formed between 2-D"),
    "_lower_of: its input is unknown (the loader records no connectivity)":
        ("tests/test_cones.py::test_graph_without_shapes_gives_states_only", "its input is unknown"),
    "_lower_of: it reads {} tensors ({}), not one conv":
        ("tests/test_cones.py::test_other_connections_are_not_pairs", "not one conv"),
    "_lower_of: {} between {} and {}: not element-wise{}":
        ("tests/test_cones.py::test_ineligible_pairs_are_listed_with_reasons", "not element-wise"),
    "_pair_plane: {} has stride {} (cone pairs need stride 1)":
        ("tests/test_cones.py::test_ineligible_pairs_are_listed_with_reasons", "(cone pairs need stride 1)"),
    "_pair_plane: {} maps a {} plane to {} (cone pairs need both convs on the same plane)":
        ("tests/test_cones.py::test_ineligible_pairs_are_listed_with_reasons",
         "(cone pairs need both convs on the same plane)"),
    "_pair_plane: the {} kernel of {} is larger than the {} plane":
        ("tests/test_cones.py::test_ineligible_pairs_are_listed_with_reasons", "larger than the"),
    "_why_alone: a {} layer: cone pairs are formed between 2-D convs only":
        ("tests/test_skip_reasons.py::test_cones_list_linear_and_1d_layers", "cone pairs are formed between 2-D"),
    "_skip_reason: linear layer; pass --with-linear to include linear layers":
        ("tests/test_projection.py::test_linear_and_1x1_options", "--with-linear"),
    "_skip_reason: a fully-connected layer written as a conv (its kernel covers the whole input plane); "
    "pass --with-linear to include linear layers":
        ("tests/test_ties.py::test_fully_connected_rule_uses_padding_and_dilation",
         "fully-connected layer written as a conv"),
    "_skip_reason: 1x1 conv skipped by --skip-1x1 (as the reference code did)":
        ("tests/test_projection.py::test_linear_and_1x1_options", "--skip-1x1"),
    "_skip_reason: layer has no weights":
        ("tests/test_projection.py::test_layer_without_weights_is_listed", "layer has no weights"),
    "_run_op: bnorm layer has no moments (MatConvNet then normalises with batch statistics); it is not folded":
        ("tests/test_skip_reasons.py::test_matconvnet_bnorm_without_moments_is_listed",
         "bnorm layer has no moments"),
    "_skip_reason: unknown MatConvNet layer type '{}'; passed through as an opaque op, so shapes after it are "
    "unknown":
        ("tests/test_matconvnet_loader.py::test_unknown_layer_type_is_skipped", "unknown MatConvNet layer type"),
    "applies: no two stacked stride-1 2-D convs on the same plane":
        ("tests/test_skip_reasons.py::test_a_statistic_that_does_not_apply_says_why",
         "no two stacked stride-1 2-D convs on the same plane"),
    "_unused_layers: {} not called in the forward pass (unused in eval mode, or called inside a fused op)":
        ("tests/test_skip_reasons.py::test_torch_module_never_called_is_listed", " not called in the forward pass"),
    "_refusal: BatchNorm that no naming rule pairs with a conv or linear layer it certainly follows":
        ("tests/test_skip_reasons.py::test_state_dict_batchnorms_that_cannot_be_paired_are_listed",
         "no naming rule pairs with a conv or linear layer it certainly follows"),
    "_refusal: BatchNorm that could follow several layers ({})":
        ("tests/test_skip_reasons.py::test_state_dict_batchnorms_that_cannot_be_paired_are_listed",
         "BatchNorm that could follow several layers ("),
    "_refusal: BatchNorm that, like {}, would follow {}":
        ("tests/test_skip_reasons.py::test_state_dict_batchnorms_that_cannot_be_paired_are_listed",
         ", would follow "),
    "_refusal: BatchNorm with {} channels after {}, which has {} outputs":
        ("tests/test_skip_reasons.py::test_state_dict_batchnorms_that_cannot_be_paired_are_listed",
         ", which has "),
    "_why_not_a_layer: 1-D weight, a normalisation scale rather than an affine layer ({})":
        ("tests/test_torch_files.py::test_state_dict_batchnorm_that_follows_nothing_is_listed", "normalisation"),
    "_note_unknown: {}::{}: unknown operator, not analysed (predecessors are traced through it)":
        ("tests/test_skip_reasons.py::test_onnx_unknown_operator_is_listed", ": unknown operator, not analysed"),
    "_lower_of: it reads the model input, not another conv":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         "it reads the model input, not another conv"),
    "_lower_of: its input comes from {}, which is not a layer of the graph":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         ", which is not a layer of the graph"),
    "_pair_plane: the stride of {} is unknown (cone pairs need stride 1)":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         " is unknown (cone pairs need stride 1)"),
    "_pair_plane: the groups of {} are unknown":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         "the groups of "),
    "_pair_plane: {} reads {} channels but {} makes {}":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         " channels but "),
    "_pair_plane: the graph does not show that {} keeps the size of its plane (shapes unknown); "
    "pass --input-size C,H,W":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         " keeps the size of its plane (shapes unknown)"),
    "_why_alone: in no cone pair; {}":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_known_connectivity_strides_groups_and_planes",
         "in no cone pair; "),
    "_lower_of: its input comes from {}, a {} layer, not a 2-D conv":
        ("tests/test_skip_reasons.py::test_cone_pairs_need_a_2d_conv_below",
         " layer, not a 2-D conv"),
    "Skip: {} {} is computed at run time, not a constant; not analysed":
        ("tests/test_onnx_loader.py::test_runtime_weight_and_unsupported_layers_are_skipped", "run time"),
    "_conv_layer: it has no stored weights":
        ("tests/test_skip_reasons.py::test_matconvnet_conv_layers_that_cannot_be_read_are_listed",
         "it has no stored weights"),
    "_conv_layer: its biases have {} values for {} filters":
        ("tests/test_skip_reasons.py::test_matconvnet_conv_layers_that_cannot_be_read_are_listed",
         " filters"),
    "_conv_layer: its biases have {} values for {} output channels":
        ("tests/test_skip_reasons.py::test_matconvnet_conv_layers_that_cannot_be_read_are_listed",
         " output channels"),
    "_conv_layer: its weights have {} dimensions (expected H x W x Cin x Cout)":
        ("tests/test_skip_reasons.py::test_matconvnet_conv_layers_that_cannot_be_read_are_listed",
         " dimensions (expected H x W x Cin x Cout)"),
    "_skip_reason: custom layer (MATLAB function handles) cannot be run outside MATLAB; passed through as an "
    "opaque op, so shapes after it are unknown":
        ("tests/test_skip_reasons.py::test_matconvnet_conv_layers_that_cannot_be_read_are_listed",
         "custom layer (MATLAB function handles) cannot be run outside MATLAB"),
    "_skip_reason: {} layer skipped: {}":
        ("tests/test_skip_reasons.py::test_matconvnet_conv_layers_that_cannot_be_read_are_listed",
         " layer skipped: "),
    ".problem: the layer is not a struct but {}; every entry of the file's layers must be a layer struct "
    "with a 'type' field (re-save the network from MATLAB)":
        ("tests/test_skip_reasons.py::test_matconvnet_entry_that_is_not_a_struct_is_listed",
         "every entry of the file's layers must be a layer struct"),
    "_why_not_a_layer: not a conv, linear or BatchNorm weight group ({})":
        ("tests/test_skip_reasons.py::test_state_dict_groups_that_are_not_layers_are_listed",
         "not a conv, linear or BatchNorm weight group"),
    "_fold_batchnorms: BatchNorm after {}, not folded (--no-fold-bn)":
        ("tests/test_skip_reasons.py::test_state_dict_groups_that_are_not_layers_are_listed",
         ", not folded (--no-fold-bn)"),
    "Skip: a {}-D weight {} is not a 1-D, 2-D or 3-D conv":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " is not a 1-D, 2-D or 3-D conv"),
    "Skip: bias of shape {} is not one value per output channel":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " is not one value per output channel"),
    "Skip: bias of shape {} is not one value per output unit":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " is not one value per output unit"),
    "Skip: bias {} is computed at run time, not a constant":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " is computed at run time, not a constant"),
    "Skip: bias {} is computed at run time, not a constant; not analysed":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " is computed at run time, not a constant; not analysed"),
    "Skip: both operands are constant; nothing depends on the input":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         "both operands are constant; nothing depends on the input"),
    "Skip: constant operand {} is {}-D, not a weight matrix":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         "-D, not a weight matrix"),
    "Skip: kernel_shape {} does not match the weight's {}":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " does not match the weight's "),
    "Skip: the constant is the left operand (weight @ data); not a linear layer of the input":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         "the constant is the left operand (weight @ data); not a linear layer of the input"),
    "Skip: transA=1 (transposed data) is not a linear layer of the input's rows":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         "transA=1 (transposed data) is not a linear layer of the input's rows"),
    "Skip: weight {} is computed at run time, not a constant; not analysed":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         " is computed at run time, not a constant; not analysed"),
    "Skip: weight {} is {}-D, not a matrix":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         "-D, not a matrix"),
    "Skip: {} {} has type {}, not numbers":
        ("tests/test_skip_reasons.py::test_onnx_layers_that_cannot_be_read_are_listed",
         ", not numbers"),
    "WEIGHTED_UNSUPPORTED: Einsum is not analysed as a layer":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "Einsum is not analysed as a layer"),
    "WEIGHTED_UNSUPPORTED: deformable convs are not analysed":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "deformable convs are not analysed"),
    "WEIGHTED_UNSUPPORTED: integer matmul (MatMulInteger) is not analysed":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "integer matmul (MatMulInteger) is not analysed"),
    "WEIGHTED_UNSUPPORTED: quantized matmul (QLinearMatMul) is not analysed":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "quantized matmul (QLinearMatMul) is not analysed"),
    "WEIGHTED_UNSUPPORTED: recurrent layers (GRU) are not analysed":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "recurrent layers (GRU) are not analysed"),
    "WEIGHTED_UNSUPPORTED: recurrent layers (LSTM) are not analysed":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "recurrent layers (LSTM) are not analysed"),
    "WEIGHTED_UNSUPPORTED: recurrent layers (RNN) are not analysed":
        ("tests/test_skip_reasons.py::test_onnx_weighted_ops_hpa_does_not_analyse_are_listed",
         "recurrent layers (RNN) are not analysed"),
    # quantized convs (issue 18)
    "Skip: its input is not quantized by a DynamicQuantizeLinear or QuantizeLinear whose scale and zero point it "
    "uses; not analysed":
        ("tests/test_quantized.py::test_quantized_convs_that_cannot_be_read_are_skipped_with_the_reason",
         "its input is not quantized by a DynamicQuantizeLinear or "),
    "Skip: its input scale {} is not one constant, so its int32 bias cannot be dequantized; not analysed":
        ("tests/test_quantized.py::test_quantized_convs_that_cannot_be_read_are_skipped_with_the_reason",
         " is not one constant, so its "),
    "Skip: its {} {} is computed at run time, not a constant; not analysed":
        ("tests/test_quantized.py::test_quantized_convs_that_cannot_be_read_are_skipped_with_the_reason",
         " is computed at run time, "),
    "Skip: the scale of its weights is not a constant factor of the Mul after it (ConvInteger -> Cast -> Mul); "
    "not analysed":
        ("tests/test_quantized.py::test_conv_integer_whose_scale_cannot_be_found_is_skipped_with_the_reason",
         "the scale of its weights is not a constant factor of the Mul "),
    "Skip: the weight scale after it has shape {}, not one value per output channel":
        ("tests/test_quantized.py::test_quantized_convs_that_cannot_be_read_are_skipped_with_the_reason",
         "the weight scale after it has shape "),
    # weighted layers that are not affine layers of their input (issue 18)
    "_note_not_analysed: {}: a lookup table, not a linear layer of its input; not analysed":
        ("tests/test_nothing_to_analyse.py::test_beside_convs_recurrent_layers_and_lookups_are_listed",
         "a lookup table, not a linear layer of its input; not analysed"),
    "_note_not_analysed: {}: recurrent layer, not analysed":
        ("tests/test_nothing_to_analyse.py::test_beside_convs_recurrent_layers_and_lookups_are_listed",
         "recurrent layer, not analysed"),
    "_weighted_modules_not_analysed: {}: a lookup table, not a linear layer of its input; not analysed":
        ("tests/test_nothing_to_analyse.py::test_beside_convs_recurrent_layers_and_lookups_are_listed",
         ": a lookup table, not a linear layer of its input; not analysed"),
    "_weighted_modules_not_analysed: {}: recurrent layer, not analysed":
        ("tests/test_nothing_to_analyse.py::test_beside_convs_recurrent_layers_and_lookups_are_listed",
         ": recurrent layer, not analysed"),
    # what a bare state_dict holds that is not an affine layer (issue 18)
    "_input_vector: class or register token {}: a learned vector put beside the input, not a layer":
        ("tests/test_state_dict_norms.py::test_norms_embeddings_and_tokens_are_listed_never_analysed",
         "a learned vector put beside the input"),
    "_input_vector: positional embedding {}: a learned table added to the input, not a layer":
        ("tests/test_state_dict_norms.py::test_norms_embeddings_and_tokens_are_listed_never_analysed",
         ": a learned table added to the input, not a layer"),
    "_not_an_affine_layer: normalisation layer (LayerNorm, GroupNorm, InstanceNorm or RMSNorm, by its name): one "
    "scale per channel, not an affine layer ({})":
        ("tests/test_state_dict_norms.py::test_norms_embeddings_and_tokens_are_listed_never_analysed",
         "one scale per channel, not an affine layer"),
    "_not_an_affine_layer: {} table without a bias: a lookup by index, not a linear layer of the input ({})":
        ("tests/test_state_dict_norms.py::test_norms_embeddings_and_tokens_are_listed_never_analysed",
         " table without a bias: a lookup by index, not a linear layer of the input"),
    ".problem: its params {} are not in the file's params list":
        ("tests/test_skip_reasons.py::test_matconvnet_dagnn_conv_whose_params_are_missing_is_listed",
         " are not in the file's params list"),
}

#: Reason sites no test exercises yet: the lead's to-do list, reported by the strict xfail below.
UNCOVERED: set[str] = set()


def _template(node: ast.AST) -> str | None:
    """The text of a string literal or f-string, ``{}`` for each value; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _strings(node: ast.AST | None) -> list[str]:
    """The string literals a returned or assigned expression can take (tuples and conditionals looked into)."""
    if node is None:
        return []
    text = _template(node)
    if text is not None:
        return [text]
    if isinstance(node, ast.Tuple):
        return [t for element in node.elts for t in _strings(element)]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "fixed text; " + details
        left, right = _strings(node.left), _strings(node.right)
        return [a + b for a in left or ["{}"] for b in right or ["{}"]] if left or right else []
    return []


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _sources():
    for folder in ("hpa", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def _indirect_key(path: str, function: str, expression: str) -> str | None:
    """The INDIRECT row that explains a non-literal reason, or None."""
    for key in INDIRECT:
        where, func, expr = key.split(":", 2)
        if fnmatch(path, where) and fnmatch(function, func) and expr == expression:
            return key
    return None


def _exception_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
        return node.exc.func.id
    return None


def reason_sites() -> tuple[set[str], list[str]]:
    """Every reason site in hpa/ and plugins/, and the non-literal reasons no INDIRECT row explains."""
    sites, unexplained, producers = set(), [], set()
    trees = list(_sources())
    for path, tree in trees:
        for function in _functions(tree):
            for node in ast.walk(function):
                # a statistic's ``applies``: its reasons go to statistics_not_run, the other "not analysed" list
                applies = [k.value for k in getattr(node, "keywords", []) if k.arg == "applies"]
                producers.update((path.rsplit("/", 1)[0], a.id) for a in applies if isinstance(a, ast.Name))
                if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Skipped"):
                    continue
                reason = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "reason"), None)
                text = _template(reason)
                expression = ast.unparse(reason)
                key = _indirect_key(path, function.name, expression)
                if key is None and text is not None and re.search("[A-Za-z]", text.replace("{}", "")):
                    sites.add(f"{function.name}: {text}")
                    continue
                if key is None:
                    unexplained.append(f"{path}:{function.name}:{expression}")
                else:
                    producers.update((path.rsplit("/", 1)[0], p) for p in INDIRECT[key])
    for path, tree in trees:
        names = {p for where, p in producers if where == path.rsplit("/", 1)[0]}  # a producer's own folder
        for function in _functions(tree):
            if function.name in names:
                for node in ast.walk(function):
                    if isinstance(node, ast.Return):
                        sites.update(f"{function.name}: {t}" for t in _strings(node.value))
        for node in ast.walk(tree):
            if f"raise {_exception_name(node)}" in names and node.exc.args:
                sites.update(f"{_exception_name(node)}: {t}" for t in _strings(node.exc.args[0]))
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) \
                    and f".{node.targets[0].attr}" in names:
                sites.update(f".{node.targets[0].attr}: {t}" for t in _strings(node.value))
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id in names and isinstance(node.value, ast.Dict):
                sites.update(f"{node.targets[0].id}: {t}" for v in node.value.values for t in _strings(v))
    return sites, unexplained


def _test_source(reference: str) -> str | None:
    """The test function's source, with the module-level constants it reads (a parametrize table)."""
    file, name = reference.split("::")
    path = ROOT / file
    if not path.exists():
        return None
    text = path.read_text()
    tree = ast.parse(text)
    for function in _functions(tree):
        if function.name == name:
            used = {node.id for node in ast.walk(function) if isinstance(node, ast.Name)}
            constants = [ast.get_source_segment(text, node) for node in tree.body if isinstance(node, ast.Assign)
                         and any(getattr(t, "id", None) in used for t in node.targets)]
            return "\n".join([ast.get_source_segment(text, function), *constants])
    return None


def test_every_reason_site_is_in_the_table():
    """A new skip reason needs a row in COVERED (or, knowingly, UNCOVERED); a removed one loses its row."""
    sites, unexplained = reason_sites()
    assert unexplained == [], "non-literal reasons with no INDIRECT row saying where they come from"
    assert COVERED.keys().isdisjoint(UNCOVERED)
    assert sorted(sites - COVERED.keys() - UNCOVERED) == [], "skip reasons with no test: add rows to COVERED"
    assert sorted((COVERED.keys() | UNCOVERED) - sites) == [], "rows for reasons that no longer exist"


@pytest.mark.parametrize("site", sorted(COVERED))
def test_the_covering_test_checks_the_reason(site):
    """The named test exists and checks a fragment of this very reason's text."""
    reference, marker = COVERED[site]
    source = _test_source(reference)
    assert source is not None, f"{reference} does not exist"
    assert marker in site.split(": ", 1)[1], f"{marker!r} is not part of the reason {site!r}"
    assert marker in source, f"{reference} does not check {marker!r}"
    assert "skipped" in source or "skip_reasons" in source or "cone_skips" in source or "reasons" in source


@pytest.mark.xfail(bool(UNCOVERED), strict=True, reason="some skip reasons have no test yet (see UNCOVERED)")
def test_no_reason_is_left_uncovered():
    assert not UNCOVERED, sorted(UNCOVERED)


# -- cone pairs a graph cannot form (hand-built graphs: what a loader may leave unknown) ---------------

def conv_layer(name, index, in_channels, out_channels, predecessor, groups=1, stride=(1, 1), padding=1,
               shapes=True, via=("relu",)):
    rng = np.random.default_rng(index)
    weight = rng.standard_normal((out_channels, in_channels // (groups or 1), 3, 3))
    shape = dict(input_shape=(in_channels, 6, 6), output_shape=(out_channels, 6, 6)) if shapes else {}
    return hpa.Layer(name=name, index=index, kind="conv2d", weight=weight, stride=stride,
                     padding=((padding, padding),) * 2, dilation=(1, 1), groups=groups, predecessors=(predecessor,),
                     via={predecessor: via}, **shape)


def cone_reasons(*layers):
    result = hpa.scan(hpa.ConvGraph(list(layers)), statistics=["cones"])
    assert result.to_dict()["pairs"] == []
    return {s["name"]: s["reason"] for s in result.to_dict()["skipped"] if s.get("statistic") == "cones"}


def test_cone_pairs_need_known_connectivity_strides_groups_and_planes():
    """docs/statistics.md §2 "Which layer pairs": both stride 1, on the same plane, one conv feeding the next."""
    first = conv_layer("first", 0, 2, 4, "input")
    reasons = cone_reasons(first, conv_layer("ghostly", 1, 4, 4, "ghost"))
    assert "its input comes from ghost, which is not a layer of the graph" in reasons["ghostly"]
    assert "in no cone pair; as upper: it reads the model input, not another conv" in reasons["first"]
    reasons = cone_reasons(conv_layer("low", 0, 2, 4, "input", stride=None), conv_layer("up", 1, 4, 4, "low"))
    assert "the stride of low is unknown (cone pairs need stride 1)" in reasons["low -> up"]
    reasons = cone_reasons(first, conv_layer("up", 1, 4, 4, "first", groups=None))
    assert "the groups of up are unknown" in reasons["first -> up"]
    reasons = cone_reasons(first, conv_layer("up", 1, 3, 4, "first"))
    assert "up reads 3 channels but first makes 4" in reasons["first -> up"]
    reasons = cone_reasons(conv_layer("low", 0, 2, 4, "input", padding=0, shapes=False),
                           conv_layer("up", 1, 4, 4, "low", shapes=False))
    assert "the graph does not show that low keeps the size of its plane (shapes unknown)" in reasons["low -> up"]


def test_cone_pairs_need_a_2d_conv_below():
    """docs/statistics.md §2: a pair is "two convs where the input of l+1 is the output of l"."""
    linear = hpa.Layer(name="fc", index=0, kind="linear", weight=np.ones((32, 8)), predecessors=("input",),
                       via={"input": ()})
    reasons = cone_reasons(linear, conv_layer("up", 1, 2, 4, "fc", via=("view",)))
    assert "its input comes from fc, a linear layer, not a 2-D conv" in reasons["up"]


# -- loader reasons: MatConvNet layers that cannot be read, state_dict groups ---------------------------

def mcn_skips(tmp_path, *layers, input_size=(2, 8, 8)):
    """Load a SimpleNN file of a good conv followed by ``layers``; its skipped reasons by layer name."""
    torch.manual_seed(0)
    path = tmp_path / "net.mat"
    mcn.export_simplenn([nn.Conv2d(2, 4, 3, padding=1), *layers], path, input_size=input_size)
    graph = hpa.load(path)
    assert [layer.name for layer in graph] == ["conv1"]
    return {s.name: s.reason for s in graph.skipped}


def test_matconvnet_conv_layers_that_cannot_be_read_are_listed(tmp_path):
    """A conv whose weights are missing, malformed or disagree with its biases is listed, not guessed."""
    empty = np.zeros((0, 0), np.float32)
    five_d = np.ones((3, 3, 4, 2, 2), np.float32)
    filters = np.ones((3, 3, 4, 4), np.float32)
    reasons = mcn_skips(
        tmp_path,
        {"name": "bare", "type": "conv", "weights": mcn.cell([empty, empty])},
        {"name": "deep", "type": "conv", "weights": mcn.cell([five_d, empty])},
        {"name": "biased", "type": "conv", "weights": mcn.cell([filters, np.ones((1, 3), np.float32)])},
        {"name": "upsampler", "type": "convt", "weights": mcn.cell([filters, np.ones((1, 3), np.float32)])},
        {"name": "handles", "type": "custom"})
    assert "conv layer skipped: it has no stored weights" in reasons["bare"]
    assert "its weights have 5 dimensions (expected H x W x Cin x Cout)" in reasons["deep"]
    assert "its biases have 3 values for 4 filters" in reasons["biased"]
    assert "its biases have 3 values for 4 output channels" in reasons["upsampler"]
    assert "custom layer (MATLAB function handles) cannot be run outside MATLAB" in reasons["handles"]


@pytest.mark.parametrize("entry, found", [
    (np.empty((0, 0), dtype=object), "an empty cell array"),
    (np.array([[3.0]]), "a 1x1 numeric array"),  # once reported as "unknown MatConvNet layer type ''"
    ("relu", "the text 'relu'"),
], ids=["empty cell", "number", "text"])
def test_matconvnet_entry_that_is_not_a_struct_is_listed(tmp_path, entry, found):
    import scipy.io

    torch.manual_seed(0)
    path = tmp_path / "net.mat"
    mcn.export_simplenn([nn.Conv2d(2, 4, 3, padding=1)], path, input_size=(2, 8, 8))
    content = scipy.io.loadmat(path)
    layers = np.empty((1, 2), dtype=object)
    layers[0, 0], layers[0, 1] = content["layers"][0, 0], entry
    content["layers"] = layers
    scipy.io.savemat(path, {k: v for k, v in content.items() if not k.startswith("__")})
    graph = hpa.load(path)
    assert [layer.name for layer in graph] == ["conv1"]
    [(name, reason)] = [(s.name, s.reason) for s in graph.skipped]
    assert name == "layer2"
    assert (f"the layer is not a struct but {found}; every entry of the file's layers must be a layer struct "
            "with a 'type' field") in reason


def test_state_dict_groups_that_are_not_layers_are_listed(tmp_path):
    """A bare state_dict: a group with no weight, and a BatchNorm kept raw by --no-fold-bn, are listed."""
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.zeros(4), "shift.bias": torch.zeros(4),
             "bn.weight": torch.ones(4), "bn.bias": torch.zeros(4), "bn.running_mean": torch.zeros(4),
             "bn.running_var": torch.ones(4)}
    torch.save(state, tmp_path / "sd.pt")
    graph = hpa.load(str(tmp_path / "sd.pt"), fold_bn=False)
    assert [layer.name for layer in graph] == ["conv"]
    reasons = {s.name: s.reason for s in graph.skipped}
    assert "not a conv, linear or BatchNorm weight group" in reasons["shift"]
    assert "BatchNorm after conv, not folded (--no-fold-bn)" in reasons["bn"]


def batchnorm_tensors(prefix, channels):
    return {f"{prefix}.{k}": torch.rand(channels) + 0.5 for k in ("weight", "bias", "running_mean", "running_var")}


STATE_DICT_REFUSALS = {  # case -> (conv prefixes and output channels, BatchNorms and channels, the refused one, why)
    "no rule": ({"conv": 4}, {"bn0": 4}, "bn0",
                "BatchNorm that no naming rule pairs with a conv or linear layer it certainly follows"),
    # bns.1 follows bns.0 by position and convs.1 as Res2Net's parallel lists: two rules disagree
    "several": ({"net.convs.1": 4, "net.bns.0": 4}, {"net.bns.1": 4}, "net.bns.1",
                "BatchNorm that could follow several layers (net.bns.0, net.convs.1)"),
    # bn by name, bn1 as the first BatchNorm of a timm block whose only conv is conv
    "claimed twice": ({"conv": 4}, {"bn": 4, "bn1": 4}, "bn", "BatchNorm that, like bn1, would follow conv"),
    "channels": ({"conv1": 8}, {"bn1": 6}, "bn1", "BatchNorm with 6 channels after conv1, which has 8 outputs"),
}


@pytest.mark.parametrize("case", sorted(STATE_DICT_REFUSALS))
def test_state_dict_batchnorms_that_cannot_be_paired_are_listed(tmp_path, case):
    """Issue 7 §2: a BatchNorm that cannot be paired with certainty is not folded, and listed with its reason."""
    convs, batchnorms, refused, why = STATE_DICT_REFUSALS[case]
    state = {f"{prefix}.weight": torch.randn(out, 4, 3, 3) for prefix, out in convs.items()}
    for prefix, channels in batchnorms.items():
        state.update(batchnorm_tensors(prefix, channels))
    torch.save(state, tmp_path / "sd.pt")
    graph = hpa.load(str(tmp_path / "sd.pt"))
    for prefix in convs:  # whatever else happens, no layer gets the refused BatchNorm
        np.testing.assert_array_equal(graph[prefix].weight, state[f"{prefix}.weight"].numpy())
    reasons = {s.name: s.reason for s in graph.skipped}
    assert reasons[refused].startswith(f"{why}; not folded (give the architecture instead: ")


# -- loader reasons: ONNX nodes that are not analysed ----------------------------------------------------

def onnx_file(tmp_path, node, initializers, extra_inputs=()):
    """A model with one good conv on ``x`` (1x3x8x8) beside ``node``, which may also read ``v`` (1x6)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("x", [1, 3, 8, 8]), ("v", [1, 6]), *extra_inputs)]
    good = helper.make_node("Conv", ["x", "good_w"], ["good_y"], name="good", pads=[1, 1, 1, 1])
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in (good, node) for o in n.output]
    initializers = {"good_w": np.ones((4, 3, 3, 3), np.float32), **initializers}
    graph = helper.make_graph([good, node], "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


CONV_W = np.ones((4, 3, 3, 3), np.float32)
GEMM_B = np.ones((6, 4), np.float32)
ONNX_CASES = {  # op, inputs, attributes, initializers, runtime inputs, expected reason
    "kernel_shape": ("Conv", ["x", "w"], {"kernel_shape": [2, 2]}, {"w": CONV_W}, (),
                     "Conv: kernel_shape [2, 2] does not match the weight's [3, 3]"),
    "6-D weight": ("Conv", ["x", "w"], {}, {"w": np.ones((4, 3, 1, 1, 1, 1), np.float32)}, (),
                   "Conv: a 6-D weight (4, 3, 1, 1, 1, 1) is not a 1-D, 2-D or 3-D conv"),
    "bool weight": ("Conv", ["x", "w"], {}, {"w": np.ones((4, 3, 3, 3), bool)}, (),
                    "Conv: weight 'w' has type bool, not numbers"),
    "conv runtime bias": ("Conv", ["x", "w", "bb"], {}, {"w": CONV_W}, (("bb", [4]),),
                          "Conv: bias 'bb' is computed at run time, not a constant; not analysed"),
    "conv bias shape": ("Conv", ["x", "w", "b"], {}, {"w": CONV_W, "b": np.ones(3, np.float32)}, (),
                        "Conv: bias of shape [3] is not one value per output channel"),
    "gemm runtime weight": ("Gemm", ["v", "bb"], {}, {}, (("bb", [6, 4]),),
                            "Gemm: weight 'bb' is computed at run time, not a constant; not analysed"),
    "gemm left constant": ("Gemm", ["a", "v"], {}, {"a": np.ones((2, 1), np.float32)}, (),
                           "Gemm: the constant is the left operand (weight @ data); not a linear layer of the input"),
    "gemm both constant": ("Gemm", ["a", "b"], {}, {"a": np.ones((1, 6), np.float32), "b": GEMM_B}, (),
                           "Gemm: both operands are constant; nothing depends on the input"),
    "gemm transA": ("Gemm", ["v", "b"], {"transA": 1}, {"b": GEMM_B}, (),
                    "Gemm: transA=1 (transposed data) is not a linear layer of the input's rows"),
    "gemm 3-D weight": ("Gemm", ["v", "b"], {}, {"b": np.ones((6, 4, 1), np.float32)}, (),
                        "Gemm: weight 'b' is 3-D, not a matrix"),
    "gemm runtime bias": ("Gemm", ["v", "b", "cc"], {}, {"b": GEMM_B}, (("cc", [4]),),
                          "Gemm: bias 'cc' is computed at run time, not a constant"),
    "gemm bias shape": ("Gemm", ["v", "b", "c"], {}, {"b": GEMM_B, "c": np.ones((2, 3), np.float32)}, (),
                        "Gemm: bias of shape [2, 3] is not one value per output unit"),
    "matmul both constant": ("MatMul", ["a", "b"], {}, {"a": np.ones((1, 6), np.float32), "b": GEMM_B}, (),
                             "MatMul: both operands are constant; nothing depends on the input"),
    "matmul 3-D weight": ("MatMul", ["v", "b"], {}, {"b": np.ones((2, 6, 4), np.float32)}, (),
                          "MatMul: constant operand 'b' is 3-D, not a weight matrix"),
}
UNSUPPORTED = {  # weighted ops hpa does not analyse, and what it says
    "QLinearMatMul": "quantized matmul (QLinearMatMul) is not analysed",
    "MatMulInteger": "integer matmul (MatMulInteger) is not analysed",
    "LSTM": "recurrent layers (LSTM) are not analysed",
    "GRU": "recurrent layers (GRU) are not analysed",
    "RNN": "recurrent layers (RNN) are not analysed",
    "DeformConv": "deformable convs are not analysed",
    "Einsum": "Einsum is not analysed as a layer",
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_layers_that_cannot_be_read_are_listed(tmp_path, case):
    from onnx import helper

    op, inputs, attributes, initializers, runtime, expected = ONNX_CASES[case]
    node = helper.make_node(op, inputs, ["y"], name="odd", **attributes)
    graph = hpa.load(onnx_file(tmp_path, node, initializers, runtime))
    assert [layer.name for layer in graph] == ["good"]
    assert [(s.name, s.reason) for s in graph.skipped] == [("odd", expected)]


@pytest.mark.parametrize("op", sorted(UNSUPPORTED))
def test_onnx_weighted_ops_hpa_does_not_analyse_are_listed(tmp_path, op):
    from onnx import helper

    node = helper.make_node(op, ["v", "w"], ["y"], name="odd")
    graph = hpa.load(onnx_file(tmp_path, node, {"w": np.ones((1, 8, 6), np.float32)}))
    assert [layer.name for layer in graph] == ["good"]
    assert [(s.name, s.reason) for s in graph.skipped] == [("odd", f"{op}: {UNSUPPORTED[op]}")]


def test_matconvnet_dagnn_conv_whose_params_are_missing_is_listed(tmp_path):
    """A DagNN conv naming params the file's params list does not hold cannot be read: listed."""
    import scipy.io

    torch.manual_seed(0)
    path = tmp_path / "dag.mat"
    mcn.export_dagnn(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)), path,
                     input_size=(2, 8, 8))
    content = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    names = [str(p["name"].ravel()[0]) for p in content["params"].ravel()]
    assert names == ["layer1_filter", "layer1_bias", "layer3_filter", "layer3_bias"]
    content["params"] = content["params"][:, :2]  # layer3's filter and bias are gone
    scipy.io.savemat(path, content)
    graph = hpa.load(path)
    assert [layer.name for layer in graph] == ["layer1"]
    reasons = {s.name: s.reason for s in graph.skipped}
    assert "its params layer3_filter, layer3_bias are not in the file's params list" in reasons["layer3"]


def test_onnx_unknown_operator_is_listed(tmp_path):
    from onnx import helper

    node = helper.make_node("Mystery", ["x"], ["y"], name="odd", domain="com.example")
    graph = hpa.load(onnx_file(tmp_path, node, {}))
    assert [(s.name, s.reason) for s in graph.skipped] == [
        ("odd", "com.example::Mystery: unknown operator, not analysed (predecessors are traced through it)")]


def test_torch_module_never_called_is_listed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Conv2d(2, 3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    graph = hpa.load(Net(), input_size=(2, 6, 6))
    assert [layer.name for layer in graph] == ["used"]
    assert [(s.name, s.reason) for s in graph.skipped] == [
        ("spare", "Linear not called in the forward pass (unused in eval mode, or called inside a fused op)")]
