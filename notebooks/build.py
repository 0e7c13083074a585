"""Execute the notebook sources and write them, with their outputs, as `.ipynb`.

    python notebooks/build.py             # every notebook
    python notebooks/build.py regression  # those whose name contains "regression"

The sources are the jupytext percent-format `.py` files beside this script (edit
those, in any editor or in Jupyter with jupytext); the committed `.ipynb` files
are their executed copies, plots included. `tests/test_notebooks.py` runs the
sources and checks that the `.ipynb` files hold the same code. Needs
`jupytext`, `nbclient`, `ipykernel` and the `demo` extra (`pip install ".[test]"`).
"""

import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
SOURCES = sorted(path for path in HERE.glob("*.py") if path.name != "build.py")


def execute(source: Path) -> nbformat.NotebookNode:
    """The notebook of a jupytext source, executed top to bottom in a fresh kernel."""
    notebook = jupytext.read(source)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(source.parent)}},
    ).execute()
    return notebook


if __name__ == "__main__":
    wanted = sys.argv[1:]
    for source in SOURCES:
        if not wanted or any(word in source.stem for word in wanted):
            target = source.with_suffix(".ipynb")
            nbformat.write(execute(source), target)
            print("wrote", target)
