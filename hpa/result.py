"""ScanResult: one scan's findings, and every way out of it (dict/JSON, CSV, pandas, figures).

A result read back from ``result.json`` (:func:`read_result`, :meth:`ScanResult.from_dict`)
is a full ScanResult except that its layers carry no weights, so it can be
tabled and redrawn but not recomputed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from hpa import __version__
from hpa.errors import HpaWarning, LoadError, OptionError, suggest
from hpa.graph import ConvGraph, Layer, Skipped
from hpa.registry import Statistic, StatisticResult
from hpa.render import style
from hpa.render.style import select
from hpa.render.table import header_line, table_cells

SCHEMA_VERSION = 1
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")  # what ``hpa plot`` replaces in a result folder


@dataclass
class ScanResult:
    graph: ConvGraph
    statistics: dict[str, StatisticResult]
    options: dict[str, Any] = field(default_factory=dict)
    init: ConvGraph | None = None
    not_run: dict[str, str] = field(default_factory=dict)  # statistics left out by default, and why
    # The Statistic plugins that computed ``statistics`` (name -> Statistic): their columns,
    # tables and figures render this result, whatever the plugin registry holds later.
    # hpa.scan and hpa.api.read_result fill it; a statistic missing here is not rendered.
    statistic_plugins: dict[str, Statistic] = field(default_factory=dict)

    # -- the JSON schema (documented in README.md) ---------------------------------
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.graph:
            entry = layer.attributes()
            entry["statistics"] = {name: result.layers[layer.name]
                                   for name, result in self.statistics.items() if layer.name in result.layers}
            layers.append(entry)
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "hpa_version": __version__,
            "model": _jsonable(self.graph.source) | {"n_layers": len(self.graph)},
            "init": None if self.init is None else _jsonable(self.init.source),
            "options": _jsonable(self.options),
            "statistics": sorted(self.statistics),
            "statistics_not_run": dict(self.not_run),
            "layers": layers,
            "skipped": self.skipped_dicts(),
        }
        # Which statistic wrote which top-level key, in the order the statistics ran (for from_dict).
        owners: dict[str, list[str]] = {name: [] for name in self.statistics}
        for name, result in self.statistics.items():
            for key, value in result.extra.items():
                if key in out and not (key in _extra_keys(owners) and out[key] is value):
                    raise ValueError(f"statistic extra key {key!r} collides with the result schema")
                out[key] = value
                owners[name].append(key)
        out["statistic_extra_keys"] = owners
        return _finite(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], statistics: Iterable[Statistic] = ()) -> "ScanResult":
        """The result ``to_dict`` described; its layers carry no weights (NaN placeholders).

        ``statistics``: the Statistic plugins to render it with (:func:`hpa.api.read_result`
        adds the installed ones).  Raises LoadError when ``data`` is not an hpa result.
        """
        _check_schema(data)
        graph = ConvGraph([Layer.from_attributes(entry) for entry in data["layers"]], source=_source(data["model"]))
        results = {name: StatisticResult() for name in _statistics_order(data)}
        for entry in data["layers"]:
            for name, values in entry.get("statistics", {}).items():
                results.setdefault(name, StatisticResult()).layers[entry["name"]] = values
        _restore_skipped(data.get("skipped", []), graph, results)
        _restore_extra(data, results)
        init = None if data.get("init") is None else ConvGraph([], source=dict(data["init"]))
        return cls(graph=graph, statistics=results, options=dict(data.get("options") or {}), init=init,
                   not_run=dict(data.get("statistics_not_run") or {}),
                   statistic_plugins={s.name: s for s in statistics})

    @classmethod
    def from_json(cls, text: str, statistics: Iterable[Statistic] = ()) -> "ScanResult":
        """:meth:`from_dict` of a JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoadError(f"the result is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            "give the result.json that hpa scan --out or --json wrote") from None
        return cls.from_dict(data, statistics)

    def skipped_dicts(self) -> list[dict[str, Any]]:
        entries = [s.to_dict() for s in self.graph.skipped]
        for name, result in self.statistics.items():
            entries += [dict(s.to_dict(), statistic=s.statistic or name) for s in result.skipped]
        return entries

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @property
    def damaged(self) -> list[str]:
        """One line per layer with NaN or Inf weights, from every statistic."""
        return list(dict.fromkeys(w for result in self.statistics.values() for w in result.damaged))

    # -- tables ------------------------------------------------------------------------
    def layer_rows(self) -> list[dict[str, Any]]:
        """One flat row per layer: attributes plus every scalar statistic value."""
        return layer_rows(self.to_dict())

    def to_csv(self, path: str | os.PathLike) -> Path:
        rows = self.layer_rows()
        write_csv(path, rows)
        return Path(path)

    def extra_tables(self) -> dict[str, list[dict[str, Any]]]:
        tables: dict[str, list[dict[str, Any]]] = {}
        for name in self.statistics:
            stat = self.statistic_plugins.get(name)
            if stat is not None and stat.tables is not None:
                tables.update(stat.tables(self))
        return tables

    def to_pandas(self):
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from None
        return pandas.DataFrame(self.layer_rows())

    # -- figures -----------------------------------------------------------------------
    def plot(self, directory: str | os.PathLike, format: str = "png", *, dpi: float | None = None,
             hist_range: float | None = None, layers: str | None = None) -> list[Path]:
        """Write every statistic's figures into ``directory``; returns the files.

        ``dpi`` overrides ``savefig.dpi`` (the user's matplotlibrc, else the house
        dpi); ``hist_range`` fixes the half-width of cosine histograms; ``layers``
        (comma-separated fnmatch patterns) chooses the layers drawn.  A statistic
        without a renderer is named in a warning, not dropped silently.
        """
        options = style.FigureOptions(format=format, dpi=dpi, hist_range=hist_range, layers=layers)
        self._check_layer_pattern(layers)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        unrendered = []
        with style.drawing(options):
            for name in self.statistics:
                stat = self.statistic_plugins.get(name)
                if stat is None or stat.plot is None:
                    unrendered.append(name)
                    continue
                written += stat.plot(self, directory, format)
        _warn_unrendered([n for n in unrendered if self.statistic_plugins.get(n) is None])
        return written

    def _check_layer_pattern(self, pattern: str | None) -> None:
        names = [layer.name for layer in self.graph]
        if pattern and not select(names, pattern):
            raise OptionError(f"--layers {pattern!r} matches no layer of {len(names)}{suggest(pattern, names)}; "
                              f"layer names look like {', '.join(names[:3])}")

    def write(self, directory: str | os.PathLike, format: str = "png", **figure_options: Any) -> list[Path]:
        """result.json, layers.csv, the statistics' CSVs and figures, into ``directory``.

        ``figure_options``: ``dpi``, ``hist_range``, ``layers``, as for :meth:`plot`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "result.json").write_text(self.to_json() + "\n")
        files = [directory / "result.json", self.to_csv(directory / "layers.csv")]
        for filename, rows in self.extra_tables().items():
            write_csv(directory / filename, rows)
            files.append(directory / filename)
        return files + self.plot(directory, format, **figure_options)

    # -- notebooks -----------------------------------------------------------------------
    def __repr__(self) -> str:
        """One line: the model, the statistics and what was not analysed (never weights or arrays)."""
        spec = self.graph.source.get("spec", "model")
        stats = ", ".join(self.statistics) or "none"
        not_run = f", not run: {', '.join(self.not_run)}" if self.not_run else ""
        init = ", compared with init" if self.init is not None else ""
        skipped = len(self.skipped_dicts())
        return (f"<ScanResult {spec}: {len(self.graph)} layers, statistics: {stats}{not_run}{init}, "
                f"{skipped} not analysed>")

    def _repr_html_(self) -> str:
        """The terminal's layer table as an HTML table, under the header line."""
        from html import escape

        headers, _, rows = table_cells(self, width=None)
        head = "".join(f"<th>{escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><caption>{escape(header_line(self))}</caption><tr>{head}</tr>{body}</table>"


# -- reading a result back --------------------------------------------------------------------

def _warn_unrendered(names: list[str]) -> None:
    if names:
        warnings.warn(f"no figures for {', '.join(names)}: the plugin that computed it is not installed; "
                      "install it, or pass its Statistic to read_result", HpaWarning, stacklevel=3)


def _check_schema(data: Any) -> None:
    if not isinstance(data, Mapping) or "layers" not in data or "schema_version" not in data:
        raise LoadError("this JSON is not an hpa result (no schema_version or layers); "
                        "give the result.json that hpa scan --out or --json wrote")
    if not isinstance(data["schema_version"], int) or data["schema_version"] > SCHEMA_VERSION:
        raise LoadError(f"the result has schema_version {data['schema_version']!r}, newer than this hpa "
                        f"reads ({SCHEMA_VERSION}); upgrade hpa")


def _statistics_order(data: Mapping[str, Any]) -> list[str]:
    """The statistics in the order they ran (older results: as the layers list them, then by name)."""
    order = list(data.get("statistic_extra_keys") or {})
    for entry in data["layers"]:
        order += [name for name in entry.get("statistics", {}) if name not in order]
    return order + sorted(set(data.get("statistics", [])) - set(order))


def _source(model: Mapping[str, Any]) -> dict[str, Any]:
    source = dict(model)
    source.pop("n_layers", None)  # to_dict adds it; it is not part of the source
    return source


def _restore_skipped(entries: list[Mapping[str, Any]], graph: ConvGraph,
                     results: dict[str, StatisticResult]) -> None:
    for entry in entries:
        skipped = Skipped(entry["name"], entry["reason"], entry.get("statistic"))
        owner = results.get(skipped.statistic) if skipped.statistic else None
        (owner.skipped if owner is not None else graph.skipped).append(skipped)


_SCHEMA_KEYS = {"schema_version", "hpa_version", "model", "init", "options", "statistics", "statistics_not_run",
                "layers", "skipped", "statistic_extra_keys"}


def _restore_extra(data: Mapping[str, Any], results: dict[str, StatisticResult]) -> None:
    """Give each statistic back its top-level keys; a result from before statistic_extra_keys gives
    every statistic all of them (to_dict accepts the same value from several)."""
    owners = data.get("statistic_extra_keys")
    if owners is None:
        unowned = [k for k in data if k not in _SCHEMA_KEYS]
        owners = {name: unowned for name in results}
    for name, keys in owners.items():
        if name in results:
            results[name].extra.update({key: data[key] for key in keys if key in data})


def _extra_keys(owners: Mapping[str, list[str]]) -> set[str]:
    return {key for keys in owners.values() for key in keys}


def layer_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:meth:`ScanResult.layer_rows` of a result's JSON form (``to_dict``, a saved result.json)."""
    rows = []
    for entry in data["layers"]:
        row = {k: _cell(v) for k, v in entry.items() if k not in ("statistics", "via")}
        for stat, values in entry["statistics"].items():
            _flatten(values, f"{stat}.", row)
        rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _flatten(values: dict[str, Any], prefix: str, row: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", row)
        elif not isinstance(value, list):
            row[prefix + key] = value


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite(value: Any) -> Any:
    """Replace NaN and Inf by None so that the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
