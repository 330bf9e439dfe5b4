"""The PyTorch examples of docs/compaction.md run as written (its 'Export a PyTorch model' and
'The FLOP estimate' sections, in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "compaction.md"


def section_blocks(text: str, title: str) -> list[str]:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_docs_examples_run(capsys) -> None:
    text = DOC.read_text()
    blocks = section_blocks(text, "Export a PyTorch model") + section_blocks(
        text, "The FLOP estimate"
    )
    assert len(blocks) == 3
    namespace: dict = {"__name__": "docs_compaction"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "units removed:" in out and "CompactSequential" in out
    assert re.search(r"compact: \d+\.\d+x fewer FLOPs than dense", out)
    report = namespace["report"]
    assert report.max_abs_difference is not None


def test_training_compacted_example_runs(capsys) -> None:
    blocks = section_blocks(DOC.read_text(), "Training compacted")
    assert len(blocks) == 1
    namespace: dict = {"__name__": "docs_compaction_training"}
    exec(compile(blocks[0], f"{DOC}:training", "exec"), namespace)
    out = capsys.readouterr().out
    assert "runs [" in out and "units removed" in out and "shape run" in out
    layers = namespace["telemetry"]["layers"]
    assert all(layer["calls"]["forward"] == 120 for layer in layers.values())
    assert namespace["telemetry"]["step_time_s"]["window"]["steps"] > 0
