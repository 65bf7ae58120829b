"""The terminal output of ``hpa scan``: a header line, the layer table, the statistics' reports,
the skipped block and the notes.

Everything fits in :data:`WIDTH` columns where it can: long layer names are shortened
from the middle (the JSON keeps them whole), and columns that would say nothing
(``groups`` when every layer has one group) are left out.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, Iterable
from hpa.graph import CONV_KINDS, TRANSPOSED_KINDS

WIDTH = 100  # columns the table is made to fit
_MIN_NAME = 16  # a layer name is never shortened below this many characters
_ELLIPSIS = "…"


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Plain aligned columns; numbers (indices in ``right``) are right-aligned."""
    right = right or set()
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_scan(result) -> str:
    """The whole terminal report of a finished scan."""
    return "\n".join([render_layers(result), *render_rest(result)])


def render_layers(result) -> str:
    """The header line and the layer table: what can be shown once the column statistics are done."""
    return "\n".join([header_line(result), "", layer_table(result)])


def render_rest(result, reports: Iterable[str] | None = None) -> list[str]:
    """What follows the layer table: each statistic's report, the skipped block and the notes.

    ``reports``: the statistics whose report to print (default: all of them).
    """
    lines: list[str] = []
    for name in (result.statistics if reports is None else reports):
        stat = result.statistic_plugins.get(name)
        if stat is not None and stat.report is not None:
            report = stat.report(result)
            if report:
                lines += ["", report]
    lines += skipped_block(result.skipped_dicts())
    return lines + notes(result)


