"""The normalized conv-layer graph: the one data type between loaders and statistics.

Every loader, whatever framework it reads, produces a :class:`ConvGraph`.  Every
statistic and experiment reads only this type, never a framework object, so
adding a backend never touches a statistic and vice versa.

Conventions (all loaders follow them):

* ``weight`` is a numpy array shaped ``(out, in/groups, *kernel)`` for convs,
  ``(out, in)`` for linear layers, and ``(in, out/groups, *kernel)`` for
  transposed convs, exactly as PyTorch stores them.
* ``padding`` is one ``(begin, end)`` pair per spatial dimension, so asymmetric
  padding (TensorFlow "SAME", MatConvNet ``[top bottom left right]``) is exact.
* Shapes exclude the batch dimension: ``(C, H, W)`` for a 2-D conv.
* Attributes a source cannot know (a bare state_dict has no strides) are
  ``None``; nothing is guessed.
* ``predecessors`` names the layers whose outputs reach this layer's input,
  traced through element-wise ops, pooling, concatenation and additions; the
  pseudo-layer ``"input"`` stands for the model's input.  ``via`` lists, per
  predecessor, the operations passed on the way (``"max_pool2d"``, ``"add"``,
  ``"relu"``, ...), which is what decides whether two layers are "stacked".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    import numpy as np

CONV_KINDS = ("conv1d", "conv2d", "conv3d")
TRANSPOSED_KINDS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
LAYER_KINDS = CONV_KINDS + TRANSPOSED_KINDS + ("linear",)

#: The pseudo-layer name used as predecessor of layers fed by the model input.
INPUT = "input"

# -- canonical operation names ---------------------------------------------------------------
# Every backend maps its own spelling (torch function, ONNX op type, MatConvNet block type) to
# these names before it writes ``Layer.activation`` or ``Layer.via``, so statistics test
# membership here and nowhere else.

#: Activation functions, as ``Layer.activation`` names them.
ACTIVATIONS = frozenset({
    "relu", "leaky_relu", "prelu", "relu6", "silu", "gelu", "hardswish", "sigmoid", "tanh", "elu",
    "selu", "celu", "mish", "softplus", "hardsigmoid", "hardtanh", "rrelu", "softsign",
    "logsigmoid", "threshold", "clamp",
})  # not glu: it halves an axis (the width, by default), so it is not element-wise
#: Operations that pass a tensor on unchanged at inference time.
INFERENCE_IDENTITIES = frozenset({
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "identity", "contiguous", "clone", "detach", "to", "float", "type_as", "cast",
})
#: Operations that act element by element (a plane keeps its size and pixel positions).
ELEMENTWISE = ACTIVATIONS | INFERENCE_IDENTITIES

#: Field names a loader may list in ``Layer.inferred``.
INFERABLE_FIELDS = ("kind", "stride", "padding", "dilation", "groups", "activation", "predecessors",
                    "bn_folded", "input_shape", "output_shape")


def unique_name(name: str, used: dict[str, int]) -> str:
    """``name``, or ``name#2``, ``name#3``, ... when ``used`` has seen it; updates ``used``.

    Every name handed out is recorded in ``used`` too, so a source name that
    itself ends in ``#2`` never collides with a generated one.
    """
    count = used.get(name, 0) + 1
    candidate = name if count == 1 else f"{name}#{count}"
    while candidate in used:
        count += 1
        candidate = f"{name}#{count}"
    used[name] = count
    used.setdefault(candidate, 1)
    return candidate


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: tuple[int, int] = (0, 0),
                     dilation: int = 1) -> int:
    """Output length of a conv along one axis: floor((m + p0 + p1 - d*(k-1) - 1) / s) + 1."""
    return (size + padding[0] + padding[1] - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(eq=False)
class Layer:
    """One affine layer (conv, transposed conv or linear) and what follows it."""

    name: str  # the framework's own, stable name ("features.0", "conv1")
    index: int  # position in execution (or file) order, from 0
    kind: str  # one of LAYER_KINDS
    weight: np.ndarray  # (out, in/groups, *kernel); transposed: (in, out/groups, *kernel)
    bias: np.ndarray | None = None  # (out,), after BatchNorm folding
    stride: tuple[int, ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None  # (begin, end) per spatial dim
    dilation: tuple[int, ...] | None = None
    groups: int | None = 1
    output_padding: tuple[int, ...] | None = None  # transposed convs only
    activation: str | None = "none"  # what follows: relu, leaky_relu, ..., none; None = unknown
    activation_params: dict[str, float] = field(default_factory=dict)  # e.g. negative_slope
    bn_folded: bool = False
    input_shape: tuple[int, ...] | None = None  # without batch dim
    output_shape: tuple[int, ...] | None = None
    predecessors: tuple[str, ...] = ()
    via: dict[str, tuple[str, ...]] = field(default_factory=dict)  # ops passed per predecessor
    channel_bias: np.ndarray | None = None  # (out, in/groups): one bias per kernel (000 eq. 4)
    # Fields (names from INFERABLE_FIELDS) that the loader inferred rather than read from the
    # source, e.g. ("kind", "activation") for a bare state_dict.  Empty: everything was read.
    inferred: tuple[str, ...] = ()
    # Where the numbers come from: role -> tensor name in the source's state
    # ("weight", "bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"), plus
    # "bn.eps" as a float when a BatchNorm was folded.  Empty when the weight is computed.
    params: dict[str, object] = field(default_factory=dict)
    # The control-flow branch that holds the layer ("If_0/then_branch"), None at top level.
    branch: str | None = None
    # How the source stored the weights when they were quantized, e.g. {"format": "QLinearConv",
    # "dtype": "int8", "per_channel": True}: ``weight`` and ``bias`` are then the dequantized values,
    # (q - zero_point) * scale.  Empty: the source held floats.
    quantization: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.weight.shape))
        return f"<Layer {self.index} {self.name!r} {self.kind} {shape} act={self.activation}>"

    @property
    def transposed(self) -> bool:
        return self.kind in TRANSPOSED_KINDS

    @property
    def spatial_dims(self) -> int:
        return 0 if self.kind == "linear" else self.weight.ndim - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        if self.transposed:
            return int(self.weight.shape[1]) * int(self.groups or 1)
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int | None:
        if self.transposed:
            return int(self.weight.shape[0])
        if self.groups is None:
            return None
        return int(self.weight.shape[1]) * int(self.groups)

    @classmethod
    def from_attributes(cls, entry: Mapping[str, Any]) -> "Layer":
        """The inverse of :meth:`attributes`: every attribute, and NaN placeholder weights.

        The weights take no memory (a broadcast NaN of the shape the attributes imply, 1 where
        they do not tell); :func:`hpa.rebind` fills in real ones, and a statistic run on the
        placeholders reports them as non-finite rather than computing a silent number.
        """
        import numpy as np

        shape = _weight_shape(entry)
        channel_bias = np.broadcast_to(np.float32(np.nan), shape[:2]) if entry.get("channel_bias") else None
        return cls(
            name=entry["name"], index=entry["index"], kind=entry["kind"],
            weight=np.broadcast_to(np.float32(np.nan), shape), stride=_tuple(entry.get("stride")),
            padding=None if entry.get("padding") is None else tuple(tuple(p) for p in entry["padding"]),
            dilation=_tuple(entry.get("dilation")), groups=entry.get("groups"),
            output_padding=_tuple(entry.get("output_padding")), activation=entry.get("activation"),
            activation_params=dict(entry.get("activation_params") or {}),
            bn_folded=bool(entry.get("bn_folded")), input_shape=_tuple(entry.get("input_shape")),
            output_shape=_tuple(entry.get("output_shape")), predecessors=tuple(entry.get("predecessors", ())),
            via={k: tuple(v) for k, v in (entry.get("via") or {}).items()}, channel_bias=channel_bias,
            inferred=tuple(entry.get("inferred", ())), params=dict(entry.get("params") or {}),
            branch=entry.get("branch"), quantization=dict(entry.get("quantization") or {}))

    def attributes(self) -> dict[str, Any]:
        """The layer's description as JSON-ready values (no weights)."""
        return {
            "index": int(self.index),
            "name": self.name,
            "kind": self.kind,
            "out_channels": self.out_channels,
            "in_channels": self.in_channels,
            "kernel_size": list(self.kernel_size),
            "stride": _list(self.stride),
            "padding": None if self.padding is None else [_list(p) for p in self.padding],
            "dilation": _list(self.dilation),
            "groups": None if self.groups is None else int(self.groups),
            "output_padding": _list(self.output_padding) if self.transposed else None,
            "activation": self.activation,
            "activation_params": {k: float(v) for k, v in self.activation_params.items()},  # e.g. negative_slope
            "bn_folded": bool(self.bn_folded),
            "input_shape": _list(self.input_shape),
            "output_shape": _list(self.output_shape),
            "predecessors": list(self.predecessors),
            "via": {k: list(v) for k, v in self.via.items()},
            "channel_bias": self.channel_bias is not None,
            "inferred": list(self.inferred),
            "params": {k: v.item() if hasattr(v, "item") else v for k, v in self.params.items()},  # numpy eps
            "branch": self.branch,
            "quantization": dict(self.quantization),
        }


