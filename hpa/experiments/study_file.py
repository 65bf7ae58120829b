"""A study file (TOML): a base ``hpa train`` configuration, a grid whose product is the cells, an optional reinit.

Read and checked whole before anything is written: an unknown field (with "did you mean"), a
value of the wrong type, an empty grid are refused in one line naming the file and the field.
The options a study may set are those of ``hpa train`` and ``hpa reinit``, described by the
command line (``hpa.cli`` builds the :class:`CommandOption` tables from its own flags), so a new
``hpa train`` flag is a study field with nothing to add here.  Torch-free.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hpa.errors import OptionError, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

TABLES = ("train", "grid", "reinit")
#: hpa train options a study sets itself, per job.
OWN_TRAIN_OPTIONS = {"out": "the study places each run in OUT/<cell>/seed-N", "resume": "the study resumes by itself",
                     "seed": "list the seeds in [grid]: seeds = [0, 1, 2]", "nproc": "a study runs one process per run",
                     "quiet": "each run's output goes to its log", "bars": "each run's output goes to its log",
                     "progress": "each run's output goes to its log"}
OWN_REINIT_OPTIONS = {"run_or_spec": "the study resets every trained run", "out": "it goes to OUT/<cell>/reinit",
                      "weights": "the study resets its own runs", "plugin": "the runs' task is used",
                      "data": "the runs' data is used", "quiet": "each job's output goes to its log",
                      "format": "figures are PNG"}


@dataclass(frozen=True)
class CommandOption:
    """One flag of a command, as a study field: ``kind`` int, float, str, bool or choice."""

    flag: str  # "--lr"
    kind: str
    choices: tuple[str, ...] = ()
    multiple: bool = False  # given once per value (--stat a --stat b)
    negative: str | None = None  # "--no-flip", for a flag whose default is on


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its folder name and the values it sets."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Study:
    path: Path
    train: dict[str, Any]  # the base configuration (normalised names)
    grid: dict[str, list[Any]]  # without the seeds
    seeds: tuple[int, ...]
    reinit: dict[str, Any] | None  # None: no [reinit] table

    def cells(self) -> list[Cell]:
        names = list(self.grid)
        cells = [Cell(cell_name(dict(zip(names, values))), dict(zip(names, values)))
                 for values in itertools.product(*self.grid.values())]
        seen: dict[str, Cell] = {}
        for cell in cells:
            if cell.name in seen:
                raise OptionError(f"{self.path}: the cells {seen[cell.name].values} and {cell.values} would share "
                                  f"the folder {cell.name!r}; make the grid's values differ in more than punctuation")
            seen[cell.name] = cell
        return cells

    def as_record(self) -> dict[str, Any]:
        """What the study folder records, and what a rerun's file is compared with."""
        return {"train": self.train, "grid": {**self.grid, "seeds": list(self.seeds)}, "reinit": self.reinit}


