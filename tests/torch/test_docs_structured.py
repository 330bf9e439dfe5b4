"""The example of docs/compaction.md's 'Emptying more units' section runs as written and empties
units that compaction then removes."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "compaction.md"


def test_the_ablation_example_runs(capsys) -> None:
    text = DOC.read_text()
    start = text.index("## Emptying more units")
    end = text.index("\n## ", start + 1)
    (block,) = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    namespace: dict = {"__name__": "docs_structured"}
    exec(compile(block, f"{DOC}:ablate_below", "exec"), namespace)
    out = capsys.readouterr().out
    ablated = namespace["sparse"].history[-1].layers
    assert ablated[0].ablated > 0 and ablated[-1].ablated == 0
    removed = int(re.search(r"units removed: (\d+) of 410", out).group(1))
    assert removed >= ablated[0].ablated + ablated[1].ablated
