"""ONNX models from real exporters that hide convs: If/Loop/Scan subgraphs, local functions, opset 18.

Each fixture is written by a real exporter (torch.onnx with a scripted ``if``,
the dynamo exporter, onnxscript) or, where none writes that structure, built
with ``onnx.helper`` as spox writes it.  The numbers are checked against the
equivalent torch module traced by hpa, and the file's behaviour against torch
with onnxruntime.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnx
import torch
nn = torch.nn

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import hpa  # noqa: E402
from conftest import assert_bad_input  # noqa: E402
from hpa.backends.onnx.runtime import run_onnx  # noqa: E402
from hpa.errors import UnsupportedModelError  # noqa: E402

OPSET = [helper.make_opsetid("", 17)]


def projection(graph) -> dict[str, dict]:
    """Layer name -> the projection statistic's values (n_l, cosines) for every layer."""
    result = hpa.scan(graph, statistics=["projection"], with_linear=True)
    return dict(result.statistics["projection"].layers)


def assert_same_numbers(got_graph, got_names, want_graph, want_names=None):
    """n_l and per-filter cosines of ``got_names`` equal those of ``want_names`` to 1e-6."""
    got, want = projection(got_graph), projection(want_graph)
    want_names = [layer.name for layer in want_graph] if want_names is None else want_names
    assert len(got_names) == len(want_names)
    for g, w in zip(got_names, want_names):
        assert got[g]["n_l"] == pytest.approx(want[w]["n_l"], abs=1e-6), (g, w)
        np.testing.assert_allclose(np.array(got[g]["cosines"], float), np.array(want[w]["cosines"], float),
                                   atol=1e-6, err_msg=f"{g} vs {w}")


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Weights with a clear sign bias per filter, so n_l is far from 0.5 and a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) + 0.3 * torch.randn(
                    m.weight.shape[0], *([1] * (m.weight.ndim - 1)), generator=g))
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return module.eval()


# -- torch.onnx.export of a scripted module with `if` on the sample rate ----------------------------

class PerRate(nn.Module):
    """One front end per sample rate, chosen by scripted control flow, then a shared head."""

    def __init__(self):
        super().__init__()
        self.fast = nn.Sequential(nn.Conv1d(1, 6, 9), nn.ReLU(), nn.Conv1d(6, 5, 3))
        self.slow = nn.Sequential(nn.Conv1d(1, 6, 5), nn.ReLU(), nn.Conv1d(6, 5, 3))
        self.head = nn.Conv1d(5, 4, 3)

    def forward(self, x, rate: int):
        if rate == 16000:
            y = self.fast(x)
        else:
            y = self.slow(x)
        return self.head(torch.relu(y))


@pytest.fixture(scope="module")
def scripted_if(tmp_path_factory):
    model = randomize(PerRate(), seed=1)
    path = tmp_path_factory.mktemp("scripted") / "per_rate.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(model), (torch.randn(1, 1, 64), torch.tensor(16000)), str(path),
                          dynamo=False, input_names=["audio", "rate"],
                          dynamic_axes={"audio": {0: "batch"}})
    return model, path


def _branch_of(graph, prefix: str) -> list:
    return [layer for layer in graph if layer.branch is not None and layer.branch.endswith(prefix)]


def test_scripted_if_finds_the_convs_of_both_branches(scripted_if):
    model, path = scripted_if
    graph = hpa.load(str(path))
    then, other = _branch_of(graph, "then_branch"), _branch_of(graph, "else_branch")
    assert len(then) == 2 and len(other) == 2, [(layer.name, layer.branch) for layer in graph]
    for layer in then + other:
        assert layer.name.startswith(layer.branch + "/"), layer.name
    assert then[0].name.endswith("fast.0") and other[0].name.endswith("slow.0")
    assert [layer.kernel_size for layer in then] == [(9,), (3,)]
    assert [layer.kernel_size for layer in other] == [(5,), (3,)]
    assert graph["head"].branch is None
    assert graph.source["branches"] == [then[0].branch, other[0].branch]


