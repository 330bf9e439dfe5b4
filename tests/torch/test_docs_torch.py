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


def test_reports_page_own_loop_example_runs_without_warnings(tmp_path, monkeypatch, capsys):
    """docs/reports.md, "From your own training loop": no warning (total_steps given), the
    accuracy reported in percent although the loop measured fractions, TensorBoard events."""
    import warnings

    page = (DOC.parent / "reports.md").read_text()
    section = page[page.index("From your own training loop") :]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_reports"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # sparsecore's warnings are UserWarnings
        exec(compile(block.group(1), "docs/reports.md", "exec"), namespace)
    out = capsys.readouterr().out
    final = float(re.search(r"test accuracy \(this run\): final (\S+)%", out).group(1))
    assert final > 30.0  # a percentage, not a fraction printed as "0.xx%"
    assert abs(namespace["record"].epochs[-1]["test_acc"] - final) < 0.01
    assert (tmp_path / "run.json").is_file()
    assert list((tmp_path / "tb" / "mine").glob("events.out.tfevents.*"))
