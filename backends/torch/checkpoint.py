"""The checkpoint of ``sparsecore train``: what it holds, written in full, read without running code.

A checkpoint is read with ``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler
builds tensors and plain containers (dicts, lists, tuples, numbers, strings, ``OrderedDict``,
``Counter``) and nothing else, so a file passed to ``--resume`` cannot run code, whatever it holds.
A foreign pickle is refused with a message that says so. The only other types allowed are the
NumPy array pieces that checkpoints written before this format held (NumPy's RNG state); new
checkpoints store that state as a tensor. Everything read is then checked field by field before
the job uses it, so a truncated, damaged or foreign file ends in one line naming the file and the
problem, never in a traceback.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "sparsecore.train/2"

#: Every field of a checkpoint and the type it must have ("format", "data" and
#: "schedule_epochs" are absent from checkpoints of format 1).
FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "epoch": (int,),
    "model": (dict,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "sparse": (dict, type(None)),
    "rng": (dict,),
    "metrics": (list,),
    "mask_updates": (list,),
    "wall_time_s": (float, int),
}
NEW_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "data": (dict,),
    "schedule_epochs": (int,),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, foreign, or missing what a resume needs."""


def _numpy_globals() -> list[Any]:
    """The NumPy types an array in a format-1 checkpoint (NumPy's RNG state) is rebuilt from."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded without running code and checked; else raise
    :class:`CheckpointError` naming the file and the problem."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: cannot be read (permission denied)") from None
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: not a sparsecore checkpoint: it holds Python objects other than "
                f"tensors and plain containers, which a checkpoint never does; it was not "
                f"loaded (no code in it ran)"
            ) from None
        raise CheckpointError(
            f"{path}: not a checkpoint (damaged or foreign: {_brief(err)})"
        ) from None
    except Exception as err:  # torch.load fails on a damaged file in many ways (KeyError too)
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or damaged: {_brief(err)})"
        ) from None
    _check_fields(path, ckpt)
    return ckpt


def _brief(err: BaseException) -> str:
    """The error's type and first sentence, for a one-line message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(". ")[0][:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_fields(path: Path, ckpt: Any) -> None:
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: not a sparsecore checkpoint (it holds a {type(ckpt).__name__}, not a dict)"
        )
    fields = dict(FIELDS)
    if "format" in ckpt:
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: checkpoint format {ckpt['format']!r}; this sparsecore reads "
                f"{CHECKPOINT_FORMAT!r} and the format before it"
            )
        fields.update(NEW_FIELDS)
    missing = [k for k in fields if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not a sparsecore checkpoint (field {missing[0]!r} is missing)"
        )
    for key, types in fields.items():
        value = ckpt[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(
                f"{path}: field {key!r} holds a {type(value).__name__}, not a "
                f"{' or '.join(t.__name__ for t in types)}"
            )
    if ckpt["epoch"] < 1:
        raise CheckpointError(f"{path}: field 'epoch' is {ckpt['epoch']}, not an epoch >= 1")
    for key in ("model",):
        for name, value in ckpt[key].items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{path}: field {key!r} entry {name!r} holds a {type(value).__name__}, "
                    f"not a tensor"
                )


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states, in types a weights-only load reads."""
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global state user code uses)
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any], where: Path | str = "checkpoint") -> None:
    """Restore :func:`rng_state` output (or a format-1 checkpoint's NumPy tuple). All three
    states are checked first; a bad one raises :class:`CheckpointError` and sets nothing."""
    try:
        python = _python_state(state["python"])
        numpy_state = state["numpy"]
        if isinstance(numpy_state, dict):
            numpy_state = {
                "bit_generator": str(numpy_state["bit_generator"]),
                "state": {
                    "key": numpy_state["key"].numpy().astype(np.uint32),
                    "pos": int(numpy_state["pos"]),
                },
                "has_gauss": int(numpy_state["has_gauss"]),
                "gauss": float(numpy_state["gauss"]),
            }
        generator = np.random.RandomState()
        generator.set_state(numpy_state)
        torch_state = state["torch"]
        if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
            raise TypeError("the torch state must be a uint8 tensor")
        spare = torch.Generator()
        spare.set_state(torch_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{where}: field 'rng' is not a valid RNG state ({err})") from None
    random.setstate(python)
    np.random.set_state(numpy_state)  # noqa: NPY002
    torch.set_rng_state(torch_state)


def _python_state(value: Sequence[Any]) -> tuple[Any, ...]:
    version, internal, gauss = value
    spare = random.Random()
    spare.setstate((version, tuple(internal), gauss))  # raises for a bad state
    return (version, tuple(internal), gauss)
