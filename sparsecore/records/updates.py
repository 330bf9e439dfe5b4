"""What a mask update did, per layer and in total: the one data model, plain and JSON-ready.

The engine returns an :class:`UpdateReport` from every update; a run record
(:class:`~sparsecore.records.run_record.RunRecord`) is a run's list of them, with the
training job's epoch and each layer's ever-active count filled in. Both are the same classes, so
a count has one name wherever it is read: ``nnz_after`` (the active count after the update; the
run-record files call it ``nnz``), ``pruned``/``grown`` (gross) and ``net_pruned``/``net_grown``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["COUNT_KEYS", "LayerReport", "UpdateReport"]

#: The integer counts summed over layers by :meth:`UpdateReport.totals`.
COUNT_KEYS = ("pruned", "grown", "net_pruned", "net_grown")


@dataclass(frozen=True)
class LayerReport:
    """One layer's part of one mask update.

    ``pruned``/``grown`` are gross counts (r_l, g_l); ``net_pruned``/``net_grown`` count positions
    whose state really changed (a weight pruned and regrown in the same update is in the gross
    counts only). ``importance`` is s_l, ``share`` pi_l (for ``redistribution='none'``, the
    layer's fraction of the regrowth), ``capacity`` c_l. ``units`` is the number of output units,
    ``dead_units`` how many were dead when the update found the layer (no active weight, or no
    gradient: :mod:`sparsecore.units`) and ``revived`` how many weights were grown into them with
    a non-zero start (``revive_dead_units``). ``ablated`` is how many units the update emptied
    and kept empty (``ablate_below``, :mod:`sparsecore.structured`). Reports written before these
    existed read as 0 (no layer has 0 units, so ``units == 0`` means "not recorded").
    ``ever_active`` counts the positions active at any time so far, initial mask included; a run
    record fills it in (``None`` where it was not counted).
    """

    name: str
    size: int
    nnz_before: int
    nnz_after: int
    pruned: int
    grown: int
    net_pruned: int
    net_grown: int
    importance: float
    share: float
    capacity: int
    units: int = 0
    dead_units: int = 0
    revived: int = 0
    ablated: int = 0
    ever_active: int | None = None

    @property
    def nnz(self) -> int:
        """The active count after the update (``nnz_after``), under the run-record files' key."""
        return self.nnz_after

    @property
    def density(self) -> float:
        return self.nnz_after / self.size

    @property
    def dead_fraction(self) -> float | None:
        """Share of the layer's output units found dead (None when not recorded)."""
        return self.dead_units / self.units if self.units else None

    @property
    def ever_active_fraction(self) -> float | None:
        return None if self.ever_active is None else self.ever_active / self.size


@dataclass(frozen=True)
class UpdateReport:
    """One mask update: ``update`` is u (1, 2, ...), ``step`` the optimizer step it followed.

    A skipped update (non-finite inputs with ``on_nonfinite='skip'``) has no layers and a reason.
    ``epoch`` is the training epoch the update happened in, where a training job knows it (run
    records); ``extra`` holds what an engine adds (its ``ever_active`` counts per layer).
    """

    update: int
    prune_rate: float
    layers: tuple[LayerReport, ...]
    step: int | None = None
    skipped: bool = False
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    @property
    def total_nnz(self) -> int:
        return sum(layer.nnz_after for layer in self.layers)

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def nnz(self) -> int:
        """``total_nnz``, under the run-record files' key."""
        return self.total_nnz

    @property
    def size(self) -> int:
        """``total_size``, under the run-record files' key."""
        return self.total_size

    @property
    def density(self) -> float:
        return self.total_nnz / self.total_size if self.layers else 0.0

    @property
    def ever_active_fraction(self) -> float | None:
        """Share of all positions ever active (None when a layer's count is not known)."""
        if not self.layers or any(layer.ever_active is None for layer in self.layers):
            return None
        return sum(int(layer.ever_active or 0) for layer in self.layers) / self.total_size

    def total(self, key: str) -> int:
        """Sum of an integer field (``pruned``, ``grown``, ``net_pruned``, ...) over layers."""
        return sum(int(getattr(layer, key)) for layer in self.layers)

    def totals(self) -> dict[str, int]:
        return {key: self.total(key) for key in COUNT_KEYS}

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["epoch"] is None:
            del out["epoch"]
        out["layers"] = [_layer_dict(layer) for layer in self.layers]
        out["total_nnz"] = self.total_nnz
        out["density"] = self.density
        out.update(self.totals())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpdateReport:
        names = LayerReport.__dataclass_fields__
        layers = tuple(
            LayerReport(**{k: v for k, v in layer.items() if k in names})
            for layer in data["layers"]
        )
        epoch = data.get("epoch")
        return cls(
            update=int(data["update"]),
            prune_rate=float(data["prune_rate"]),
            layers=layers,
            step=data.get("step"),
            skipped=bool(data.get("skipped", False)),
            reason=str(data.get("reason", "")),
            extra=dict(data.get("extra", {})),
            epoch=None if epoch is None else int(epoch),
        )


def _layer_dict(layer: LayerReport) -> dict[str, Any]:
    out = asdict(layer)
    if out["ever_active"] is None:  # an engine's report: its counts are in ``extra``
        del out["ever_active"]
    out["density"] = layer.density
    return out