def layer_table(result) -> str:
    """One row per layer; grouped under a sub-heading per control-flow branch when layers have one.

    When most layers have no result (a ViT: one patch-embedding conv, dozens of linear
    layers), those rows are left out and one line says how many and of which kinds.
    """
    headers, right, rows = table_cells(result)
    layers = list(result.graph)
    empty = [i for i, layer in enumerate(layers) if not _statistic_cells(result, layer.name)]
    hidden = set(empty) if len(empty) > max(10, len(layers) // 2) else set()
    keep = [i for i in range(len(layers)) if i not in hidden]
    table = format_table(headers, [rows[i] for i in keep], right).split("\n")
    out = table[:2]
    branches = [layers[i].branch for i in keep]
    for n, (branch, line) in enumerate(zip(branches, table[2:])):
        if any(branches) and (n == 0 or branch != branches[n - 1]):
            out.append(f"[{branch}]" if branch else "[top level]")
        out.append(line)
    if hidden:
        kinds: dict[str, int] = {}
        for i in sorted(hidden):
            kinds[layers[i].kind] = kinds.get(layers[i].kind, 0) + 1
        what = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        out.append(f"(+{len(hidden)} layers without results, not shown: {what}; see 'not analysed' below)")
    return "\n".join(out)


def table_cells(result, width: int | None = WIDTH) -> tuple[list[str], set[int], list[list[str]]]:
    """Headers, right-aligned column indices and the cell rows of the layer table.

    ``width``: shorten layer names from the middle so that the table fits; None keeps them whole.
    """
    graph = result.graph
    with_groups = any((layer.groups or 1) > 1 for layer in graph)
    fixed = ["#", "layer", "kind", "shape", "F"] + (["groups"] if with_groups else []) + ["act"]
    cells_per_layer = [_statistic_cells(result, layer.name) for layer in graph]
    extra: list[str] = []
    for cells in cells_per_layer:
        extra += [h for h in cells if h not in extra]
    rows = []
    for layer, cells in zip(graph, cells_per_layer):
        act = "?" if layer.activation is None else layer.activation
        row = [str(layer.index), layer.name, layer.kind, "x".join(str(s) for s in layer.weight.shape),
               str(layer.out_channels)]
        if with_groups:
            row.append("?" if layer.groups is None else str(layer.groups))
        rows.append(row + [f"bn+{act}" if layer.bn_folded else act] + [cells.get(h, "") for h in extra])
    headers = fixed + extra
    right = {0, 4} | ({5} if with_groups else set()) | set(range(len(fixed), len(headers)))
    if width is not None:
        _fit_names(headers, rows, column=1, width=width)
    return headers, right, rows


def _statistic_cells(result, layer_name: str) -> dict[str, str]:
    cells: dict[str, str] = {}
    for name, stat_result in result.statistics.items():
        stat = result.statistic_plugins.get(name)
        values = stat_result.layers.get(layer_name)
        if values is not None and stat is not None and stat.columns is not None:
            cells.update(stat.columns(values))
    return cells


def _fit_names(headers: list[str], rows: list[list[str]], column: int, width: int) -> None:
    """Shorten the names in ``column`` from the middle until the table fits ``width`` columns."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    total = sum(widths) + 2 * (len(widths) - 1)
    room = max(_MIN_NAME, widths[column] - (total - width))
    for row in rows:
        row[column] = shorten_middle(row[column], room)


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing its middle with an ellipsis."""
    if len(text) <= width:
        return text
    keep = width - len(_ELLIPSIS)
    head = (keep + 1) // 2
    return text[:head] + _ELLIPSIS + text[len(text) - (keep - head):]


# -- the skipped block ----------------------------------------------------------------------------

def skipped_block(skipped: list[dict[str, Any]], examples: int = 3) -> list[str]:
    """Skipped layers grouped by reason: one line per reason, with a count and a few names.

    Reasons that differ only in their specifics (a parenthesised detail, a size, the
    layers they name, details after a ';' that name layers) form one group; the JSON
    keeps every entry with its full reason.
    """
    if not skipped:
        return []
    names = {entry["name"] for entry in skipped} | {part for entry in skipped
                                                   for part in entry["name"].split(" -> ")}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in skipped:
        key = (entry.get("statistic") or "", _general(entry["reason"], names))
        groups.setdefault(key, []).append(entry)
    grouped = f"{len(groups)} group" + ("s" if len(groups) > 1 else "")
    lines = ["", f"not analysed ({len(skipped)} entries in {grouped}; every entry and its full reason is in "
                 "the JSON):"]
    for (statistic, general), entries in sorted(groups.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(shorten_middle(e["name"], 60) for e in entries[:examples])
        more = f", ... (+{len(entries) - examples})" if len(entries) > examples else ""
        reason = entries[0]["reason"] if len(entries) == 1 else general
        where = f"[{statistic}] " if statistic else ""
        text = f"{len(entries):>4} {where}{reason}: {shown}{more}"
        lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent=" " * 7,
                               break_on_hyphens=False) or [""]
    return lines


_SIZE = re.compile(r"\b\d+(?:x\d+)+\b")  # 2x2, 3x3x3


def _general(reason: str, names: set[str] = frozenset()) -> str:
    """A reason without its specifics, so that alike reasons group together.

    Drops parenthesised parts, writes sizes as N and layer names as <layer>, and
    keeps of the details after the first ';' only advice that names no layer.
    """
    head, _, tail = reason.partition(";")
    if tail and any(name in tail for name in names):
        reason = head + "; details in the JSON"
    while True:
        shorter = re.sub(r"\s*\([^()]*\)", "", reason)
        if shorter == reason:
            break
        reason = shorter
    for name in sorted(names, key=len, reverse=True):
        if name and name in reason:
            reason = re.sub(rf"(?<![\w.]){re.escape(name)}(?![\w.])", "<layer>", reason)
    return " ".join(_SIZE.sub("N", reason).split())


# -- header and notes ---------------------------------------------------------------------------

def header_line(result) -> str:
    """One line: model, weights (and the weight set chosen in a checkpoint), input, statistics."""
    source: dict[str, Any] = result.graph.source
    parts = [str(source.get("spec", "model"))]
    if source.get("weights"):
        parts.append(f"weights={source['weights']}")
    if source.get("checkpoint_key") and len(source.get("checkpoint_keys") or ()) > 1:
        others = [k for k in source["checkpoint_keys"] if k != source["checkpoint_key"]]
        parts.append(f"weight set {source['checkpoint_key']!r} (not {', '.join(map(repr, others))}; "
                     "-o checkpoint_key=KEY picks another)")
    elif source.get("checkpoint_key"):
        parts.append(f"weight set {source['checkpoint_key']!r}")
    shape = result.graph.input_shape or source.get("input_size")
    if shape:
        parts.append("input=" + "x".join(str(s) for s in shape))
    parts.append(f"{len(result.graph)} layers")
    pending = [n for n in getattr(result, "statistic_plugins", {}) if n not in result.statistics]
    ran = list(result.statistics) + [f"{n} (running, report below)" for n in pending]
    parts.append("statistics: " + (", ".join(ran) or "none"))
    for name, reason in getattr(result, "not_run", {}).items():
        parts.append(f"not run: {name} ({reason})")
    if result.init is not None:
        init = result.init.source
        what = init.get("file") or f"weights={init.get('weights')}" + (f", seed={init['seed']}" if "seed" in init else "")
        parts.append(f"compared with init ({what})")
    return " | ".join(parts)


def notes(result) -> list[str]:
    """Footer lines: a structure inferred from tensor names, quantized layers, a mostly non-convolutional model."""
    from hpa.backends.state_dict import INFERRED_NOTE_KEY  # here, not at the top: backends.state_dict imports numpy

    lines = []
    note = result.graph.source.get(INFERRED_NOTE_KEY)
    if note:
        lines.append(f"note: {note}")
    quantized = [layer for layer in result.graph if layer.quantization]
    if quantized:
        formats = ", ".join(sorted({str(layer.quantization.get("format")) for layer in quantized}))
        lines.append(f"note: {len(quantized)} of {len(result.graph)} layers were stored quantized ({formats}); "
                     "they are analysed from their dequantized weights, (q - zero_point) * scale")
    kinds = [layer.kind for layer in result.graph]
    convs = sum(kind in CONV_KINDS + TRANSPOSED_KINDS for kind in kinds)
    if kinds.count("linear") > 2 * max(convs, 1) and not result.options.get("with_linear"):
        lines.append(f"note: {convs} conv and {kinds.count('linear')} linear layers: a mostly non-convolutional "
                     "model; --with-linear analyses the linear ones")
    return [""] + lines if lines else []  # one line each, however long: a note is read whole
