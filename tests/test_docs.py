"""The project's own documents: present, consistent with the package, and free of dangling references."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _help_texts() -> str:
    """Every --help text of every command, as a user sees them."""
    commands = [[], ["scan"], ["plot"], ["train"], ["experiments"], ["reinit"], ["analyse-run"], ["plugins"],
                ["list-models"]]
    texts = []
    for command in commands:
        proc = subprocess.run([sys.executable, "-m", "hpa", *command, "--help"], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, COLUMNS="120"))
        assert proc.returncode == 0, (command, proc.stderr)
        texts.append(proc.stdout)
    return "\n".join(texts)


def test_no_document_or_help_text_points_at_files_outside_the_repository():
    """STATISTICS.md and the seed numbers live outside the repository; users see docs/statistics.md and papers."""
    readme = (ROOT / "README.md").read_text()
    for text, where in ((readme, "README.md"), (_help_texts(), "--help")):
        assert "STATISTICS.md" not in text, where
        assert not re.search(r"\bseed 00\d\b", text), where
    assert (ROOT / "docs" / "statistics.md").is_file()
    assert "docs/statistics.md" in readme


def test_statistics_doc_states_the_rules_the_code_implements():
    """The doc quotes the comparisons that the tie tests check in the code (<= for n_l; the four cone states)."""
    doc = (ROOT / "docs" / "statistics.md").read_text()
    assert "c_i <= 0" in doc
    for rule in ("A >= 0 and Delta <= 0   ->  OUT_FULL_IN", "A >= 0 and Delta >  0   ->  OUT_PARTIAL_IN",
                 "A <  0 and Delta >= 0   ->  IN_FULL_OUT", "A <  0 and Delta <  0   ->  IN_PARTIAL_OUT"):
        assert rule in doc
    from hpa.cones import STATES
    assert set(STATES) == set(re.findall(r"(OUT_FULL_IN|IN_FULL_OUT|OUT_PARTIAL_IN|IN_PARTIAL_OUT)", doc))


def test_license_and_citation_match_the_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text()
    declared = meta["license"]["text"] if isinstance(meta["license"], dict) else meta["license"]
    assert declared == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"].startswith("1.2")
    assert citation["license"] == declared and citation["version"] == meta["version"]
    titles = {ref["title"] for ref in citation["references"]}
    doc = " ".join((ROOT / "docs" / "statistics.md").read_text().split())
    assert titles == {"Hyperplane Arrangements of Trained ConvNets Are Biased",
                      "On the Geometry of Rectifier Convolutional Neural Networks"}
    for title in titles:  # the doc cites the same papers, by title
        assert title in doc


def test_quick_start_says_how_to_put_hpa_on_the_path():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in quick
    assert "pip install" in quick and "cpu" in quick.lower()


@pytest.mark.skipif(not Path("/usr/bin/make").exists() and not Path("/bin/make").exists(), reason="make not installed")
def test_make_set_up_shows_the_log_only_when_it_fails(tmp_path):
    """A failing set-up prints its log and the hint; the log file holds the same text."""
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'pip: no matching distribution (simulated)' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-f", str(ROOT / "Makefile"), f"PYTHON={fake_python}", f"VENV={venv}",
                           f"{venv}/.installed"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "no matching distribution (simulated)" in out and "set-up failed" in out
    assert "no matching distribution (simulated)" in Path(f"{venv}-install.log").read_text()
    assert not (venv / ".installed").exists()


#: The documented namespaces: each lists its public names in ``__all__`` (README, "Where things live").
PUBLIC_NAMESPACES = ("hpa", "hpa.experiments", "hpa.integrations", "hpa.integrations.lightning",
                     "hpa.integrations.transformers", "hpa.nn", "hpa.render.series")


def test_the_readme_names_only_public_names():
    """Every ``hpa.x.y`` the README mentions is a documented namespace, or a name in one's ``__all__``."""
    import importlib

    mentioned = set(re.findall(r"\bhpa(?:\.[A-Za-z_][A-Za-z_0-9]*)+", (ROOT / "README.md").read_text()))
    assert {"hpa.load", "hpa.experiments.Task", "hpa.RunSeries"} <= mentioned  # the reader sees these
    internal = []
    for name in sorted(mentioned):
        namespace, _, attribute = name.rpartition(".")
        if name in PUBLIC_NAMESPACES or attribute == "__all__" and namespace in PUBLIC_NAMESPACES:
            continue
        if namespace not in PUBLIC_NAMESPACES or attribute not in importlib.import_module(namespace).__all__:
            internal.append(name)
    assert not internal, f"README sends users to internal names: {internal}"
    for namespace in PUBLIC_NAMESPACES:
        module = importlib.import_module(namespace)
        assert all(hasattr(module, attribute) for attribute in module.__all__), namespace