def test_scripted_if_numbers_equal_each_branch_module(scripted_if):
    model, path = scripted_if
    graph = hpa.load(str(path))
    then, other = _branch_of(graph, "then_branch"), _branch_of(graph, "else_branch")
    assert_same_numbers(graph, [layer.name for layer in then], hpa.load(model.fast, input_size=(1, 64)))
    assert_same_numbers(graph, [layer.name for layer in other], hpa.load(model.slow, input_size=(1, 64)))
    assert_same_numbers(graph, ["head"], hpa.load(model.head, input_size=(5, 30)))


def test_scripted_if_predecessors_cross_the_branch_boundary(scripted_if):
    _, path = scripted_if
    graph = hpa.load(str(path))
    then, other = _branch_of(graph, "then_branch"), _branch_of(graph, "else_branch")
    for branch in (then, other):
        assert branch[0].predecessors == ("input",)
        assert branch[1].predecessors == (branch[0].name,)
        assert branch[1].via[branch[0].name] == ("relu",)
        assert branch[0].activation == "relu" and branch[1].activation == "none"
    head = graph["head"]
    assert set(head.predecessors) == {then[1].name, other[1].name}
    assert set(head.via[then[1].name]) == {"if", "relu"}


def test_scripted_if_runs_like_the_module(scripted_if):
    model, path = scripted_if
    x = torch.randn(2, 1, 64)
    for rate in (16000, 8000):
        want = model(x, rate).detach().numpy()
        got = run_onnx(path, {"audio": x.numpy(), "rate": np.array(rate, np.int64)}, device="cpu")[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- spox-style If: the weights are Constant nodes inside the branches ---------------------------------

def _constant(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32)))


def _spox_if_model(then_net: nn.Sequential, else_net: nn.Sequential, outer_weight: bool = True,
                   branch_initializers: bool = False):
    """cond ? then_net(x) : else_net(x), every weight a Constant in its branch.

    With ``outer_weight`` the else branch's second conv reads its weight from an
    initializer of the main graph, referenced by name across the scope.  With
    ``branch_initializers`` the then branch holds its weights as initializers of
    its own graph instead of Constant nodes.
    """
    def branch(net, tag, weight_outside):
        nodes, initializers = [], []
        value = "x"
        convs = [m for m in net if isinstance(m, nn.Conv2d)]
        for k, conv in enumerate(convs):
            w = f"{tag}_w{k}" if not (weight_outside and k == 1) else "shared_weight"
            constants = [(f"{tag}_b{k}", conv.bias)] + ([(w, conv.weight)] if w != "shared_weight" else [])
            for name, tensor in constants:
                if branch_initializers and tag == "t":
                    initializers.append(numpy_helper.from_array(tensor.detach().numpy(), name))
                else:
                    nodes.append(_constant(name, tensor.detach().numpy()))
            pad = conv.padding[0]
            nodes.append(helper.make_node("Conv", [value, w, f"{tag}_b{k}"], [f"{tag}_conv{k}"],
                                          name=f"conv{k}", pads=[pad] * 4))
            value = f"{tag}_conv{k}"
            if k < len(convs) - 1:
                nodes.append(helper.make_node("Relu", [value], [f"{tag}_relu{k}"]))
                value = f"{tag}_relu{k}"
        out = helper.make_tensor_value_info(value, TensorProto.FLOAT, None)
        return helper.make_graph(nodes, f"{tag}_branch", [], [out], initializer=initializers)

    shared = numpy_helper.from_array(else_net[2].weight.detach().numpy().astype(np.float32), "shared_weight")
    if_node = helper.make_node("If", ["cond"], ["y"], name="If_0", then_branch=branch(then_net, "t", False),
                               else_branch=branch(else_net, "e", outer_weight))
    graph = helper.make_graph(
        [if_node], "spox_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[shared] if outer_weight else [])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


@pytest.fixture(scope="module")
def spox_if(tmp_path_factory):
    then_net = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)), seed=2)
    else_net = randomize(nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 4, 3)), seed=3)
    path = tmp_path_factory.mktemp("spox") / "spox_if.onnx"
    onnx.save(_spox_if_model(then_net, else_net), str(path))
    return then_net, else_net, path


