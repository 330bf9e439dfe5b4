"""The ``sparsecore`` command: ``sparsecore train ...`` and ``sparsecore report ...``.

Torch is imported only when a subcommand needs it, so ``sparsecore --help`` and
``import sparsecore.job.cli`` stay light and framework-free. ``sparsecore train`` checks its options
and prints the run's first line before it loads the framework (seconds), so that nothing runs in
silence.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from sparsecore import __version__
from sparsecore.job.recipe import KERAS_MODELS, TORCH_MODELS, Recipe

__all__ = ["build_parser", "main"]

_MODELS = TORCH_MODELS
_METHODS = ("sparse", "dense", "static", "set")

# Options that define the run (saved in its checkpoint), as (flag, config field, argparse kwargs).
_CONFIG_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"choices": _MODELS, "help": "network (default lenet300)"}),
    (
        "--method",
        "method",
        {
            "choices": _METHODS,
            "help": "sparse = sparse momentum; static = fixed random mask; set = SET "
            "(magnitude prune by sign, random regrowth); dense = no sparsity (default sparse)",
        },
    ),
    ("--density", "density", {"type": float, "help": "fraction of weights kept (default 0.05)"}),
    ("--epochs", "epochs", {"type": int, "help": "default 20 (language models: 10)"}),
    ("--batch-size", "batch_size", {"type": int, "help": "default 100 (language models: 32)"}),
    (
        "--lr",
        "lr",
        {
            "type": float,
            "help": "initial learning rate, /10 at 50%% and 75%% "
            "(0.1; lenet5: 0.01; lstm-lm: 1; gpt-mini: 0.1)",
        },
    ),
    ("--momentum", "momentum", {"type": float, "help": "SGD Nesterov momentum (default 0.9)"}),
    ("--weight-decay", "weight_decay", {"type": float, "help": "default 5e-4"}),
    ("--seed", "seed", {"type": int, "help": "seeds weights, shuffling and masks (default 0)"}),
    ("--prune-rate", "prune_rate", {"type": float, "help": "initial prune rate (default 0.5)"}),
    (
        "--prune-schedule",
        "prune_schedule",
        {"choices": ("cosine", "linear", "constant"), "help": "default cosine"},
    ),
    (
        "--update-every",
        "update_every",
        {"type": int, "help": "mask update every N optimizer steps (default: each epoch end)"},
    ),
    ("--init", "init", {"choices": ("uniform", "ER", "ERK"), "help": "initial layer densities"}),
    (
        "--limit-train",
        "limit_train",
        {"type": int, "help": "use only the first N training images (quick runs)"},
    ),
    ("--limit-test", "limit_test", {"type": int, "help": "use only the first N test images"}),
]
# Mask options of SparseConfig, same meaning as attach()'s and SparseCallback's keywords.
_MASK_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--max-density",
        "max_density",
        {
            "type": float,
            "help": "per-layer density ceiling for redistribution (default 1: a layer may "
            "become fully dense)",
        },
    ),
    (
        "--min-density",
        "min_density",
        {"type": float, "help": "per-layer density floor: pruning stops there (default 0)"},
    ),
    (
        "--redistribution",
        "redistribution",
        {
            "choices": ("momentum", "magnitude", "nonzero", "none"),
            "help": "how the pruned budget is split across layers (default: the method's; "
            "momentum for sparse, none for set)",
        },
    ),
    (
        "--growth",
        "growth",
        {
            "choices": ("momentum", "momentum_neuron", "random", "gradient"),
            "help": "which inactive weights regrow (default: the method's; momentum for "
            "sparse, random for set)",
        },
    ),
    (
        "--ablate-below",
        "ablate_below",
        {
            "type": float,
            "metavar": "FRACTION",
            "help": "structure: each mask update empties the output units whose fan-in pruning "
            "left below FRACTION of the layer's mean and gives their weights to the rest, so "
            "that compaction removes them (default 0: off)",
        },
    ),
    (
        "--stop-at",
        "stop_at",
        {
            "type": float,
            "metavar": "FRACTION",
            "help": "no mask update at or after this fraction of training, e.g. 0.5 freezes "
            "the masks at the first learning-rate decay (default: updates until the last "
            "epoch, which has none)",
        },
    ),
]
_CONFIG_FLAGS: list[tuple[str, str, str]] = [
    ("--dense-first", "dense_first", "keep the first layer dense"),
    ("--dense-last", "dense_last", "keep the last layer dense"),
    (
        "--scale-init",
        "scale_init",
        "scale each output unit's initial weights by sqrt(fan-in / active fan-in), the dense "
        "output scale (not in the paper)",
    ),
    (
        "--cover-units",
        "cover_units",
        "give every output unit an initial weight where the budget allows (not in the paper)",
    ),
    (
        "--revive-dead-units",
        "revive_dead_units",
        "regrow output units without weights or gradient, at non-zero weights (not in the paper)",
    ),
]


_RECIPE_FIELDS = frozenset(Recipe.__dataclass_fields__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsecore",
        description="Train neural networks that stay sparse from the first step to the last.",
    )
    parser.add_argument("--version", action="version", version=f"sparsecore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a model on Fashion-MNIST, or a character-level language model (dense or "
        "sparse)",
        description="Train a model on Fashion-MNIST (the installed copy, or the embedded subset), "
        "or a character-level language model on English text (--model lstm-lm | gpt-mini). "
        "After every epoch it writes to --out: checkpoint.pt (everything --resume needs), "
        "summary.json (options, metrics per epoch, final accuracy), mask_updates.json (one "
        "record per mask update) and telemetry.json (the run record 'sparsecore report' reads). "
        "With --framework keras it writes summary.json, model.keras and telemetry.json when the "
        "run ends. --tensorboard DIR adds TensorBoard event files in DIR.",
        argument_default=argparse.SUPPRESS,
    )
    for flag, dest, kwargs in _CONFIG_OPTIONS + _MASK_OPTIONS:
        train.add_argument(flag, dest=dest, **kwargs)
    for flag, dest, text in _CONFIG_FLAGS:
        train.add_argument(flag, dest=dest, action="store_true", help=text)
    train.add_argument(
        "--no-nesterov", dest="nesterov", action="store_false", help="plain momentum SGD"
    )
    train.add_argument(
        "--data",
        help="folder with the Fashion-MNIST IDX files, or 'embedded' for the shipped subset "
        "(default: /usr/share/datasets/fashion-mnist if present, else the embedded subset); for "
        "lstm-lm and gpt-mini a plain-text file (.gz or not), or 'embedded' for the shipped "
        "excerpt of the Jargon File (default: Debian's jargon-text copy if installed)",
    )
    train.add_argument("--out", help="run folder (default runs/MODEL-METHOD[-dDENSITY]-seedSEED)")
    train.add_argument(
        "--resume",
        help="run folder (or checkpoint file) to continue from; its options and data are reused, "
        "and --epochs N with a larger N extends the run",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write the run's scalars (densities, pruned/grown, accuracy) for TensorBoard "
        "to DIR (needs the tensorboard or tensorboardX package)",
    )
    train.add_argument(
        "--framework",
        choices=("torch", "keras"),
        help="torch (default) or keras: the Keras 3 job of sparsecore.keras.train "
        "(lenet300/lenet5; KERAS_BACKEND picks Keras' backend)",
    )
    train.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCH",
        help="stop after this epoch (checkpoint kept; continue later with --resume)",
    )
    train.add_argument(
        "--progress",
        dest="progress",
        action=argparse.BooleanOptionalAction,
        help="live progress line (default: only when stdout is a terminal)",
    )
    sub.add_parser(
        "report",
        help="summarise and plot finished runs (sparsecore report --help)",
        add_help=False,
    )
    return parser


def _default_out(cfg: Any) -> Path:
    name = f"{cfg.model}-{cfg.method}"
    if cfg.method != "dense":
        name += f"-d{cfg.density:g}"
    return Path("runs") / f"{name}-seed{cfg.seed}"


def _train_keras(given: dict[str, Any]) -> int:
    """``--framework keras``: the Keras job (sparsecore.keras.train), same options and outputs."""
    from sparsecore.job.datasets import load_embedded_fashion_mnist
    from sparsecore.job.recipe import DEFAULT_LR
    from sparsecore.job.rundir import check_run_folder

    torch_only = {"resume", "stop_after", "progress", "tensorboard"}
    if not given.get("progress", True):
        given = {
            k: v for k, v in given.items() if k != "progress"
        }  # the Keras job has no live line
    unsupported = sorted(torch_only & set(given))
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        print(
            f"sparsecore train: error: {flags} not supported with --framework keras",
            file=sys.stderr,
        )
        return 2
    try:
        config_keys = {dest for _, dest, _ in _CONFIG_OPTIONS + _MASK_OPTIONS}
        config_keys |= {d for _, d, _ in _CONFIG_FLAGS}
        config_keys.add("nesterov")
        options = {k: v for k, v in given.items() if k in config_keys}
        options.setdefault("lr", DEFAULT_LR.get(options.get("model", "lenet300"), 0.1))
        _announce(options, KERAS_MODELS, "keras", "Keras")
        try:
            from sparsecore.keras.train import KerasTrainConfig, run_training
        except ImportError as err:
            raise ValueError(
                f"--framework keras needs Keras 3 and a backend for it (pip install "
                f"'sparsecore[keras]'): {err}"
            ) from None

        cfg = KerasTrainConfig.from_options(options)
        cfg.validate()
        out = (
            Path(given["out"])
            if "out" in given
            else _default_out(cfg).with_name(_default_out(cfg).name + "-keras")
        )
        check_run_folder(out)
        if (out / "summary.json").exists() and not given.get("overwrite", False):
            print(
                f"sparsecore train: {out} already holds a run; pass --overwrite to replace it, "
                "or another --out",
                file=sys.stderr,
            )
            return 2
        data = given.get("data")
        dataset = load_embedded_fashion_mnist() if data == "embedded" else None
        run_training(
            cfg,
            data=None if data == "embedded" else data,
            dataset=dataset,
            out_dir=out,
            threads=given.get("threads"),
            announce=False,
        )
    except BaseException as exc:
        return _failure(exc)
    return 0


def _failure(exc: BaseException) -> int:
    """The exit status and one message for what ended a training job early.

    Ctrl-C: what was saved and how to continue (130). Something the user can fix (an option, a
    file, the data, a checkpoint, a folder, a learning rate that makes the loss diverge): one
    line naming it (2). Anything else is a bug and keeps its traceback.
    """
    from sparsecore.job.recipe import TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        print(f"sparsecore train: {exc.message()}", file=sys.stderr)
        return 130
    if isinstance(exc, KeyboardInterrupt):
        print("sparsecore train: interrupted before the first epoch; nothing was written",
              file=sys.stderr)  # fmt: skip
        return 130
    if isinstance(exc, (ValueError, OSError, FloatingPointError)):
        print(f"sparsecore train: error: {exc}", file=sys.stderr)
        return 2
    raise exc


def _announce(options: dict[str, Any], models: Sequence[str], framework: str, name: str) -> None:
    """Check the options that need no framework, print the run's first line and the warnings
    about the options, and say what the next seconds are spent on. Raises ValueError (exit 2,
    before the framework is loaded) for a bad option."""
    recipe = Recipe.from_dict({k: v for k, v in options.items() if k in _RECIPE_FIELDS})
    recipe.check(models, framework=name if framework == "keras" else "")
    _say(recipe.headline(framework if framework == "keras" else ""))
    for caveat in recipe.caveats() if _first_rank() else []:
        print(f"sparsecore train: warning: {caveat}", file=sys.stderr)
    _say(f"loading {name} and the dataset ...")


def _first_rank() -> bool:
    """False on the ranks but the first of a ``torchrun`` launch, which print nothing of their
    own (the job's lines come from rank 0)."""
    return os.environ.get("RANK", "0") == "0"


def _say(line: str, stream: TextIO | None = None) -> None:
    if not _first_rank():
        return
    out = sys.stdout if stream is None else stream
    out.write(line + "\n")
    out.flush()


def _train(args: argparse.Namespace) -> int:
    if vars(args).pop("framework", "torch") == "keras":
        return _train_keras(vars(args))
    from sparsecore.job.recipe import model_defaults
    from sparsecore.job.rundir import check_run_folder

    given = vars(args)
    config_keys = {dest for _, dest, _ in _CONFIG_OPTIONS + _MASK_OPTIONS}
    config_keys |= {d for _, d, _ in _CONFIG_FLAGS}
    config_keys.add("nesterov")
    overrides = {k: v for k, v in given.items() if k in config_keys}
    resume = given.get("resume")
    try:
        if resume is None:
            for key, value in model_defaults(overrides.get("model", "lenet300")).items():
                overrides.setdefault(key, value)
            _announce(overrides, _MODELS, "", "PyTorch")
        else:
            _say(f"sparsecore train: resuming {resume}; loading PyTorch ...")
        from sparsecore.torch.train import (
            CHECKPOINT_NAME,
            TrainConfig,
            load_checkpoint_config,
            run_folder_of,
            run_training,
        )

        if resume is not None:
            cfg, ckpt_path = load_checkpoint_config(resume)
            for key, value in overrides.items():
                setattr(cfg, key, value)  # a differing value is reported by run_training
            out = Path(given["out"]) if "out" in given else run_folder_of(ckpt_path)
        else:
            cfg = TrainConfig(**overrides)
            out = Path(given["out"]) if "out" in given else _default_out(cfg)
            check_run_folder(out)
            if (out / CHECKPOINT_NAME).exists() and not given.get("overwrite", False):
                print(
                    f"sparsecore train: {out} already holds a run; pass --resume {out} to "
                    "continue it, --overwrite to replace it, or another --out",
                    file=sys.stderr,
                )
                return 2
        run_training(
            cfg,
            data=given.get("data"),
            out_dir=out,
            resume=resume,
            threads=given.get("threads"),
            progress=given.get("progress"),
            stop_after=given.get("stop_after"),
            tensorboard=given.get("tensorboard"),
            announce=resume is not None,  # a new run's first line is out already
        )
    except BaseException as exc:
        return _failure(exc)
    return 0


def _report(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("sparsecore.records.report_command") is None:
        print(
            "sparsecore report: not available in this installation (module "
            "sparsecore.records.report_command is missing)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module("sparsecore.records.report_command")
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(
            "sparsecore report: not available in this installation "
            "(sparsecore.records.report_command has no main())",
            file=sys.stderr,
        )
        return 2
    result = entry(list(argv))
    return int(result or 0)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """While the job runs, show sparsecore's own warnings as one line each (``sparsecore train:
    Category: text``) on stderr, not as Python's ``file:line`` and the source line that raised
    it: the job is an application, and those warnings (dead units, ...) are addressed to its
    user. Other libraries' warnings are shown as before."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not category.__module__.startswith("sparsecore"):
            previous(message, category, filename, lineno, file, line)
            return
        print(f"sparsecore train: {category.__name__}: {message}", file=file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsecore`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return _report(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    del args.command
    with warnings_as_lines():
        return _train(args)


if __name__ == "__main__":
    sys.exit(main())