def read_study(path: str | Path, train_options: Mapping[str, CommandOption],
               reinit_options: Mapping[str, CommandOption]) -> Study:
    """The study file at ``path``, checked against the options of hpa train and hpa reinit."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError(f"the study file {path} does not exist; give the path of a .toml file")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"{path} is not valid TOML ({exc}); fix the line it names") from None
    for name, value in table.items():
        if name not in TABLES:
            raise OptionError(f"{path}: unknown table [{name}]{suggest(name, TABLES)}; a study has the tables "
                              "[train], [grid] and [reinit]")
        if not isinstance(value, dict):
            raise OptionError(f"{path}: {name} must be a table, [{name}], not a value")
    train = _checked_fields(path, "train", table.get("train", {}), train_options, OWN_TRAIN_OPTIONS)
    grid_given = _normalised(path, "grid", table.get("grid", {}))
    seeds = _seeds(path, grid_given.pop("seeds", None), train.pop("seeds", None))
    grid = _checked_grid(path, grid_given, train, train_options)
    if not grid and seeds is None:
        raise OptionError(f"{path}: the grid is empty; list what to vary in [grid], at the least the seeds, "
                          "e.g. seeds = [0, 1, 2]")
    if "plugin" not in train and "plugin" not in grid:
        raise OptionError(f"{path}: [train] needs plugin = TASK (the training task, e.g. \"cifar10\"; "
                          "'hpa experiments' lists them)")
    reinit = None
    if "reinit" in table:
        reinit = _checked_fields(path, "reinit", table["reinit"], reinit_options, OWN_REINIT_OPTIONS)
    return Study(path, train, grid, tuple(seeds or (0,)), reinit)


def _normalised(path: Path, section: str, given: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in given.items():
        name = key.replace("-", "_")
        if name in out:
            raise OptionError(f"{path}: [{section}] gives {name} twice (as {key!r} and another spelling); give it once")
        out[name] = value
    return out


def _checked_fields(path: Path, section: str, given: dict[str, Any], options: Mapping[str, CommandOption],
                    own: Mapping[str, str]) -> dict[str, Any]:
    fields = _normalised(path, section, given)
    for name, value in fields.items():
        if section == "train" and name == "seeds":
            continue
        _check_name(path, section, name, options, own)
        check_value(path, f"[{section}] {name}", value, options[name])
    return fields


def _check_name(path: Path, section: str, name: str, options: Mapping[str, CommandOption],
                own: Mapping[str, str]) -> None:
    if name in own:
        raise OptionError(f"{path}: [{section}] {name} is not a study field: {own[name]}")
    if name not in options:
        command = "hpa train" if section in ("train", "grid") else "hpa reinit"
        known = [n for n in options if n not in own]
        raise OptionError(f"{path}: unknown [{section}] field {name!r}{suggest(name, known)}; the fields are the "
                          f"options of {command} ('{command} --help')")


def _checked_grid(path: Path, grid: dict[str, Any], train: dict[str, Any],
                  options: Mapping[str, CommandOption]) -> dict[str, list[Any]]:
    for name, values in grid.items():
        _check_name(path, "grid", name, options, OWN_TRAIN_OPTIONS)
        if not isinstance(values, list):
            raise OptionError(f"{path}: [grid] {name} must be a list of the values to try, e.g. {name} = "
                              f"[{_toml(values)}], not {_toml(values)}")
        if not values:
            raise OptionError(f"{path}: [grid] {name} is an empty list; give the values to try, or remove it")
        if name in train:
            raise OptionError(f"{path}: {name} is in both [train] and [grid]; keep it in one")
        for value in values:
            check_value(path, f"[grid] {name}", value, options[name])
        if len({_toml(v) for v in values}) != len(values):
            raise OptionError(f"{path}: [grid] {name} lists a value twice; give each once")
    return grid


def _seeds(path: Path, in_grid: Any, in_train: Any) -> list[int] | None:
    if in_grid is not None and in_train is not None:
        raise OptionError(f"{path}: seeds is in both [train] and [grid]; keep it in [grid]")
    seeds = in_grid if in_grid is not None else in_train
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise OptionError(f"{path}: seeds must be a list of integers, e.g. seeds = [0, 1, 2], not {_toml(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise OptionError(f"{path}: seeds lists a seed twice; give each once")
    return list(seeds)


def check_value(path: Path, where: str, value: Any, option: CommandOption) -> None:
    """Refuses a value that ``option`` cannot take, naming the file, the field and what it takes."""
    if option.multiple and isinstance(value, list):
        for item in value:
            check_value(path, where, item, CommandOption(option.flag, option.kind, option.choices))
        return
    fits = {"int": _is_int(value), "float": _is_int(value) or isinstance(value, float),
            "bool": isinstance(value, bool), "str": isinstance(value, str),
            "choice": isinstance(value, str) and value in option.choices}[option.kind]
    if not fits:
        wanted = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                  "choice": "one of " + ", ".join(f'"{c}"' for c in option.choices)}[option.kind]
        raise OptionError(f"{path}: {where} = {_toml(value)} is not {wanted} ({option.flag} of the command)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return str(value)


def cell_name(values: Mapping[str, Any]) -> str:
    """The folder of a cell, from its values in the grid's order: ``schedule=step,lr=0.01``; "base" for none."""
    if not values:
        return "base"
    parts = []
    for name, value in values.items():
        text = _toml(value).strip('"') if not isinstance(value, list) else "+".join(map(str, value))
        parts.append(f"{name}={re.sub(r'[^A-Za-z0-9._+-]+', '-', text)}")
    return ",".join(parts)


def flags(values: Mapping[str, Any], options: Mapping[str, CommandOption]) -> list[str]:
    """The command-line flags that give ``values`` (checked study fields)."""
    out: list[str] = []
    for name, value in values.items():
        option = options[name]
        if option.kind == "bool":
            if value:
                out.append(option.flag)
            elif option.negative is not None:
                out.append(option.negative)
            continue
        for item in value if option.multiple and isinstance(value, list) else [value]:
            out += [option.flag, str(item)]
    return out


def first_difference(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """Where two study records (:meth:`Study.as_record`) first differ, in words, or None."""
    old, new = dict(_flat(recorded)), dict(_flat(given))
    for place in list(old) + [p for p in new if p not in old]:
        if place not in new:
            return f"{place} is gone (recorded: {_shown(old[place])})"
        if place not in old:
            return f"{place} = {_shown(new[place])} is new (not in the recorded study)"
        if _toml(old[place]) != _toml(new[place]):
            return f"{place} is {_shown(new[place])}, recorded {_shown(old[place])}"
    return None


def _flat(record: Mapping[str, Any]):
    for table in TABLES:
        values = record.get(table)
        if values is None:
            continue
        yield f"[{table}]", "a table"
        for key, value in values.items():
            yield f"[{table}] {key}", value


def _shown(value: Any) -> str:
    return value if value == "a table" else _toml(value)
