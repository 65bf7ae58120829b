"""Turn a ``torch.nn.Module`` into a :class:`~hpa.graph.ConvGraph` by tracing one forward pass.

A ``TorchFunctionMode`` sees every torch function called on data derived from
the dummy input.  Conv and linear calls become layers, read straight from the
call's arguments (so a weight computed on the fly, as in weight-standardised
convs, is the weight that is analysed); every other call becomes an op node.
Predecessors, the ops between layers, BatchNorm folding and the activation
that follows each layer are then read off that dataflow graph.
"""

from __future__ import annotations

import contextlib
import random
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from hpa.dataflow import predecessors
from hpa.errors import LoadError
from hpa.fold import fold_batchnorm
from hpa.graph import ACTIVATIONS, INFERENCE_IDENTITIES, INPUT, ConvGraph, Layer, Skipped, unique_name
from hpa.plugins import module_converters

_LAYER_SIGNATURES = {
    "conv1d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv3d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose1d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "conv_transpose2d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "conv_transpose3d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "linear": ("input", "weight", "bias"),
}
_BATCH_NORM_SIGNATURE = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

# Torch spellings (function names with in-place "_" and dunders stripped, and TorchScript's aten
# names) that differ from hpa.graph's canonical op names; every other op keeps its torch name.
_SPELLINGS = {"feature_dropout": "dropout2d", "clip": "clamp", "_threshold": "threshold"}


def _module_converters() -> dict[type, Callable[..., Layer]]:
    """Module classes traced as a whole: class -> converter(module, name, input, output) -> Layer.

    Every converter comes from a plugin's ``register_module_converters`` hook (hpa's own
    ``ChannelReLUConv2d`` from the built-in ``cifar`` plugin), through the core's registry.
    """
    return module_converters()


@dataclass(eq=False)
class Node:
    """One call in the dataflow graph; shared with the TorchScript reader."""

    id: int
    op: str  # "input", "layer", or a normalized op name
    inputs: list[Node] = field(default_factory=list)
    layer: Layer | None = None
    args: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # arg -> state_dict key, for tensors of the state


