"""The README is true as written: its first command is the canonical run whose console output
is kept in docs/results/readme_run/, and the output it shows is that run's, line for line (the
times, which are the machine's, are shown as ``…s``)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "docs" / "results" / "readme_run"


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _first_command() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", _readme(), flags=re.S)
    assert block is not None
    command = block.group(1).strip().split("&& sparsecore train", 1)[1]
    return shlex.split("sparsecore train" + command)


def test_the_first_command_is_the_canonical_run():
    args = _first_command()
    summary = json.loads((RUN / "lenet300-sparse-seed0-threads1.summary.json").read_text())
    value = {flag: args[i + 1] for i, flag in enumerate(args) if flag.startswith("--")}
    assert value["--threads"] == "1" == str(summary["machine"]["torch_threads"])
    assert value["--model"] == summary["config"]["model"] == "lenet300"
    assert float(value["--density"]) == summary["config"]["density"]
    assert int(value["--epochs"]) == summary["config"]["epochs"]
    assert "--seed" not in value and summary["config"]["seed"] == 0  # the default seed
    assert summary["dataset"]["train_size"] == 60000  # the full data set, as the README says


def test_the_shown_output_is_the_runs_line_for_line():
    text = _readme()
    start = text.index("The first command prints")
    shown = re.search(r"```text\n(.*?)```", text[start:], flags=re.S)
    assert shown is not None
    log = (RUN / "lenet300-sparse-seed0-threads1.log").read_text().splitlines()
    elided = [re.sub(r"\b\d+\.\ds(;|$)", r"…s\1", line) for line in log]
    lines = [line for line in shown.group(1).splitlines() if line != "..."]
    assert lines[0] == elided[0] and lines[-1] == elided[-1]
    position = 0
    for line in lines:  # in order, each one a line of the run
        assert line in elided[position:], line
        position = elided.index(line, position) + 1
