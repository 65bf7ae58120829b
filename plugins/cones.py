"""The cone statistics (Gamba et al. 2019 §3.3-3.4 and §4; docs/statistics.md §2).

For every pair of stacked 2-D convs ``(l, l+1)`` on the same ``H x W`` plane,
each single-channel kernel ``u = W^{l+1}[i, o]`` is a cone; its predecessors
are the kernels ``v_p = W^l[o, p]``.  Reported per layer pair: the four
nesting states, degenerate cones, and the mean/std of the per-cone means of
the normalised apex distance ``|d|``, the opening offset ``|delta|`` and the
rotation ``rho``.  The maths is in :mod:`hpa.cones`; this module only chooses
the pairs, lists what cannot take part, and presents the results.

Options (``-o key=value``): ``cones_device`` (auto, cpu, cuda),
``cones_memory_mb`` (bound on the temporaries of one chunk, default 512),
``cones_rotation`` (false skips the rotation), and ``input_size`` when the
graph carries no shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hpa import Option, Statistic, StatisticContext, StatisticResult, hookimpl
from hpa.graph import ELEMENTWISE, INPUT, ConvGraph, Layer, Skipped  # ELEMENTWISE: canonical op names

NAME = "cones"
STATES = ("OUT_FULL_IN", "IN_FULL_OUT", "OUT_PARTIAL_IN", "IN_PARTIAL_OUT")  # == hpa.cones.STATES

DEFAULTS = {"cones_device": "auto", "cones_memory_mb": 512.0, "cones_rotation": True}


@hookimpl
def register_statistics(register):
    register(Statistic(
        name=NAME,
        compute=compute,
        description="nesting of the single-channel cones of stacked convs (Gamba et al. 2019): four states, "
                    "apex distance, opening offset, rotation",
        report=report,
        plot=plot,
        tables=tables,
        applies=applies,
        options=OPTIONS,
        plot_series=plot_series,
        estimate=cost,
    ))


def _device(value: str) -> str:
    """auto, cpu, cuda or cuda:N"""
    text = str(value).strip()
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ValueError(value)


def _megabytes(value: Any) -> float:
    """a positive number of MB"""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError(value)
    return number


OPTIONS = (
    Option("cones_device", _device, "auto", "where the cone maths runs: auto, cpu, cuda or cuda:N"),
    Option("cones_memory_mb", _megabytes, 512.0, "bound on the temporaries of one chunk, in MB"),
    Option("cones_rotation", bool, True, "compute the rotation rho (false skips it, which is faster)"),
)


def applies(graph: ConvGraph) -> str | None:
    """None when the graph has at least one eligible pair of stacked 2-D convs."""
    pairs, _ = find_pairs(graph, {})
    return None if pairs else "no two stacked stride-1 2-D convs on the same plane"


# The cost model of estimate(), fitted once to whole default scans (rotation on) on a busy, shared
# 2-core machine: EfficientNet-B0, VGG-16 and ResNet-50 at 64 px took 39 s, 45 s and 36 s, and the
# model gives 40 s, 47 s and 39 s.  An order of magnitude for planning, not a promise.
SECONDS_PER_CONE_PREDECESSOR = 4e-8  # every (cone, predecessor) pair: states, distance, opening
SECONDS_PER_SHIFT_TAP = 3e-10  # and per candidate shift x kernel tap of the rotation
SECONDS_PER_PAIR = 0.02  # setting up one layer pair


def estimate(graph: ConvGraph, options: Mapping[str, Any] | None = None) -> tuple[int, float]:
    """(number of eligible pairs, a rough CPU time in seconds) without computing anything."""
    options = {**DEFAULTS, **dict(options or {})}
    pairs, _ = find_pairs(graph, options)
    rotation = _flag(options.get("cones_rotation", True))
    seconds = sum(pair_seconds(lower, upper, plane if rotation else None) for lower, upper, plane in pairs)
    return len(pairs), seconds


def cost(graph: ConvGraph, options: Mapping[str, Any]) -> tuple[str, float]:
    """Statistic.estimate: the eligible layer pairs and their rough CPU seconds (what 'hpa scan' announces)."""
    pairs, seconds = estimate(graph, options)
    return f"{pairs} layer pairs", seconds


def pair_seconds(lower: Layer, upper: Layer, plane) -> float:
    """Rough CPU seconds of one pair: its (cone, predecessor) pairs, each with the rotation's
    candidate shifts x upper-kernel taps when there is a plane (and rotation is on)."""
    ku, kv = _effective_kernel(upper), _effective_kernel(lower)
    cones_and_predecessors = upper.weight.shape[0] * upper.weight.shape[1] * lower.weight.shape[1]
    per_pair = SECONDS_PER_CONE_PREDECESSOR
    if plane is not None:
        shifts = min((ku[0] + kv[0] - 1) * (ku[1] + kv[1] - 1), plane[0] * plane[1])
        per_pair += ku[0] * ku[1] * shifts * SECONDS_PER_SHIFT_TAP
    return cones_and_predecessors * per_pair + SECONDS_PER_PAIR


# -- which layer pairs -----------------------------------------------------------------------

def find_pairs(graph: ConvGraph, options: Mapping[str, Any] | None = None):
    """Eligible ``(lower, upper, plane)`` triples, and a Skipped entry for everything else.

    ``plane`` is ``(H, W)``, or None when the graph has no shapes and no
    ``input_size`` tells them (then only the states and distances are computed).
    """
    options = options or {}
    pairs: list[tuple[Layer, Layer, tuple[int, int] | None]] = []
    pair_skips: list[Skipped] = []
    upper_reason: dict[str, str] = {}
    for layer in graph:
        lower, reason = _lower_of(graph, layer)
        if reason is None:
            plane, reason = _pair_plane(graph, lower, layer, options)
        if reason is None:
            pairs.append((lower, layer, plane))
            continue
        upper_reason[layer.name] = reason
        if lower is not None and layer.kind == "conv2d":
            pair_skips.append(Skipped(f"{lower.name} -> {layer.name}", reason, NAME))
    taking_part = {layer.name for pair in pairs for layer in pair[:2]}
    layer_skips = [Skipped(layer.name, _why_alone(graph, layer, upper_reason), NAME)
                   for layer in graph if layer.name not in taking_part]
    return pairs, pair_skips + layer_skips


def _lower_of(graph: ConvGraph, layer: Layer) -> tuple[Layer | None, str | None]:
    """The conv whose output ``layer`` reads, or why there is none."""
    if layer.kind != "conv2d":
        return None, f"a {layer.kind} layer: cone pairs are formed between 2-D convs only"
    if not layer.predecessors:
        return None, "its input is unknown (the loader records no connectivity)"
    if len(layer.predecessors) > 1:
        return None, f"it reads {len(layer.predecessors)} tensors ({', '.join(layer.predecessors)}), not one conv"
    (name,) = layer.predecessors
    if name == INPUT:
        return None, "it reads the model input, not another conv"
    if name not in graph:
        return None, f"its input comes from {name}, which is not a layer of the graph"
    lower = graph[name]
    ops = [op for op in layer.via.get(name, ()) if _normal(op) not in ELEMENTWISE]
    if lower.kind != "conv2d":
        return lower, f"its input comes from {name}, a {lower.kind} layer, not a 2-D conv"
    if ops:
        what = ", ".join(dict.fromkeys(ops))
        unfolded = any(_normal(op) in ("batch_norm", "batchnormalization") for op in ops)
        hint = " (scan with BatchNorm folding on)" if unfolded else ""
        return lower, f"{what} between {name} and {layer.name}: not element-wise{hint}"
    return lower, None


def _pair_plane(graph: ConvGraph, lower: Layer, upper: Layer, options) -> tuple[Any, str | None]:
    for layer in (lower, upper):
        if layer.stride is None:
            return None, f"the stride of {layer.name} is unknown (cone pairs need stride 1)"
        if any(s != 1 for s in layer.stride):
            return None, f"{layer.name} has stride {_size(layer.stride)} (cone pairs need stride 1)"
    if upper.groups is None:
        return None, f"the groups of {upper.name} are unknown"
    if upper.in_channels != lower.out_channels:
        return None, f"{upper.name} reads {upper.in_channels} channels but {lower.name} makes {lower.out_channels}"
    low_in, up_in = _plane_in(graph, lower, options), _plane_in(graph, upper, options)
    if up_in is None:
        up_in = _plane_out(lower, low_in)
    if low_in is not None and up_in is not None and low_in != up_in:
        return None, (f"{lower.name} maps a {_size(low_in)} plane to {_size(up_in)} "
                      "(cone pairs need both convs on the same plane)")
    if (low_in is None or up_in is None) and not _preserves_plane(lower):
        return None, (f"the graph does not show that {lower.name} keeps the size of its plane "
                      "(shapes unknown); pass --input-size C,H,W")
    plane = low_in or up_in
    if plane is not None:
        for layer in (lower, upper):
            kernel = _effective_kernel(layer)
            if kernel[0] > plane[0] or kernel[1] > plane[1]:
                return None, f"the {_size(kernel)} kernel of {layer.name} is larger than the {_size(plane)} plane"
    return plane, None


def _plane_in(graph: ConvGraph, layer: Layer, options) -> tuple[int, int] | None:
    if layer.input_shape is not None and len(layer.input_shape) == 3:
        return tuple(int(s) for s in layer.input_shape[1:])
    if layer.predecessors == (INPUT,) and all(_normal(op) in ELEMENTWISE for op in layer.via.get(INPUT, ())):
        size = _input_size(options.get("input_size")) or graph.input_shape or graph.source.get("input_size")
        if size is not None and len(size) == 3:
            return int(size[1]), int(size[2])
    return None


def _input_size(value) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    from hpa.api import parse_input_size

    return parse_input_size(value)


def _plane_out(layer: Layer, plane_in) -> tuple[int, int] | None:
    if layer.output_shape is not None and len(layer.output_shape) == 3:
        return tuple(int(s) for s in layer.output_shape[1:])
    if plane_in is None or layer.padding is None or layer.stride is None:
        return None
    kernel = _effective_kernel(layer)
    return tuple((n + sum(p) - k) // s + 1 for n, p, k, s in zip(plane_in, layer.padding, kernel, layer.stride))


def _preserves_plane(layer: Layer) -> bool:
    return layer.padding is not None and all(sum(p) == k - 1 for p, k in zip(layer.padding, _effective_kernel(layer)))


def _effective_kernel(layer: Layer) -> tuple[int, int]:
    dilation = layer.dilation or (1, 1)
    return tuple((k - 1) * d + 1 for k, d in zip(layer.kernel_size, dilation))


def _why_alone(graph: ConvGraph, layer: Layer, upper_reason: dict[str, str]) -> str:
    if layer.kind != "conv2d":
        return f"a {layer.kind} layer: cone pairs are formed between 2-D convs only"
    reasons = [f"as upper: {upper_reason.get(layer.name, 'not paired')}"]
    readers = [s for s in graph.successors(layer.name) if s.kind == "conv2d"]
    if not readers:
        reasons.append("as lower: no 2-D conv reads its output")
    else:
        reasons += [f"as lower of {s.name}: {upper_reason.get(s.name, 'not paired')}" for s in readers]
    return "in no cone pair; " + "; ".join(reasons)


def _normal(op: str) -> str:
    return op.lower().strip("_")


def _size(values) -> str:
    return "x".join(str(int(v)) for v in values)


# -- computing ----------------------------------------------------------------------------------

def compute(graph: ConvGraph, context: StatisticContext) -> StatisticResult:
    options = {**DEFAULTS, **dict(context.options)}
    pairs, skipped = find_pairs(graph, options)
    result = StatisticResult(skipped=skipped)
    entries = []
    for done, (lower, upper, plane) in enumerate(pairs):
        if context.progress:
            context.progress(NAME, done, len(pairs))
        entry = {"lower": lower.name, "upper": upper.name, **pair_summary(lower, upper, plane, options)}
        init = context.init
        if init is not None and lower.name in init and upper.name in init:
            init_entry = pair_summary(init[lower.name], init[upper.name], plane, options)
            init_entry.pop("bias_rule", None)
            entry["init"] = init_entry
        entries.append(entry)
    if context.progress:
        context.progress(NAME, len(pairs), len(pairs))
    result.extra["pairs"] = entries
    return result


def pair_summary(lower: Layer, upper: Layer, plane, options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON entry of one pair, without its names (docs/statistics.md §2, "What is reported")."""
    from hpa import cones

    low_w = cones.dilate(lower.weight, lower.dilation)
    up_w = cones.dilate(upper.weight, upper.dilation)
    low_b, low_rule = cones.channel_biases(lower.weight, lower.bias, lower.channel_bias)
    up_b, up_rule = cones.channel_biases(upper.weight, upper.bias, upper.channel_bias)
    stats = cones.cone_pair_statistics(
        low_w, low_b, up_w, up_b, upper.groups or 1, plane,
        device=str(options.get("cones_device", "auto")),
        memory_mb=float(options.get("cones_memory_mb", 512)),
        rotation=_flag(options.get("cones_rotation", True)))
    summary = cones.summarize(stats, bins=int(options.get("bins", 40)))
    rule = low_rule if low_rule == up_rule else f"lower {low_rule}, upper {up_rule}"
    return {"n_cones": summary.pop("n_cones"), "degenerate": summary.pop("degenerate"), "bias_rule": rule,
            **summary}


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