def test_spox_if_resolves_constant_and_outer_weights(spox_if):
    then_net, else_net, path = spox_if
    graph = hpa.load(str(path))
    assert [layer.name for layer in graph] == ["If_0/then_branch/conv0", "If_0/then_branch/conv1",
                                               "If_0/else_branch/conv0", "If_0/else_branch/conv1"]
    assert [layer.branch for layer in graph] == ["If_0/then_branch"] * 2 + ["If_0/else_branch"] * 2
    np.testing.assert_array_equal(graph["If_0/else_branch/conv1"].weight, else_net[2].weight.detach().numpy())
    assert graph["If_0/then_branch/conv1"].predecessors == ("If_0/then_branch/conv0",)
    assert graph["If_0/else_branch/conv0"].input_shape == (3, 12, 12)
    assert graph["If_0/else_branch/conv0"].output_shape == (6, 12, 12)
    assert_same_numbers(graph, ["If_0/then_branch/conv0", "If_0/then_branch/conv1"],
                        hpa.load(then_net, input_size=(3, 12, 12)))
    assert_same_numbers(graph, ["If_0/else_branch/conv0", "If_0/else_branch/conv1"],
                        hpa.load(else_net, input_size=(3, 12, 12)))


def test_spox_if_runs_like_the_modules(spox_if):
    then_net, else_net, path = spox_if
    x = torch.randn(1, 3, 12, 12)
    for cond, net in ((True, then_net), (False, else_net)):
        got = run_onnx(path, {"x": x.numpy(), "cond": np.array(cond)}, device="cpu")[0]
        np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def _mapped_from_file(array: np.ndarray) -> bool:
    import mmap

    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    if isinstance(array, memoryview):
        array = array.obj
    return isinstance(array, mmap.mmap)