class _Tracer(TorchFunctionMode):
    def __init__(self, module_names: dict[int, str], param_names: dict[int, str],
                 real_of: dict[int, torch.Tensor], state_keys: dict[int, str]) -> None:
        super().__init__()
        self.module_names = module_names
        self.param_names = param_names
        self.state_keys = state_keys  # id(tensor as the forward pass sees it) -> its state_dict key
        self.real_of = real_of  # id(meta stand-in) -> the real tensor, in a meta-device trace
        self.nodes: list[Node] = []
        # id(tensor) -> (weak reference, node).  Tensors are not kept alive (that would hold
        # every activation of the forward pass); a dead reference means the id was reused.
        self.node_of: dict[int, tuple[weakref.ref, Node]] = {}
        self.stack: list[torch.nn.Module] = []
        self.opaque_depth = 0
        self.used_names: dict[str, int] = {}
        self.seen_weights: set[int] = set()
        # Module hooks are process-wide: a training loop's forward pass on another thread (the trainer
        # scans snapshots on its writer thread) calls them too, and must not enter this trace.
        self.thread = threading.get_ident()

    # -- bookkeeping -----------------------------------------------------------
    def new_node(self, op: str, inputs: list[Node], **kw: Any) -> Node:
        node = Node(len(self.nodes), op, inputs, **kw)
        self.nodes.append(node)
        return node

    def tag(self, value: Any, node: Node) -> None:
        for tensor in _tensors(value):
            self.node_of[id(tensor)] = (weakref.ref(tensor), node)

    def node_for(self, tensor: torch.Tensor) -> Node | None:
        entry = self.node_of.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def sources(self, args: Any, kwargs: Any) -> list[Node]:
        found = []
        for tensor in _tensors((args, kwargs)):
            node = self.node_for(tensor)
            if node is not None and node not in found:
                found.append(node)
        return found

    def unique_name(self, name: str) -> str:
        return unique_name(name, self.used_names)

    def keys_of(self, values: dict[str, Any]) -> dict[str, str]:
        """arg -> state_dict key, for the tensor args that are tensors of the module's state."""
        return {arg: self.state_keys[id(v)] for arg, v in values.items()
                if isinstance(v, torch.Tensor) and id(v) in self.state_keys}

    # -- module hooks ------------------------------------------------------------
    def elsewhere(self) -> bool:
        """Whether a module call comes from another thread, and so is not part of this trace."""
        return threading.get_ident() != self.thread

    def pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        if self.elsewhere():
            return
        self.stack.append(module)
        if type(module) in _module_converters():
            self.opaque_depth += 1

    def post_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.elsewhere():
            return
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        converter = _module_converters().get(type(module))
        if converter is None:
            return
        self.opaque_depth -= 1
        if self.opaque_depth:
            return
        name = self.unique_name(self.module_names.get(id(module), type(module).__name__))
        layer = converter(module, name, args[0], output)
        self.seen_weights.update(id(p) for p in module.parameters())
        node = self.new_node("layer", self.sources(args, {}), layer=layer)
        self.tag(output, node)

    # -- every torch function ------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque_depth:
            return out
        inputs = self.sources(args, kwargs)
        if not inputs or next(_tensors(out), None) is None:
            return out
        op = _op_name(func)
        if op in _LAYER_SIGNATURES:
            node = self.layer_node(op, args, kwargs, inputs, out)
        else:
            values = _op_args(op, args, kwargs)
            node = self.new_node(op, inputs, args={k: self.real(v) for k, v in values.items()},
                                 names=self.keys_of(values))
        self.tag(out, node)
        return out

    def real(self, value: Any) -> Any:
        """The real tensor behind a meta stand-in; a meta value with no real tensor needs a real trace."""
        if not isinstance(value, torch.Tensor) or value.device.type != "meta":
            return value
        found = self.real_of.get(id(value))
        if found is None:
            raise _NeedsValues()
        return found

    def layer_node(self, kind, args, kwargs, inputs, out) -> Node:
        bound = _bind(_LAYER_SIGNATURES[kind], args, kwargs)
        x, weight = bound["input"], bound["weight"]
        name = self.param_names.get(id(weight))
        params = _layer_params(self.keys_of(bound), bound.get("bias") is not None)
        bound = {k: (self.real(v) if k != "input" else v) for k, v in bound.items()}
        self.seen_weights.add(id(bound["weight"]))
        if name is None:
            owner = self.stack[-1] if self.stack else None
            # The root module's name is "": a call in its own forward is named by its kind.
            name = (self.module_names.get(id(owner)) if owner is not None else None) or kind
        name = self.unique_name(name)
        layer = make_layer(kind, name, bound, tuple(x.shape[1:]), tuple(out.shape[1:]), params)
        data_input = self.node_for(x)
        return self.new_node("layer", [data_input] if data_input else [], layer=layer)


def _layer_params(keys: dict[str, str], has_bias: bool) -> dict[str, object]:
    """``Layer.params`` of a conv call: empty unless its weight and bias are tensors of the state.

    A weight (or bias) computed in the forward pass cannot be re-read from a
    snapshot, so such a layer records nothing and :func:`hpa.rebind.rebind`
    asks for a new trace.
    """
    if "weight" not in keys or (has_bias and "bias" not in keys):
        return {}
    return {role: keys[role] for role in ("weight", "bias") if role in keys}


class _NeedsValues(Exception):
    """A meta-device trace met a weight computed on the fly, or data-dependent code."""


def trace_module(
    model: torch.nn.Module,
    input_size: tuple[int, ...],
    *,
    fold_bn: bool = True,
    source: dict[str, Any] | None = None,
    seed: int = 0,
    copy_weights: bool = True,
) -> ConvGraph:
    """Trace ``model`` on one dummy input of ``input_size`` (no batch dim).

    The pass runs first on PyTorch's meta device, with stand-ins for every
    parameter that map back to the real tensors: it computes nothing and reads
    no weight, so a memory-mapped checkpoint stays unread until a statistic
    needs it.  Models that compute weights on the fly, or branch on values,
    are traced again for real on a seeded random input, made on the model's
    own device and in its dtype.

    ``model`` comes back as it was: every submodule's training flag, every
    random number generator (torch CPU and CUDA, numpy, ``random``), the
    parameters, their gradients and ``requires_grad``.  With ``copy_weights``
    the graph's arrays are the graph's own, so training ``model`` later never
    changes the graph; a loader that built ``model`` itself and drops it
    afterwards may pass ``False`` to keep views of its tensors, so that a
    memory-mapped checkpoint is not held twice.  Each layer's ``params`` names
    the state_dict keys its numbers were read from.
    """
    with _untouched(model):
        tracer = _trace(model, input_size, seed)
    layers = finish_layers(tracer.nodes, fold_bn)
    if copy_weights:
        _own_arrays(layers)
    skipped = _unused_layers(model, tracer.seen_weights) + _weighted_modules_not_analysed(model)
    # A graph with no conv layer is refused by hpa.api, which names what the model holds instead.
    return ConvGraph(layers, source=dict(source or {}), skipped=skipped, input_shape=tuple(input_size))


