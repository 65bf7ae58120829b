"""The terminal table of ``hpa scan``."""

from __future__ import annotations

from typing import Any


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """Plain aligned columns; numbers (indices in ``right``) are right-aligned."""
    right = right or set()
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]).rstrip()


def render_scan(result) -> str:
    from hpa.plugins import registries

    registry = registries()["statistics"]
    stats = [registry.get(n) for n in result.statistics if n in registry]
    headers = ["#", "layer", "kind", "shape", "F", "act"]
    rows: list[list[str]] = []
    extra_headers: list[str] = []
    cells_per_layer = []
    for layer in result.graph:
        cells: dict[str, str] = {}
        for stat in stats:
            values = result.statistics[stat.name].layers.get(layer.name)
            if values is not None and stat.columns is not None:
                cells.update(stat.columns(values))
        extra_headers += [h for h in cells if h not in extra_headers]
        cells_per_layer.append(cells)
    for layer, cells in zip(result.graph, cells_per_layer):
        shape = "x".join(str(s) for s in layer.weight.shape)
        act = layer.activation if layer.activation is not None else "?"
        if layer.bn_folded:
            act = f"bn+{act}"
        rows.append([str(layer.index), layer.name, layer.kind, shape, str(layer.out_channels), act]
                    + [cells.get(h, "") for h in extra_headers])
    n_fixed = len(headers)
    text = [_title(result), "", format_table(headers + extra_headers, rows,
                                             right={0, 4} | set(range(n_fixed, n_fixed + len(extra_headers))))]
    for stat in stats:
        if stat.report is not None:
            report = stat.report(result)
            if report:
                text += ["", report]
    skipped = result.skipped_dicts()
    if skipped:
        text += ["", f"skipped ({len(skipped)}):"]
        text += [f"  {s['name']}" + (f" [{s['statistic']}]" if s.get("statistic") else "") + f": {s['reason']}"
                 for s in skipped]
    return "\n".join(text)


def _title(result) -> str:
    source: dict[str, Any] = result.graph.source
    parts = [str(source.get("spec", "model"))]
    if source.get("weights"):
        parts.append(f"weights={source['weights']}")
    if result.graph.input_shape:
        parts.append("input=" + "x".join(str(s) for s in result.graph.input_shape))
    parts.append(f"{len(result.graph)} layers")
    if result.init is not None:
        init = result.init.source
        what = init.get("file") or f"weights={init.get('weights')}" + (f", seed={init['seed']}" if "seed" in init else "")
        parts.append(f"compared with init ({what})")
    return " | ".join(parts)
