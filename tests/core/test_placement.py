"""One vocabulary for where mask updates run, shared by the adapters (sparsecore.placement)."""

from __future__ import annotations

import pytest

from sparsecore import SparseCoreError
from sparsecore.placement import ALIASES, PLACEMENTS, placement_of


def test_every_framework_takes_the_placements_and_its_earlier_names():
    assert PLACEMENTS == ("auto", "host", "device")
    for framework in ("torch", "keras"):
        assert [placement_of(p, framework) for p in PLACEMENTS] == list(PLACEMENTS)
    assert ALIASES == {
        "torch": {"numba": "host", "torch": "device"},
        "keras": {"numpy": "host", "keras": "device"},
    }
    for framework, aliases in ALIASES.items():
        for old, new in aliases.items():
            assert placement_of(old, framework) == new


@pytest.mark.parametrize(
    "value,framework",
    [("numpy", "torch"), ("numba", "keras"), ("cuda", "torch"), (None, "keras"), (1, "torch")],
)
def test_a_word_of_another_framework_or_none_is_refused_with_the_choices(value, framework):
    with pytest.raises(SparseCoreError) as err:
        placement_of(value, framework)
    message = str(err.value)
    assert message.startswith("update_backend must be one of ['auto', 'host', 'device']")
    assert message.endswith(f"got {value!r}")
    for old in ALIASES[framework]:
        assert repr(old) in message
