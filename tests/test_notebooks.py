"""Every notebook runs headless, top to bottom, in fast mode (what CI promises users).

Each notebook executes in its own kernel from the notebooks/ folder with
TASKVEC_FAST=1 (fast zoo, evaluation subsets) and TASKVEC_FIGURES pointing at a
temp dir; widgets render statically there. The first notebook that needs a zoo
builds it into the cache (TASKVEC_CACHE or ~/.cache/taskvec), the rest reuse it.
"""
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIGURE_INDEX = ROOT / "figures" / "README.md"


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names[:2] == ["00_model_merging_tour.ipynb", "01_task_arithmetic.ipynb"], names
    assert len(NOTEBOOKS) >= 7, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_clean_with_a_parameters_cell(path):
    cells = _cells(path)
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# "), \
        f"{path.name}: first cell must be the title and story"
    code = [c for c in cells if c["cell_type"] == "code"]
    first = "".join(code[0]["source"])
    assert "TASKVEC_FAST" in first and "HUB" in first, f"{path.name}: first code cell must hold FAST and HUB parameters"
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None, f"{path.name}: commit notebooks without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    figures = tmp_path / "figures"
    monkeypatch.setenv("TASKVEC_FAST", "1")
    monkeypatch.setenv("TASKVEC_FIGURES", str(figures))
    monkeypatch.setenv("TASKVEC_NO_PROGRESS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error

    saved = sorted(p.stem for p in figures.rglob("*.png"))
    assert saved, f"{path.name} saved no figure"
    prefix = path.name[:2] + "-"
    assert all(s.startswith(prefix) for s in saved), f"{path.name}: figure names must start with {prefix!r}: {saved}"
    for png in figures.rglob("*.png"):
        assert png.with_suffix(".svg").exists(), f"{png.name} has no SVG twin"
    index = FIGURE_INDEX.read_text(encoding="utf-8")
    missing = [s for s in saved if not re.search(rf"\b{re.escape(s)}\.png\b", index)]
    assert not missing, f"figures/README.md does not index {missing}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
