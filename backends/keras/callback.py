"""``SparseCallback``: sparse momentum training for any Keras 3 model, as a ``fit`` callback.

How it works:

- At the start of ``fit`` it finds the sparse weights (:mod:`.discovery`), creates the engine with
  exact initial counts, zeroes the weights outside the initial masks and installs a
  :class:`~.constraint.SparseMask` on each sparse variable. Keras applies that constraint inside the
  compiled train step after every optimizer update, so weights outside the mask are exactly 0
  after every batch without any per-batch Python work.
- Mask updates run on the schedule of :class:`sparsecore.SparseConfig` (every ``update_every``
  optimizer steps, counted by ``optimizer.iterations``, and/or at epoch ends). An update reads the
  kernels, the masks and the optimizer's momentum slots, runs the engine and assigns the new masks
  and weights. With the tensors on the CPU the engine runs on NumPy (sparsecore's reference
  backend: a few ms instead of tens of ms of eager op dispatch), on an accelerator on the Keras
  backend (``keras.ops``, on the tensors' device); see :mod:`.placement`. Under a
  ``tf.distribute`` strategy this runs once, in cross-replica context, and the assignments go to
  every replica, so all replicas hold the same masks.
- The masks and the engine state are saved with the constraints' weights entries (their configs
  hold only small metadata), so ``model.save()``, ``ModelCheckpoint`` and
  ``keras.models.load_model`` carry them; a new ``SparseCallback`` given a loaded model continues
  the run (same masks, same update counter, same schedule).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from sparsecore.backend import ArrayBackend
from sparsecore.config import RECIPES, SparseConfig, option_names
from sparsecore.engine import SparseEngine
from sparsecore.errors import SparseCoreError
from sparsecore.init import layer_counts
from sparsecore.layers import Layer
from sparsecore.modes import NEEDS_GRAD, NEEDS_MOMENTUM
from sparsecore.records.updates import UpdateReport
from sparsecore.saved_state import (
    ENGINE_FIELDS,
    EngineState,
    StateFields,
    expected_counts,
    read_engine_state,
)
from sparsecore.validation import check_flag

from . import jax_step
from .constraint import SparseMask
from .discovery import SparseWeight, find_sparse_weights
from .momentum import OWN, MomentumReader, OwnMomentum, describe, momentum_kind, optimizer_slots
from .placement import as_update_array, check_update_backend, resolve_update_backend

__all__ = ["SparseCallback"]

_LOG = logging.getLogger("sparsecore")
_SAVED = "saved sparse state"


@dataclass(frozen=True)
class _SavedRun:
    """The sparse run a loaded model carries, checked: engine names, engine state, and whether
    ``total_steps`` followed each ``fit``."""

    names: list[str]
    engine: EngineState
    total_steps_from_fit: bool


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the engine state")


def _from_host(mask: np.ndarray, backend: ArrayBackend) -> Any:
    """A saved (host) mask as an array of the update backend."""
    return np.asarray(mask, dtype=bool) if backend.name == "numpy" else ops.convert_to_tensor(mask)


def _zero_where(changed: Any, slot: Any, backend: ArrayBackend) -> Any:
    """The optimizer slot with the positions in ``changed`` set to 0 (as the update backend's array)."""
    if backend.name == "numpy":
        value = np.array(ops.convert_to_numpy(slot), copy=True)
        value[changed] = 0
        return value
    value = slot.value  # the tensor: jax.numpy takes no Keras variable
    return ops.where(changed, ops.zeros_like(value), value)


def _is_jax() -> bool:
    return bool(keras.backend.backend() == "jax")


def _host_mask(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(bool, copy=False)
    return np.asarray(ops.convert_to_numpy(x), dtype=bool)


class SparseCallback(keras.callbacks.Callback):
    """Train the model's Dense/Conv kernels sparse with sparse momentum (Dettmers & Zettlemoyer).

    ``SparseCallback(**options)`` takes exactly the options of :class:`sparsecore.SparseConfig`
    (``density``, ``init``, ``prune``, ``growth``, ``redistribution``, ``prune_rate``,
    ``update_every``, ...) with the paper's defaults, plus which layers are sparse:
    ``include``/``exclude`` (layer names, name patterns, class names or classes),
    ``dense_first``/``dense_last`` and ``embeddings`` (make Embedding tables sparse too), and
    where updates run: ``update_backend='auto'`` (on the host with NumPy when the kernels are on
    the CPU, else on the device with ``keras.ops``), ``'host'`` or ``'device'``
    (:mod:`sparsecore.placement`; ``'numpy'`` and ``'keras'`` are their earlier names); every
    choice gives the same masks.
    ``total_steps`` (the optimizer step at which training ends) defaults to the steps already
    taken plus those of the current ``fit`` (``(epochs - initial_epoch) * steps_per_epoch``), so
    ``fit(initial_epoch=e, epochs=E)`` after loading a checkpoint keeps the schedule. Pass it when
    one run is split into ``fit`` calls that each see only part of it.

    After each epoch ``logs`` (hence the History and TensorBoard) get ``sparse_density``,
    ``sparse_measured_density`` (nonzero fraction of the kernels), ``sparse_updates`` and the
    last update's ``sparse_prune_rate``, ``sparse_pruned``, ``sparse_net_pruned`` and
    ``sparse_ever_active``, plus ``sparse_density/<weight>`` per sparse weight. Put the callback
    before ``TensorBoard`` in the list so that it sees them.
    """

    # Mask updates assign model variables: never run concurrently with a train step.
    async_safe = False

    def __init__(
        self,
        *,
        include: Any = None,
        exclude: Any = None,
        dense_first: bool = False,
        dense_last: bool = False,
        embeddings: bool = False,
        update_backend: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise SparseCoreError(
                f"SparseCallback got unknown option(s) {unknown}; the options are "
                f"{option_names()} and include, exclude, dense_first, dense_last, embeddings, "
                f"update_backend"
            )
        check_update_backend(update_backend)
        for flag, value in (
            ("dense_first", dense_first),
            ("dense_last", dense_last),
            ("embeddings", embeddings),
        ):
            check_flag(flag, value)  # a string such as "no" would be true
        self.update_backend = update_backend
        self.config = SparseConfig.from_options(**options)
        if self.config.growth in NEEDS_GRAD["growth"]:
            raise SparseCoreError(
                f"growth={self.config.growth!r} needs the dense gradient at every position, "
                f"which Keras does not hand to callbacks; use growth='momentum' (the optimizer's "
                f"momentum, the paper's choice) or 'random', or the PyTorch adapter "
                f"(sparsecore.torch.attach) for gradient growth"
            )
        self._given = dict(options)
        self._selection = {
            "include": include,
            "exclude": exclude,
            "dense_first": dense_first,
            "dense_last": dense_last,
            "embeddings": embeddings,
        }
        self._engine: SparseEngine | None = None
        self.weights: list[SparseWeight] = []
        self.constraints: list[SparseMask] = []
        self._reader: MomentumReader | None = None
        self._momentum_source: str | None = None
        self._backend: ArrayBackend | None = None
        self._attached_to: Any = None
        self._total_from_fit = "total_steps" not in options
        self._recompile_after_update = False
        self._loaded_run_pending = False

    # -- public views -------------------------------------------------------------------------
    @property
    def engine(self) -> SparseEngine | None:
        """The run's engine (options, update counter, history); None before attaching."""
        self._take_over_loaded_run()
        return self._engine

    @engine.setter
    def engine(self, engine: SparseEngine | None) -> None:
        self._engine = engine

    @property
    def momentum_source(self) -> str | None:
        """Where the momentum the mask updates read comes from, in words: the optimizer's slot
        (SGD/RMSprop momentum, Adam's first moment ...) or the library's own gradient average
        when the optimizer keeps none; None before the callback is attached."""
        return self._momentum_source

    @property
    def history(self) -> list[UpdateReport]:
        """Every mask update (and skipped update) of the run so far."""
        return [] if self.engine is None else list(self.engine.history)

    def masks(self) -> dict[str, np.ndarray]:
        """The current masks as NumPy arrays, by sparse weight name."""
        return {w.name: c.mask_numpy() for w, c in zip(self.weights, self.constraints)}

    def layer_densities(self) -> dict[str, float]:
        """Fraction of active positions per sparse weight."""
        return {name: float(m.mean()) for name, m in self.masks().items()}

    def dead_units(self) -> dict[str, tuple[int, int]]:
        """Per sparse weight, ``(dead output units, output units)`` as the last mask update found
        them (no active weight, or no gradient: :mod:`sparsecore.units`); before the first
        update, the units that start without a weight."""
        from sparsecore.units import dead_unit_counts

        masks = self.masks()
        axes = [w.axis for w in self.weights]
        return dead_unit_counts(self.history, list(masks.values()), list(masks), axes)

    def density(self) -> float:
        """Active fraction over all sparse weights (exactly ``N / sum n_l``)."""
        masks = list(self.masks().values())
        return sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)

    def summary(self, print_fn: Callable[[str], Any] | None = None) -> None:
        """Print a per-layer table, like Keras' ``model.summary()``: shape, size, active weights,
        density, ever-active fraction, what the last mask update pruned and regrew and the
        weight's share of its regrowth budget, and the total. The same renderer as the table of
        ``sparsecore report`` (:mod:`sparsecore.records.layer_table`). ``print_fn`` gets each line
        (default ``print``)."""
        from sparsecore.records.layer_table import summary_text

        engine = self.engine
        if engine is None:
            raise SparseCoreError(
                "SparseCallback is not attached to a model yet: call fit() or attach(model) first"
            )
        masks = [c.mask_numpy() for c in self.constraints]
        text = summary_text(
            "SparseCallback",
            engine.history,
            shapes=dict(zip(engine.names, engine.shapes)),
            nnz={n: int(m.sum()) for n, m in zip(engine.names, masks)},
            step=self._step_or_none(),
        )
        for line in text.splitlines():
            (print_fn or print)(line)

    def __repr__(self) -> str:
        if self.engine is None:
            return f"SparseCallback(not attached, density {self.config.density:g})"
        return (
            f"SparseCallback({len(self.weights)} sparse weights, density "
            f"{self.density():.4f}, {len(self.history)} updates)"
        )

    def _step_or_none(self) -> int | None:
        self._sync_jax_state()
        optimizer = getattr(self._attached_to, "optimizer", None)
        try:
            return None if optimizer is None else int(ops.convert_to_numpy(optimizer.iterations))
        except (TypeError, ValueError, AttributeError):  # a JAX variable mid-epoch holds no value
            return None

    # -- attaching ----------------------------------------------------------------------------
    def attach(self, model: Any | None = None) -> None:
        """Install masks on ``model`` (default: the model being fitted) now rather than at fit.

        Useful to evaluate or save the sparse model before training. Everything is checked before
        anything is changed; calling it again on the same model does nothing.
        """
        model = self.model if model is None else model
        if model is None:
            raise SparseCoreError("no model to attach to: pass one, or use the callback in fit()")
        if self._attached_to is model:
            return
        self._attach(model, steps_known=False)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._attached_to is not self.model:
            self._attach(self.model, steps_known=True)
        elif self.engine is not None:
            self._check_steps_per_execution(self.model, self.engine.config)
            if _is_jax():  # compile() since the last fit gave the model Keras' own step
                self._prepare_train_function(self.model)
        self._fit_starting = True

    def _total_steps(self, first_epoch: int = 0) -> int | None:
        """Optimizer steps at the end of this ``fit``: the steps already taken plus its own.

        ``first_epoch`` is the epoch ``fit`` starts at (its ``initial_epoch``), known for sure
        only at the first ``on_epoch_begin``.
        """
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if not (epochs and steps):
            return None
        optimizer = getattr(self.model, "optimizer", None)
        done = 0 if optimizer is None else int(ops.convert_to_numpy(optimizer.iterations))
        return done + max(int(epochs) - int(first_epoch), 0) * int(steps)

    def _needs_momentum(self, config: SparseConfig) -> bool:
        return (
            config.redistribution in NEEDS_MOMENTUM["importance"]
            or config.growth in NEEDS_MOMENTUM["growth"]
            or config.revive_dead_units
        )

    def _attach(self, model: Any, *, steps_known: bool) -> None:
        # 1. Check everything; change nothing.
        weights = find_sparse_weights(model, **self._selection)
        if not weights:
            raise SparseCoreError(
                f"model {model.name!r} has no layer sparsecore can make sparse (Dense, Conv*, "
                f"DepthwiseConv*, SeparableConv*, Conv*Transpose; Embedding with "
                f"embeddings=True); check include/exclude"
            )
        existing = [w.variable.constraint for w in weights]
        ours = [isinstance(c, SparseMask) for c in existing]
        if any(ours) and not all(ours):
            missing = [w.name for w, o in zip(weights, ours) if not o]
            raise SparseCoreError(
                f"the model carries sparsecore masks on some weights but not on {missing}; "
                f"use the same layer selection (include/exclude/dense_first/dense_last) as the "
                f"run that created them"
            )
        for w, c in zip(weights, existing):
            if c is not None and not isinstance(c, SparseMask):
                raise SparseCoreError(
                    f"layer {w.name!r} already has the constraint {c!r}; sparsecore needs the "
                    f"variable's constraint slot to apply the mask; remove it or exclude the layer"
                )
        resume = all(ours)
        config = self.config
        saved: _SavedRun | None = None
        if resume:
            constraints = [c for c in existing if isinstance(c, SparseMask)]
            saved = self._read_saved_run(weights, constraints)
            config = self._resumed_config(saved.engine.config)
        total_from_fit = "total_steps" not in self._given and (
            saved is None or saved.total_steps_from_fit
        )
        if total_from_fit and steps_known:
            total = self._total_steps()
            if total is not None:
                config = config.replace(total_steps=total)
        if steps_known and config.prune_schedule != "constant" and config.total_steps is None:
            if not config.schedule().static:
                raise SparseCoreError(
                    f"prune_schedule={config.prune_schedule!r} needs the length of training but "
                    f"fit() does not know its steps per epoch; pass total_steps=... or "
                    f"steps_per_epoch to fit, or use prune_schedule='constant'"
                )
        self._check_steps_per_execution(model, config)
        optimizer = getattr(model, "optimizer", None)
        reader = MomentumReader(optimizer, config.adam_momentum)
        reads_momentum = self._needs_momentum(config) and not config.schedule().static
        if reads_momentum:
            reader.check()
        backend = resolve_update_backend(self.update_backend, [w.variable for w in weights])
        names = [w.name for w in weights] if saved is None else saved.names
        engine = SparseEngine(config, names, [w.shape for w in weights], [w.axis for w in weights])
        if saved is not None:
            engine.restore(saved.engine)
            engine.config = config
            if engine.ever_active is not None:
                engine.ever_active = [_from_host(e, backend) for e in engine.ever_active]

        # 2. Change the model.
        if not resume:
            masks = engine.initial_masks()
            with self._scope(model):
                constraints = [
                    SparseMask(
                        w.shape, name=n, index=i, axis=w.axis, mask=m, dtype=w.variable.dtype
                    )
                    for i, (w, n, m) in enumerate(zip(weights, names, masks))
                ]
            scales = engine.initial_scales(masks)
            for i, (w, c) in enumerate(zip(weights, constraints)):
                start = c(ops.copy(w.variable))
                if scales is not None:  # scale_init: each unit at its dense output scale
                    start = start * ops.convert_to_tensor(scales[i], dtype=w.variable.dtype)
                w.variable.assign(start)
                w.variable.constraint = c
                setattr(w.layer, w.constraint_attr, c)  # so that get_config() saves it
        if reads_momentum and momentum_kind(optimizer) == OWN:
            reader.own = OwnMomentum(
                optimizer, [w.variable for w in weights], config.momentum_beta, self._scope(model)
            )
            reader.own.install()
        self.weights, self.constraints, self.engine = weights, constraints, engine
        self._reader = reader
        self._momentum_source = (
            describe(optimizer, config.adam_momentum, config.momentum_beta)
            if reads_momentum
            else "none: the chosen modes and schedule read no momentum"
        )
        _LOG.info("sparsecore: sparse momentum reads %s", self._momentum_source)
        self._backend = backend
        self._total_from_fit = total_from_fit
        self._attached_to = model
        self._store_state()
        if not resume or _is_jax() or reader.own is not None:
            self._prepare_train_function(model)

    @staticmethod
    def _scope(model: Any) -> Any:
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None and hasattr(strategy, "scope"):
            return strategy.scope()
        return contextlib.nullcontext()

    def _prepare_train_function(self, model: Any) -> None:
        """Make the model's train step apply the current masks.

        A train function traced before the constraints existed would not apply them, so it is
        rebuilt. On JAX the compiled step gets the masks as arguments (:mod:`.jax_step`); where
        that is not possible it is recompiled after every mask update instead.
        """
        self._recompile_after_update = False
        if _is_jax():
            own = None if self._reader is None else self._reader.own
            if jax_step.is_installed(model, self.constraints, own):
                return
            if own is None and jax_step.needs_nothing(model):
                return
            if jax_step.install(model, self.constraints, own):
                return
            if own is not None:
                raise SparseCoreError(
                    f"SparseCallback: {type(model.optimizer).__name__} keeps no momentum, and on "
                    f"Keras' JAX backend the library's own gradient average needs the train step "
                    f"sparsecore builds, which this model cannot take (a keras.distribution, Flax "
                    f"NNX or a custom train function): use an optimizer with momentum (SGD with "
                    f"momentum, Adam, ...) or growth/redistribution modes that read no momentum"
                )
            self._recompile_after_update = True
        self._rebuild_train_function(model)

    @staticmethod
    def _rebuild_train_function(model: Any) -> None:
        make = getattr(model, "make_train_function", None)
        if getattr(model, "train_function", None) is not None and make is not None:
            make(force=True)

    def _read_saved_run(
        self, weights: Sequence[SparseWeight], constraints: Sequence[SparseMask]
    ) -> _SavedRun:
        """Check the run a model carries in its constraints (masks, ever-active masks, the engine
        state) against the model; changes nothing, raises naming the first bad field."""
        for i, (w, c) in enumerate(zip(weights, constraints)):
            if c.index != i or c.shape != w.shape:
                raise SparseCoreError(
                    f"layer {w.name!r}: its saved mask is #{c.index} of shape {c.shape}, but the "
                    f"layer is #{i} of shape {w.shape}; use the same layer selection as the run "
                    f"that saved it"
                )
        state, _ = constraints[0].snapshot()
        if state is None:
            raise SparseCoreError(
                f"layer {weights[0].name!r} carries a sparsecore mask but no engine state; the "
                f"model was saved before SparseCallback attached to it"
            )
        f = StateFields(_SAVED, "")
        f.keys(state, "", [k for k in ENGINE_FIELDS if k != "ever_active"] + ["keras"])
        f.keys(state["keras"], "keras", ["total_steps_from_fit"])
        from_fit = check_flag(
            f.name("keras.total_steps_from_fit"), state["keras"]["total_steps_from_fit"]
        )
        names = f.sequence(state["names"], "names", len(weights))
        mask_names = [c.name for c in constraints]
        if names != mask_names:
            raise f.error("names", f"is {names!r}, the saved masks are named {mask_names!r}")
        masks = [c.mask_numpy() for c in constraints]
        ever = [c.snapshot()[1] for c in constraints]
        missing = [w.name for w, e in zip(weights, ever) if e is None]
        if missing and len(missing) != len(weights):
            raise f.error("ever_active", f"is saved for some layers but not for {missing}")
        engine_state = {k: v for k, v in state.items() if k != "keras"}
        engine_state["ever_active"] = None if missing else ever
        checked = read_engine_state(
            engine_state,
            names=names,
            shapes=[w.shape for w in weights],
            axes=[w.axis for w in weights],
            config=None,
            target=None,
            owner=_SAVED,
        )
        cfg = checked.config
        initial = layer_counts(
            [w.shape for w in weights],
            cfg.density,
            cfg.init,
            axes=[w.axis for w in weights],
            max_density=cfg.max_density,
            min_density=cfg.min_density,
        )
        want, source = expected_counts(checked.history, initial)
        counts = [int(m.sum()) for m in masks]
        if counts != want:
            raise f.error(
                "masks", f"hold {counts} active weights (the constraints), {source} gives {want}"
            )
        for w, m, e in zip(weights, masks, checked.ever_active or []):
            if np.any(m & ~e):
                raise f.error(
                    "ever_active", f"of layer {w.name!r} leaves out active positions of its mask"
                )
        return _SavedRun(names, checked, from_fit)

    def _resumed_config(self, saved: SparseConfig) -> SparseConfig:
        given = dict(self._given)
        given = {**RECIPES[given.pop("recipe", "default")], **given}  # the recipe's values
        diff = {
            k: (getattr(saved, k), v)
            for k, v in given.items()
            if k != "total_steps" and getattr(saved, k) != v
        }
        if diff:
            raise SparseCoreError(
                f"the model continues a saved sparse run whose options differ from the ones "
                f"given: {{option: (saved, given)}} = {diff}; pass the same options or none"
            )
        if "total_steps" in self._given and self._given["total_steps"] != saved.total_steps:
            saved = saved.replace(total_steps=self._given["total_steps"])
        return saved

    @staticmethod
    def _check_steps_per_execution(model: Any, config: SparseConfig) -> None:
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        every = config.update_every
        if spe > 1 and every is not None and every % spe != 0:
            raise SparseCoreError(
                f"update_every={every} is not a multiple of the model's steps_per_execution={spe}"
                f"; callbacks only see every {spe}-th step, so choose update_every as a multiple"
            )

    # -- the engine state kept in the constraints ---------------------------------------------
    def _store_state(self) -> None:
        """Let the constraints read the live engine state whenever the model is saved, and tell
        the callback when ``load_weights`` refills them.

        The state is serialised on demand (when Keras saves the constraint's entry), not after
        every update, so a long history costs nothing until a checkpoint is written.
        """
        for c in self.constraints:
            c.provider = self._provide_state
            c.on_load = self._constraint_loaded

    def _constraint_loaded(self, constraint: SparseMask) -> None:
        """``model.load_weights`` refilled a constraint of this run with a saved one: the saved
        run is taken over, checked as a whole as on resume, once every entry is in (the next
        time the callback needs its engine: :meth:`_take_over_loaded_run`)."""
        self._loaded_run_pending = True

    def _take_over_loaded_run(self) -> None:
        if not self._loaded_run_pending or self._engine is None or self._backend is None:
            return
        self._loaded_run_pending = False
        live = [c.provider for c in self.constraints]
        for c in self.constraints:
            c.provider = None  # read what was loaded, not this callback's engine
        try:
            saved = self._read_saved_run(self.weights, self.constraints)
            config = self._resumed_config(saved.engine.config)
        finally:
            for c, provider in zip(self.constraints, live):
                c.provider = provider
        engine = self._engine
        engine.restore(saved.engine)
        engine.config = config
        if engine.ever_active is not None:
            engine.ever_active = [_from_host(e, self._backend) for e in engine.ever_active]
        # as on resume: the next fit() sets the length of training unless it was given
        self._total_from_fit = "total_steps" not in self._given and saved.total_steps_from_fit

    def _provide_state(self, index: int) -> tuple[dict[str, Any] | None, np.ndarray | None]:
        assert self.engine is not None
        state = self.engine.state_dict()
        ever = state.pop("ever_active")
        state["keras"] = {"total_steps_from_fit": self._total_from_fit}
        saved = json.loads(json.dumps(state, default=_json_default)) if index == 0 else None
        return saved, None if ever is None else _host_mask(ever[index])

    # -- updates ------------------------------------------------------------------------------
    def _step(self) -> int:
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        engine = self.engine
        if engine is not None and getattr(self, "_fit_starting", False):
            self._fit_starting = False
            if self._total_from_fit:
                total = self._total_steps(first_epoch=epoch)
                if total is not None and total != engine.config.total_steps:
                    engine.config = engine.config.replace(total_steps=total)
        # One read of the step counter per epoch; batch hooks count from it in Python, which
        # spares a device-to-host read after every batch.
        self._epoch_base = self._step() if engine is not None else None

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # The update due after step s runs here, before step s + 1, rather than in
        # ``on_train_batch_end``: Keras calls this hook on the main thread before each train
        # step, and a callback that leaves ``on_train_batch_end`` at its default keeps Keras'
        # asynchronous batch-end dispatch on (no host read of the logs after every batch).
        # Below: pure Python integer work unless an update is due.
        engine = self.engine
        if engine is None:
            return
        every = engine.config.update_every
        if every is None:
            return
        base = getattr(self, "_epoch_base", None)
        # ``batch`` is the number of steps this epoch has taken (steps_per_execution > 1 too).
        step = self._step() if base is None else base + int(batch)
        if step % every == 0:
            self._step_update(step)

    def _step_update(self, step: int) -> None:
        """The update due after ``step`` by the step count, unless one was already made there.

        An update after an epoch's last step runs at that epoch's end (before the epoch logs);
        one recorded at ``step`` (by that, or in the saved run a checkpoint continues) is not
        repeated by the next batch.
        """
        engine = self.engine
        if engine is None or not engine.due(step):
            return
        if engine.history and engine.history[-1].step == step:
            return
        self.update_masks(step)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        engine = self.engine
        if engine is None:
            return
        step = self._step()
        every = engine.config.update_every
        if every is not None and step % every == 0:
            self._step_update(step)
        if engine.config.update_at_epoch_end and engine.due(step, epoch_end=True):
            self.update_masks(step)
        if logs is not None:
            logs.update(self.epoch_logs())

    def update_masks(self, step: int | None = None) -> UpdateReport:
        """Run one mask update now (the schedule calls this; tests and users may too)."""
        if self.engine is None or self._reader is None or self._backend is None:
            raise SparseCoreError("SparseCallback is not attached to a model yet")
        self._sync_jax_state()
        step = self._step() if step is None else step
        engine, config, be = self.engine, self.engine.config, self._backend
        needs_momentum = self._needs_momentum(config)
        layers = []
        # Engine names come from the run that created the masks (they survive renames).
        for name, w, c in zip(engine.names, self.weights, self.constraints, strict=True):
            momentum = self._reader.read(w.variable, w.name) if needs_momentum else None
            layers.append(
                Layer(
                    name,
                    as_update_array(w.variable, be),
                    as_update_array(c.mask, be),
                    momentum=None if momentum is None else as_update_array(momentum, be),
                    axis=w.axis,
                )
            )
        result = engine.update(layers, step, backend=be)
        if not result.report.skipped:
            optimizer = self.model.optimizer if self.model is not None else None
            weights = result.weights or [None] * len(layers)
            for w, c, layer, report, new, weight in zip(
                self.weights, self.constraints, layers, result.report.layers, result.masks, weights
            ):
                if report.net_pruned == 0 and report.net_grown == 0:  # mask unchanged
                    continue
                # the new weights when the update computed them (dead units revived), else masked
                w.variable.assign(
                    be.apply(layer.weight, layer.mask, new) if weight is None else weight
                )
                c.assign(new)
                if config.reset_optimizer_state and optimizer is not None:
                    changed = be.logical_or(
                        be.and_not(layer.mask, new), be.and_not(new, layer.mask)
                    )
                    slots = optimizer_slots(optimizer, w.variable)
                    if self._reader.own is not None:
                        slots.append(self._reader.own.buffer(w.variable))
                    for slot in slots:
                        slot.assign(_zero_where(changed, slot, be))
            if self._recompile_after_update:
                # the compiled JAX step holds the masks it was traced with (see jax_step)
                self._rebuild_train_function(self._attached_to)
        return result.report

    def _sync_jax_state(self) -> None:
        """On JAX, bring the variables up to date with the training state before reading them.

        During an epoch Keras' JAX trainer keeps weights, optimizer slots and step counter in a
        state outside the variables (their values are dropped), and writes it back only at the
        epoch's end. ``jax_state_sync()`` writes it back now; the trainer then reads the
        variables again before its next step, so the masks, weights and momentum this update
        reads are the ones training reached, and what it assigns is what training continues
        with. A no-op on the other backends, and when nothing is pending.
        """
        sync = getattr(self._attached_to, "jax_state_sync", None)
        if _is_jax() and callable(sync):
            sync()

    def epoch_logs(self) -> dict[str, float]:
        """The values added to ``logs`` at each epoch end."""
        if self.engine is None:
            return {}
        total = sum(math.prod(s) for s in self.engine.shapes)
        nonzero = sum(
            int(ops.convert_to_numpy(ops.count_nonzero(ops.copy(w.variable)))) for w in self.weights
        )
        out: dict[str, float] = {
            "sparse_density": self.engine.target / total,
            "sparse_measured_density": nonzero / total,
            "sparse_updates": float(self.engine.updates),
        }
        done = [r for r in self.engine.history if not r.skipped]
        last = done[-1] if done else None
        totals = last.totals() if last is not None else {"pruned": 0, "net_pruned": 0}
        out["sparse_prune_rate"] = float(last.prune_rate) if last is not None else 0.0
        out["sparse_pruned"] = float(totals["pruned"])
        out["sparse_net_pruned"] = float(totals["net_pruned"])
        out["sparse_ever_active"] = float(
            last.extra.get("ever_active_fraction", 0.0) if last is not None else 0.0
        )
        for name, density in self.layer_densities().items():
            out[f"sparse_density/{name}"] = density
        return out
