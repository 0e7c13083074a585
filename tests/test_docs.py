"""The documentation site builds with `mkdocs build --strict` (API reference from
the docstrings included), and the Python examples on its pages run."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
HAVE_MKDOCS = all(
    importlib.util.find_spec(name) is not None
    for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
)


@pytest.mark.skipif(
    not HAVE_MKDOCS,
    reason="mkdocs-material and mkdocstrings[python] are not installed: "
    "pip install '.[docs]'",
)
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "api" / "operators" / "index.html").read_text()
    assert "fisherops.GGNOperator" in reference


def python_blocks(page: str) -> str:
    """The page's Python code blocks, in order, but those that import laplax."""
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return "\n".join(block for block in blocks if "from laplax" not in block)


@pytest.mark.parametrize("page", ["getting-started.md", "migrating-from-laplax.md"])
def test_page_examples_run(page):
    if page == "getting-started.md":
        pytest.importorskip("flax.nnx", reason="the page's Flax example needs flax")
    exec(compile(python_blocks(page), page, "exec"), {"__name__": "docs_example"})
