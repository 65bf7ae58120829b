"""A gallery's numbers, from the models' records alone (numpy and scipy; no framework object).

Per model, over its analysed layers in the graph's order (layer i of L sits at relative depth
(i + 0.5) / L, so the first and last layers of every model are equally far from the ends):

- ``n_l`` mean (unweighted over layers), min, max, and the mean within each fifth of the depth;
- ``share_far``: the share of layers with |n_l - 0.5| > 0.2;
- a two-sided exact binomial test (scipy.stats.binomtest) of each layer's count of negative cosines
  (c <= 0, as n_l counts them) among its live filters against p = 0.5.  The layer tests are summarised
  per model after Holm's step-down correction over that model's layers (family-wise error 0.05,
  valid under any dependence between layers): how many layers are significant, how many of those lie
  above 0.5, and the smallest Holm-adjusted p.  At a seeded initialisation the cosines are symmetric
  about 0, so about 5 % of models or fewer should show any significant layer.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

ALPHA = 0.05  # the family-wise error rate of each model's layer tests
FAR = 0.2  # |n_l - 0.5| above this counts as far from one half
DEPTH_BINS = 5  # the fifths of relative depth the table reports
DEPTH_COLUMNS = tuple(f"n_l_depth_{i * 20:02d}_{(i + 1) * 20:02d}" for i in range(DEPTH_BINS))


def layer_counts(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per analysed layer of a result's JSON form (ScanResult.to_dict), in order: name, negatives, live filters."""
    layers = []
    for entry in result["layers"]:
        values = entry.get("statistics", {}).get("projection")
        if not values:
            continue
        live = [c for c in values["cosines"] if c is not None]
        if live:
            layers.append({"name": entry["name"], "negative": sum(1 for c in live if c <= 0), "filters": len(live)})
    return layers


def relative_depths(count: int) -> list[float]:
    return [(i + 0.5) / count for i in range(count)]


def holm(p_values: Iterable[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    import numpy as np

    p = np.asarray(list(p_values), dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def model_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The gallery.csv row of one model's record (hpa.gallery.scan_models)."""
    row = {"loader": record["loader"], "name": record["name"], "weights": record.get("weights"),
           "status": record["status"], "reason": record.get("reason", ""), "layers_analysed": None}
    row.update({key: None for key in ("n_l_mean", "n_l_min", "n_l_max", *DEPTH_COLUMNS, "share_far",
                                      "binom_tested", "binom_significant", "binom_significant_above",
                                      "binom_min_p_holm")})
    row["seconds"] = record.get("seconds")
    if record["status"] == "ok":
        row.update(layer_summary(record["layers"]))
    return row


def layer_summary(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    import numpy as np
    from scipy.stats import binomtest

    if not layers:
        return {"layers_analysed": 0}
    n_l = np.array([layer["negative"] / layer["filters"] for layer in layers])
    depth = np.array(relative_depths(len(layers)))
    bins = np.minimum((depth * DEPTH_BINS).astype(int), DEPTH_BINS - 1)
    p = [binomtest(layer["negative"], layer["filters"], 0.5).pvalue for layer in layers]
    adjusted = np.array(holm(p))
    significant = adjusted <= ALPHA
    out = {"layers_analysed": len(layers), "n_l_mean": float(n_l.mean()), "n_l_min": float(n_l.min()),
           "n_l_max": float(n_l.max()), "share_far": float(np.mean(np.abs(n_l - 0.5) > FAR)),
           "binom_tested": len(layers), "binom_significant": int(significant.sum()),
           "binom_significant_above": int((significant & (n_l > 0.5)).sum()),
           "binom_min_p_holm": float(adjusted.min())}
    for i, column in enumerate(DEPTH_COLUMNS):
        inside = n_l[bins == i]
        out[column] = float(inside.mean()) if inside.size else None
    return out


def coverage(records: list[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """The coverage line ("612 of 629 conv models scanned; 17 failed: 9 not cached, ...") and one line per
    failure reason with its models.  Models without conv layers are no conv models: counted apart."""
    failed: dict[str, list[str]] = {}
    no_conv = []
    scanned = 0
    for record in records:
        if record["status"] == "ok":
            scanned += 1
        elif record.get("category") == NO_CONV:
            no_conv.append(record["name"])
        else:
            failed.setdefault(record.get("category") or "error", []).append(record["name"])
    conv = scanned + sum(map(len, failed.values()))
    line = f"{scanned} of {conv} conv models scanned"
    by_reason = sorted(failed.items(), key=lambda item: (-len(item[1]), item[0]))
    if failed:
        line += f"; {conv - scanned} failed: " + ", ".join(f"{len(names)} {reason}" for reason, names in by_reason)
    if no_conv:
        line += f"; {len(no_conv)} model{'s' if len(no_conv) != 1 else ''} without conv layers left out"
    details = [f"{reason} ({len(names)}): {', '.join(sorted(names))}" for reason, names in by_reason]
    if no_conv:
        details.append(f"{NO_CONV} ({len(no_conv)}): {', '.join(sorted(no_conv))}")
    return line, details


#: The category of a model that loaded but has no conv layer (UnsupportedModelError): not a conv model.
NO_CONV = "no conv layers"


def family(loader: str, name: str) -> str:
    """The family a model's panel groups it in: its loader and the letters its name starts with
    (timm:resnet50.a1_in1k -> "timm resnet", a file convnet_v2.onnx -> "onnx convnet")."""
    import re

    base = name.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0].lower()
    letters = re.match(r"[a-z]+", base)
    return f"{loader} {letters.group(0) if letters else 'other'}"
