"""The ``sparsecore train`` job end to end: real models, real SGD, real Fashion-MNIST images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsecore
from sparsecore.cli import main
from sparsecore.datasets import FASHION_MNIST_FILES, load_embedded_fashion_mnist, write_idx
from sparsecore.torch.lm_models import LM_MODELS
from sparsecore.torch.models import build_model, model_names
from sparsecore.torch.train import weight_densities

SPARSE_METHODS = ["sparse", "static", "set"]
ALL_METHODS = ["dense", *SPARSE_METHODS]
TINY = ["--limit-train", "400", "--limit-test", "200", "--threads", "1", "--no-progress"]


def _train(tmp: Path, *args: str) -> int:
    return main(["train", "--data", "embedded", "--out", str(tmp), *TINY, *args])


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _load_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    return ckpt["model"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_tiny_run_summary_and_density(tmp_path, method, capsys):
    run = tmp_path / "run"
    assert _train(run, "--method", method, "--epochs", "1", "--density", "0.1") == 0
    out = capsys.readouterr().out
    assert "fashion-mnist-subset" in out and "400 train / 200 test" in out
    assert "final test accuracy" in out

    s = _summary(run)
    assert s["dataset"]["name"] == "fashion-mnist-subset"
    assert s["dataset"]["source"].startswith("embedded:")
    assert (s["dataset"]["train_size"], s["dataset"]["test_size"]) == (400, 200)
    assert s["dataset"]["limited_from"] == {"train_size": 6000, "test_size": 1000}
    assert s["model"] == "lenet300" and s["method"] == method
    assert s["config"]["density"] == 0.1 and s["config"]["epochs"] == 1
    assert s["completed"] is True and len(s["epochs"]) == 1
    epoch = s["epochs"][0]
    for key in ("train_loss", "test_loss", "test_acc", "density", "layer_densities", "lr"):
        assert key in epoch
    assert s["final_test_acc"] == epoch["test_acc"]
    assert 0.0 <= s["final_test_acc"] <= 100.0 and epoch["train_loss"] > 0
    if method == "dense":
        assert s["final_test_acc"] > 40.0  # one epoch of 4 steps already beats chance (10%)
    assert s["wall_time_s"] > 0

    weights = _load_weights(run)
    n_total = sum(weights[f"{n}.weight"].numel() for n in ("fc1", "fc2", "fc3"))
    n_nonzero = sum(int((weights[f"{n}.weight"] != 0).sum()) for n in ("fc1", "fc2", "fc3"))
    if method == "dense":
        assert n_nonzero == n_total
        assert s["final_density"] == 1.0
    else:
        # The budget is exact: round(density * total) active weights, not one more. Before any
        # mask update every active weight is nonzero (default init), so nonzeros count them.
        masks = _saved_masks(run)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * n_total)
        assert n_nonzero == round(0.1 * n_total)
        _check_weights_inside_masks(run)
        assert s["final_density"] == pytest.approx(0.1, abs=1e-6)
        assert s["final_measured_density"] == pytest.approx(0.1, abs=1e-6)
        for name, density in s["layer_densities"].items():
            assert s["measured_layer_densities"][name] == pytest.approx(density, abs=1e-9)
        assert set(s["layer_densities"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert json.loads((run / "mask_updates.json").read_text()) == []  # no update after last epoch


def _saved_masks(run: Path) -> dict[str, torch.Tensor]:
    """The sparse state's masks from a run's checkpoint, by parameter name."""
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    if ckpt["sparse"] is None:
        return {k: torch.ones_like(v, dtype=torch.bool) for k, v in ckpt["model"].items()}
    return dict(zip(ckpt["sparse"]["names"], ckpt["sparse"]["masks"], strict=True))


def _check_weights_inside_masks(run: Path) -> None:
    weights = _load_weights(run)
    for name, mask in _saved_masks(run).items():
        assert not weights[name][~mask].any(), f"{name} has nonzero weights outside its mask"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_resume_after_epoch_one_matches_uninterrupted_run(tmp_path, method, capsys):
    common = ["--method", method, "--epochs", "2", "--seed", "3", "--batch-size", "50"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, *common) == 0
    assert _train(split, *common, "--stop-after", "1") == 0
    assert "stopped after epoch 1" in capsys.readouterr().out
    assert _summary(split)["completed"] is False
    mask_epoch1 = _saved_masks(split)  # saved after the epoch-end update

    assert main(["train", "--resume", str(split), "--data", "embedded", "--no-progress"]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out
    final_straight, final_split = _load_weights(straight), _load_weights(split)
    assert final_straight.keys() == final_split.keys()
    for key in final_straight:
        assert torch.equal(final_straight[key], final_split[key]), key
    s1, s2 = _summary(straight), _summary(split)
    assert s2["completed"] is True and len(s2["epochs"]) == 2
    for e1, e2 in zip(s1["epochs"], s2["epochs"], strict=True):
        assert e1["test_acc"] == e2["test_acc"] and e1["train_loss"] == e2["train_loss"]
    updates = json.loads((split / "mask_updates.json").read_text())
    assert updates == json.loads((straight / "mask_updates.json").read_text())

    # One mask update ran after epoch 1 (none after the last); what it did depends on the method.
    final_masks = _saved_masks(split)
    _check_weights_inside_masks(split)
    for name, mask in final_masks.items():
        assert torch.equal(mask, mask_epoch1[name]), name
    initial = _initial_masks(method, seed=3, density=0.05)
    changed = sum(int((initial[k] != final_masks[k]).sum()) for k in initial)
    if method in ("dense", "static"):
        assert changed == 0
        assert updates == []
    else:
        assert len(updates) == 1 and updates[0]["epoch"] == 1
        net = sum(layer["net_pruned"] + layer["net_grown"] for layer in updates[0]["layers"])
        assert changed == net > 0
        assert sum(int(m.sum()) for m in initial.values()) == sum(
            int(m.sum()) for m in final_masks.values()
        )


def test_resume_of_a_batch_norm_model_matches_uninterrupted_run(tmp_path, capsys):
    """vgg has batch norm: the job's telemetry, written at every epoch end after the checkpoint,
    must not move its running statistics, or the resumed run would differ."""
    common = ["--model", "vgg", "--epochs", "2", "--seed", "1", "--batch-size", "50"]
    common += ["--limit-train", "200", "--limit-test", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, *common) == 0
    assert _train(split, *common, "--stop-after", "1") == 0
    assert main(["train", "--resume", str(split), "--data", "embedded", "--no-progress"]) == 0
    capsys.readouterr()
    final_straight, final_split = _load_weights(straight), _load_weights(split)
    assert any("running_mean" in key for key in final_straight)
    for key in final_straight:
        assert torch.equal(final_straight[key], final_split[key]), key
    for e1, e2 in zip(_summary(straight)["epochs"], _summary(split)["epochs"], strict=True):
        assert e1["test_acc"] == e2["test_acc"] and e1["train_loss"] == e2["train_loss"]


def _initial_masks(method: str, seed: int, density: float) -> dict[str, torch.Tensor]:
    """The masks attach() draws for LeNet-300-100 before any training, under the job's recipe
    (the paper's)."""
    model = build_model("lenet300")
    if method == "dense":
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    import sparsecore.torch as st

    sparse = st.attach(
        model,
        density=density,
        seed=seed,
        update_every=None,
        prune_schedule="constant",
        recipe="paper",
    )
    return {name: sparse.mask(name).clone() for name in sparse.layer_densities()}


def test_sparse_momentum_learns_and_beats_static(tmp_path):
    """A 10%-dense LeNet-300-100 learns within 3 short epochs, and moving the mask helps.

    Masked default-initialised layers start with small activations, so sparse nets start slowly;
    the first mask update moves weights to where the momentum is (mostly the last layer).
    """
    args = ["--epochs", "3", "--density", "0.1", "--limit-train", "2000", "--limit-test", "500"]
    assert _train(tmp_path / "sparse", *args, "--method", "sparse") == 0
    assert _train(tmp_path / "static", *args, "--method", "static") == 0
    sparse, static = _summary(tmp_path / "sparse"), _summary(tmp_path / "static")
    assert sparse["final_test_acc"] > 40.0
    assert sparse["final_test_acc"] > static["final_test_acc"] + 5.0
    # Redistribution moved density between layers; the total stayed exact.
    assert sparse["layer_densities"] != static["layer_densities"]
    assert sparse["final_density"] == pytest.approx(0.1, abs=1e-6)
    # Nonzero weights never exceed the mask (grown weights start at 0 and may stay 0).
    assert sparse["final_measured_density"] <= sparse["final_density"] + 1e-12
    _check_weights_inside_masks(tmp_path / "sparse")
    assert sparse["num_mask_updates"] == 2 and static["num_mask_updates"] == 0


def test_update_every_steps_records_reports(tmp_path):
    run = tmp_path / "run"
    # 400 images / batch 50 = 8 steps per epoch, 16 in all; updates every 3 steps until
    # the last epoch starts (step 8): at steps 3 and 6.
    args = ["--method", "sparse", "--epochs", "2", "--batch-size", "50", "--update-every", "3"]
    assert _train(run, *args) == 0
    updates = json.loads((run / "mask_updates.json").read_text())
    assert len(updates) == 2
    assert _summary(run)["num_mask_updates"] == 2


@pytest.mark.parametrize("model", ["lenet5", "vgg", "wrn"])
def test_conv_models_train_sparse(tmp_path, model):
    run = tmp_path / model
    assert (
        main(
            [
                "train",
                "--data",
                "embedded",
                "--out",
                str(run),
                "--model",
                model,
                "--method",
                "sparse",
                "--epochs",
                "1",
                "--limit-train",
                "100",
                "--limit-test",
                "50",
                "--batch-size",
                "50",
                "--threads",
                "1",
                "--density",
                "0.2",
            ]
        )
        == 0
    )
    s = _summary(run)
    assert s["final_density"] == pytest.approx(0.2, abs=1e-4)
    _check_weights_inside_masks(run)
    convs = [n for n in s["layer_densities"] if "conv" in n or "features" in n]
    assert convs, "convolution weights must be sparse too"


def test_idx_directory_is_used_and_described(tmp_path, capsys):
    sub = load_embedded_fashion_mnist()
    data = tmp_path / "fm"
    data.mkdir()
    arrays = {
        "train_images": sub.train_images[:300],
        "train_labels": sub.train_labels[:300].astype("uint8"),
        "test_images": sub.test_images[:100],
        "test_labels": sub.test_labels[:100].astype("uint8"),
    }
    for key, stem in FASHION_MNIST_FILES.items():
        write_idx(data / f"{stem}.gz", arrays[key], compress=True)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--method", "dense", "--epochs", "1"]
    assert main([*args, "--threads", "1", "--no-progress"]) == 0
    s = _summary(run)
    assert s["dataset"]["name"] == "fashion-mnist" and s["dataset"]["source"] == str(data)
    assert (s["dataset"]["train_size"], s["dataset"]["test_size"]) == (300, 100)


def test_errors_are_clear_and_write_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--density", "1.5", "--epochs", "1") == 2
    assert "invalid density: 1.5" in capsys.readouterr().err
    assert not (run / "checkpoint.pt").exists()

    assert _train(run, "--method", "dense", "--epochs", "1") == 0
    assert _train(run, "--method", "dense", "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train(run, "--method", "dense", "--epochs", "1", "--overwrite") == 0

    rc = main(["train", "--resume", str(run), "--lr", "0.5", "--data", "embedded"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{run / 'checkpoint.pt'}: the options given differ" in err
    assert "\n  lr: 0.1 (checkpoint) -> 0.5 (given)\n" in err
    rc = main(["train", "--resume", str(tmp_path / "nothing")])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err
    rc = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "resnet9000"])


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    args = ["--method", "sparse", "--epochs", "1", "--limit-train", "200"]
    assert _train(tmp_path / "a", *args, "--seed", "1") == 0
    assert _train(tmp_path / "b", *args, "--seed", "1") == 0
    assert _train(tmp_path / "c", *args, "--seed", "2") == 0
    a, b = (_load_weights(tmp_path / x) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mc = _saved_masks(tmp_path / "a"), _saved_masks(tmp_path / "c")
    assert not torch.equal(ma["fc1.weight"], mc["fc1.weight"])


def test_models_registry_shapes():
    x = torch.randn(3, 1, 28, 28)
    for name in model_names():
        if name in LM_MODELS:  # language models: tests/torch/test_lm_job.py
            continue
        model = build_model(name)
        assert model(x).shape == (3, 10), name
        assert all(d == 1.0 for d in weight_densities(model).values())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="depth must be 6n\\+4"):
        build_model("wrn", depth=12)


def test_cli_import_is_framework_free():
    code = "import sys, sparsecore.cli; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "train" in text and "report" in text


def test_scale_init_multiplies_initial_sparse_weights(tmp_path):
    """With a vanishing learning rate the trained weights are the initial ones: the scaled run's
    active weights are sqrt(fan_in / active fan_in) times the plain run's, unit by unit (the
    library's scale_init), the masks identical."""
    args = ["--epochs", "1", "--limit-train", "100", "--lr", "1e-20", "--weight-decay", "0"]
    args += ["--density", "0.1", "--momentum", "0"]
    assert _train(tmp_path / "plain", *args) == 0
    assert _train(tmp_path / "scaled", *args, "--scale-init") == 0
    plain, scaled = _load_weights(tmp_path / "plain"), _load_weights(tmp_path / "scaled")
    masks = _saved_masks(tmp_path / "scaled")
    assert masks.keys() == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name, mask in masks.items():
        assert torch.equal(mask, _saved_masks(tmp_path / "plain")[name])
        factor = torch.as_tensor(sparsecore.init_scales(mask.numpy(), 0), dtype=torch.float32)
        torch.testing.assert_close(scaled[name], plain[name] * factor)
    torch.testing.assert_close(scaled["fc1.bias"], plain["fc1.bias"])
    assert _summary(tmp_path / "scaled")["config"]["scale_init"] is True


def test_default_learning_rate_follows_the_model(tmp_path):
    # LeNet-5 (no normalisation) stays at chance at 0.1, so its default is 0.01; an explicit
    # --lr always wins.
    for model, args, expected in [
        ("lenet5", [], 0.01),
        ("lenet300", [], 0.1),
        ("lenet5", ["--lr", "0.05"], 0.05),
    ]:
        out = tmp_path / f"{model}-{len(args)}"
        assert _train(out, "--model", model, "--method", "dense", "--epochs", "1", *args) == 0
        assert _summary(out)["config"]["lr"] == expected


def test_version(capsys):
    import sparsecore

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparsecore {sparsecore.__version__}"


def test_train_help_lists_every_file_a_run_writes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("checkpoint.pt", "summary.json", "mask_updates.json", "telemetry.json"):
        assert name in text
    assert "model.keras" in text  # --framework keras


def test_density_one_with_a_sparse_method_warns_that_it_trains_dense(tmp_path, capsys):
    assert _train(tmp_path / "run", "--density", "1", "--epochs", "1") == 0
    captured = capsys.readouterr()
    assert "warning: density 1 with method sparse keeps every weight" in captured.err
    assert "trains dense" in captured.err
    assert _train(tmp_path / "dense", "--method", "dense", "--epochs", "1") == 0
    assert "warning" not in capsys.readouterr().err


def test_the_first_line_comes_before_pytorch_is_loaded(tmp_path):
    """The run's first line, then what is being loaded, are out before ``import torch`` (which
    takes seconds), and a bad option is refused before it."""
    code = """
import builtins, sys
real = builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        print("<torch import>", flush=True)
    return real(name, *args, **kwargs)
builtins.__import__ = spy
import sparsecore
from sparsecore.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
sys.exit(code)
"""
    run = ["--data", "embedded", "--epochs", "1", "--limit-train", "200", "--limit-test", "100"]
    result = subprocess.run(
        [sys.executable, "-c", code, "train", *run, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "sparsecore train: lenet300, method sparse, density 0.05, 1 epoch, seed 0",
        "loading PyTorch and the dataset ...",
        "<torch import>",
    ]
    assert lines[3].startswith("dataset: fashion-mnist-subset")
    bad = subprocess.run(
        [sys.executable, "-c", code, "train", "--density", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "invalid density: 1.5" in bad.stderr
    assert "<torch import>" not in bad.stdout
