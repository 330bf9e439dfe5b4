"""Route sparse ``nn.Linear`` / ``nn.Conv2d`` layers through real sparse kernels.

The adapter hands the router its sparse layers (name, module, live boolean mask). The router
replaces the forward of each layer where sparse kernels pay off with one that calls the sparse
autograd functions, leaves every other layer untouched, and restores all modules on ``remove``.

Where it is worth it: a layer runs on the sparse kernels while its sparsity (1 - density) is at
least ``min_sparsity``. The default comes from ``benchmarks/kernels_cpu.py`` (see
``docs/kernels-cpu.md``): below it the dense BLAS / oneDNN path is as fast or faster. The
decision is taken per layer at construction and again on every ``refresh()``, since sparse
momentum moves density between layers. A routed layer also falls back to the dense forward for
inputs the kernels do not take (a device other than the CPU, a dtype other than float32/float64,
autocast, a weight dtype that differs from the input's).

The modes ``"compact"``, ``"compact+cpu"`` and ``"compact+cuda"`` route every sparse layer (a
grouped convolution excepted) through :mod:`sparsecore.torch.compact_functions` instead: the
layer computes on the block of its active rows and read input channels, with dense kernels or,
where the block is still ``min_sparsity`` sparse, the CPU / CUDA sparse kernels on it. Compaction
never adds work, so it is not gated by density.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compact_functions import CompactFunction, CompactLayerState
from .sparse_functions import (
    SUPPORTED_DTYPES,
    ConvLayerState,
    LinearLayerState,
    SparseConv2dFunction,
    SparseLinearFunction,
)

__all__ = ["COMPACT_MODES", "DEFAULT_MIN_SPARSITY", "MODES", "KernelRouter"]

#: Sparsity from which a layer runs on the CPU kernels (measured break-even, docs/kernels-cpu.md).
DEFAULT_MIN_SPARSITY = 0.85

MODES = ("cpu", "cuda", "auto", "compact", "compact+cpu", "compact+cuda")
#: Modes that run routed layers on their gathered active channels (compact_functions), and the
#: kernels each runs on the gathered block.
COMPACT_MODES = {"compact": "dense", "compact+cpu": "cpu", "compact+cuda": "cuda"}

_MISSING = object()


@dataclass(eq=False)
class _Route:
    name: str
    module: nn.Module
    state: LinearLayerState | ConvLayerState | CompactLayerState
    kind: str
    saved_forward: Any = _MISSING
    installed: bool = False
    use_sparse: bool = False
    reason: str | None = None


@dataclass
class StepTimes:
    """Wall time between consecutive optimizer steps (a whole training step: data, forward,
    backward, optimizer, and the mask update when one is due), in seconds."""

    steps: int = 0
    total: float = 0.0
    least: float = float("inf")
    last: float = 0.0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.total += seconds
        self.least = min(self.least, seconds)
        self.last = seconds

    def as_dict(self) -> dict[str, Any]:
        if not self.steps:
            return {"steps": 0}
        return {
            "steps": self.steps,
            "mean": self.total / self.steps,
            "min": self.least,
            "last": self.last,
        }


@dataclass
class _StepClock:
    """Step times, apart for steps inside the dense-gradient window and outside it."""

    window: StepTimes = field(default_factory=StepTimes)
    outside: StepTimes = field(default_factory=StepTimes)
    last_end: float | None = None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of a Conv2d, or None if the kernels cannot express it."""
    if module.padding_mode != "zeros":
        return None
    pad = module.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        dil = _pair(module.dilation)
        ks = _pair(module.kernel_size)
        totals = [dil[i] * (ks[i] - 1) for i in range(2)]
        if any(t % 2 for t in totals):
            return None  # PyTorch pads asymmetrically here
        return (totals[0] // 2, totals[1] // 2)
    return _pair(pad)


def _cpu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if this input and weight can run on the Numba CPU kernels."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in SUPPORTED_DTYPES
    )


def _cuda_functions() -> Any:
    """The CUDA autograd functions, or a sentence saying why they cannot run here."""
    try:
        from sparsecore import kernels

        from . import cuda_kernels
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"CUDA kernels unavailable: {exc}"
    if not kernels.cuda_available():
        return "CUDA kernels unavailable: CuPy with a working GPU driver is required"
    return cuda_kernels