def test_branch_weights_with_clashing_names_are_views_of_the_file(tmp_path):
    """Both branches call their weight "w" (sibling scopes may): scopes keep them apart, none is copied."""
    rng = np.random.default_rng(0)
    w_then, w_else = rng.standard_normal((2, 64, 32, 3, 3)).astype(np.float32)
    w_head = rng.standard_normal((16, 64, 1, 1)).astype(np.float32)

    def branch(name, nodes, initializers=()):
        return helper.make_graph(nodes + [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], name, [],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                 initializer=list(initializers))

    then = branch("then", [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w_then))])
    other = branch("else", [], [numpy_helper.from_array(w_else, "w")])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="If_0", then_branch=then, else_branch=other),
         helper.make_node("Conv", ["y", "head.weight"], ["z"])], "clash",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w_head, "head.weight")])
    path = tmp_path / "clash.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=8), str(path))
    loaded = hpa.load(str(path))
    assert [layer.name for layer in loaded] == ["If_0/then_branch/conv", "If_0/else_branch/conv", "head"]
    for layer, want in zip(loaded, (w_then, w_else, w_head)):
        np.testing.assert_array_equal(layer.weight, want)
        assert _mapped_from_file(layer.weight), layer.name
    assert set(loaded["head"].predecessors) == {"If_0/then_branch/conv", "If_0/else_branch/conv"}
    assert loaded["head"].input_shape == (64, 6, 6)
    assert "external_data" not in loaded.source  # the branch tensors point into the model file itself
    x = rng.standard_normal((1, 32, 8, 8)).astype(np.float32)
    for cond, w in ((True, w_then), (False, w_else)):
        want = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w)),
                                          torch.from_numpy(w_head)).numpy()
        got = run_onnx(path, {"x": x, "cond": np.array(cond)}, device="cpu")[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_missing_external_data_inside_a_branch_is_one_line(tmp_path, spox_if, run_hpa):
    then_net, else_net, _ = spox_if
    model = _spox_if_model(then_net, else_net, outer_weight=False, branch_initializers=True)
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    stored = onnx.load(str(path), load_external_data=False)
    then_branch = next(a.g for a in stored.graph.node[0].attribute if a.name == "then_branch")
    assert then_branch.initializer and all(t.data_location == TensorProto.EXTERNAL for t in then_branch.initializer)
    graph = hpa.load(str(path))  # complete, it loads, the weights read from the data file
    np.testing.assert_array_equal(graph["If_0/then_branch/conv0"].weight, then_net[0].weight.detach().numpy())
    assert graph.source["external_data"] == [str((tmp_path / "weights.bin").resolve())]
    (tmp_path / "weights.bin").unlink()
    assert_bad_input(run_hpa("scan", path), "weights.bin", "missing", "If_0/then_branch/t_w0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external.onnx"]  # nothing written


def test_truncated_control_flow_model_is_one_line(tmp_path, spox_if, run_hpa):
    _, _, path = spox_if
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert_bad_input(run_hpa("scan", cut), "cut.onnx")
    assert not any(p.name != "cut.onnx" for p in tmp_path.iterdir())  # no partial output


def test_no_convs_even_in_branches_says_so(tmp_path, run_hpa):
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    neg = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [],
                            [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=relu, else_branch=neg)], "no_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "no_convs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=8), str(path))
    with pytest.raises(UnsupportedModelError, match="not even inside"):
        hpa.load(str(path))
    assert_bad_input(run_hpa("scan", path), "no conv layers", "control-flow")


# -- onnxscript: a conv inside a local function --------------------------------------------------------

def _onnxscript_net():
    """The model as onnxscript source; onnxscript reads the names it uses from this module's globals."""
    global FLOAT, op  # noqa: PLW0603 - onnxscript resolves annotations and opsets through globals
    import onnxscript
    from onnxscript import FLOAT
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    local = Opset("hpa.test", 1)

    @onnxscript.script(local, default_opset=op)
    def ConvRelu(x, w, b):
        return op.Relu(op.Conv(x, w, b, pads=[1, 1, 1, 1]))

    @onnxscript.script(default_opset=op)
    def net(x: FLOAT[1, 3, 10, 10], w1: FLOAT[8, 3, 3, 3], b1: FLOAT[8], w2: FLOAT[4, 8, 3, 3],
            b2: FLOAT[4]) -> FLOAT[1, 4, 10, 10]:
        return op.Conv(ConvRelu(x, w1, b1), w2, b2, pads=[1, 1, 1, 1])

    return net


@pytest.fixture(scope="module")
def onnxscript_model(tmp_path_factory):
    net = _onnxscript_net()
    module = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)), 4)
    proto = net.to_model_proto()
    assert len(proto.functions) == 1  # the conv really is inside a local function
    weights = {"w1": module[0].weight, "b1": module[0].bias, "w2": module[2].weight, "b2": module[2].bias}
    # The call's weight inputs become initializers (as an exporter writes them), named like torch's.
    names = {"w1": "first.weight", "b1": "first.bias", "w2": "second.weight", "b2": "second.bias"}
    proto.graph.initializer.extend(numpy_helper.from_array(v.detach().numpy(), names[k]) for k, v in weights.items())
    keep = [i for i in proto.graph.input if i.name == "x"]
    proto.graph.ClearField("input")
    proto.graph.input.extend(keep)
    for node in proto.graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
    path = tmp_path_factory.mktemp("onnxscript") / "local_function.onnx"
    onnx.save(proto, str(path))
    return module, path


