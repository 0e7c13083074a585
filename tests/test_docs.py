"""The documentation site builds with `mkdocs build --strict` (API reference from
the docstrings included), and the Python examples on its pages run (issue 15.4).

A page's blocks run in order in one namespace (a page reads top to bottom, like
a script), with 64-bit types off as in a user's session. Blocks that import
laplax (the "before" of the migration guide) and blocks marked
`<!-- not run by the tests ... -->` are left out.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
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


def python_blocks(text: str) -> str:
    """The page's Python blocks, in order, but those that import laplax or are
    marked as not run."""
    blocks = re.findall(
        r"((?:<!-- [^\n]* -->\n)?)```python\n(.*?)```", text, flags=re.DOTALL
    )
    return "\n".join(
        code
        for marker, code in blocks
        if "from laplax" not in code and not marker.startswith("<!-- not run")
    )


PAGES = sorted(
    str(page.relative_to(DOCS))
    for page in DOCS.rglob("*.md")
    if python_blocks(page.read_text())
)


def test_the_pages_with_examples_are_found():
    assert {"index.md", "getting-started.md", "migrating-from-laplax.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
    code = python_blocks((DOCS / page).read_text())
    if "flax" in code:
        pytest.importorskip("flax.nnx", reason="the page's Flax example needs flax")
    with jax.enable_x64(False):
        exec(compile(code, page, "exec"), {"__name__": "docs_example"})