@dataclass(frozen=True)
class Skipped:
    """Something that is not analysed, and why.  Nothing is dropped silently."""

    name: str
    reason: str
    statistic: str | None = None  # None: the loader skipped it for every statistic

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "reason": self.reason}
        if self.statistic:
            out["statistic"] = self.statistic
        return out


@dataclass(eq=False)
class ConvGraph:
    """The layers of one model, in execution order, plus what the loader skipped."""

    layers: list[Layer]
    source: dict[str, Any] = field(default_factory=dict)  # spec, loader, weights, input_size, ...
    skipped: list[Skipped] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None  # model input without batch dim, when known

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}
        if len(self._by_name) != len(self.layers):
            raise ValueError("layer names in a ConvGraph must be unique")

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def successors(self, name: str) -> list[Layer]:
        return [layer for layer in self.layers if name in layer.predecessors]

    def summary(self) -> Mapping[str, int]:
        kinds: dict[str, int] = {}
        for layer in self.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        return kinds

    def __repr__(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in self.summary().items()) or "no layers"
        head = [str(self.source.get("spec") or "")]
        head += [] if self.input_shape is None else ["input=" + "x".join(map(str, self.input_shape))]
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"<ConvGraph {' '.join(filter(None, head))}".rstrip() + f": {kinds}{skipped}>"

    def _repr_html_(self) -> str:
        """A table for notebooks: one row per layer, no weights."""
        from html import escape

        head = "".join(f"<th>{h}</th>" for h in ("#", "layer", "kind", "weight", "stride", "groups", "act",
                                                  "bn folded"))
        rows = []
        for layer in self.layers:
            cells = (layer.index, layer.name, layer.kind, "×".join(map(str, layer.weight.shape)),
                     "?" if layer.stride is None else "×".join(map(str, layer.stride)) or "-",
                     "?" if layer.groups is None else layer.groups,
                     "?" if layer.activation is None else layer.activation, "yes" if layer.bn_folded else "")
            rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
        caption = escape(repr(self))
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{''.join(rows)}</table>"


def _list(value: tuple | None) -> list | None:
    return None if value is None else [int(v) for v in value]


def _weight_shape(entry: Mapping[str, Any]) -> tuple[int, ...]:
    """The weight shape a layer's JSON attributes imply (this module's conventions); 1 where they do not tell."""
    out, into, groups = entry["out_channels"], entry.get("in_channels"), entry.get("groups") or 1
    kernel = tuple(entry.get("kernel_size") or ())
    if entry["kind"] == "linear":
        return (out, into or 1)
    if entry["kind"] in TRANSPOSED_KINDS:
        return (into or 1, out // groups, *kernel)
    return (out, (into // groups) if into and entry.get("groups") else 1, *kernel)


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)
