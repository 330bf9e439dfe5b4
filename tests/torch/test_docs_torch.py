"""The examples of docs/torch.md run as written (every ```python block, in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "torch.md"


def test_docs_examples_run(capsys):
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "docs_torch"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "epoch 2: density 0.0500, 1 updates" in out
    accuracy = float(re.search(r"test accuracy (\S+)", out).group(1))
    assert accuracy > 0.3  # chance is 0.1; 5% dense LeNet-300-100 learns slowly in 120 steps
