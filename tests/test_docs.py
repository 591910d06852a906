"""The documentation site builds with no warning (`mkdocs build --strict`): every page, link, notebook,
gallery figure and docstring of the API reference."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def _missing() -> list[str]:
    missing = []
    for name in TOOLS:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


@pytest.mark.skipif(bool(_missing()), reason=f"documentation tools not installed ({', '.join(_missing())}): "
                    "pip install -c constraints.txt -e '.[docs]' (the dev extra includes them)")
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    # the parts that come from outside docs/ through docs/hooks.py
    assert (site / "index.html").is_file()
    assert (site / "api" / "vector" / "index.html").is_file()
    gallery = (site / "gallery" / "index.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (ROOT / "figures" / "notebooks").glob("*.png"))
    assert pngs and all(f"figures/notebooks/{png}" in gallery for png in pngs)
    assert all((site / "figures" / "notebooks" / png).is_file() for png in pngs)
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks and all((site / "notebooks" / nb / "index.html").is_file() for nb in notebooks)
    # README sections arrive on the home page, with its relative links pointing at site pages
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "constraints.txt" in home and "Guarantees" in home
    assert '<a href="../semantics/">docs/semantics.md</a>' in (site / "guide" / "index.html").read_text(encoding="utf-8")
