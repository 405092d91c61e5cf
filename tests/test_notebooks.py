"""The tutorial notebooks (notebooks/*.ipynb) run top to bottom without errors.

Each notebook is executed in a fresh python3 kernel with STACKFORMER_QUICK=1, which shrinks
its sizes and step counts so it finishes in seconds. Needs nbclient, nbformat, ipykernel and
matplotlib: the `[notebooks]` extra (`pip install ".[notebooks]"`), which the light `[test]`
extra leaves out (the Jupyter stack is ~35 packages). Without them these tests skip, saying
which are missing; CI installs `.[test,notebooks]` and runs them.

Also checks that the committed .ipynb files are exactly what notebooks/build_notebooks.py
generates (cells, fixed ids, no outputs), so an edit made in one place only is caught.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "[0-9][0-9]_*.ipynb")))
CELL_TIMEOUT_S = 600
NOTEBOOK_DEPS = ("nbformat", "nbclient", "ipykernel", "matplotlib")


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


_MISSING = [m for m in NOTEBOOK_DEPS if _absent(m)]
needs_notebook_extra = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs the [notebooks] extra (pip install \".[notebooks]\"): "
                           f"{', '.join(_MISSING)} not installed")


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", os.path.join(NB_DIR, "build_notebooks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 4, f"expected the tutorial notebooks in {NB_DIR}, found {NOTEBOOKS}"


@needs_notebook_extra
def test_notebooks_match_builder():
    builder = _builder()
    assert sorted(builder.NOTEBOOKS) == [os.path.basename(p) for p in NOTEBOOKS]
    for fname, cells in builder.NOTEBOOKS.items():
        with open(os.path.join(NB_DIR, fname), encoding="utf-8") as f:
            committed = f.read()
        assert committed == builder.render(cells, "nb" + fname[:2]), (
            f"{fname} differs from notebooks/build_notebooks.py (edited by hand, or not rebuilt "
            f"after a change, or saved with outputs): run python notebooks/build_notebooks.py")


@needs_notebook_extra
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    import nbclient
    import nbformat

    # the kernel inherits this process's environment
    monkeypatch.setenv("STACKFORMER_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # the kernel (same interpreter: jupyter_client maps a "python" kernelspec to sys.executable)
    # imports the stackformer this test run imported, wherever it is installed
    import stackformer
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(stackformer.__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": NB_DIR}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # pragma: no cover - the failure path
        pytest.fail(f"{os.path.basename(path)}: a cell raised:\n{e}")

    errors = [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{os.path.basename(path)}: cell {errors[0][0]} errored: " \
                       f"{errors[0][1].get('ename')}: {errors[0][1].get('evalue')}"
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in ran), "not every code cell was executed"
