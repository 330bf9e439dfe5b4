"""``sparsecore train --model lstm-lm | gpt-mini``: character-level language models end to end on
real English text (the embedded public-domain excerpt), with the image job's outputs, telemetry,
checkpoints and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsecore.cli import main
from sparsecore.text import VOCAB_SIZE, load_embedded_text
from sparsecore.torch.models import build_model

# 48 training windows of 64 characters in batches of 16: 3 optimizer steps per epoch.
TINY = ["--limit-train", "48", "--limit-test", "16", "--batch-size", "16", "--threads", "1",
        "--no-progress", "--density", "0.2"]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore::sparsecore.DeadUnitsWarning")


def _train(out: Path, *args: str) -> int:
    return main(["train", "--data", "embedded", "--out", str(out), *TINY, *args])


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("model", ["lstm-lm", "gpt-mini"])
def test_language_models_train_sparse_end_to_end(tmp_path, model, capsys):
    assert _train(tmp_path, "--model", model, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "Jargon File (embedded excerpt)" in out and "validation characters" in out
    assert "valid loss" in out and "bpc" in out and "final validation bits per character" in out
    for name in ("checkpoint.pt", "summary.json", "mask_updates.json", "telemetry.json"):
        assert (tmp_path / name).is_file(), name
    summary = _summary(tmp_path)
    assert summary["completed"] and summary["dataset"]["vocab_size"] == VOCAB_SIZE
    for epoch in summary["epochs"]:
        assert epoch["test_bpc"] == pytest.approx(epoch["test_loss"] / math.log(2))
        assert 0 < epoch["test_bpc"] < math.log2(VOCAB_SIZE) + 0.5
    assert summary["final_test_bpc"] == summary["epochs"][-1]["test_bpc"]
    layers = summary["layer_densities"]
    if model == "lstm-lm":  # the job makes the recurrent weights sparse too
        assert "rnn.weight_hh_l1" in layers and "decoder.weight" in layers
    else:  # every projection; embeddings and the tied head dense
        assert "blocks.0.attn.qkv.weight" in layers and "tokens.weight" not in layers
    assert summary["final_density"] == pytest.approx(0.2, abs=1e-4)
    measured = summary["measured_layer_densities"]
    assert all(measured[name] <= dens + 1e-9 for name, dens in layers.items())
    updates = json.loads((tmp_path / "mask_updates.json").read_text())
    assert len(updates) == 1 and updates[0]["epoch"] == 1
    telemetry = json.loads((tmp_path / "telemetry.json").read_text())
    assert len(telemetry["epochs"]) == 2


@pytest.mark.parametrize("model", ["lstm-lm", "gpt-mini"])
def test_resume_after_epoch_one_equals_the_uninterrupted_run(tmp_path, model, capsys):
    common = ["--model", model, "--epochs", "2", "--seed", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, *common) == 0
    assert _train(split, *common, "--stop-after", "1") == 0
    assert _summary(split)["completed"] is False
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0  # data from checkpoint
    assert "resumed after epoch 1" in capsys.readouterr().out
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    s1, s2 = _summary(straight), _summary(split)
    for e1, e2 in zip(s1["epochs"], s2["epochs"], strict=True):
        assert e1["test_bpc"] == e2["test_bpc"] and e1["train_loss"] == e2["train_loss"]
    assert json.loads((split / "mask_updates.json").read_text()) == json.loads(
        (straight / "mask_updates.json").read_text()
    )


def test_any_text_file_is_read_and_a_resume_checks_it(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text(load_embedded_text().describe()["name"] + "\n" + "It was a dark night. " * 400)
    run = tmp_path / "run"
    args = ["--model", "gpt-mini", "--epochs", "2", "--method", "dense"]
    assert main(["train", "--data", str(text), "--out", str(run), *TINY, *args,
                 "--stop-after", "1"]) == 0  # fmt: skip
    assert "book.txt" in capsys.readouterr().out
    assert _summary(run)["dataset"]["source"] == str(text.resolve())
    text.write_text("Another text altogether. " * 400)
    assert main(["train", "--resume", str(run), "--no-progress"]) != 0
    assert "data differ" in capsys.readouterr().err
    text.unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) != 0
    assert "not there any more" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    assert main(["train", "--data", str(tiny), "--out", str(tmp_path / "t"), *TINY, *args]) != 0
    assert "needs more" in capsys.readouterr().err


def test_the_models_predict_every_next_character():
    x = torch.randint(0, VOCAB_SIZE, (3, 64))
    for name in ("lstm-lm", "gpt-mini"):
        model = build_model(name, num_classes=VOCAB_SIZE)
        assert model(x).shape == (3, 64, VOCAB_SIZE), name
    gpt = build_model("gpt-mini", num_classes=VOCAB_SIZE)
    with pytest.raises(ValueError, match="longer than the context"):
        gpt(torch.zeros(1, 129, dtype=torch.long))
    # causal: the prediction at position t does not depend on later characters
    y = x.clone()
    y[:, 40:] = (y[:, 40:] + 1) % VOCAB_SIZE
    gpt.eval()
    torch.testing.assert_close(gpt(x)[:, :40], gpt(y)[:, :40])


def test_keras_job_refuses_the_language_models(capsys):
    assert main(["train", "--framework", "keras", "--model", "lstm-lm"]) != 0
    assert "lstm-lm" in capsys.readouterr().err
