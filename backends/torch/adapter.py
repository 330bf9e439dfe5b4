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
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sparsecore.config import SparseConfig, option_names
from sparsecore.engine import SparseEngine, UpdateResult
from sparsecore.errors import NonFiniteError, SparseCoreError
from sparsecore.hashing import HashKey
from sparsecore.init import layer_counts
from sparsecore.layers import Layer
from sparsecore.modes import NEEDS_GRAD, NEEDS_MOMENTUM
from sparsecore.placement import placement_of
from sparsecore.records.updates import UpdateReport
from sparsecore.saved_state import EngineState, StateFields, expected_counts, read_engine_state
from sparsecore.units import revival_scale

from . import agreement, fsdp
from . import fused_step as fs
from . import host_update as hu
from . import momentum as mom
from .backend import TorchBackend
from .selection import Selectors, Target, select_targets
from .threads import kernel_threads

KERNEL_CHOICES = (None, "cpu", "cuda", "auto", "compact", "compact+cpu", "compact+cuda")
STATE_FORMAT = "sparsecore.torch/1"
#: The fields of :meth:`SparseTraining.state_dict`, all required, no other allowed.
STATE_FIELDS = (
    "format",
    "names",
    "masks",
    "own_momentum",
    "steps",
    "epochs",
    "steps_per_epoch",
    "engine",
)

# Models and parameters currently under an attached SparseTraining (weak: never keep a model alive).
_ATTACHED_MODELS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
# Parameters by id (tensors compare elementwise, so they cannot be weak dictionary keys); an entry
# counts only while its handle is alive, attached, and still holds that very parameter.
_ATTACHED_PARAMS: dict[int, Any] = {}

_BACKEND = TorchBackend()
_UNSET: Any = object()
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
    _check_not_attached(model, targets)
    if optimizer is not None:
        _check_optimizer(optimizer, targets)
    if kernels not in KERNEL_CHOICES:
        raise SparseCoreError(f"kernels must be one of {list(KERNEL_CHOICES)}, got {kernels!r}")
    if not isinstance(fused_sgd, bool):
        raise SparseCoreError(f"fused_sgd must be True or False, got {fused_sgd!r}")
    _check_update_backend(update_backend, targets)
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


def _check_update_backend(update_backend: Any, targets: list[Target]) -> None:
    placement = placement_of(update_backend, "torch")
    if placement != "host" or any(fsdp.is_dtensor(t.param) for t in targets):
        return  # a sharded model refuses the host in attach
    problem = next(
        (
            f"layer {t.name!r}: weight {why}"
            for t in targets
            if (why := hu.why_not_viewable_tensor(t.param)) is not None
        ),
        None,
    )
    problem = problem or hu.numba_backend()[1]
    if problem is not None:
        raise SparseCoreError(f"update_backend={update_backend!r} cannot be used: {problem}")


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


