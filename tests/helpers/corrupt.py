"""Corruptions of a real saved state, one field at a time, for the all-or-nothing restore tests.

:func:`corruptions` lists every way to break one field of a state that no valid state allows: a
missing or unknown key, a value of the wrong type or out of range, an array of the wrong shape
or dtype, a list one entry short or long. :func:`apply` makes the corrupted copy, and
:func:`field_name` says which name the error message must hold. Fields that legitimately take
``None`` are listed in ``nullable``; free-text fields in ``free_text`` (any string is valid there).
"""

from __future__ import annotations

import copy
import math
from typing import Any

Path = tuple[Any, ...]
Corruption = tuple[Path, str]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def _values(x: Any, key: Any, nullable: set[str], free_text: set[str]) -> list[str]:
    if x is None:
        return ["abc", "-1"]
    if isinstance(x, bool):
        return ["abc", "2", "None"]
    if isinstance(x, int):
        return ["abc", "True", "-1", "1.5", *([] if key in nullable else ["None"])]
    if isinstance(x, float):
        return ["abc", "True", "-1.0", "nan", "inf", *([] if key in nullable else ["None"])]
    if isinstance(x, str):
        return ["5", "None", *([] if key in free_text else ["abc"])]
    if _is_array(x):
        return ["abc", "None", "shape", "dtype"]
    raise TypeError(f"no corruption for {type(x).__name__} at {key!r}")


#: Fields added after states were first saved: a state without them is a valid older state
#: (they read as off / 0), so their absence is no corruption. Their bad values still are.
ADDED_LATER = frozenset(
    {
        "cover_units",
        "revive_dead_units",
        "units",
        "dead_units",
        "revived",
        "ablate_below",
        "ablated",
        "scale_init",
    }
)


def corruptions(
    state: Any, *, nullable: set[str] = frozenset(), free_text: set[str] = frozenset()
) -> list[Corruption]:
    """Every (path, corruption) of ``state``'s fields (see the module doc)."""
    out: list[Corruption] = []

    def walk(node: Any, path: Path, key: Any) -> None:
        if isinstance(node, dict):
            out.extend((path, f"missing:{k}") for k in node if k not in ADDED_LATER)
            out.append((path, "extra"))
            for k, v in node.items():
                walk(v, (*path, k), k)
        elif isinstance(node, (list, tuple)):
            out.append((path, "drop_last" if node else "append_junk"))
            if node:
                out.append((path, "append_copy"))
            for i, v in enumerate(node):
                walk(v, (*path, i), key)
        else:
            for how in _values(node, key, set(nullable), set(free_text)):
                new = None if _is_array(node) else _replacement(node, how)
                if _is_array(node) or type(new) is not type(node) or new != node:
                    out.append((path, how))  # a "corruption" to the value it holds is none

    walk(state, (), None)
    return out


def _bad_array(x: Any, how: str) -> Any:
    """``x`` one element short (another shape), or in an integer dtype (a wrong one for masks
    and for floating-point arrays alike)."""
    if hasattr(x, "clone"):  # a torch tensor
        import torch

        if how == "shape":
            return x.reshape(-1)[:-1].clone()
        return x.to(torch.uint8 if x.dtype == torch.bool else torch.int64)
    if how == "shape":
        return x.reshape(-1)[:-1].copy()
    return x.astype("uint8" if x.dtype == bool else "int64")


def _replacement(old: Any, how: str) -> Any:
    simple = {"abc": "abc", "5": 5, "None": None, "True": True, "2": 2, "-1": -1, "1.5": 1.5}
    simple.update({"-1.0": -1.0, "nan": math.nan, "inf": math.inf})
    if how in simple:
        return simple[how]
    return _bad_array(old, how)


def apply(state: Any, corruption: Corruption) -> Any:
    """A deep copy of ``state`` with ``corruption`` made."""
    path, how = corruption
    out = copy.deepcopy(state)
    parent = None
    node = out
    for step in path:
        parent, node = node, node[step]
    if how.startswith("missing:"):
        del node[how.removeprefix("missing:")]
    elif how == "extra":
        node["bogus_field"] = 1
    elif how in ("drop_last", "append_copy", "append_junk"):
        items = list(node)
        if how == "drop_last":
            items = items[:-1]
        else:
            items.append(copy.deepcopy(items[-1]) if how == "append_copy" else "abc")
        new = type(node)(items) if isinstance(node, tuple) else items
        if parent is None:
            return new
        parent[path[-1]] = new
    else:
        assert parent is not None
        if isinstance(parent, tuple):  # rebuild the tuple one level up is not needed in states
            raise TypeError("states hold lists, not tuples")
        parent[path[-1]] = _replacement(node, how)
    return out


def field_name(corruption: Corruption) -> str:
    """The name the error message must hold: the corrupted key, or the nearest key above."""
    path, how = corruption
    if how.startswith("missing:"):
        return how.removeprefix("missing:")
    if how == "extra":
        return "bogus_field"
    names = [p for p in path if isinstance(p, str)]
    return names[-1] if names else ""
