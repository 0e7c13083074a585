"""The example notebooks run top to bottom (their committed outputs are from
`notebooks/build.py`; this re-executes them in a fresh kernel, in memory)."""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
MISSING = [
    name
    for name in ("nbclient", "nbformat", "ipykernel", "matplotlib", "sklearn")
    if importlib.util.find_spec(name) is None
]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the notebooks need {', '.join(MISSING)}: pip install '.[test]'",
)


def test_there_are_notebooks():
    assert {path.name for path in NOTEBOOKS} >= {
        "regression_1d.ipynb",
        "digits_calibration.ipynb",
        "operators_with_lineax.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    committed = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]
    assert any("image/png" in output.get("data", {}) for output in committed), (
        f"{path.name} has no committed plot: run python notebooks/build.py"
    )
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