def test_conv_inside_a_local_function(onnxscript_model):
    module, path = onnxscript_model
    graph = hpa.load(str(path))
    assert [layer.name for layer in graph] == ["first", "second"]
    assert graph["first"].activation == "relu"
    assert graph["second"].predecessors == ("first",)
    assert graph["first"].padding == ((1, 1), (1, 1))
    assert_same_numbers(graph, ["first", "second"], hpa.load(module, input_size=(3, 10, 10)))
    x = torch.randn(1, 3, 10, 10)
    got = run_onnx(path, x.numpy(), device="cpu")[0]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_torch_export_with_modules_as_local_functions(tmp_path):
    """torch.onnx's export_modules_as_functions: each Block is a local function, its weights call inputs."""
    module = randomize(nn.Sequential(Block(3, 8), Block(8, 4), nn.Conv2d(4, 2, 1)), seed=11)
    path = tmp_path / "functions.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=18,
                          export_modules_as_functions={Block}, do_constant_folding=False)
    stored = onnx.load(str(path))
    assert [f.name for f in stored.functions] == ["Block"]
    assert sum(n.op_type == "Block" for n in stored.graph.node) == 2  # the convs are only in the function
    assert sum(n.op_type == "Conv" for n in stored.graph.node) == 1
    graph = hpa.load(str(path))
    want = hpa.load(module, input_size=(3, 16, 16))
    assert [layer.name for layer in graph] == [layer.name for layer in want] == ["0.conv", "1.conv", "2"]
    for got, ref in zip(graph, want):
        assert (got.bn_folded, got.activation, got.predecessors, got.input_shape) == \
            (ref.bn_folded, ref.activation, ref.predecessors, ref.input_shape), got.name
    assert_same_numbers(graph, [layer.name for layer in graph], want)
    x = torch.randn(1, 3, 16, 16)
    np.testing.assert_allclose(run_onnx(path, x.numpy(), device="cpu")[0], module(x).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


# -- the dynamo exporter at opset 18 ------------------------------------------------------------------------

def test_dynamo_opset18_export(tmp_path):
    module = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 4, 3, stride=2)), seed=5)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.randn(1, 3, 16, 16),), dynamo=True, opset_version=18,
                                    verbose=False)
        program.save(str(path))
    assert onnx.load(str(path)).opset_import[0].version == 18
    graph = hpa.load(str(path))
    want = hpa.load(module, input_size=(3, 16, 16))
    assert [(layer.kind, layer.stride, layer.padding, layer.activation) for layer in graph] == \
        [(layer.kind, layer.stride, layer.padding, layer.activation) for layer in want]
    assert_same_numbers(graph, [layer.name for layer in graph], want)
    x = torch.randn(1, 3, 16, 16)
    np.testing.assert_allclose(run_onnx(path, x.numpy(), device="cpu")[0], module(x).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


# -- Loop and Scan bodies -----------------------------------------------------------------------------

def _loop_body(nodes, shape):
    """A Loop body carrying one tensor of ``shape`` ("carried" -> "carried_out"); the condition passes through."""
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), *nodes],
        "body",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, shape)])


