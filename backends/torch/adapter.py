"""``sparsecore.torch.attach(model, optimizer)``: sparse-momentum training for a PyTorch model.

How it hooks into training:

- With an optimizer, ``attach`` registers a step post-hook on it. After every optimizer step the
  hook re-applies the masks in place (weights outside the mask become exactly 0) and, when the
  schedule says so, runs a mask update. For ``torch.optim.SGD`` on CPU the re-masking is fused
  into the SGD update itself, bit for bit as SGD followed by masking (``fused_sgd``,
  :mod:`sparsecore.torch.fused_step`). Steps are optimizer steps actually taken: gradient
  accumulation counts one step per ``optimizer.step()``; a step that ``torch.amp.GradScaler``
  skips (non-finite gradients) never reaches the optimizer, so it is no step and changes nothing.
- Without an optimizer, the library keeps its own gradient EMA as the momentum and listens to
  every ``torch.optim`` optimizer (a global step post-hook): the first optimizer that steps the
  model's sparse parameters drives the same per-step routine. Loops that update weights without a
  ``torch.optim`` optimizer call :meth:`SparseTraining.step` after each update instead.
- Mask updates of CPU tensors run through the Numba backend on NumPy views of the tensors (the
  same masks as the torch backend, bit for bit, in about half the time;
  :mod:`sparsecore.torch.host_update`); updates of CUDA or bfloat16 tensors run through the torch
  backend on the tensors' device.
- Masks are boolean tensors on the parameters' devices, updated in place, so a model compiled
  with ``torch.compile`` never sees a new tensor and never recompiles because of a mask update.
- Distributed (``torch.distributed`` initialised, world size > 1): every rank checks its inputs
  and computes the update, the ranks agree on update, skip or error in one small all-reduce
  (:mod:`sparsecore.torch.agreement`), then rank 0's masks and report are broadcast and
  recorded everywhere, so all ranks hold identical masks and histories by construction.

This module is the lifecycle (attach, the per-step routine, the mask update, reading the state,
detach), like the Keras callback: at a mask update it builds the layers, calls the engine where
the update placement says, and copies the new masks in. The parts it composes are each their own
module: the fused SGD step (:mod:`.fused_sgd`), where updates run (:mod:`.update_placement`),
distributed agreement and the FSDP2 sharded update (:mod:`.distributed_update`), the sparse
kernels' routing and gradient window (:mod:`.kernel_routing`), saving and restoring
(:mod:`.persistence`) and the registry of attached models (:mod:`.attached`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sparsecore.config import SparseConfig, option_names
from sparsecore.engine import SparseEngine
from sparsecore.errors import NonFiniteError, SparseCoreError
from sparsecore.hashing import HashKey
from sparsecore.layers import Layer
from sparsecore.placement import placement_of
from sparsecore.records.updates import UpdateReport
from sparsecore.units import revival_scale

from . import agreement, attached, fsdp, persistence
from . import distributed_update as du
from . import kernel_routing as routing
from . import momentum as mom
from .backend import TorchBackend
from .fused_sgd import FusedSGD
from .persistence import STATE_FIELDS, STATE_FORMAT
from .selection import Selectors, Target, select_targets
from .update_placement import UpdatePlacement, check_placement

__all__ = ["KERNEL_CHOICES", "STATE_FIELDS", "STATE_FORMAT", "SparseTraining", "attach"]

KERNEL_CHOICES = (None, "cpu", "cuda", "auto", "compact", "compact+cpu", "compact+cuda")

#: The device backend of the mask updates (the torch backend on the tensors' device).
_BACKEND = TorchBackend()
_LOG = logging.getLogger("sparsecore")


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    include: Selectors = None,
    exclude: Selectors = None,
    dense_first: bool = False,
    dense_last: bool = False,
    kernels: str | None = None,
    fused_sgd: bool = True,
    update_backend: str = "auto",
    **options: Any,
) -> SparseTraining:
    """Make ``model`` train sparse from now on; returns the :class:`SparseTraining` handle.

    ``options`` are exactly the names of :class:`sparsecore.SparseConfig` (``density=0.05``,
    ``prune_rate=0.5``, ``prune_rate_min=0.005``, ``prune_schedule='cosine'``,
    ``prune='magnitude'``, ``growth='momentum'``, ``redistribution='momentum'``,
    ``init='uniform'``, ``update_every=100`` optimizer steps, ``update_at_epoch_end=False``,
    ``total_steps=None``, ``stop_at=None``, ``seed=0``, ...). ``growth='none'`` is accepted as the
    static sparse baseline: masks never change (it sets ``update_every=None`` and
    ``update_at_epoch_end=False``). ``include``/``exclude``/``dense_first``/``dense_last``: which
    parameters are sparse (:mod:`sparsecore.torch.selection`). ``kernels``: ``None`` (dense
    computation on masked weights), ``'cpu'``/``'cuda'``/``'auto'`` (sparse kernels) or
    ``'compact'``/``'compact+cpu'``/``'compact+cuda'`` (each layer computed on its active rows and
    read input channels only, with dense kernels or the sparse ones on that smaller block;
    :mod:`sparsecore.torch.compact_functions`).
    ``fused_sgd``: for ``torch.optim.SGD`` steps of sparse CPU float32/float64 parameters, run
    SGD's update and the re-masking as one loop (same results bit for bit, about half the memory
    traffic; :mod:`sparsecore.torch.fused_step`); ``False`` keeps SGD's own step plus a multiply.
    ``update_backend``: where the mask updates run (:mod:`sparsecore.placement`, the same words
    as the Keras callback's). ``'auto'`` runs them on the host, through the Numba backend on NumPy
    views, when every array is a CPU tensor in float16/32/64 (the same masks bit for bit, in
    about half the time; :mod:`sparsecore.torch.host_update`) and on the device, through the
    torch backend, otherwise; ``'device'`` always uses the torch backend; ``'host'`` requires the
    Numba path. ``'torch'`` and ``'numba'``, the earlier names, are aliases of ``'device'`` and
    ``'host'``.

    Everything is checked before the model is touched: a bad option, a model without sparse
    parameters, an optimizer that does not hold them, or a model already attached raises
    :class:`sparsecore.SparseCoreError` and changes nothing.
    """
    config = _make_config(options)
    targets = select_targets(
        model, include=include, exclude=exclude, dense_first=dense_first, dense_last=dense_last
    )
    attached.check_not_attached(model, targets)
    if optimizer is not None:
        _check_optimizer(optimizer, targets)
    if kernels not in KERNEL_CHOICES:
        raise SparseCoreError(f"kernels must be one of {list(KERNEL_CHOICES)}, got {kernels!r}")
    if not isinstance(fused_sgd, bool):
        raise SparseCoreError(f"fused_sgd must be True or False, got {fused_sgd!r}")
    check_placement(update_backend, targets)
    if fsdp.sharded_targets([t.name for t in targets], [t.param for t in targets]):
        fsdp.check_config(config)
        if kernels is not None or placement_of(update_backend, "torch") == "host":
            raise SparseCoreError(
                f"a model sharded with fully_shard runs its mask updates sharded (kernels=None, "
                f"update_backend='auto' or 'device'), got kernels={kernels!r}, "
                f"update_backend={update_backend!r}"
            )
    return SparseTraining(
        model,
        optimizer,
        config,
        targets,
        kernels=kernels,
        fused_sgd=fused_sgd,
        update_backend=update_backend,
    )


def _make_config(options: dict[str, Any]) -> SparseConfig:
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise SparseCoreError(
            f"unknown attach option(s) {unknown}; options are {option_names()} and include, "
            f"exclude, dense_first, dense_last, kernels, fused_sgd, update_backend"
        )
    if options.get("growth") == "none":
        options = dict(options, growth="momentum", update_every=None, update_at_epoch_end=False)
    return SparseConfig.from_options(**options)


def _check_optimizer(optimizer: Any, targets: list[Target]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SparseCoreError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [t.name for t in targets if id(t.param) not in held]
    if missing:
        raise SparseCoreError(
            f"the optimizer ({type(optimizer).__name__}) does not hold the sparse parameter(s) "
            f"{missing} of this model; pass the optimizer built from model.parameters()"
        )


class SparseTraining:
    """The handle ``attach`` returns: masks, schedule, momentum and reports of one sparse run."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: SparseConfig,
        targets: list[Target],
        *,
        kernels: str | None = None,
        fused_sgd: bool = True,
        update_backend: str = "auto",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self._schedule = config.schedule()  # built once: due() runs after every step
        self.targets = targets
        self.names = [t.name for t in targets]
        # FSDP2 (fully_shard): masks, own momentum and updates of this rank's rows only
        self._sharded = fsdp.sharded_targets(self.names, [t.param for t in targets])
        self.engine = SparseEngine(
            config, self.names, [tuple(t.param.shape) for t in targets], [t.axis for t in targets]
        )
        self.steps = 0
        self.epochs = 0
        self._steps_per_epoch: int | None = None
        self._detached = False
        self._driver: int | None = None  # id of the optimizer that drives steps (no-optimizer mode)
        self._groups = [
            None if optimizer is None else mom.group_of(optimizer, t.param) for t in targets
        ]
        self._kinds = [mom.momentum_kind(g, config.adam_momentum, optimizer) for g in self._groups]
        self._own: list[torch.Tensor | None] = [
            mom.own_buffer(self._local(t.param)) if k == mom.OWN else None
            for t, k in zip(targets, self._kinds)
        ]
        self._momentum_source = mom.describe(self._kinds, optimizer, config.momentum_beta)
        if config.schedule().total_steps is None and config.prune_schedule != "constant":
            warnings.warn(
                f"prune_schedule={config.prune_schedule!r} decays the prune rate over the training "
                f"length, but total_steps is not set: the prune rate stays at prune_rate="
                f"{config.prune_rate} until it is. Pass total_steps=<optimizer steps in the run> "
                f"(epochs * batches per epoch) to attach().",
                UserWarning,
                stacklevel=3,
            )
        masks_np = self.engine.initial_masks()
        scales_np = self.engine.initial_scales(masks_np)
        self.masks = [
            fsdp.to_local_part(torch.as_tensor(m), t.param).to(device=self._local(t.param).device)
            if self._sharded
            else torch.as_tensor(m).to(device=t.param.device)
            for m, t in zip(masks_np, targets)
        ]
        # The per-step re-masking multiplies the weights' bits, viewed as integers of the same
        # width, by a 0/1 integer tensor: one streaming pass, as fast as a float multiply and
        # several times faster on CPUs than masked_fill_ with a boolean mask (measured in
        # benchmarks/overhead_torch.py), one _foreach call for every layer, and exact: active
        # weights keep their bits, every other position becomes +0 whatever it held (a float
        # multiply would leave -0 and turn Inf or NaN into NaN).
        self._keep = [m.to(_bits_dtype(t.param.dtype)) for m, t in zip(self.masks, targets)]
        # The kernel router validates everything before it installs anything, so it goes first:
        # if it refuses, the model is still untouched.
        self._router: Any = None
        self._window = 0
        if kernels is not None:
            self._router = routing.build_router(kernels, targets, self.masks)
            self._window = routing.gradient_window(self._groups, self._kinds, config.momentum_beta)

        self._placement = UpdatePlacement(update_backend)  # checks the value

        # --- from here on the model and optimizer change (nothing below can fail) ---
        if scales_np is not None:
            self._scale_initial_weights(scales_np)
        self._apply_masks()
        self._sharded_backend: Any = fsdp.ShardedBackend() if self._sharded else None
        attached.register(self)
        # SGD steps a sharded model's DTensors itself
        self._sgd = FusedSGD(
            targets, self.masks, self._own, enabled=fused_sgd and not self._sharded
        )
        self._hooks: list[Any] = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._hooks.append(optimizer.register_step_post_hook(self._on_optimizer_step))
        else:
            self._hooks.append(register_optimizer_step_pre_hook(self._before_any_optimizer_step))
            self._hooks.append(register_optimizer_step_post_hook(self._on_any_optimizer_step))
        self._set_gradient_window()
        _LOG.info("sparsecore: sparse momentum reads %s", self._momentum_source)

    # -- hooks and steps ----------------------------------------------------------------------
    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._take_sgd_step(optimizer, args, kwargs)

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._after_step(self._finish_sgd_step(optimizer))

    def _before_any_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._drives(optimizer):
            self._take_sgd_step(optimizer, args, kwargs)

    def _on_any_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._drives(optimizer):
            self._after_step(self._finish_sgd_step(optimizer))

    def _drives(self, optimizer: Any) -> bool:
        """Without an optimizer given: the first optimizer that steps the model drives the steps."""
        if self._driver is None:
            first = self.targets[0].param
            if not any(p is first for g in optimizer.param_groups for p in g["params"]):
                return False
            self._driver = id(optimizer)
        return id(optimizer) == self._driver

    def _take_sgd_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before an SGD step: hold back the gradients the fused loop updates (:mod:`.fused_sgd`)."""
        self._sgd.take(optimizer, args, kwargs)

    def _finish_sgd_step(self, optimizer: Any) -> set[int]:
        """After the SGD step: the fused loop over the held-back parameters; their indices."""
        return self._sgd.finish(optimizer, self.config.momentum_beta)

    def step(self) -> None:
        """One training step done, for loops that update weights without ``torch.optim``.

        Folds the gradients into the own momentum, re-applies the masks and runs a mask update
        when due. A step whose gradients are not finite (for instance one ``GradScaler`` would
        skip) is not counted and leaves momentum and masks alone (the weights outside the masks
        are made +0 again all the same, since the loop may have written NaN there); with
        ``on_nonfinite='raise'`` it raises after that.
        """
        self._check_live()
        if self.optimizer is not None or self._driver is not None:
            raise SparseCoreError(
                "step() is for training loops without a torch.optim optimizer; here the "
                "optimizer's steps already drive the masks (calling step() would count twice)"
            )
        bad = self._nonfinite_grad()
        if agreement.world_size() > 1:  # every rank counts this step, or none does
            codes = [3 if t.name == bad else 0 for t in self.targets]
            verdict = agreement.agree(
                self.steps + 1, codes, failed=False, device=self.masks[0].device
            )
            where = verdict.nonfinite
            bad = None if where is None else f"rank {where[0]}: layer {self.names[where[1]]!r}"
        elif bad is not None:
            bad = f"layer {bad!r}"
        if bad is not None:
            with torch.no_grad():
                self._apply_masks()
            reason = f"{bad}: gradient contains NaN or Inf at step {self.steps + 1}"
            if self.config.on_nonfinite == "raise":
                raise NonFiniteError(
                    reason + "; the step was not counted (masks and momentum unchanged)"
                )
            if self._schedule.due(self.steps + 1):
                report = self.engine.record_skip(self.steps + 1, reason)
                self._warn_skip(report)
            return
        self._after_step()

    def _nonfinite_grad(self) -> str | None:
        grads = [None if t.param.grad is None else self._local(t.param.grad) for t in self.targets]
        flags = [torch.isfinite(g).all() for g in grads if g is not None]
        if not flags or bool(torch.stack(flags).all()):
            return None
        for t, g in zip(self.targets, grads):
            if g is not None and not bool(torch.isfinite(g).all()):
                return t.name
        return None  # pragma: no cover

    def _after_step(self, masked: set[int] | None = None) -> None:
        """Per optimizer step; ``masked``: targets whose fused SGD step has re-masked them (and
        folded their gradients into the own momentum)."""
        if self._detached:
            return
        self.steps += 1
        if self._router is not None:
            self._router.note_step()
        done = masked or ()
        due = self._schedule.due(self.steps)
        # When a fused step did everything and no update is due, there is nothing left to do:
        # even entering no_grad would cost more than the rest of this routine.
        if due or len(done) < len(self.targets):
            with torch.no_grad():
                self._fold_own_momentum(done)
                if due:
                    self._update(self.steps)  # masks exactly first
                else:  # the targets a fused SGD step updated are masked already
                    self._apply_masks(skip=done)
        self._set_gradient_window()

    def _fold_own_momentum(self, folded: Collection[int] = ()) -> None:
        """``P <- beta * P + (1 - beta) * g`` (``torch.lerp``) for the layers on the library's own
        momentum, except those in ``folded`` (their fused SGD step did it)."""
        beta = self.config.momentum_beta
        bufs, grads = [], []
        for i, (t, own) in enumerate(zip(self.targets, self._own)):
            if own is None or i in folded:
                continue
            grad = t.param.grad
            if grad is None:
                own.mul_(beta)
            else:
                grad = self._local(grad)
                bufs.append(own)
                grads.append(grad if grad.dtype == own.dtype else grad.to(own.dtype))
        if bufs:
            torch._foreach_lerp_(bufs, grads, 1.0 - beta)

    def end_epoch(self) -> UpdateReport | None:
        """Call at the end of each epoch: runs the epoch-end update if configured and due.

        Harmless otherwise. Returns the report of an update made now, else None.
        """
        self._check_live()
        self.epochs += 1
        if self._steps_per_epoch is None and self.epochs == 1 and self.steps > 0:
            self._steps_per_epoch = self.steps
        report = None
        if self._schedule.due(self.steps, epoch_end=True):
            report = self._update(self.steps)
        self._set_gradient_window()
        return report

    # -- the mask update ------------------------------------------------------------------------
    def _layers(self) -> list[Layer]:
        growth_needs_grad = self.config.growth == "gradient"
        layers = []
        for t, mask, kind, own in zip(self.targets, self.masks, self._kinds, self._own):
            p = t.param.detach()
            grad = None
            if growth_needs_grad:
                grad = t.param.grad if t.param.grad is not None else torch.zeros_like(p)
            momentum = mom.read_momentum(t.name, t.param, kind, self.optimizer, own)
            layers.append(Layer(t.name, p, mask, momentum=momentum, grad=grad, axis=t.axis))
        return layers

    @torch.no_grad()
    def _update(self, step: int) -> UpdateReport:
        cfg = self.config
        rate = None
        if cfg.total_steps is None and cfg.prune_schedule != "constant":
            rate = cfg.prune_rate
        self._apply_masks()
        if self._sharded:
            self._placement.last = self._sharded_backend.name
            result = du.sharded_update(
                self.engine, self._shard_layers(), step, rate, self._sharded_backend
            )
        elif agreement.world_size() > 1:
            layers = self._layers()
            result = du.agreed_update(
                self.engine,
                layers,
                step,
                propose=lambda: self._placement.propose(self.engine, layers, step, rate, _BACKEND),
                masks=self.masks,
                params=[t.param for t in self.targets],
                backend=_BACKEND,
            )
        else:
            result = self._placement.update(self.engine, self._layers(), step, rate, _BACKEND)
        report = result.report
        if report.skipped:
            self._warn_skip(report)
            return report
        for t, old, keep, new in zip(self.targets, self.masks, self._keep, result.masks):
            if cfg.reset_optimizer_state:
                self._reset_state(t.param, old ^ new)
            old.copy_(new)
            _copy_mask_into(keep, old)
        # Newly inactive weights become 0; newly active ones were 0 already (inactive before),
        # except those grown into dead units, which start at +-scale (sparsecore.units): the
        # same values on every rank, from the position hash of this update.
        self._apply_masks()
        for i, (t, fresh) in enumerate(zip(self.targets, result.revived or ())):
            if fresh is not None:
                scale = revival_scale(tuple(t.param.shape), t.axis)
                key = HashKey(cfg.seed, report.update, i)
                t.param.copy_(_BACKEND.signed_fill(t.param.detach(), fresh, scale, key))
        if self._router is not None:
            self._router.refresh()
        return report

    def _shard_layers(self) -> list[Layer]:
        """This rank's rows of every layer (weights, mask, momentum), for the sharded update."""
        layers = []
        for t, mask, kind, own in zip(self.targets, self.masks, self._kinds, self._own):
            weight = fsdp.shard_of(t.param)
            momentum = mom.read_momentum(t.name, t.param, kind, self.optimizer, own)
            layers.append(
                Layer(
                    t.name,
                    weight,
                    weight.like(mask),
                    momentum=fsdp.as_shard(self._local(momentum), t.param),
                    axis=t.axis,
                )
            )
        return layers

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter-shaped tensor (the tensor itself unless sharded)."""
        return fsdp.local(x) if self._sharded else x

    def _reset_state(self, param: torch.Tensor, changed: torch.Tensor) -> None:
        i = next(i for i, t in enumerate(self.targets) if t.param is param)
        own = self._own[i]
        if own is not None:
            own.masked_fill_(changed, 0)
        if self.optimizer is not None:
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    self._local(value).masked_fill_(changed, 0)

    def _warn_skip(self, report: UpdateReport) -> None:
        warnings.warn(
            f"sparsecore: mask update after step {report.step} skipped: {report.reason}",
            RuntimeWarning,
            stacklevel=4,
        )

    @torch.no_grad()
    def _scale_initial_weights(self, scales: Sequence[np.ndarray]) -> None:
        """``scale_init``: multiply each weight by its unit's factor (0 outside the mask)."""
        for factor_np, t in zip(scales, self.targets):
            local = self._local(t.param.detach())
            factor = torch.as_tensor(factor_np, dtype=local.dtype)
            if self._sharded:
                factor = fsdp.to_local_part(factor, t.param)
            local.mul_(factor.to(local.device))

    @torch.no_grad()
    def _apply_masks(self, skip: Collection[int] = ()) -> None:
        """Make every weight outside the masks exactly +0 (whatever it held, NaN and Inf
        included), active weights bit for bit unchanged, except in the targets ``skip`` (by
        index: a fused SGD step has masked them already)."""
        rest = [i for i in range(len(self.targets)) if i not in skip]
        if rest:
            torch._foreach_mul_(
                [
                    self._local(self.targets[i].param.detach()).view(self._keep[i].dtype)
                    for i in rest
                ],
                [self._keep[i] for i in rest],
            )

    def _set_gradient_window(self) -> None:
        """Sparse kernels: dense weight gradients only in the window before the next update."""
        if self._router is None:
            return
        self._router.set_dense_weight_grad(
            routing.dense_gradients_due(
                self._schedule, self.steps, self.epochs, self._steps_per_epoch, self._window
            )
        )

    # -- reading the state ----------------------------------------------------------------------
    @property
    def history(self) -> list[UpdateReport]:
        """One report per mask update (skipped ones included, with ``skipped=True``)."""
        return self.engine.history

    @property
    def last_report(self) -> UpdateReport | None:
        return self.engine.history[-1] if self.engine.history else None

    def _nnz(self) -> list[int]:
        """Active weights per sparse parameter (of the whole layers: summed over the ranks of a
        sharded model, a collective every rank must call)."""
        counts = [int(n) for n in torch.stack([m.sum() for m in self.masks]).tolist()]
        if self._sharded:
            counts = fsdp.global_sums(counts, self.masks[0].device)
        return counts

    def _sizes(self) -> list[int]:
        return [t.param.numel() for t in self.targets]

    def density(self) -> float:
        """Active fraction of all sparse parameters together (whole layers, also when
        sharded: then every rank must call it)."""
        return sum(self._nnz()) / sum(self._sizes())

    def layer_densities(self) -> dict[str, float]:
        """Active fraction per sparse parameter, by qualified parameter name."""
        return {n: c / s for n, c, s in zip(self.names, self._nnz(), self._sizes())}

    def mask(self, name: str) -> torch.Tensor:
        """The live boolean mask of parameter ``name`` (do not modify it): a DTensor placed like
        the parameter (this rank's rows, the same storage) when the model is sharded."""
        if name not in self.names:
            raise SparseCoreError(f"no sparse parameter {name!r}; sparse parameters: {self.names}")
        i = self.names.index(name)
        if self._sharded:
            return fsdp.as_dtensor(self.masks[i], self.targets[i].param)
        return self.masks[i]

    def summary(self, print_fn: Callable[[str], Any] | None = None) -> None:
        """Print a per-layer table, like Keras' ``model.summary()``: shape, size, active weights,
        density, ever-active fraction, what the last mask update pruned and regrew and the
        layer's share of its regrowth budget, the units and input channels that compaction
        leaves out (and, under ``kernels="compact..."``, the weight shape each layer computes
        with), and the total. The same renderer as the table of
        ``sparsecore report`` (:mod:`sparsecore.records.layer_table`). ``print_fn`` gets each line
        (default ``print``)."""
        from sparsecore.records.layer_table import removed_channels, summary_text

        shapes_run = None
        if self._router is not None and self._router.mode.startswith("compact"):
            layers = self._router.telemetry()["layers"]
            shapes_run = {
                n: "x".join(str(d) for d in layer["shape_run"])
                for n, layer in layers.items()
                if "shape_run" in layer and layer["installed"]
            }
        text = summary_text(
            "SparseTraining",
            self.history,
            shapes={n: tuple(t.param.shape) for n, t in zip(self.names, self.targets)},
            nnz=dict(zip(self.names, self._nnz())),
            step=self.steps,
            removed={  # a sharded model's masks are gathered for this table only
                t.name: removed_channels(
                    (fsdp.whole_mask(m, t.param) if self._sharded else m).cpu().numpy(), t.axis
                )
                for t, m in zip(self.targets, self.masks)
            },
            shapes_run=shapes_run,
        )
        for line in text.splitlines():
            (print_fn or print)(line)

    def dead_units(self) -> dict[str, tuple[int, int]]:
        """Per sparse parameter, ``(dead output units, output units)`` as the last mask update
        found them (no active weight, or no gradient: :mod:`sparsecore.units`); before the first
        update, the units that start without a weight."""
        from sparsecore.units import dead_unit_counts

        masks = []
        if not self.history:  # a sharded model's masks, gathered for this report only
            masks = [
                (fsdp.whole_mask(m, t.param) if self._sharded else m).cpu().numpy()
                for m, t in zip(self.masks, self.targets)
            ]
        return dead_unit_counts(self.history, masks, self.names, [t.axis for t in self.targets])

    @property
    def momentum_source(self) -> str:
        """Where the momentum the mask updates read comes from, in words: the optimizer's buffer
        (``momentum_buffer``, ``exp_avg``) or the library's own gradient average when the
        optimizer keeps none (Adadelta, Adagrad, SGD without momentum, ...) or none is given."""
        return self._momentum_source

    @property
    def last_update_backend(self) -> str | None:
        """The array backend that computed the last mask update: ``'numba'`` (CPU tensors read
        as NumPy views) or ``'torch'``; None before the first update."""
        return self._placement.last

    @property
    def kernel_router(self) -> Any:
        """The sparse-kernel router (None without ``kernels=``)."""
        return self._router

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, engine state, step/epoch counts and own momentum: save it with model/optimizer
        (:mod:`.persistence`)."""
        return persistence.state_of(self)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: all or nothing.

        The whole state is checked first: every field present and of its type, masks and own
        momentum of the parameters' shapes, the engine state (:meth:`SparseEngine.load_state_dict`'s
        checks) for these parameters at this density, and the fields consistent with each other
        (the masks hold what the last update left, inside the ever-active masks). A bad one raises
        :class:`SparseCoreError` naming it, and masks, weights, counters, history and momentum
        stay exactly as they were. The saved sparse options replace those given to ``attach``.
        """
        self._check_live()
        state = persistence.localise(self, state)
        checked = persistence.read_state(self, state)
        masks, own = state["masks"], state["own_momentum"]
        self.engine.restore(checked)
        if self.engine.ever_active is not None and not self._sharded:
            self.engine.ever_active = [
                e.to(m.device) for e, m in zip(self.engine.ever_active, self.masks)
            ]
        self.config = self.engine.config
        self._schedule = self.config.schedule()
        for cur, keep, m in zip(self.masks, self._keep, masks):
            cur.copy_(m.to(cur.device))
            _copy_mask_into(keep, cur)
        for cur_own, o in zip(self._own, own):
            if cur_own is not None:
                cur_own.copy_(o.to(cur_own.device))
        self.steps = int(state["steps"])
        self.epochs = int(state["epochs"])
        self._steps_per_epoch = (
            None if state["steps_per_epoch"] is None else int(state["steps_per_epoch"])
        )
        self._apply_masks()
        if self._router is not None:
            self._router.refresh()
        self._set_gradient_window()

    def export(self) -> dict[str, Any]:
        """The model's weights with every sparse weight as a ``torch.sparse_csr`` tensor.

        See :func:`sparsecore.torch.export.export_sparse`; load with
        :func:`sparsecore.torch.load_sparse`.
        """
        from .export import export_sparse

        if self._sharded:
            raise SparseCoreError(
                "export() takes whole weights; for a model sharded with fully_shard, save "
                "with torch.distributed.checkpoint (state_dict() holds DTensor masks) and export "
                "from one process that loads it"
            )
        return export_sparse(self.model, dict(zip(self.names, self.masks)))

    # -- detaching ------------------------------------------------------------------------------
    def detach(self) -> nn.Module:
        """Remove every hook (and sparse kernels); the model is a plain model again, weights kept."""
        self._check_live()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._sgd.give_back()
        self._sgd.enabled = False
        if self._router is not None:
            self._router.remove()
            self._router = None
        attached.unregister(self)
        self._detached = True
        return self.model

    def _check_live(self) -> None:
        if self._detached:
            raise SparseCoreError("this SparseTraining was detached; attach the model again")

    def __repr__(self) -> str:
        return (
            f"SparseTraining({len(self.names)} sparse layers, density {self.density():.4f}, "
            f"step {self.steps}, {len(self.history)} updates)"
        )


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type as wide as ``dtype`` (a weight's bits are multiplied by 0 or 1 in it)."""
    return _BITS[dtype.itemsize]


def _copy_mask_into(keep: torch.Tensor, mask: torch.Tensor) -> None:
    """``keep[:] = mask`` as 0/1 values: converting the mask's bytes is several times faster on
    CPU than converting from bool."""
    keep.copy_(mask.view(torch.uint8) if mask.is_contiguous() else mask)
