"""Class selectivity of units: how strongly each unit (neuron, conv channel) prefers one class.

The class selectivity index of Morcos et al. (2018, "On the importance of single directions for
generalization") compares a unit's mean activation on its preferred class with its mean over all
other classes::

    SI = (mu_max - mu_rest) / (mu_max + mu_rest)

where ``mu_c`` is the unit's mean activation over the samples of class ``c``, ``mu_max`` the
largest of them and ``mu_rest`` the mean of the remaining ``K - 1`` class means. For non-negative
(post-ReLU) activations SI lies in [0, 1]: 0 when every class drives the unit equally, 1 when only
one class activates it at all. The sparse-momentum paper uses it to show that sparse networks
learn features that serve more classes (lower selectivity) than dense ones.

Conventions here:

- A convolutional channel's activation for one sample is its mean over all spatial positions, so
  activations of shape ``(N, C, H, W)`` (or any ``(N, C, ...)``) become ``(N, C)`` first.
- Activations must be non-negative (take them after the ReLU): with negative values the ratio
  has no meaning (its denominator can vanish or change sign), so they are rejected.
- A **dead unit** (mean activation 0 on every class, i.e. never active on the data) has no class
  preference and a 0/0 index: its index is NaN and it is flagged in ``dead``, so that statistics
  and histograms leave it out and report how many there were instead of counting them as
  "perfectly unselective" (0) or "perfectly selective" (1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SparseCoreError

__all__ = [
    "SelectivityAccumulator",
    "SelectivityResult",
    "class_means",
    "class_selectivity",
    "selectivity_from_means",
    "unit_activations",
]


@dataclass(frozen=True)
class SelectivityResult:
    """Per-unit selectivity of one layer.

    ``index``: SI per unit (NaN for dead units); ``dead``: units never active; ``preferred``: the
    class with the largest mean (-1 for dead units); ``class_means``: ``(K, U)`` means.
    """

    index: np.ndarray
    dead: np.ndarray
    preferred: np.ndarray
    class_means: np.ndarray

    @property
    def units(self) -> int:
        return int(self.index.shape[0])

    @property
    def live(self) -> np.ndarray:
        """Indices of the units that are not dead."""
        return self.index[~self.dead]

    def summary(self) -> dict[str, Any]:
        """Mean, median and quartiles of SI over live units, and the dead-unit count."""
        live = self.live
        stats: dict[str, Any] = {"units": self.units, "dead": int(self.dead.sum())}
        if live.size:
            q1, med, q3 = np.quantile(live, [0.25, 0.5, 0.75])
            stats.update(mean=float(live.mean()), median=float(med), q1=float(q1), q3=float(q3))
        else:
            stats.update(mean=None, median=None, q1=None, q3=None)
        return stats


def unit_activations(activations: Any, name: str = "activations") -> np.ndarray:
    """``(N, U)`` float64 activations: conv maps ``(N, C, ...)`` averaged over their spatial axes."""
    a = np.asarray(activations)
    if a.ndim < 2:
        raise SparseCoreError(
            f"{name}: need activations of shape (samples, units[, spatial...]), got shape {a.shape}"
        )
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise SparseCoreError(f"{name}: activations must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if a.ndim > 2:
        a = a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2)
    return a


def class_means(
    activations: Any, labels: Any, num_classes: int | None = None, name: str = "activations"
) -> np.ndarray:
    """``(K, U)`` class-conditional mean activation of every unit (spatially averaged first)."""
    acc = SelectivityAccumulator(num_classes, name=name)
    acc.add(activations, labels)
    return acc.class_means()


def class_selectivity(
    activations: Any, labels: Any, num_classes: int | None = None, name: str = "activations"
) -> SelectivityResult:
    """Selectivity index of every unit from activations ``(N, U[, ...])`` and labels ``(N,)``.

    ``num_classes`` defaults to ``max(label) + 1``; every class must have at least one sample.
    ``name`` (e.g. the layer's) is used in error messages.
    """
    acc = SelectivityAccumulator(num_classes, name=name)
    acc.add(activations, labels)
    return acc.result()


def selectivity_from_means(means: np.ndarray, name: str = "activations") -> SelectivityResult:
    """SI from ``(K, U)`` class means (K >= 2, non-negative)."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] < 2:
        raise SparseCoreError(
            f"{name}: need class means of shape (classes >= 2, units), got {means.shape}"
        )
    if (means < 0).any():
        raise SparseCoreError(f"{name}: class means must be non-negative, min is {means.min()}")
    k = means.shape[0]
    preferred = means.argmax(axis=0)
    mu_max = means.max(axis=0)
    mu_rest = (means.sum(axis=0) - mu_max) / (k - 1)
    dead = mu_max == 0.0
    denom = np.where(dead, 1.0, mu_max + mu_rest)
    index = np.where(dead, np.nan, (mu_max - mu_rest) / denom)
    return SelectivityResult(
        index=index,
        dead=dead,
        preferred=np.where(dead, -1, preferred),
        class_means=means,
    )


class SelectivityAccumulator:
    """Class-conditional sums over batches, so a dataset's activations need not fit in memory.

    ``add(batch_activations, batch_labels)`` for each batch, then ``result()``.
    """

    def __init__(self, num_classes: int | None = None, *, name: str = "activations") -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise SparseCoreError(
                f"{name}: num_classes must be an integer >= 2, got {num_classes!r}"
            )
        self.name = name
        self.num_classes = num_classes
        self._sums: np.ndarray | None = None  # (K, U)
        self._counts: np.ndarray | None = None  # (K,)

    def add(self, activations: Any, labels: Any) -> None:
        a = unit_activations(activations, self.name)
        y = np.asarray(labels)
        if y.ndim != 1 or y.shape[0] != a.shape[0]:
            raise SparseCoreError(
                f"{self.name}: labels of shape {y.shape} do not match {a.shape[0]} samples"
            )
        if y.size and (y.dtype.kind not in "iu" or y.min() < 0):
            raise SparseCoreError(
                f"{self.name}: labels must be non-negative integers, got dtype {y.dtype}"
                + (f" with minimum {y.min()}" if y.dtype.kind in "iu" else "")
            )
        if not np.isfinite(a).all():
            raise SparseCoreError(f"{self.name}: activations contain NaN or Inf")
        if a.size and a.min() < 0:
            raise SparseCoreError(
                f"{self.name}: activations must be non-negative (take them after the ReLU); "
                f"minimum is {a.min():g}"
            )
        k_needed = int(y.max()) + 1 if y.size else 0
        if self.num_classes is not None and k_needed > self.num_classes:
            raise SparseCoreError(
                f"{self.name}: label {k_needed - 1} is out of range for {self.num_classes} classes"
            )
        if self._sums is not None and a.shape[1] != self._sums.shape[1]:
            raise SparseCoreError(
                f"{self.name}: batch has {a.shape[1]} units, earlier batches {self._sums.shape[1]}"
            )
        k = max(k_needed, self.num_classes or 0, 0 if self._sums is None else self._sums.shape[0])
        onehot = np.zeros((k, a.shape[0]))
        onehot[y.astype(np.intp), np.arange(a.shape[0])] = 1.0
        sums = onehot @ a
        counts = np.bincount(y.astype(np.intp), minlength=k).astype(np.int64)
        if self._sums is not None and self._counts is not None:
            sums[: self._sums.shape[0]] += self._sums
            counts[: self._counts.shape[0]] += self._counts
        self._sums, self._counts = sums, counts

    def class_means(self) -> np.ndarray:
        if self._sums is None or self._counts is None or self._counts.sum() == 0:
            raise SparseCoreError(f"{self.name}: no samples were added")
        if self._sums.shape[0] < 2:
            raise SparseCoreError(f"{self.name}: selectivity needs at least 2 classes")
        empty = np.flatnonzero(self._counts == 0)
        if empty.size:
            raise SparseCoreError(
                f"{self.name}: class {int(empty[0])} has no samples; every class needs at least one"
            )
        return self._sums / self._counts[:, None]

    def result(self) -> SelectivityResult:
        return selectivity_from_means(self.class_means(), self.name)