def _loop_model(conv: nn.Conv2d, trips: int):
    """x -> Loop(trips) { relu(conv(x)) } with the weights as initializers of the main graph."""
    body = _loop_body(
        [helper.make_node("Conv", ["carried", "block.weight", "block.bias"], ["conv_out"], name="conv", pads=[1] * 4),
         helper.make_node("Relu", ["conv_out"], ["carried_out"])], [1, 4, 8, 8])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="Loop_0", body=body)], "looped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[numpy_helper.from_array(np.array(trips, np.int64), "trips"),
                     numpy_helper.from_array(conv.weight.detach().numpy(), "block.weight"),
                     numpy_helper.from_array(conv.bias.detach().numpy(), "block.bias")])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def test_conv_inside_a_loop_body(tmp_path):
    conv = randomize(nn.Conv2d(4, 4, 3, padding=1), seed=6)
    path = tmp_path / "loop.onnx"
    onnx.save(_loop_model(conv, trips=2), str(path))
    graph = hpa.load(str(path))
    assert [layer.name for layer in graph] == ["Loop_0/body/block"]
    layer = graph["Loop_0/body/block"]
    assert layer.branch == "Loop_0/body" and layer.activation == "relu"
    assert layer.predecessors == ("input",) and layer.via["input"] == ("loop",)
    assert layer.input_shape == (4, 8, 8)
    assert_same_numbers(graph, [layer.name], hpa.load(nn.Sequential(conv, nn.ReLU()), input_size=(4, 8, 8)))
    x = torch.randn(1, 4, 8, 8)
    want = torch.relu(conv(torch.relu(conv(x)))).detach().numpy()
    np.testing.assert_allclose(run_onnx(path, x.numpy(), device="cpu")[0], want, rtol=1e-4, atol=1e-5)


def test_conv_inside_a_scan_body(tmp_path):
    """Scan over a sequence of images, one conv per step; the conv's weights are a Constant in the body."""
    conv = randomize(nn.Conv2d(2, 3, 3), seed=7)
    body = helper.make_graph(
        [_constant("w", conv.weight.detach().numpy()), _constant("b", conv.bias.detach().numpy()),
         helper.make_node("Conv", ["frame", "w", "b"], ["feature"], name="frame_conv")],
        "body", [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT, [1, 3, 4, 4])])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["frames"], ["features"], name="Scan_0", body=body, num_scan_inputs=1)],
        "scanned", [helper.make_tensor_value_info("frames", TensorProto.FLOAT, [5, 1, 2, 6, 6])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [5, 1, 3, 4, 4])])
    path = tmp_path / "scan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=8), str(path))
    loaded = hpa.load(str(path))
    assert [(layer.name, layer.branch) for layer in loaded] == [("Scan_0/body/frame_conv", "Scan_0/body")]
    assert loaded.layers[0].predecessors == ("input",)
    assert_same_numbers(loaded, ["Scan_0/body/frame_conv"], hpa.load(conv, input_size=(2, 6, 6)))
    frames = torch.randn(5, 1, 2, 6, 6)
    want = torch.stack([conv(f) for f in frames]).detach().numpy()
    np.testing.assert_allclose(run_onnx(path, frames.numpy(), device="cpu")[0], want, rtol=1e-4, atol=1e-5)


