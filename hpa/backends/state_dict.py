"""A graph from a bare state_dict, with no model code.

A state_dict holds tensors under dotted module names and nothing else: no
strides, no connectivity, no activations, and (in ``.safetensors``, whose keys
are sorted) not even the module order.  So everything here is decided from the
names alone, the same way whatever the file format, and what was inferred is
recorded (``Layer.inferred``, ``graph.source["inferred_from_names"]``).

* **Layers.**  A float ``*.weight`` with 2 dimensions is a linear layer, with
  3-5 dimensions a conv1d/2d/3d.  It is a transposed conv when the checkpoint's
  stored module classes say ``ConvTranspose``, or its name says ``deconv``,
  ``upconv``, ``convtranspose``, ...; its weight is then ``(in, out/groups, k...)``.
* **Order.**  Module order from the names (:func:`module_order`): natural order
  of the name components, with stems first and heads (``fc``, ``classifier``,
  ...) last, and timm's block layouts in execution order.  A ``.pth``'s own key
  order is not used, so every format gives the same order.
* **BatchNorm.**  A BatchNorm is folded into a layer only when a naming rule
  pairs them with certainty (:func:`pair_batchnorms`) and the channels agree;
  eps is PyTorch's default 1e-5 (a state_dict does not store it; cosines and
  ``n_l`` do not depend on it).  Any other BatchNorm is listed under
  ``skipped`` with the reason and how to give the architecture instead.
* **What is not an affine layer**, by name and shape, is listed under ``skipped``
  (:func:`_not_an_affine_layer`, :func:`_input_vector`): a normalisation layer
  (a leaf name with ``norm``, ``layernorm``, ``groupnorm``, ``instancenorm``,
  ``rmsnorm``, ``ln`` or ``gn`` as a word, ``ln_1``, ``norm2``, ``input_layernorm``,
  whose weight is one value per channel, even when stored 2-D as ``(1, C)``), an
  embedding table (a leaf name with ``embed``, ``embedding``, ``emb``, ``wte``
  or ``wpe`` as a word and a 2-D weight without a bias), and class tokens and
  positional embeddings (``cls_token``, ``pos_embed``, ``class_embedding``, ...).
* Quantized tensors (``torch.ao.nn.quantized``) are dequantized, and the layer records ``quantization``.
* Every other tensor group is listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from hpa.fold import fold_batchnorm
from hpa.graph import ConvGraph, Layer, Skipped

_KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
_TRANSPOSED_KINDS = {3: "conv_transpose1d", 4: "conv_transpose2d", 5: "conv_transpose3d"}
BN_EPS = 1e-5

ARCHITECTURE_HINT = ("give the architecture instead: torchvision:NAME --weights FILE, timm:NAME --weights FILE, "
                     "or hpa.scan(module) in Python")
#: graph.source key: the one-line note the table prints under a graph built from names.
INFERRED_NOTE_KEY = "inferred_from_names"
INFERRED_NOTE = f"structure inferred from tensor names (bare state_dict); {ARCHITECTURE_HINT}"

# A conv's fields that a state_dict never stores, and a linear layer's.
_CONV_INFERRED = ("kind", "stride", "padding", "dilation", "groups", "activation", "predecessors",
                  "bn_folded", "input_shape", "output_shape")
_LINEAR_INFERRED = ("kind", "activation", "predecessors", "bn_folded", "input_shape", "output_shape")

_TRANSPOSED_NAME = re.compile(r"deconv|upconv|up_conv|convtranspose|conv_transpose|transposed_conv", re.I)

# Sibling names in execution order, for the block layouts whose names do not sort that way
# (timm's EfficientNet/MobileNet family).  A layout applies when all its signature names are siblings.
_LAYOUTS: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = (
    (frozenset({"conv_pwl"}), ("conv_pw", "conv_exp", "conv_dw", "se", "conv_pwl")),  # inverted residual
    (frozenset({"conv_dw", "conv_pw"}), ("conv_dw", "se", "conv_pw")),  # depthwise separable
    (frozenset({"conv_reduce", "conv_expand"}), ("conv_reduce", "conv_expand")),  # squeeze-excitation
    (frozenset({"conv_stem"}), ("conv_stem", "blocks", "conv_head", "classifier")),
)
# timm's blocks name their BatchNorms bn1, bn2, ... in the execution order of their convs.
_TIMM_BN_ORDERS = (("conv_stem", "conv_head"), ("conv_pw", "conv_dw", "conv_pwl"), ("conv_exp", "conv_pwl"),
                   ("conv_dw", "conv_pw"), ("conv",))
_STEMS = {"stem": 0, "conv_stem": 0, "patch_embed": 0, "embed": 0}
_HEADS = {"conv_head": 80, "pre_logits": 85, "head": 90, "fc": 90, "classifier": 90, "last_linear": 90,
          "logits": 90}
_DEFAULT_RANK = 50


def graph_from_state_dict(state: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray],
                          fold_bn: bool = True, source: dict[str, Any] | None = None,
                          bn_eps: float = BN_EPS, module_classes: Mapping[str, str] | None = None) -> ConvGraph:
    """The layers of ``state`` (name -> tensor) in module order, BatchNorm folded where certain.

    ``module_classes`` (module name -> class name, when the checkpoint stores them)
    decides transposed convs; without it the kind is inferred from the weight's shape and name.
    """
    groups = _group_by_module(state)
    batchnorms = {p: t for p, t in groups.items() if "running_mean" in t and "running_var" in t}
    layers: dict[str, Layer] = {}
    skipped: list[Skipped] = []
    for prefix in module_order(groups):
        tensors = groups[prefix]
        if prefix in batchnorms:
            continue
        not_affine = _not_an_affine_layer(prefix, tensors)  # a norm or an embedding is never a linear layer
        layer = None if not_affine else _make_layer(prefix, tensors, len(layers), to_numpy, module_classes or {})
        if not_affine:
            skipped.append(Skipped(prefix, not_affine))
        elif layer is None:
            skipped += _skipped_group(prefix, tensors, state)
        else:
            layers[prefix] = layer
    skipped += _fold_batchnorms(layers, batchnorms, fold_bn, bn_eps, to_numpy)
    info = {"connectivity": "unknown (bare state_dict: no model code)",
            INFERRED_NOTE_KEY: INFERRED_NOTE, **(source or {})}
    if batchnorms and fold_bn:
        info["bn_eps"] = bn_eps
    return ConvGraph(list(layers.values()), source=info, skipped=skipped)


# -- layers --------------------------------------------------------------------------------

def _make_layer(prefix: str, tensors: Mapping[str, Any], index: int, to_numpy, module_classes) -> Layer | None:
    weight = tensors.get("weight")
    ndim = len(getattr(weight, "shape", ()))
    quantized = bool(getattr(weight, "is_quantized", False))
    if weight is None or ndim not in _KINDS or not (quantized or _is_float(weight)):
        return None
    kind, kind_was_read = _kind(prefix, ndim, module_classes.get(prefix))
    bias = tensors.get("bias")
    # torch.ao's quantized modules store q, scale and zero point in one tensor: dequantize() is (q - zp) * scale
    values = to_numpy(weight.dequantize() if quantized else weight)
    layer = Layer(name=prefix, index=index, kind=kind, weight=values,
                  bias=None if bias is None else to_numpy(bias), activation=None, groups=None)
    if quantized:
        layer.quantization = _torch_quantization(weight)
    layer.params = {"weight": f"{prefix}.weight"} | ({"bias": f"{prefix}.bias"} if bias is not None else {})
    inferred = _LINEAR_INFERRED if kind == "linear" else _CONV_INFERRED
    layer.inferred = tuple(f for f in inferred if not (f == "kind" and kind_was_read))
    if kind == "linear":
        layer.stride, layer.padding, layer.dilation, layer.groups = (), (), (), 1
    return layer


def _kind(prefix: str, ndim: int, module_class: str | None) -> tuple[str, bool]:
    """(kind, whether it was read from a stored class name rather than inferred)."""
    if module_class:
        transposed = "ConvTranspose" in module_class
        if ndim in _TRANSPOSED_KINDS and (transposed or "Conv" in module_class):
            return (_TRANSPOSED_KINDS if transposed else _KINDS)[ndim], True
    if ndim in _TRANSPOSED_KINDS and _TRANSPOSED_NAME.search(prefix):
        return _TRANSPOSED_KINDS[ndim], False
    return _KINDS[ndim], False


# -- module order --------------------------------------------------------------------------

def module_order(prefixes: Iterable[str]) -> list[str]:
    """Module names in the order the model most likely runs them, from the names alone.

    Component by component: a rank (stems first, heads last, known block layouts
    in execution order), then natural order ("features.2" before "features.10").
    """
    prefixes = list(prefixes)
    children: dict[str, set[str]] = {}
    for prefix in prefixes:
        parts = prefix.split(".")
        for depth in range(len(parts)):
            children.setdefault(".".join(parts[:depth]), set()).add(parts[depth])

    def key(prefix: str) -> list:
        parts = prefix.split(".")
        return [(_rank(part, children[".".join(parts[:d])]), _natural(part)) for d, part in enumerate(parts)]

    return sorted(prefixes, key=key)


def _rank(name: str, siblings: set[str]) -> int:
    for signature, order in _LAYOUTS:
        if signature <= siblings and name in order:
            return 10 + order.index(name)
    return _STEMS.get(name, _HEADS.get(name, _DEFAULT_RANK))


def _natural(name: str) -> list[tuple[int, int, str]]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


# -- BatchNorm pairing ---------------------------------------------------------------------

def pair_batchnorms(layers: Mapping[str, Layer], batchnorms: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({batchnorm: layer} paired with certainty, {batchnorm: why not}).

    Rules, all within one parent module (``a.b.bn1`` pairs only with ``a.b.*``):

    1. sequential siblings: BatchNorm ``P.i+1`` follows layer ``P.i`` (nn.Sequential);
       and ``P.bns.i`` follows ``P.convs.i`` (parallel lists, Res2Net);
    2. matching names: ``P.bnX`` follows ``P.convX`` (``conv1``/``bn1`` in ResNets, ``conv_dw``/``bn_dw``,
       ``conv``/``bn``);
    3. a lone ``P.bn`` follows the only layer of ``P``;
    4. timm's blocks: ``P.bn1, P.bn2, ...`` follow ``P``'s ``conv_*`` layers in execution order
       (``conv_stem, conv_head``; ``conv_pw, conv_dw, conv_pwl``; ``conv_dw, conv_pw``; ``conv``; ...).

    A BatchNorm no rule pairs, one two rules pair differently, two BatchNorms claiming one
    layer, or a channel count that differs from the layer's outputs: not paired.
    """
    by_parent: dict[str, dict[str, str]] = {}
    for prefix in layers:
        parent, _, leaf = prefix.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = prefix
    candidates: dict[str, set[str]] = {}
    for bn in batchnorms:
        parent, _, leaf = bn.rpartition(".")
        candidates[bn] = _candidates(bn, by_parent.get(parent, {}), layers)
    claims: dict[str, list[str]] = {}
    for bn, found in candidates.items():
        for layer in found:
            claims.setdefault(layer, []).append(bn)
    paired, refused = {}, {}
    for bn, found in candidates.items():
        refused_why = _refusal(bn, found, claims, layers, batchnorms)
        if refused_why:
            refused[bn] = refused_why
        else:
            paired[bn] = next(iter(found))
    return paired, refused


