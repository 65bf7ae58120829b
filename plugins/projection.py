"""The projection statistic (Gamba et al. 2020 §2.3; docs/statistics.md §1).

For filter i with weights w_i of dimension n:

    c_i = sum(w_i) / (||w_i||_2 * sqrt(n))
    n_l = #{i : c_i <= 0} / F'      (F' = filters with ||w_i|| > 0 and finite weights)

All arithmetic is float64.  Exactly-zero filters are "dead": no hyperplane,
excluded from n_l, counted.  Filters holding NaN or Inf are counted, given a
null cosine, excluded from n_l, and reported as a warning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hpa import ConvGraph, Layer, Skipped, Statistic, StatisticContext, StatisticResult, hookimpl

NAME = "projection"
_CHUNK_ELEMENTS = 1 << 18  # weights converted to float64 at a time (2 MB: stays in cache, bounds memory)


@hookimpl
def register_statistics(register):
    register(Statistic(
        name=NAME,
        compute=compute,
        description="cosine of each filter with the all-ones vector; n_l = fraction of negative cosines",
        columns=columns,
        plot=plot,
        tables=tables,
        plot_series=plot_series,
    ))


# -- the maths (numpy only) -----------------------------------------------------------

def filter_matrix(layer: Layer):
    """Each unit's weights as one row: (F, n).  A view when no copy is needed.

    Transposed convs: unit o is W[:, o] of its group (docs/statistics.md §1), exact for
    stride 1 and an approximation for larger strides.
    """
    import numpy as np

    w = layer.weight
    if not layer.transposed:
        return _rows(w)
    groups = layer.groups or 1
    in_ch, per_group = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, in_ch // groups, per_group, -1)
    return np.ascontiguousarray(grouped.transpose(0, 2, 1, 3)).reshape(groups * per_group, -1)


def _rows(w):
    """``w`` as (F, n) without copying when each filter's block is contiguous in any axis order.

    The sum and the norm of a filter do not depend on the order of its
    elements, so the within-filter axes are put in memory order first (a
    column-major MatConvNet array then needs no copy).
    """
    import numpy as np

    inner = sorted(range(1, w.ndim), key=lambda axis: -abs(w.strides[axis]))
    view = np.transpose(w, [0, *inner])
    return view.reshape(w.shape[0], -1)


def cosines(filters) -> dict[str, Any]:
    """Per-row cosine with the all-ones vector, in float64, chunked to bound memory.

    Large layers are split over the machine's cores: numpy releases the GIL in
    the conversion and the reductions.
    """
    import numpy as np

    count, n = filters.shape
    sums = np.empty(count)
    norms = np.empty(count)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))

    def work(start: int) -> None:
        block = np.asarray(filters[start:start + rows], dtype=np.float64)
        sums[start:start + len(block)] = block.sum(axis=1)
        norms[start:start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block))

    starts = range(0, count, rows)
    if len(starts) > 4 and _WORKERS > 1:
        with _pool() as pool:
            list(pool.map(work, starts))
    else:
        for start in starts:
            work(start)
    # A NaN or Inf weight makes its filter's squared norm NaN or Inf (float32 squares cannot overflow).
    finite = np.isfinite(norms) & np.isfinite(sums)
    dead = finite & (norms == 0)
    valid = finite & ~dead
    cos = np.full(count, np.nan)
    cos[valid] = sums[valid] / (norms[valid] * np.sqrt(n))
    return {"cosines": cos, "valid": valid, "dead": dead, "nonfinite": ~finite}


_WORKERS = min(4, os.cpu_count() or 1)


def _pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=_WORKERS)


def summarize(filters, bins: int) -> dict[str, Any]:
    import numpy as np

    found = cosines(filters)
    cos, valid = found["cosines"], found["valid"]
    live = cos[valid]
    counts, edges = np.histogram(live, bins=bins, range=(-1.0, 1.0))
    return {
        "n_l": float(np.mean(live <= 0)) if live.size else None,
        "mean": float(live.mean()) if live.size else None,
        "std": float(live.std()) if live.size else None,
        "n_filters": int(len(cos)),
        "n_dead": int(found["dead"].sum()),
        "n_nonfinite": int(found["nonfinite"].sum()),
        "cosines": [None if np.isnan(c) else float(c) for c in cos],
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def distance_from_init(weight, init_weight) -> dict[str, float | None]:
    """||W - W0||_F / ||W0||_F and max|W - W0| / max|W0| (reference code), in float64."""
    import numpy as np

    w, w0 = weight.reshape(len(weight), -1), init_weight.reshape(len(init_weight), -1)
    rows = max(1, _CHUNK_ELEMENTS // max(w.shape[1], 1))
    diff_sq = init_sq = diff_max = init_max = 0.0
    for start in range(0, len(w), rows):
        a = np.asarray(w[start:start + rows], dtype=np.float64)
        b = np.asarray(w0[start:start + rows], dtype=np.float64)
        diff = a - b
        diff_sq += float(np.einsum("ij,ij->", diff, diff))
        init_sq += float(np.einsum("ij,ij->", b, b))
        diff_max = max(diff_max, float(np.abs(diff).max()))
        init_max = max(init_max, float(np.abs(b).max()))
    return {
        "relative_l2": float(np.sqrt(diff_sq / init_sq)) if init_sq > 0 else None,
        "relative_linf": diff_max / init_max if init_max > 0 else None,
    }


# -- the plugin ---------------------------------------------------------------------------

def compute(graph: ConvGraph, context: StatisticContext) -> StatisticResult:
    options = context.options
    result = StatisticResult()
    eligible = []
    for layer in graph:
        reason = _skip_reason(layer, options)
        if reason:
            result.skipped.append(Skipped(layer.name, reason, NAME))
        else:
            eligible.append(layer)
    for done, layer in enumerate(eligible):
        if context.progress:
            context.progress("projection", done, len(eligible))
        values = summarize(filter_matrix(layer), options.get("bins", 40))
        if context.init is not None and layer.name in context.init:
            init_layer = context.init[layer.name]
            values["init"] = summarize(filter_matrix(init_layer), options.get("bins", 40))
            values["distance_from_init"] = distance_from_init(layer.weight, init_layer.weight)
        _note_nonfinite(layer, values, result)
        result.layers[layer.name] = values
    if context.progress:
        context.progress("projection", len(eligible), len(eligible))
    return result


def _skip_reason(layer: Layer, options: Mapping[str, Any]) -> str | None:
    if layer.kind == "linear" and not options.get("with_linear"):
        return "linear layer; pass --with-linear to include linear layers"
    if fully_connected(layer) and not options.get("with_linear"):
        return ("a fully-connected layer written as a conv (its kernel covers the whole input plane); "
                "pass --with-linear to include linear layers")
    if options.get("skip_1x1") and layer.kind != "linear" and all(k == 1 for k in layer.kernel_size):
        return "1x1 conv skipped by --skip-1x1 (as the reference code did)"
    if layer.weight.size == 0:
        return "layer has no weights"
    return None


def fully_connected(layer: Layer) -> bool:
    """A conv whose kernel covers its whole (padded) input plane, giving one output position.

    It computes exactly what a linear layer does (VGG's fc6-fc8 in MatConvNet files
    and in timm), so it follows the linear-layer rule and a model gives the same
    layers whichever format it comes in.
    """
    if layer.kind not in ("conv1d", "conv2d", "conv3d") or None in (layer.input_shape, layer.output_shape,
                                                                     layer.padding, layer.dilation):
        return False
    planes = zip(layer.kernel_size, layer.input_shape[1:], layer.padding, layer.dilation)
    covers = all((k - 1) * d + 1 == n + begin + end for k, n, (begin, end), d in planes)
    return covers and all(size == 1 for size in layer.output_shape[1:])


def _note_nonfinite(layer: Layer, values: dict[str, Any], result: StatisticResult) -> None:
    bad = values["n_nonfinite"]
    if not bad:
        return
    total = values["n_filters"]
    if bad == total:
        result.damaged.append(f"layer {layer.name}: all {total} filters hold NaN or Inf weights; "
                               "its n_l is undefined (the checkpoint is damaged: re-export or re-download it)")
    else:
        result.damaged.append(f"layer {layer.name}: {bad} of {total} filters hold NaN or Inf weights and are "
                               "excluded from n_l (the checkpoint is damaged: re-export or re-download it)")


# -- presentation ----------------------------------------------------------------------------

def columns(values: Mapping[str, Any]) -> dict[str, str]:
    cells = {"n_l": _fmt(values.get("n_l")), "mean cos": _fmt(values.get("mean"), signed=True)}
    init = values.get("init")
    if init is not None:
        cells["n_l init"] = _fmt(init.get("n_l"))
        cells["rel L2"] = _fmt(values["distance_from_init"].get("relative_l2"))
    if values.get("n_dead"):
        cells["dead"] = str(values["n_dead"])
    if values.get("n_nonfinite"):
        cells["NaN/Inf"] = str(values["n_nonfinite"])
    return cells


def tables(result) -> dict[str, list[dict[str, Any]]]:
    """filters.csv: one row per filter (layer, filter, cosine[, init_cosine])."""
    rows = []
    for name, values in result.statistics[NAME].layers.items():
        init = values.get("init", {}).get("cosines")
        for i, c in enumerate(values["cosines"]):
            row = {"layer": name, "filter": i, "cosine": c}
            if init is not None:
                row["init_cosine"] = init[i]
            rows.append(row)
    return {"filters.csv": rows}


def plot(result, directory: Path, fmt: str) -> list[Path]:
    from hpa_plugins.projection_figures import projection_figures

    return projection_figures(result, Path(directory), fmt)


def plot_series(series, directory: Path, fmt: str) -> list[Path]:
    from hpa_plugins.projection_figures import projection_series_figures

    return projection_series_figures(series, Path(directory), fmt)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