def test_nested_subgraphs_and_owners_with_one_name(tmp_path):
    """An If inside a Loop body, an If of the same name outside it, and unnamed owners: one scope each."""
    rng = np.random.default_rng(1)
    weights = {f"w{k}": rng.standard_normal((4, 4, 3, 3)).astype(np.float32) for k in range(6)}

    def conv_branch(name, weight, source):
        return helper.make_graph([helper.make_node("Conv", [source, weight], ["out"], name="conv", pads=[1] * 4)],
                                 name, [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])

    def if_node(source, output, first, second, name="If"):
        return helper.make_node("If", ["cond"], [output], name=name, then_branch=conv_branch("t", first, source),
                                else_branch=conv_branch("e", second, source))

    body = _loop_body([if_node("carried", "carried_out", "w0", "w1")], [1, 4, 6, 6])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["looped"], body=body),
         if_node("looped", "mid", "w2", "w3"), if_node("mid", "y", "w4", "w5", name="")], "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(1, np.int64), "trips")]
        + [numpy_helper.from_array(v, k) for k, v in weights.items()])
    path = tmp_path / "nested.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET, ir_version=8), str(path))
    loaded = hpa.load(str(path))
    scopes = ["Loop_0/body/If", "If", "If_2"]
    assert [(layer.name, layer.branch) for layer in loaded] == [
        (f"{scope}/{side}/conv", f"{scope}/{side}") for scope in scopes for side in ("then_branch", "else_branch")]
    for layer, weight in zip(loaded, weights.values()):
        np.testing.assert_array_equal(layer.weight, weight)
    inner, outer = scopes[0], scopes[1]
    assert set(loaded[f"{outer}/then_branch/conv"].predecessors) == {f"{inner}/then_branch/conv",
                                                                    f"{inner}/else_branch/conv"}
    # out of the inner If and the Loop; the outer branch reads the Loop's output by name, not through its If
    assert sorted(loaded[f"{outer}/then_branch/conv"].via[f"{inner}/then_branch/conv"]) == ["if", "loop"]
    assert loaded[f"{inner}/then_branch/conv"].input_shape == (4, 6, 6)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    conv = lambda v, w: torch.nn.functional.conv2d(torch.from_numpy(v), torch.from_numpy(w), padding=1).numpy()  # noqa: E731
    got = run_onnx(path, {"x": x, "cond": np.array(False)}, device="cpu")[0]
    want = conv(conv(conv(x, weights["w1"]), weights["w3"]), weights["w5"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -- conv nodes without kernel_shape -----------------------------------------------------------------

def test_conv_without_kernel_shape_in_a_branch(tmp_path):
    """kernel_shape is optional: the kernel comes from the weight, even a Constant inside a branch."""
    then_net = randomize(nn.Sequential(nn.Conv2d(3, 5, (3, 2), padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1)), 8)
    else_net = randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3)), 9)
    model = _spox_if_model(then_net, else_net, outer_weight=False)
    for branch in ("then_branch", "else_branch"):
        for node in next(a.g for a in model.graph.node[0].attribute if a.name == branch).node:
            assert not any(a.name == "kernel_shape" for a in node.attribute)
    path = tmp_path / "no_kernel_shape.onnx"
    onnx.save(model, str(path))
    graph = hpa.load(str(path))
    assert graph["If_0/then_branch/conv0"].kernel_size == (3, 2)
    assert graph["If_0/then_branch/conv0"].output_shape == (5, 12, 13)
    assert_same_numbers(graph, ["If_0/then_branch/conv0", "If_0/then_branch/conv1"],
                        hpa.load(then_net, input_size=(3, 12, 12)))


# -- symbolic input sizes and the fully-connected-conv rule -------------------------------------------

@pytest.fixture
def symbolic_length(tmp_path):
    """A conv1d with kernel 8 on an input of symbolic length, exported with dynamic axes.

    The exporter traced a dummy of length 8, where the kernel covers the whole
    input; the file must not be read as if that dummy were the model.
    """
    module = randomize(nn.Sequential(nn.Conv1d(4, 6, 8), nn.ReLU(), nn.Conv1d(6, 3, 1)), seed=10)
    path = tmp_path / "symbolic.onnx"
    model = _export_with_stored_shapes(module, path)
    return module, path, model


def _export_with_stored_shapes(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 4, 8),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 2: "length"}})
    model = onnx.load(str(path))
    # Some exporters store every intermediate shape for the traced dummy; write that into the file too.
    inferred = onnx.shape_inference.infer_shapes(_with_fixed_length(model, 8))
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    onnx.save(model, str(path))
    return model


def _with_fixed_length(model, length: int):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[2].dim_value = length
    return fixed


def test_symbolic_length_leaves_the_fully_connected_rule_undecided(symbolic_length):
    module, path, model = symbolic_length
    assert any(v.type.tensor_type.shape.dim[2].dim_value == 1 for v in model.graph.value_info)  # the dummy's
    graph = hpa.load(str(path))
    first = graph.layers[0]
    assert first.input_shape is None and first.output_shape is None
    assert graph.input_shape is None
    assert any("symbolic" in note and "--input-size" in note for note in graph.source["notes"])
    values = projection(graph)  # the conv is analysed as a conv, not skipped as a linear layer
    result = hpa.scan(graph, statistics=["projection"])
    assert first.name in result.statistics["projection"].layers
    assert_same_numbers(graph, [layer.name for layer in graph], hpa.load(module, input_size=(4, 16)))
    assert values[first.name]["n_l"] is not None


