"""ScanResult: one scan's findings, and every way out of it (dict/JSON, CSV, pandas, figures)."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpa.graph import ConvGraph
from hpa.registry import StatisticResult

SCHEMA_VERSION = 1


@dataclass
class ScanResult:
    graph: ConvGraph
    statistics: dict[str, StatisticResult]
    options: dict[str, Any] = field(default_factory=dict)
    init: ConvGraph | None = None
    not_run: dict[str, str] = field(default_factory=dict)  # statistics left out by default, and why

    # -- the JSON schema (documented in README.md) ---------------------------------
    def to_dict(self) -> dict[str, Any]:
        from hpa import __version__

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
        for result in self.statistics.values():
            for key, value in result.extra.items():
                if key in out:
                    raise ValueError(f"statistic extra key {key!r} collides with the result schema")
                out[key] = value
        return _finite(out)

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
        rows = []
        for entry in self.to_dict()["layers"]:
            row = {k: _cell(v) for k, v in entry.items() if k not in ("statistics", "via")}
            for stat, values in entry["statistics"].items():
                _flatten(values, f"{stat}.", row)
            rows.append(row)
        return rows

    def to_csv(self, path: str | os.PathLike) -> Path:
        rows = self.layer_rows()
        write_csv(path, rows)
        return Path(path)

    def extra_tables(self) -> dict[str, list[dict[str, Any]]]:
        from hpa.plugins import registries

        tables: dict[str, list[dict[str, Any]]] = {}
        registry = registries()["statistics"]
        for name in self.statistics:
            stat = registry.get(name) if name in registry else None
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
    def plot(self, directory: str | os.PathLike, format: str = "png") -> list[Path]:
        """Write every statistic's figures into ``directory``; returns the files."""
        from hpa.plugins import registries

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        registry = registries()["statistics"]
        written: list[Path] = []
        for name in self.statistics:
            stat = registry.get(name) if name in registry else None
            if stat is not None and stat.plot is not None:
                written += stat.plot(self, directory, format)
        return written

    def write(self, directory: str | os.PathLike, format: str = "png") -> list[Path]:
        """result.json, layers.csv, the statistics' CSVs and figures, into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "result.json").write_text(self.to_json() + "\n")
        files = [directory / "result.json", self.to_csv(directory / "layers.csv")]
        for filename, rows in self.extra_tables().items():
            write_csv(directory / filename, rows)
            files.append(directory / filename)
        return files + self.plot(directory, format)


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