def _candidates(bn: str, siblings: Mapping[str, str], layers: Mapping[str, Layer]) -> set[str]:
    parent, _, leaf = bn.rpartition(".")
    found = set()
    if leaf.isdigit() and str(int(leaf) - 1) in siblings:
        found.add(siblings[str(int(leaf) - 1)])
    if leaf.isdigit():
        found.update(_parallel_list(parent, leaf, layers))
    named = re.fullmatch(r"bn(_?\w*)", leaf)
    if named and f"conv{named.group(1)}" in siblings:
        found.add(siblings[f"conv{named.group(1)}"])
    if leaf == "bn" and len(siblings) == 1:
        found.update(siblings.values())
    numbered = re.fullmatch(r"bn(\d+)", leaf)
    if numbered:
        convs = [n for n in siblings if layers[siblings[n]].kind != "linear"]
        for order in _TIMM_BN_ORDERS:
            position = int(numbered.group(1)) - 1
            if set(convs) == set(order) and 0 <= position < len(order):
                found.add(siblings[order[position]])
    return found


def _parallel_list(parent: str, index: str, layers: Mapping[str, Layer]) -> set[str]:
    """``P.bns.i`` follows ``P.convs.i``: parallel lists of convs and their BatchNorms (Res2Net)."""
    grandparent, _, container = parent.rpartition(".")
    named = re.fullmatch(r"bn(s?)(\w*)", container)
    if not named:
        return set()
    conv = ".".join(p for p in (grandparent, f"conv{named.group(1)}{named.group(2)}", index) if p)
    return {conv} if conv in layers else set()