def _check_not_attached(model: nn.Module, targets: list[Target]) -> None:
    live = _ATTACHED_MODELS.get(model)
    if live is not None and live() is not None:
        raise SparseCoreError(
            f"model {type(model).__name__} is already attached to sparsecore; call detach() on "
            f"the existing handle before attaching again"
        )
    for t in targets:
        ref = _ATTACHED_PARAMS.get(id(t.param))
        owner = None if ref is None else ref()
        held = [] if owner is None else [o.name for o in owner.targets if o.param is t.param]
        if owner is not None and held:
            raise SparseCoreError(
                f"parameter {t.name!r} is already sparse (as {held[0]!r} of "
                f"{type(owner.model).__name__}) under another attach(); detach that one first"
            )


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
        self._kinds = [mom.momentum_kind(g, config.adam_momentum) for g in self._groups]
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
            self._router = _build_router(kernels, targets, self.masks)
            beta = max(
                mom.momentum_beta(g, k, config.momentum_beta)
                for g, k in zip(self._groups, self._kinds)
            )
            self._window = max(1, round(1.0 / (1.0 - beta)))

        # --- from here on the model and optimizer change (nothing below can fail) ---
        self._apply_masks()
        self._sharded_backend: Any = fsdp.ShardedBackend() if self._sharded else None
        handle_ref = weakref.ref(self)
        _ATTACHED_MODELS[model] = handle_ref
        for t in targets:
            _ATTACHED_PARAMS[id(t.param)] = handle_ref
        self._fused_sgd = fused_sgd and not self._sharded  # SGD steps DTensors itself
        self._update_backend = update_backend  # as given, for messages
        self._placement = placement_of(update_backend, "torch")
        self._last_update_backend: str | None = None
        # gradients held over an SGD step, with their group's options
        self._taken: list[tuple[int, torch.Tensor, fs.GroupPlan]] = []
        self._param_plans: list[fs.ParamPlan | None] = [None] * len(targets)
        self._sgd_groups: list[dict[str, Any] | None] | None = None  # the driver's, per target
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
        """Before an SGD step: hold back the gradients of the parameters the fused loop updates.

        SGD skips a parameter whose ``grad`` is None; :meth:`_finish_sgd_step` then updates it
        and puts its gradient back (:mod:`sparsecore.torch.fused_step`). Each group's options are
        read once here and kept with the gradients, so the loop sees this step's learning rate.
        """
        self._give_back_grads()  # only if the previous step raised between the two hooks
        if not self._fused_sgd or self._detached or not fs.optimizer_fusable(optimizer):
            return
        # The hooks see step's own arguments: (optimizer, closure=None).
        if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
            return  # a closure recomputes the gradients inside the step
        if self._sgd_groups is None:
            self._sgd_groups = [mom.group_of(optimizer, t.param) for t in self.targets]
        plans: dict[int, fs.GroupPlan | None] = {}
        state = optimizer.state
        for i, (t, group) in enumerate(zip(self.targets, self._sgd_groups)):
            if group is None:
                continue
            plan = plans.get(id(group), _UNSET)
            if plan is _UNSET:
                plan = plans[id(group)] = fs.plan_group(group) if fs.group_fusable(group) else None
            if (
                plan is not None
                and fs.param_fusable(t.param)
                and (
                    not plan.momentum
                    or fs.buffer_fusable(state.get(t.param, {}).get("momentum_buffer"), t.param)
                )
            ):
                grad = t.param.grad
                assert grad is not None
                self._taken.append((i, grad, plan))
                t.param.grad = None

    def _finish_sgd_step(self, optimizer: Any) -> set[int]:
        """After the SGD step: the fused update of the held-back parameters, which also folds
        their gradients into the own momentum where there is one; their indices."""
        if not self._taken:
            return set()
        done = set()
        state = optimizer.state
        # The loop writes through data pointers: no autograd op runs, so no no_grad is needed.
        for i, grad, group_plan in self._taken:
            param = self.targets[i].param
            plan = self._param_plans[i]
            if plan is None or not plan.valid_for(param, self.masks[i], self._own[i]):
                plan = self._param_plans[i] = fs.plan_param(
                    param, self.masks[i], self._own[i], 1.0 - self.config.momentum_beta
                )
            fs.run_planned(plan, group_plan, grad, state[param] if group_plan.momentum else {})
            done.add(i)
        self._give_back_grads()
        return done

    def _give_back_grads(self) -> None:
        for i, grad, _ in self._taken:
            self.targets[i].param.grad = grad
        self._taken.clear()

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
            result = self._sharded_update(step, rate)
        elif agreement.world_size() > 1:
            result = self._agreed_update(step, rate)
        else:
            result = self._engine_update(step, rate)
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

    def _sharded_update(self, step: int, rate: float | None) -> UpdateResult:
        """A mask update of a ``fully_shard`` model: each rank passes its rows of every layer
        (weights, mask, momentum) to the sharded update, which agrees with the other ranks
        through per-layer sums and selection histograms only (:mod:`.sharded_update`); errors
        and skips come out the same on every rank. The masks come back as this rank's rows."""
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
        self._last_update_backend = self._sharded_backend.name
        result = self.engine.update(layers, step, backend=self._sharded_backend, prune_rate=rate)
        masks = [m.local if isinstance(m, fsdp.Shard) else m for m in result.masks]
        return replace(result, masks=masks, weights=None)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter-shaped tensor (the tensor itself unless sharded)."""
        return fsdp.local(x) if self._sharded else x

    def _numba_for(self, layers: list[Layer]) -> Any:
        """The Numba backend when this update runs on NumPy views of the tensors, else None."""
        if self._placement == "device":
            return None
        problem = hu.why_not_viewable(layers)
        if problem is None:
            return hu.numba_backend()[0]
        if self._placement == "host":
            raise SparseCoreError(
                f"update_backend={self._update_backend!r} cannot be used: {problem}"
            )
        return None

    def _agreed_update(self, step: int, rate: float | None) -> UpdateResult:
        """A mask update in a distributed job: every rank checks its inputs and proposes the
        update, the ranks agree in one all-reduce (:mod:`sparsecore.torch.agreement`), then all
        skip, all raise, or all record rank 0's masks and report."""
        layers = self._layers()
        cfg = self.config
        codes = agreement.nonfinite_codes(
            layers,
            momentum=cfg.redistribution in NEEDS_MOMENTUM["importance"]
            or cfg.growth in NEEDS_MOMENTUM["growth"],
            grad=cfg.growth in NEEDS_GRAD["growth"],
        )
        proposal: UpdateResult | None = None
        error: Exception | None = None
        if not any(codes):
            try:
                proposal = self._propose(layers, step, rate)
            except Exception as err:  # every rank must learn of it before anyone broadcasts
                error = err
        verdict = agreement.agree(
            step, codes, failed=error is not None, device=self.masks[0].device
        )
        if verdict.nonfinite is not None:
            rank, j, label = verdict.nonfinite
            reason = (
                f"rank {rank}: layer {self.names[j]!r}: {label} contains NaN or Inf; the mask "
                f"update was not made on any of the {verdict.world} ranks"
            )
            if cfg.on_nonfinite == "raise":
                raise NonFiniteError(reason + " (nothing changed)")
            return UpdateResult(list(self.masks), self.engine.record_skip(step, reason))
        if verdict.failed:
            if error is not None:
                raise error
            raise SparseCoreError(
                f"the mask update after step {step} failed on rank(s) {verdict.failed}; it was "
                f"not made on any rank (nothing changed)"
            )
        assert proposal is not None
        masks, report = agreement.broadcast_result(proposal.masks, proposal.report)
        # rank 0's weights grown into dead units too: ranks whose momentum differs disagree
        revived = _broadcast_revived(proposal.revived, [t.param for t in self.targets])
        return self.engine.commit(
            layers, UpdateResult(masks, report, revived=revived), backend=_BACKEND
        )

    def _propose(self, layers: list[Layer], step: int, rate: float | None) -> UpdateResult:
        """The engine's proposal for this update (nothing recorded), masks as tensors."""
        numba_backend = self._numba_for(layers)
        if numba_backend is None:
            self._last_update_backend = _BACKEND.name
            return self.engine.propose(layers, step, backend=_BACKEND, prune_rate=rate)
        self._last_update_backend = numba_backend.name
        kernel_threads()
        result = self.engine.propose(
            hu.numpy_views(layers), step, backend=numba_backend, prune_rate=rate
        )
        revived = None if result.revived is None else hu.as_tensors(result.revived)
        return replace(result, masks=hu.as_tensors(result.masks), weights=None, revived=revived)

    def _engine_update(self, step: int, rate: float | None) -> UpdateResult:
        """The engine's update of the current layers: through the Numba backend on NumPy views
        where that applies (:mod:`sparsecore.torch.host_update`), else through the torch backend.
        The masks come back as tensors either way."""
        layers = self._layers()
        numba_backend = self._numba_for(layers)
        if numba_backend is None:
            self._last_update_backend = _BACKEND.name
            return self.engine.update(layers, step, backend=_BACKEND, prune_rate=rate)
        self._last_update_backend = numba_backend.name
        kernel_threads()  # Numba's pool as large as PyTorch's, PyTorch's count kept
        engine = self.engine
        # The engine keeps its ever-active masks in its backend's arrays; this handle keeps tensors.
        engine.ever_active = hu.as_arrays(engine.ever_active)
        try:
            result = engine.update(
                hu.numpy_views(layers), step, backend=numba_backend, prune_rate=rate
            )
        finally:
            engine.ever_active = hu.as_tensors(engine.ever_active)
        if result.revived is None:
            return replace(result, masks=hu.as_tensors(result.masks), weights=None)
        return replace(
            result,
            masks=hu.as_tensors(result.masks),
            weights=hu.as_tensors(result.weights),
            revived=hu.as_tensors(result.revived),
        )

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
        schedule = self._schedule
        until = schedule.steps_until_next(self.steps)
        if schedule.at_epoch_end and self.steps < schedule.stop_step():
            if self._steps_per_epoch is None:
                until = 0  # epoch length unknown until the first epoch ends: stay dense
            else:
                into = self.steps - self.epochs * self._steps_per_epoch
                until = min(until, max(0, self._steps_per_epoch - into))
        self._router.set_dense_weight_grad(until <= self._window)

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
        return self._last_update_backend

    @property
    def kernel_router(self) -> Any:
        """The sparse-kernel router (None without ``kernels=``)."""
        return self._router

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, engine state, step/epoch counts and own momentum: save it with model/optimizer."""
        engine = self.engine.state_dict()
        if self._sharded:
            return self._sharded_state(engine)
        if engine["ever_active"] is not None:
            engine["ever_active"] = [e.cpu() for e in engine["ever_active"]]
        return {
            "format": STATE_FORMAT,
            "names": list(self.names),
            "masks": [m.cpu().clone() for m in self.masks],
            "own_momentum": [None if o is None else o.cpu().clone() for o in self._own],
            "steps": self.steps,
            "epochs": self.epochs,
            "steps_per_epoch": self._steps_per_epoch,
            "engine": engine,
        }

    def _sharded_state(self, engine: dict[str, Any]) -> dict[str, Any]:
        """:meth:`state_dict` of a ``fully_shard`` model, for ``torch.distributed.checkpoint``:
        masks, ever-active masks and own momentum as DTensors placed like their parameters
        (copies of this rank's rows), and the engine's history as one JSON string."""
        params = [t.param for t in self.targets]

        def spread(parts: list[Any]) -> list[Any]:
            return [
                None if x is None else fsdp.as_dtensor(fsdp.local(x).clone(), p)
                for x, p in zip(parts, params)
            ]

        # before the first update the engine has no ever-active masks (None): the masks are
        # saved in their place, which restores to the same, so that the state's keys are the
        # same at every step (DCP loads into a fresh handle's state_dict as a template)
        ever = engine["ever_active"]
        engine["ever_active"] = spread(
            list(self.masks) if ever is None else [e.local for e in ever]
        )
        engine["history"] = fsdp.history_to_text(engine["history"])
        return {
            "format": STATE_FORMAT,
            "names": list(self.names),
            "masks": spread(list(self.masks)),
            "own_momentum": spread(list(self._own)),
            "steps": self.steps,
            "epochs": self.epochs,
            "steps_per_epoch": self._steps_per_epoch,
            "engine": engine,
        }

    def _localise(self, state: Any) -> Any:
        """A sharded model: the state with this rank's rows of its DTensors or whole tensors
        (masks and own momentum as local tensors, ever-active masks as shards) and the
        history read from JSON; the whole-layer checks then run on the ranks together."""
        if not (
            self._sharded and isinstance(state, dict) and isinstance(state.get("engine"), dict)
        ):
            return state
        params = [t.param for t in self.targets]

        def parts(values: Any) -> Any:
            if not isinstance(values, list) or len(values) != len(params):
                return values
            return [fsdp.to_local_part(v, p) for v, p in zip(values, params)]

        engine = dict(
            state["engine"], history=fsdp.history_from_text(state["engine"].get("history"))
        )
        ever = parts(engine.get("ever_active"))
        if isinstance(ever, list):
            ever = [
                fsdp.as_shard(e, p) if isinstance(e, torch.Tensor) and not fsdp.is_dtensor(e) else e
                for e, p in zip(ever, params)
            ]
        engine["ever_active"] = ever
        return dict(
            state,
            masks=parts(state.get("masks")),
            own_momentum=parts(state.get("own_momentum")),
            engine=engine,
        )

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
        state = self._localise(state)
        checked = self._read_state(state)
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

    def _read_state(self, state: Any) -> EngineState:
        """Check a saved state against this handle (changes nothing); its engine part, parsed."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise SparseCoreError(
                f"not a sparsecore.torch state (field 'format' is {found!r}, expected "
                f"{STATE_FORMAT!r})"
            )
        f = StateFields("sparsecore.torch state", "")
        f.keys(state, "", STATE_FIELDS)
        names = f.sequence(state["names"], "names")
        if names != self.names:
            raise f.error("names", f"is {names!r}, this model's sparse parameters are {self.names}")
        n = len(self.names)
        masks = f.sequence(state["masks"], "masks", n)
        own = f.sequence(state["own_momentum"], "own_momentum", n)
        for i, (t, m, o, cur_own) in enumerate(zip(self.targets, masks, own, self._own)):
            shape = tuple(t.param.shape)
            # a sharded model's state holds this rank's rows here (_localise)
            held = tuple(self._local(t.param).shape)
            if (
                not isinstance(m, torch.Tensor)
                or fsdp.is_dtensor(m)
                or m.dtype != torch.bool
                or m.shape != held
            ):
                raise f.error(f"masks[{i}]", f"must be a torch.bool tensor of shape {shape} "
                              f"(layer {t.name!r}), got {_describe(m)}")  # fmt: skip
            if cur_own is None and o is not None:
                raise f.error(
                    f"own_momentum[{i}]",
                    f"is a tensor, but layer {t.name!r} takes its momentum from the optimizer "
                    f"here (was the optimizer changed?)",
                )
            if cur_own is not None and (
                not isinstance(o, torch.Tensor)
                or fsdp.is_dtensor(o)
                or not o.is_floating_point()
                or o.shape != held
            ):
                raise f.error(
                    f"own_momentum[{i}]",
                    f"must be a floating-point tensor of shape {shape} (layer {t.name!r} keeps "
                    f"its own momentum here), got {_describe(o)}",
                )
        steps = f.integer(state["steps"], "steps")
        epochs = f.integer(state["epochs"], "epochs")
        per_epoch = f.integer(state["steps_per_epoch"], "steps_per_epoch", 1, nullable=True)
        if per_epoch is not None and (epochs == 0 or per_epoch > steps):
            raise f.error(
                "steps_per_epoch",
                f"is {per_epoch}, but the state has taken {steps} steps in {epochs} epochs",
            )
        engine = self.engine
        checked = read_engine_state(
            state["engine"],
            names=engine.names,
            shapes=engine.shapes,
            axes=engine.axes,
            config=engine.config,
            target=engine.target,
            owner="sparsecore.torch state",
            prefix="engine.",
        )
        last_step = max((r.step for r in checked.history if r.step is not None), default=0)
        if last_step > steps:
            raise f.error("steps", f"is {steps}, before the last update's step {last_step}")
        cfg = checked.config
        initial = layer_counts(
            engine.shapes,
            cfg.density,
            cfg.init,
            axes=engine.axes,
            max_density=cfg.max_density,
            min_density=cfg.min_density,
        )
        want, source = expected_counts(checked.history, initial)
        counts = [int(m.sum()) for m in masks]
        outside = [
            int(
                bool(
                    (
                        m & ~self._local(e if isinstance(e, torch.Tensor) else e.local).to(m.device)
                    ).any()
                )
            )
            for m, e in zip(masks, checked.ever_active or [])
        ]
        if self._sharded:  # whole layers: every rank checks the same sums
            both = fsdp.global_sums(counts + outside, self.masks[0].device)
            counts, outside = both[: len(counts)], both[len(counts) :]
        if counts != want:
            raise f.error("masks", f"hold {counts} active weights, {source} gives {want}")
        for i, bad in enumerate(outside):
            if bad:
                raise f.error(
                    f"engine.ever_active[{i}]", f"leaves out active positions of masks[{i}]"
                )
        return checked

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
        self._give_back_grads()
        if self._router is not None:
            self._router.remove()
            self._router = None
        _ATTACHED_MODELS.pop(self.model, None)
        for t in self.targets:
            _ATTACHED_PARAMS.pop(id(t.param), None)
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


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x) if x is None or isinstance(x, (str, int, float)) else type(x).__name__


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type as wide as ``dtype`` (a weight's bits are multiplied by 0 or 1 in it)."""
    return _BITS[dtype.itemsize]


def _copy_mask_into(keep: torch.Tensor, mask: torch.Tensor) -> None:
    """``keep[:] = mask`` as 0/1 values: converting the mask's bytes is several times faster on
    CPU than converting from bool."""
    keep.copy_(mask.view(torch.uint8) if mask.is_contiguous() else mask)


def _broadcast_revived(revived: list[Any] | None, params: list[torch.Tensor]) -> list[Any] | None:
    """In a distributed job, rank 0's positions grown into dead units (None where it has none).

    Ranks whose momentum differs may disagree on them; the weights must follow rank 0's masks.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return revived
    device = params[0].device
    has = [0 if revived is None or r is None else 1 for r in (revived or [None] * len(params))]
    flags = torch.tensor(has, dtype=torch.uint8, device=device)
    dist.broadcast(flags, src=0)
    out: list[Any] = []
    for i, param in enumerate(params):
        if not int(flags[i]):  # rank 0 revived nothing in this layer
            out.append(None)
            continue
        local = None if revived is None else revived[i]
        buf = (
            torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
            if local is None
            else local.to(torch.uint8)
        )
        dist.broadcast(buf, src=0)
        out.append(buf.to(torch.bool))
    return out


def _build_router(kernels: str, targets: list[Target], masks: list[torch.Tensor]) -> Any:
    """The sparse-kernel router over the sparse ``nn.Linear``/``nn.Conv2d`` weights.

    Other sparse parameters (Conv1d/3d, included embeddings, ...) keep the dense computation on
    masked weights.
    """
    try:
        from .kernel_router import KernelRouter
    except ImportError as err:  # pragma: no cover - the module ships with the package
        raise SparseCoreError(
            f"kernels={kernels!r} needs sparsecore.torch.kernel_router, which could not be "
            f"imported ({err}); use kernels=None"
        ) from err
    routed: list[tuple[str, nn.Module, torch.Tensor]] = [
        (t.name, t.module, m)
        for t, m in zip(targets, masks)
        if isinstance(t.module, (nn.Linear, nn.Conv2d)) and t.module.weight is t.param
    ]
    if not routed:
        raise SparseCoreError(
            f"kernels={kernels!r}: none of the sparse parameters {[t.name for t in targets]} "
            f"belongs to an nn.Linear or nn.Conv2d, the layers the sparse kernels handle"
        )
    try:
        return KernelRouter(routed, kernels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise SparseCoreError(f"kernels={kernels!r}: {err}") from err
