"""Packaging: what a plain install pulls, the extras the README's commands install, the files an sdist ships."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_plain_install_pulls_only_torch_and_what_the_kernels_need():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {_name(r) for r in project["dependencies"]} == {"torch", "numpy", "packaging", "triton"}
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["compare"]} == {"rich", "matplotlib"}
    assert {"transformers", "accelerate", "pytorch-lightning"} <= {_name(r) for r in extras["test"]}
    assert project["license"] == {"text": "Apache-2.0"}


def test_the_readme_commands_install_the_extras():
    lines = (ROOT / "Makefile").read_text().splitlines()
    install = [line for line in lines if "pip install --no-build-isolation -e" in line and "--no-deps" not in line]
    assert install and all('".[test,compare]"' in line for line in install)


def test_licence_changelog_and_contributing_ship():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    assert "## 0.1.0" in (ROOT / "CHANGELOG.md").read_text()
    assert "## Adding an op" in (ROOT / "CONTRIBUTING.md").read_text()
    included = {name for line in (ROOT / "MANIFEST.in").read_text().splitlines()
                if line.startswith("include ") for name in line.split()[1:]}
    assert {"LICENSE", "CHANGELOG.md", "CONTRIBUTING.md"} <= included


def test_compare_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, caplog):
    from fastoptim.compare import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.write_plot(tmp_path, [], "title") is None
    assert "pip install 'fastoptim[compare]'" in caplog.text
