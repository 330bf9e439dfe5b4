"""The Keras example of docs/compaction.md runs as written (on the backend tox selects)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "compaction.md"


def test_keras_example_runs(capsys) -> None:
    text = DOC.read_text()
    start = text.index("## Export a Keras model")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {"__name__": "docs_compaction_keras"}
    exec(compile(blocks[0], f"{DOC}:keras", "exec"), namespace)
    assert "units removed:" in capsys.readouterr().out
    assert namespace["keras_report"].max_abs_difference is not None
