"""The example notebooks: their jupytext sources (`notebooks/*.py`) run top to
bottom in a fresh kernel, and the committed `.ipynb` files are executed copies of
those sources (`python notebooks/build.py` writes them)."""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
SOURCES = sorted(path for path in NOTEBOOKS.glob("*.py") if path.name != "build.py")
MISSING = [
    name
    for name in ("jupytext", "nbclient", "nbformat", "ipykernel", "matplotlib")
    if importlib.util.find_spec(name) is None
]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the notebooks need {', '.join(MISSING)}: pip install '.[test]'",
)


def build():
    """`notebooks/build.py` as a module (it is not in a package)."""
    spec = importlib.util.spec_from_file_location(
        "notebooks_build", NOTEBOOKS / "build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_notebooks():
    assert {path.stem for path in SOURCES} >= {
        "regression_1d",
        "digits_calibration",
        "operators_with_lineax",
    }


@pytest.mark.parametrize("source", SOURCES, ids=[path.stem for path in SOURCES])
def test_committed_notebook_is_the_executed_source(source):
    import jupytext
    import nbformat

    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert code(committed) == code(jupytext.read(source)), (
        f"{source.with_suffix('.ipynb').name} is not {source.name}: run "
        "python notebooks/build.py"
    )
    outputs = [output for cell in committed.cells for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert not any(output.output_type == "error" for output in outputs)


@pytest.mark.parametrize("source", SOURCES, ids=[path.stem for path in SOURCES])
def test_notebook_runs(source):
    notebook = build().execute(source)
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors
