"""Every Python block of README.md runs as written, on its own (issue 15.4).

Each block runs in a fresh namespace with 64-bit types off, as in a user's
session, so a block that leans on a name from another block or on float64
fails here. The one block that needs several processes
(`jax.distributed.initialize()`) is marked in the README with an HTML comment
and is run for real by tests/test_sharding.py instead.
"""

import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
NOT_RUN = "<!-- not run by the tests"


def python_blocks(text: str) -> list[tuple[str, str, bool]]:
    """`(section heading, code, run?)` for every ```python block."""
    blocks = []
    heading = "top"
    for match in re.finditer(
        r"^(#+ [^\n]*)$|((?:<!-- [^\n]* -->\n)?)```python\n(.*?)```", text, re.M | re.S
    ):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
            continue
        run = not match.group(2).startswith(NOT_RUN)
        blocks.append((heading, match.group(3), run))
    return blocks


BLOCKS = python_blocks(README)


def test_the_blocks_are_found():
    assert len(BLOCKS) >= 4
    skipped = [code for _, code, run in BLOCKS if not run]
    assert len(skipped) == 1 and "jax.distributed.initialize()" in skipped[0]


@pytest.mark.parametrize(
    "code",
    [code for _, code, run in BLOCKS if run],
    ids=[f"{i}-{heading}" for i, (heading, _, run) in enumerate(BLOCKS) if run],
)
def test_block_runs(code):
    with jax.enable_x64(False):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_block"})


def test_ci_runs_the_readme_test_command():
    command = 'pip install ".[test]" && python -m pytest -q'
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_in_a_fresh_virtual_environment():
    """CI sees what a new user sees: the newest versions pyproject.toml allows,
    nothing left on the machine (issue 19.1: pytest 9.2 broke a test that the
    machine's older pytest passed)."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "-m venv" in script
    assert script.index("-m venv") < script.index('pip install ".[test]"')
