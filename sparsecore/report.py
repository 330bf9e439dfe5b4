"""What a mask update did, per layer and in total: plain data, JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    existed read as 0.
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

    @property
    def density(self) -> float:
        return self.nnz_after / self.size


@dataclass(frozen=True)
class UpdateReport:
    """One mask update: ``update`` is u (1, 2, ...), ``step`` the optimizer step it followed."""

    update: int
    prune_rate: float
    layers: tuple[LayerReport, ...]
    step: int | None = None
    skipped: bool = False
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_nnz(self) -> int:
        return sum(layer.nnz_after for layer in self.layers)

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def density(self) -> float:
        return self.total_nnz / self.total_size if self.layers else 0.0

    def totals(self) -> dict[str, int]:
        keys = ("pruned", "grown", "net_pruned", "net_grown")
        return {k: sum(getattr(layer, k) for layer in self.layers) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [dict(asdict(layer), density=layer.density) for layer in self.layers]
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
        return cls(
            update=int(data["update"]),
            prune_rate=float(data["prune_rate"]),
            layers=layers,
            step=data.get("step"),
            skipped=bool(data.get("skipped", False)),
            reason=str(data.get("reason", "")),
            extra=dict(data.get("extra", {})),
        )