# -- presentation ----------------------------------------------------------------------------------

_SHORT = {"OUT_FULL_IN": "OFI", "IN_FULL_OUT": "IFO", "OUT_PARTIAL_IN": "OPI", "IN_PARTIAL_OUT": "IPO"}


def report(result) -> str:
    """The pairs table printed after the layer table: means only, so it fits 100 columns.

    Standard deviations, the per-pair bias rule and everything else are in pairs.csv and the JSON.
    """
    from hpa.render.table import format_table, shorten_middle

    pairs = _pairs(result)
    if not pairs:
        return "cones: no eligible layer pair (see skipped)"
    entries = [entry for pair in pairs for entry in (pair, pair.get("init")) if entry]
    show_degenerate = any(entry["degenerate"] for entry in entries)
    rules = sorted({entry.get("bias_rule", "") for entry in entries} - {""})
    headers = (["lower -> upper", "plane", "cones"] + (["degen"] if show_degenerate else [])
               + [_SHORT[s] for s in STATES] + ["|d|", "|delta|", "rho"] + (["biases"] if len(rules) > 1 else []))
    rows = []
    side = 15 - 4 * show_degenerate - 4 * (len(rules) > 1)  # each name's width, so that a row fits 100 columns
    for entry in pairs:
        label = f"{shorten_middle(entry['lower'], side)} -> {shorten_middle(entry['upper'], side)}"
        rows.append(_row(label, entry, show_degenerate, len(rules) > 1))
        if "init" in entry:
            rows.append(_row("  (init)", entry["init"], show_degenerate, len(rules) > 1))
    legend = ("states: fraction of the non-degenerate cones (OFI OUT_FULL_IN, IFO IN_FULL_OUT, OPI OUT_PARTIAL_IN, "
              "IPO IN_PARTIAL_OUT); |d|, |delta|, rho: mean of the per-cone means (std in pairs.csv)"
              + ("" if show_degenerate else "; no degenerate cones")
              + (f"; biases: {rules[0]}" if len(rules) == 1 else ""))
    table = format_table(headers, rows, right=set(range(1, len(headers) - (len(rules) > 1))))
    return f"cone pairs ({len(pairs)}):\n{table}\n" + "\n".join(_wrap(legend, 100))