@contextlib.contextmanager
def _untouched(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode, then restore every flag and random generator.

    The global generators are forked, not reseeded: a training loop that scans
    as it goes must draw the same numbers as one that does not.
    """
    flags = [(module, module.training) for module in model.modules()]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            yield
    finally:
        for module, training in flags:
            module.training = training  # per module: train() would overwrite a mixed tree
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _trace(model: torch.nn.Module, input_size, seed: int) -> _Tracer:
    """The meta-device trace when it suffices, else a real one."""
    if not any(type(m) in _module_converters() for m in model.modules()):
        try:
            return _run(model, input_size, seed, meta=True)
        except _NeedsValues:
            pass
    return _run(model, input_size, seed, meta=False)


def _dummy_placement(tensors) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first floating tensor (CPU float32 if none)."""
    first = next((t for t in tensors if t.is_floating_point()), None)
    return (torch.device("cpu"), torch.float32) if first is None else (first.device, first.dtype)


def _run(model: torch.nn.Module, input_size, seed: int, meta: bool) -> _Tracer:
    module_names = {id(m): n for n, m in model.named_modules()}
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    device, dtype = _dummy_placement(named.values())
    if meta:
        stand_ins = {name: torch.empty_like(t, device="meta") for name, t in named.items()}
        real_of = {id(stand_ins[name]): t for name, t in named.items()}
        x = torch.empty((1, *input_size), device="meta", dtype=dtype)
    else:
        stand_ins, real_of = named, {}
        # Drawn on the CPU from a private generator, so the input is the same on every device.
        x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(seed))
        x = x.to(device=device, dtype=dtype)
    param_names = {id(t): n.rsplit(".", 1)[0] if n.endswith(".weight") else n for n, t in stand_ins.items()}
    in_state = set(model.state_dict(keep_vars=True))  # leaves out non-persistent buffers
    state_keys = {id(t): n for n, t in stand_ins.items() if n in in_state}
    tracer = _Tracer(module_names, param_names, real_of, state_keys)
    tracer.tag(x, tracer.new_node("input", []))
    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(tracer.pre_hook),
        torch.nn.modules.module.register_module_forward_hook(tracer.post_hook),
    ]
    try:
        with torch.no_grad(), tracer:
            if meta:
                torch.func.functional_call(model, stand_ins, (x,), strict=False)
            else:
                model(x)
    except _NeedsValues:
        raise
    except Exception as exc:
        if meta:
            raise _NeedsValues() from exc
        size = "x".join(str(s) for s in input_size)
        raise LoadError(
            f"the forward pass on a dummy {size} input failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); pass --input-size C,H,W matching the model"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return tracer


# -- building layers ---------------------------------------------------------------

def make_layer(kind: str, name: str, bound: dict[str, Any], in_shape, out_shape,
               params: dict[str, object] | None = None) -> Layer:
    """The layer of one conv/linear call; ``params`` names its tensors in the state (see ``Layer.params``)."""
    weight = to_numpy(bound["weight"])
    bias = bound.get("bias")
    params = dict(params or {})
    if kind == "linear":
        return Layer(name=name, index=0, kind=kind, weight=weight,
                     bias=None if bias is None else to_numpy(bias), stride=(), padding=(),
                     dilation=(), groups=1, input_shape=in_shape, output_shape=out_shape, params=params)
    dims = weight.ndim - 2
    transposed = kind.startswith("conv_transpose")
    padding = bound.get("padding", 0)
    dilation = _tuple(bound.get("dilation", 1), dims)
    if isinstance(padding, str):
        padding = _string_padding(padding, weight.shape[2:], dilation)
    else:
        padding = tuple((p, p) for p in _tuple(padding, dims))
    return Layer(
        name=name, index=0, kind=kind, weight=weight,
        bias=None if bias is None else to_numpy(bias),
        stride=_tuple(bound.get("stride", 1), dims), padding=padding, dilation=dilation,
        groups=int(bound.get("groups", 1)),
        output_padding=_tuple(bound.get("output_padding", 0), dims) if transposed else None,
        input_shape=in_shape, output_shape=out_shape, params=params,
    )


def _string_padding(mode: str, kernel, dilation) -> tuple[tuple[int, int], ...]:
    if mode == "valid":
        return tuple((0, 0) for _ in kernel)
    # PyTorch's "same" puts the odd extra pixel at the end.
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple((t // 2, t - t // 2) for t in totals)


def _own_arrays(layers: list[Layer]) -> None:
    """Copy every array of ``layers`` that still lives in a tensor's memory (each at most once)."""
    for layer in layers:
        for field_name in ("weight", "bias", "channel_bias"):
            array = getattr(layer, field_name)
            if array is not None and not _owned_by_numpy(array):
                setattr(layer, field_name, array.copy())


def _owned_by_numpy(array: np.ndarray) -> bool:
    # Folding, casting and dtype conversion already made new arrays; a view of a tensor's
    # memory ends in a base that is not a numpy array.
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.flags.owndata


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy for float32/float64)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.numpy()


# -- reading the dataflow graph ------------------------------------------------------

def finish_layers(nodes: list[Node], fold_bn: bool) -> list[Layer]:
    consumers: dict[int, list[Node]] = {n.id: [] for n in nodes}
    for node in nodes:
        for source in node.inputs:
            consumers[source.id].append(node)
    alias: dict[int, Node] = {}  # op node id -> layer node it stands for (folded BN)
    for node in nodes:
        if node.layer is not None:
            _merge_zero_pad(node, consumers)
    layers = []
    for node in nodes:
        if node.layer is None:
            continue
        layer = node.layer
        layer.index = len(layers)
        layers.append(layer)
        if layer.channel_bias is not None:
            # A channel-wise-ReLU layer rectifies inside, before its channel sum: its converter
            # set the activation, and a BatchNorm after the sum is not part of its units.
            continue
        end = node
        nxt = consumers[node.id]
        if fold_bn and len(nxt) == 1 and _foldable(nxt[0]):
            _fold_into(layer, nxt[0])
            alias[nxt[0].id] = node
            end = nxt[0]
        layer.activation, layer.activation_params = _activation_after(end, consumers, fold_bn)
    for node in nodes:
        if node.layer is not None:
            node.layer.predecessors, node.layer.via = _predecessors(node, alias)
    return layers


def _merge_zero_pad(node: Node, consumers) -> None:
    """Fold a constant-zero F.pad feeding only this conv into its (begin, end) padding pairs."""
    layer = node.layer
    if len(node.inputs) != 1 or layer.transposed or layer.kind == "linear" or layer.padding is None:
        return
    pad_node = node.inputs[0]
    args = pad_node.args
    if (pad_node.op != "pad" or args.get("mode") != "constant" or args.get("value") != 0
            or len(consumers[pad_node.id]) != 1 or min(args["pad"], default=0) < 0):
        return
    dims = len(layer.padding)
    pad = args["pad"]
    if len(pad) > 2 * dims:
        return  # pads channels or batch too: not a conv padding
    pairs = list(layer.padding)
    for k in range(len(pad) // 2):  # F.pad lists the last dimension first
        begin, end = pairs[dims - 1 - k]
        pairs[dims - 1 - k] = (begin + pad[2 * k], end + pad[2 * k + 1])
    layer.padding = tuple(pairs)
    layer.input_shape = args["input_shape"]
    node.inputs = list(pad_node.inputs)
    consumers[pad_node.id] = []


def _foldable(node: Node) -> bool:
    args = node.args
    return (node.op == "batch_norm" and len(node.inputs) == 1 and not args.get("training")
            and args.get("running_mean") is not None and args.get("running_var") is not None)


def _fold_into(layer: Layer, bn: Node) -> None:
    a = {k: to_numpy(v) if isinstance(v, torch.Tensor) else v for k, v in bn.args.items()}
    out_axis = 1 if layer.transposed else 0
    layer.weight, layer.bias = fold_batchnorm(
        layer.weight, layer.bias, a["running_mean"], a["running_var"], a.get("weight"), a.get("bias"),
        eps=float(a.get("eps", 1e-5)), out_axis=out_axis, groups=layer.groups or 1)
    layer.bn_folded = True
    layer.params = _folded_params(layer.params, bn)


#: BatchNorm argument -> its role in ``Layer.params``.
_BN_ROLES = {"weight": "bn.weight", "bias": "bn.bias", "running_mean": "bn.running_mean",
             "running_var": "bn.running_var"}


def _folded_params(params: dict[str, object], bn: Node) -> dict[str, object]:
    """``params`` plus the folded BatchNorm's keys; empty when one of its tensors is not in the state."""
    tensors = [arg for arg in _BN_ROLES if isinstance(bn.args.get(arg), torch.Tensor)]
    if not params or any(arg not in bn.names for arg in tensors):
        return {}
    folded = dict(params, **{_BN_ROLES[arg]: bn.names[arg] for arg in tensors})
    folded["bn.eps"] = float(bn.args.get("eps", 1e-5))
    return folded


def _activation_after(node: Node, consumers, fold_bn: bool) -> tuple[str, dict[str, float]]:
    passable = INFERENCE_IDENTITIES | ({"batch_norm"} if not fold_bn else set())
    while True:
        nxt = consumers[node.id]
        if len(nxt) != 1:
            return "none", {}
        node = nxt[0]
        name = _SPELLINGS.get(node.op, node.op)
        if name == "clamp":  # an activation only where it is a ReLU or ReLU6
            lo, hi = node.args.get("min"), node.args.get("max")
            if lo == 0 and hi is None:
                return "relu", {}
            if lo == 0 and hi == 6:
                return "relu6", {}
            return "none", {}
        if name in ACTIVATIONS:
            return _activation_name(name, node)
        if name not in passable:
            return "none", {}


def _activation_name(name: str, node: Node) -> tuple[str, dict[str, float]]:
    args = node.args
    if name == "hardtanh":
        if args.get("min_val", -1.0) == 0 and args.get("max_val", 1.0) == 6:
            return "relu6", {}
        return "hardtanh", {k: float(v) for k, v in args.items() if isinstance(v, (int, float))}
    if name == "leaky_relu":
        return name, {"negative_slope": float(args.get("negative_slope", 0.01))}
    return name, {}


def _predecessors(node: Node, alias) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    def endpoint(current: Node) -> str | None:
        target = alias.get(current.id, current)
        if target.layer is not None:
            return target.layer.name
        return INPUT if target.op == "input" else None

    def op(current: Node) -> str | None:
        return None if _SPELLINGS.get(current.op, current.op) in INFERENCE_IDENTITIES else current.op

    return predecessors(node.inputs, endpoint, lambda n: n.inputs, op, key=lambda n: n.id)


def _unused_layers(model: torch.nn.Module, seen: set[int]) -> list[Skipped]:
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    skipped = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and weight is not None and id(weight) not in seen:
            skipped.append(Skipped(name, f"{type(module).__name__} not called in the forward pass "
                                         "(unused in eval mode, or called inside a fused op)"))
    return skipped


def _weighted_modules_not_analysed(model: torch.nn.Module) -> list[Skipped]:
    """Modules with weights that are not affine layers of their input: recurrent layers and lookup tables."""
    skipped = []
    for name, module in model.named_modules():
        label, cls = name or type(module).__name__, type(module).__name__
        if isinstance(module, torch.nn.RNNBase):
            skipped.append(Skipped(label, f"{cls}: recurrent layer, not analysed"))
        elif isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            skipped.append(Skipped(label, f"{cls}: a lookup table, not a linear layer of its input; not analysed"))
    return skipped


# -- small helpers ---------------------------------------------------------------------

def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("i", "r")) and name[1:] in ("add", "sub", "mul", "truediv", "matmul"):
            name = name[1:]
    return name.rstrip("_") or name


def _op_args(op: str, args, kwargs) -> dict[str, Any]:
    if op == "batch_norm":
        bound = _bind(_BATCH_NORM_SIGNATURE, args, kwargs)
        bound.pop("input", None)
        return bound
    if op == "pad":
        bound = _bind(("input", "pad", "mode", "value"), args, kwargs)
        return {"pad": tuple(int(p) for p in bound.get("pad", ())), "mode": bound.get("mode", "constant"),
                "value": bound.get("value") or 0.0, "input_shape": tuple(bound["input"].shape[1:])}
    params = {"hardtanh": ("input", "min_val", "max_val"), "leaky_relu": ("input", "negative_slope"),
              "clamp": ("input", "min", "max"), "clip": ("input", "min", "max")}.get(op)
    if params is None:
        return {}
    bound = _bind(params, args, kwargs)
    bound.pop("input", None)
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in bound.items()}


def _bind(names: tuple[str, ...], args, kwargs) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound


def _tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        values = tuple(int(v) for v in value)
        return values * dims if len(values) == 1 and dims > 1 else values
    return (int(value),) * dims


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)