def test_input_size_decides_the_fully_connected_rule(symbolic_length):
    _, path, _ = symbolic_length
    covering = hpa.load(str(path), input_size=(4, 8))
    assert covering.layers[0].input_shape == (4, 8) and covering.layers[0].output_shape == (6, 1)
    skipped = {s.name: s.reason for s in hpa.scan(str(path), statistics=["projection"], input_size=(4, 8))
               .statistics["projection"].skipped}
    assert "fully-connected" in skipped[covering.layers[0].name]
    longer = hpa.scan(str(path), statistics=["projection"], input_size=(4, 20))
    assert covering.layers[0].name in longer.statistics["projection"].layers


# -- one set of canonical op names --------------------------------------------------------------------

def test_onnx_names_are_the_graphs_canonical_names():
    from hpa.backends.onnx.activations import ACTIVATION_OPS, TRANSPARENT
    from hpa.graph import ACTIVATIONS

    assert set(ACTIVATION_OPS.values()) <= ACTIVATIONS
    assert TRANSPARENT == {"Identity", "Dropout"}


# -- sibling control-flow nodes with one name (issue 17) ---------------------------------------------

def _two_ifs_named_alike(weights):
    """Two If nodes, both named "gate", in sequence; every branch holds a conv named "conv" on weight "w"."""
    def branch(name, source, weight):
        return helper.make_graph(
            [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
             helper.make_node("Conv", [source, "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], name, [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])

    first = helper.make_node("If", ["cond"], ["h"], name="gate", then_branch=branch("t0", "x", weights[0]),
                             else_branch=branch("e0", "x", weights[1]))
    second = helper.make_node("If", ["cond"], ["z"], name="gate", then_branch=branch("t1", "h", weights[2]),
                              else_branch=branch("e1", "h", weights[3]))
    graph = helper.make_graph(
        [first, second], "two_gates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def test_sibling_ifs_with_one_name_get_distinct_stable_scopes(tmp_path):
    rng = np.random.default_rng(7)
    weights = [rng.standard_normal((4, 4, 3, 3)).astype(np.float32) + 0.3 * k for k in range(4)]
    path = tmp_path / "two_gates.onnx"
    onnx.save(_two_ifs_named_alike(weights), str(path))
    graph = hpa.load(str(path))
    names = [layer.name for layer in graph]
    assert names == ["gate/then_branch/conv", "gate/else_branch/conv", "gate#2/then_branch/conv",
                     "gate#2/else_branch/conv"]
    assert [layer.branch for layer in graph] == ["gate/then_branch", "gate/else_branch", "gate#2/then_branch",
                                                 "gate#2/else_branch"]
    assert graph.source["branches"] == [layer.branch for layer in graph]
    assert [layer.name for layer in hpa.load(str(path))] == names  # stable from one load to the next
    for layer, weight in zip(graph, weights):  # each branch's own weights, all four analysed
        np.testing.assert_array_equal(layer.weight, weight)
    assert set(graph["gate#2/then_branch/conv"].predecessors) == {"gate/then_branch/conv", "gate/else_branch/conv"}
    values = projection(graph)
    assert set(values) == set(names)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    conv = lambda v, w: torch.nn.functional.conv2d(torch.from_numpy(v), torch.from_numpy(w), padding=1).numpy()  # noqa: E731
    # onnxruntime refuses two nodes of one name; the ONNX reference runtime runs the file as written
    from onnx.reference import ReferenceEvaluator

    for cond, (a, b) in ((True, (0, 2)), (False, (1, 3))):
        got = ReferenceEvaluator(str(path)).run(None, {"x": x, "cond": np.array(cond)})[0]
        np.testing.assert_allclose(got, conv(conv(x, weights[a]), weights[b]), rtol=1e-4, atol=1e-4)