def _row(label: str, entry: Mapping[str, Any], degenerate: bool, bias_rule: bool) -> list[str]:
    fractions = entry["fractions"]
    plane = entry.get("plane")
    return ([label, _size(plane) if plane else "?", str(entry["n_cones"])]
            + ([str(entry["degenerate"])] if degenerate else [])
            + [_fmt(fractions.get(s)) for s in STATES]
            + [_fmt((entry.get(k) or {}).get("mean")) for k in ("distance", "opening", "rotation")]
            + ([entry.get("bias_rule", "")] if bias_rule else []))


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def tables(result) -> dict[str, list[dict[str, Any]]]:
    """pairs.csv: one row per layer pair (and its init values when compared)."""
    rows = []
    for entry in _pairs(result):
        row = _flat(entry)
        if "init" in entry:
            row.update({f"init.{k}": v for k, v in _flat(entry["init"]).items()})
        rows.append(row)
    return {"pairs.csv": rows} if rows else {}


def _flat(entry: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("init", "histograms"):
            continue
        if key == "plane":
            row[key] = _size(value) if value else None
        elif isinstance(value, dict):
            row.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            row[key] = value
    return row


def plot(result, directory: Path, fmt: str) -> list[Path]:
    from hpa.render.style import caption
    from hpa_plugins.cones_figures import cone_figures

    return cone_figures(_pairs(result), caption(result), Path(directory), fmt)


def plot_series(series, directory: Path, fmt: str) -> list[Path]:
    from hpa_plugins.cones_figures import cones_series_figures

    return cones_series_figures(series, Path(directory), fmt)


def _pairs(result) -> list[dict[str, Any]]:
    stat = result.statistics.get(NAME)
    return [] if stat is None else stat.extra.get("pairs", [])