def _refusal(bn: str, found: set[str], claims, layers: Mapping[str, Layer], batchnorms) -> str | None:
    if not found:
        return "BatchNorm that no naming rule pairs with a conv or linear layer it certainly follows"
    if len(found) > 1:
        return f"BatchNorm that could follow several layers ({', '.join(sorted(found))})"
    layer = layers[next(iter(found))]
    if len(claims[layer.name]) > 1:
        return f"BatchNorm that, like {', '.join(b for b in claims[layer.name] if b != bn)}, would follow {layer.name}"
    channels = _channels(batchnorms[bn])
    if channels != layer.out_channels:
        return f"BatchNorm with {channels} channels after {layer.name}, which has {layer.out_channels} outputs"
    return None


def _fold_batchnorms(layers: dict[str, Layer], batchnorms: Mapping[str, Mapping[str, Any]], fold_bn: bool,
                     eps: float, to_numpy) -> list[Skipped]:
    """Fold each certainly-paired BatchNorm; the others become Skipped entries."""
    paired, refused = pair_batchnorms(layers, batchnorms)
    skipped = [Skipped(bn, f"{why}; not folded ({ARCHITECTURE_HINT})") for bn, why in sorted(refused.items())]
    if not fold_bn:
        return skipped + [Skipped(bn, f"BatchNorm after {layer}, not folded (--no-fold-bn)")
                          for bn, layer in sorted(paired.items())]
    for bn, name in paired.items():
        _fold(layers[name], bn, batchnorms[bn], eps, to_numpy)
    return skipped


