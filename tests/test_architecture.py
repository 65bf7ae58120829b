"""The shape of the house: no import circle in hpa/, hpa/experiments/ in floors, the layers' rules.

Imports are read from the source with ``ast`` (every ``import`` and ``from ... import``, in
function bodies too; those under ``if TYPE_CHECKING:`` only are left out: they never run),
so a circle hidden in a function body is found as well.  The torch-free floors are checked
by importing them in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HPA = ROOT / "hpa"

#: hpa/experiments/ in floors: a module imports only from its own floor or below (see README,
#: "Where things live").  A new module is placed here, or the test fails.
FLOORS = {
    1: ("types", "rng", "layout", "image_tree", "study_file"),  # torch-free: the plugin-facing types, the random
    #          streams, the run folder's names, an image folder tree's files, the study file
    2: ("run", "open_run", "stats"),  # torch-free: writing and reading a run folder, per-epoch statistics
    3: ("data", "augment", "noise", "model", "loop", "distributed", "streaming", "loggers"),  # the pieces of training
    4: ("config", "background", "trainer"),  # a run's configuration, its background work, the trainer
    5: ("train", "seeds", "analyse_run", "reinit", "track", "study", "reproduce"),  # one file per command (track: hpa.Tracker)
}
TORCH_FREE_FLOORS = (1, 2)
HEAVY = ("torch", "torchvision", "safetensors.torch")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(HPA.rglob("*.py"))}


def _imports(path: Path, module: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) for every import that runs (TYPE_CHECKING blocks left out).

    ``from a.b import c`` gives ``a.b.c`` (a module, or a name in ``a.b``: :func:`_owner` decides).
    """
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit(branch, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.extend((f"{base}.{alias.name}", child.lineno, top) for alias in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def _owner(name: str) -> str | None:
    """The hpa module an imported name lives in (the longest module prefix), or None outside hpa."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, dict[str, int]]:
    """module -> {hpa module it imports: the line}."""
    edges: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        targets: dict[str, int] = {}
        for name, line, _ in _imports(path):
            owner = _owner(name)
            if owner is not None and owner != module:
                targets.setdefault(owner, line)
        edges[module] = targets
    return edges


def _circle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, {})):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = walk(target)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state:
            found = walk(module)
            if found:
                return found
    return None


def test_the_circle_finder_finds_a_circle_and_passes_a_line():
    assert _circle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None


def test_the_import_reader_sees_function_bodies_and_skips_type_checking(tmp_path):
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hpa.cli import main\n"
              "def f():\n    from hpa.graph import ConvGraph\nfrom . import files\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = _imports(path, "hpa.experiments.probe")
    assert ("hpa.graph.ConvGraph", 5, False) in found and ("hpa.experiments.files", 6, True) in found
    assert not any(name.startswith("hpa.cli") for name, _, _ in found)


def test_hpa_has_no_import_circle():
    circle = _circle(_edges())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def _floor(module: str) -> int | None:
    short = module.removeprefix("hpa.experiments.")
    return next((floor for floor, names in FLOORS.items() if short in names), None)


def test_every_experiments_module_has_a_floor():
    modules = {name for name in MODULES if name.startswith("hpa.experiments.")}
    unplaced = sorted(name for name in modules if _floor(name) is None)
    assert not unplaced, f"give these a floor in FLOORS: {unplaced}"
    assert {f"hpa.experiments.{name}" for names in FLOORS.values() for name in names} == modules


def test_experiments_import_only_from_their_floor_or_below():
    upward = []
    for module, targets in _edges().items():
        if not module.startswith("hpa.experiments."):
            continue
        for target, line in targets.items():
            if target.startswith("hpa.experiments.") and _floor(target) > _floor(module):
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} ({module} F{_floor(module)}) imports "
                              f"{target} (F{_floor(target)})")
    assert not upward, "\n".join(upward)


def test_experiments_never_import_the_cli_or_a_plugin():
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}"
             for module, path in MODULES.items() if module.startswith("hpa.experiments")
             for name, line, _ in _imports(path) if name.startswith(("hpa.cli", "hpa_plugins"))]
    assert not wrong, "\n".join(wrong)


def test_render_never_imports_experiments():
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}"
             for module, path in MODULES.items() if module.startswith("hpa.render")
             for name, line, _ in _imports(path) if name.startswith("hpa.experiments")]
    assert not wrong, "\n".join(wrong)


def test_the_core_never_imports_experiments_at_run_time():
    """Only the command line (hpa/cli.py) and the integrations (hpa/integrations/, callbacks over hpa.Tracker)
    use experiments; hpa/__init__.py names them lazily, by string."""
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}"
             for module, path in MODULES.items()
             if not module.startswith(("hpa.experiments", "hpa.integrations")) and module not in ("hpa.cli",)
             for name, line, _ in _imports(path) if name.startswith("hpa.experiments")]
    assert not wrong, "\n".join(wrong)


def test_the_lower_floors_keep_torch_off_at_module_level():
    wrong = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {name} at module level"
             for module, path in MODULES.items() if module.startswith("hpa.experiments.")
             and _floor(module) in TORCH_FREE_FLOORS
             for name, line, top in _imports(path) if top and name.startswith(HEAVY)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("floor", TORCH_FREE_FLOORS)
def test_the_lower_floors_import_without_torch(floor):
    names = [f"hpa.experiments.{name}" for name in FLOORS[floor]]
    code = ("import sys\n" + "".join(f"import {name}\n" for name in names) +
            f"heavy = sorted(m for m in sys.modules if m in {HEAVY!r})\nprint(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"importing floor {floor} imports {out.stdout.strip()}"


def _reason(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or above the run of import lines it belongs to."""
    if "#" in lines[line - 1]:
        return True
    above = line - 2
    while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
        above -= 1
    return above >= 0 and lines[above].strip().startswith("#")


def test_function_level_hpa_imports_say_why():
    """An hpa module is imported inside a function body only to keep torch (or numpy, or the command code)
    off the path of 'hpa --help' and 'hpa plugins'; each such import says why in a comment."""
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, line, top in _imports(path):
            if top or _owner(name) is None and not name.startswith("hpa_plugins"):
                continue
            if not _reason(lines, line):
                silent.append(f"{path.relative_to(ROOT)}:{line} imports {name} in a function without a reason")
    assert not silent, f"{len(silent)} silent function-level imports:\n" + "\n".join(silent)
