"""The Python examples in the framework-free docs run as written (in order, one namespace per page):
the core engine (core.md) and the worked examples of the map of the package (design.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ["core.md", "design.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("name", PAGES)
def test_examples_run(name: str) -> None:
    blocks = python_blocks(DOCS / name)
    assert blocks, f"{name} has no Python examples"
    namespace: dict = {"__name__": f"docs_{name}"}
    for block in blocks:
        exec(compile(block, f"docs/{name}", "exec"), namespace)