def _fold(layer: Layer, bn: str, tensors: Mapping[str, Any], eps: float, to_numpy) -> None:
    gamma, beta = tensors.get("weight"), tensors.get("bias")
    layer.weight, layer.bias = fold_batchnorm(
        layer.weight, layer.bias, to_numpy(tensors["running_mean"]), to_numpy(tensors["running_var"]),
        None if gamma is None else to_numpy(gamma), None if beta is None else to_numpy(beta), eps=eps,
        out_axis=1 if layer.transposed else 0)
    layer.bn_folded = True
    layer.params.update({f"bn.{role}": f"{bn}.{role}" for role in ("weight", "bias", "running_mean", "running_var")
                         if role in tensors})
    layer.params["bn.eps"] = float(eps)


# -- helpers -------------------------------------------------------------------------------

def _group_by_module(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix or leaf, {})[leaf] = value
    return groups


def _channels(tensors: Mapping[str, Any]) -> int:
    return int(np.prod(getattr(tensors["running_mean"], "shape", (0,))))


def _is_float(tensor: Any) -> bool:
    dtype = getattr(tensor, "dtype", None)
    return dtype is not None and ("float" in str(dtype) or "bfloat" in str(dtype))


def _torch_quantization(weight: Any) -> dict[str, Any]:
    scheme = str(weight.qscheme())
    return {"format": "torch quantized tensor", "dtype": str(weight.dtype).removeprefix("torch."),
            "per_channel": "per_channel" in scheme}