class KernelRouter:
    """Installs sparse CPU kernels on the layers where they are worth it.

    Args:
        targets: ``(qualified name, module, mask)`` per sparse layer; ``mask`` is a bool tensor
            of the weight's shape that the caller keeps up to date in place.
        mode: ``"cpu"`` (Numba kernels for layers on the CPU; other layers stay dense),
            ``"cuda"`` (CUDA kernels of :mod:`sparsecore.torch.cuda_kernels` for layers on a GPU;
            other layers stay dense) or ``"auto"`` (each layer on the kernels of its device).
        min_sparsity: a layer is routed while ``1 - density >= min_sparsity``.
        dense_grad: initial state of the dense-weight-gradient switch (see
            :meth:`set_dense_weight_grad`).
    """

    def __init__(
        self,
        targets: list[tuple[str, nn.Module, torch.Tensor]],
        mode: str,
        min_sparsity: float = DEFAULT_MIN_SPARSITY,
        dense_grad: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"kernels mode must be one of {MODES}, got {mode!r}")
        if isinstance(min_sparsity, bool) or not 0.0 <= float(min_sparsity) <= 1.0:
            raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
        self.mode = mode
        self.min_sparsity = float(min_sparsity)
        self._dense_grad = bool(dense_grad)
        self._dense_windows = 0
        self._clock = _StepClock()
        self._routes = [self._make_route(name, module, mask) for name, module, mask in targets]
        names = [r.name for r in self._routes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate layer names in kernel targets: {names}")
        for route in self._routes:
            self._install(route)
        self._decide()

    # -- construction -------------------------------------------------------------------

    def _make_route(self, name: str, module: nn.Module, mask: torch.Tensor) -> _Route:
        """Validate one target (raising before anything is installed) and build its state."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask of layer {name!r} must be a bool tensor, got {what}")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"layer {name!r} ({type(module).__name__}) has no weight tensor")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask of layer {name!r} has shape {tuple(mask.shape)}, "
                f"weight has shape {tuple(weight.shape)}"
            )
        state: LinearLayerState | ConvLayerState | CompactLayerState
        if self.mode in COMPACT_MODES and isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
            state = CompactLayerState(
                name=name,
                mask=mask,
                dense_weight_grad=self._dense_grad,
                module=module,
                inner=COMPACT_MODES[self.mode],
                min_sparsity=self.min_sparsity,
                padding=_conv_padding(module) if kind == "conv2d" else None,  # type: ignore[arg-type]
            )
        elif isinstance(module, nn.Linear):
            kind = "linear"
            state = LinearLayerState(name=name, mask=mask, dense_weight_grad=self._dense_grad)
        elif isinstance(module, nn.Conv2d):
            kind = "conv2d"
            state = ConvLayerState(
                name=name,
                mask=mask,
                dense_weight_grad=self._dense_grad,
                stride=_pair(module.stride),
                padding=_conv_padding(module) or (0, 0),
                dilation=_pair(module.dilation),
                groups=int(module.groups),
            )
        else:
            raise TypeError(
                f"layer {name!r}: sparse kernels handle nn.Linear and nn.Conv2d, "
                f"got {type(module).__name__}"
            )
        route = _Route(name=name, module=module, state=state, kind=kind)
        route.reason = self._unsupported_reason(route)
        return route

    def _unsupported_reason(self, route: _Route) -> str | None:
        module = route.module
        base = nn.Linear if route.kind == "linear" else nn.Conv2d
        if type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides forward"
        if self.mode in COMPACT_MODES:
            if route.kind == "conv2d" and int(module.groups) != 1:  # type: ignore[arg-type]
                return f"grouped convolution (groups={module.groups}); compaction takes groups=1"
            return None  # dense kernels on the block run on any device and dtype
        if route.kind == "conv2d" and _conv_padding(module) is None:  # type: ignore[arg-type]
            return "padding mode or asymmetric 'same' padding not supported"
        weight = module.weight
        device = weight.device.type
        if device == "cpu":
            if self.mode == "cuda":
                return "weight on cpu; kernels='cuda' runs only layers on a GPU"
            if weight.dtype not in SUPPORTED_DTYPES:
                return f"weight dtype {weight.dtype} not supported by the CPU kernels"
            return None
        if device == "cuda" and self.mode in ("cuda", "auto"):
            cuda = _cuda_functions()
            if isinstance(cuda, str):
                return cuda
            if weight.dtype not in cuda.CUDA_DTYPES:
                return f"weight dtype {weight.dtype} not supported by the CUDA kernels"
            return None
        return f"weight on {device}; no kernels for it in mode {self.mode!r}"

    def _install(self, route: _Route) -> None:
        if route.reason is not None:
            return
        module = route.module
        route.saved_forward = module.__dict__.get("forward", _MISSING)
        dense_forward = module.forward
        module.forward = self._routed_forward(route, dense_forward)
        route.installed = True

    def _routed_forward(
        self, route: _Route, dense_forward: Callable[..., torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        if isinstance(route.state, CompactLayerState):
            return self._compact_forward(route, dense_forward)
        module = route.module
        state = route.state
        linear = route.kind == "linear"
        on_gpu = module.weight.device.type == "cuda"
        if on_gpu:
            cuda = _cuda_functions()
            assert not isinstance(cuda, str)
            function: Any = (
                cuda.CudaSparseLinearFunction if linear else cuda.CudaSparseConv2dFunction
            )
            device_ok: Callable[[torch.Tensor, torch.Tensor], bool] = cuda.cuda_supported
        else:
            function = SparseLinearFunction if linear else SparseConv2dFunction
            device_ok = _cpu_supported
        autocast_device = "cuda" if on_gpu else "cpu"

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            if (
                route.use_sparse
                and (x.dim() >= 1 if linear else x.dim() in (3, 4))
                and device_ok(x, weight)
                and not torch.is_autocast_enabled(autocast_device)
            ):
                return function.apply(x, weight, module.bias, state)
            state.calls["dense_forward"] += 1
            return dense_forward(x)

        return forward

    def _compact_forward(
        self, route: _Route, dense_forward: Callable[..., torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        module = route.module
        state = route.state
        assert isinstance(state, CompactLayerState)
        linear = route.kind == "linear"

        def forward(x: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            if (
                route.use_sparse
                and (x.dim() >= 1 if linear else x.dim() == 4)
                and x.dtype == weight.dtype
                and x.device == weight.device
                and not torch.is_autocast_enabled(x.device.type)
            ):
                state.ensure()
                if linear or state.block_mask is None or state.block_mask.numel() > 0:
                    out: torch.Tensor = CompactFunction.apply(x, weight, module.bias, state)
                    return out
            state.calls["dense_forward"] += 1
            state.shapes["x".join(str(s) for s in weight.shape)] += 1
            return dense_forward(x)

        return forward

    def _decide(self) -> None:
        for route in self._routes:
            if not route.installed:
                route.use_sparse = False
                continue
            if isinstance(route.state, CompactLayerState):
                route.use_sparse = True  # exact whatever the density: never more work
                if route.state.min_sparsity != self.min_sparsity:  # inner kernels chosen again
                    route.state.min_sparsity = self.min_sparsity
                    route.state.rows = None
                route.state.refresh()
                continue
            sparsity = 1.0 - route.state.density()
            route.use_sparse = sparsity >= self.min_sparsity
            if route.use_sparse:
                route.state.refresh()

    # -- contract used by the adapter ---------------------------------------------------

    def refresh(self) -> None:
        """Masks changed: rebuild the structures of the layers whose mask changed, re-decide."""
        self._decide()

    def set_dense_weight_grad(self, on: bool) -> None:
        """Dense weight gradients (window before a mask update) or gradients on the mask only."""
        on = bool(on)
        if on and not self._dense_grad:
            self._dense_windows += 1
        self._dense_grad = on
        for route in self._routes:
            route.state.dense_weight_grad = on

    def note_step(self) -> None:
        """An optimizer step ended: its time is the time since the previous one ended (the
        first step, which has no previous end, is not timed)."""
        now = time.perf_counter()
        clock = self._clock
        if clock.last_end is not None:
            (clock.window if self._dense_grad else clock.outside).add(now - clock.last_end)
        clock.last_end = now

    @property
    def dense_weight_grad(self) -> bool:
        return self._dense_grad

    def telemetry(self) -> dict[str, Any]:
        """Kernel call counts per layer and op, dense-gradient steps, structure rebuilds."""
        layers = {}
        for route in self._routes:
            st = route.state
            layers[route.name] = {
                "kind": route.kind,
                "installed": route.installed,
                "sparse": route.use_sparse,
                "reason": route.reason,
                "density": st.density(),
                "calls": dict(st.calls),
                "rebuilds": st.rebuilds,
            }
            if isinstance(st, CompactLayerState):
                layers[route.name].update(
                    shape=list(st.mask.shape),
                    shape_run=list(st.block_shape()),
                    block_density=st.block_density(),
                    block_kernels=("dense" if st.inner_state is None else COMPACT_MODES[self.mode]),
                    shapes_run=dict(st.shapes),
                )
        calls = [r.state.calls for r in self._routes]
        return {
            "mode": self.mode,
            "min_sparsity": self.min_sparsity,
            "dense_weight_grad": self._dense_grad,
            "layers": layers,
            "sparse_layers": sum(1 for r in self._routes if r.use_sparse),
            # Every routed layer runs one backward per step, so the busiest layer counts steps.
            "dense_grad_steps": max((c["weight_grad_dense"] for c in calls), default=0),
            "sparse_grad_steps": max((c["weight_grad_sparse"] for c in calls), default=0),
            "dense_grad_windows": self._dense_windows,
            "rebuilds": sum(r.state.rebuilds for r in self._routes),
            "step_time_s": {
                "window": self._clock.window.as_dict(),
                "outside_window": self._clock.outside.as_dict(),
            },
        }

    def remove(self) -> None:
        """Restore every module's forward exactly as it was; idempotent."""
        for route in self._routes:
            if not route.installed:
                continue
            if route.saved_forward is _MISSING:
                del route.module.forward
            else:
                route.module.forward = route.saved_forward
            route.installed = False
            route.use_sparse = False