# -- what is not an affine layer, by name and shape -----------------------------------------------------

#: Words of a leaf module name that say "normalisation layer" (``ln_f``, ``norm1``, ``input_layernorm``).
_NORM_WORDS = frozenset({"norm", "layernorm", "groupnorm", "instancenorm", "rmsnorm", "ln", "gn"})
#: Words that say "embedding table" (``wte``/``wpe``: GPT-2's token and position embeddings).
_EMBEDDING_WORDS = frozenset({"embed", "embeds", "embedding", "embeddings", "emb", "wte", "wpe"})
_POSITION_WORDS = frozenset({"pos", "position", "positional", "absolute"})


def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[_\d]+", name.lower()) if w}


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(tensor, "shape", ()))


def _not_an_affine_layer(prefix: str, tensors: Mapping[str, Any]) -> str | None:
    """Why a ``*.weight`` group is a normalisation layer or an embedding table, by its name and shape; else None.

    A norm's weight is one scale per channel (``(C,)``, or ``(1, C)`` as some exports store it): it
    has at most one dimension above 1.  An embedding's weight is a 2-D table and it has no bias.
    """
    weight = tensors.get("weight")
    if weight is None:
        return None
    words, shape = _words(prefix.rpartition(".")[2]), _shape(weight)
    shapes = ", ".join(f"{k}{_shape(v)}" for k, v in tensors.items())
    if words & _NORM_WORDS and sum(d > 1 for d in shape) <= 1:
        return ("normalisation layer (LayerNorm, GroupNorm, InstanceNorm or RMSNorm, by its name): one scale per "
                f"channel, not an affine layer ({shapes})")
    if words & _EMBEDDING_WORDS and len(shape) == 2 and "bias" not in tensors:
        table = "positional embedding" if words & _POSITION_WORDS else "embedding"
        return f"{table} table without a bias: a lookup by index, not a linear layer of the input ({shapes})"
    return None


def _input_vector(leaf: str, tensor: Any) -> str | None:
    """Why a parameter outside any layer is a class token or a positional embedding, by its name; else None."""
    words, shape = _words(leaf), _shape(tensor)
    if words & {"token", "tokens"} or leaf == "class_embedding":
        return f"class or register token {shape}: a learned vector put beside the input, not a layer"
    if words & _POSITION_WORDS and words & (_EMBEDDING_WORDS | {"bias"}):
        return f"positional embedding {shape}: a learned table added to the input, not a layer"
    return None


def _skipped_group(prefix: str, tensors: Mapping[str, Any], state: Mapping[str, Any]) -> list[Skipped]:
    """The skipped entries of a group that is not a layer: its tokens and positional embeddings one by one
    (named by their full key), then the rest of the group."""
    skipped, rest = [], {}
    for leaf, tensor in tensors.items():
        reason = _input_vector(leaf, tensor)
        key = f"{prefix}.{leaf}" if f"{prefix}.{leaf}" in state else leaf
        if reason:
            skipped.append(Skipped(key, reason))
        else:
            rest[leaf] = tensor
    if rest:
        skipped.append(Skipped(prefix, _why_not_a_layer(rest)))
    return skipped


def _why_not_a_layer(tensors: Mapping[str, Any]) -> str:
    shapes = ", ".join(f"{k}{tuple(getattr(v, 'shape', ()))}" for k, v in tensors.items())
    if "weight" in tensors and len(getattr(tensors["weight"], "shape", ())) == 1:
        return f"1-D weight, a normalisation scale rather than an affine layer ({shapes})"
    return f"not a conv, linear or BatchNorm weight group ({shapes})"
