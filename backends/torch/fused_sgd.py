"""The fused SGD step inside training: SGD's gradients held back, then SGD and re-masking in one loop.

``torch.optim.SGD`` skips a parameter whose ``grad`` is None. Before an SGD step,
:meth:`FusedSGD.take` holds back the gradients of the sparse parameters the fused loop can update
(CPU float32/float64, SGD options the loop implements); after the step, :meth:`FusedSGD.finish`
runs the loop (:mod:`sparsecore.torch.fused_step`: SGD's update and the re-masking in one pass,
bit for bit as SGD followed by masking, folding the gradient into the library's own momentum
where there is one) and puts the gradients back. A step with a closure, or an optimizer the loop
does not implement, is left to SGD entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import fused_step as fs
from . import momentum as mom
from .selection import Target

__all__ = ["FusedSGD"]

_UNSET: Any = object()


class FusedSGD:
    """Holds SGD's gradients over one step for the fused loop; ``enabled=False`` does nothing.

    ``masks`` and ``own`` are the adapter's lists (updated in place, never replaced): the mask
    and the library's own momentum buffer (or None) of each target.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        masks: Sequence[torch.Tensor],
        own: Sequence[torch.Tensor | None],
        *,
        enabled: bool,
    ) -> None:
        self.targets = targets
        self.masks = masks
        self.own = own
        self.enabled = enabled
        # gradients held over an SGD step, with their group's options
        self.taken: list[tuple[int, torch.Tensor, fs.GroupPlan]] = []
        self._param_plans: list[fs.ParamPlan | None] = [None] * len(targets)
        self.groups: list[dict[str, Any] | None] | None = None  # the driver's, per target

    def take(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before an SGD step: hold back the gradients of the parameters the fused loop updates.

        Each group's options are read once here and kept with the gradients, so the loop sees
        this step's learning rate.
        """
        self.give_back()  # only if the previous step raised between the two hooks
        if not self.enabled or not fs.optimizer_fusable(optimizer):
            return
        # The hooks see step's own arguments: (optimizer, closure=None).
        if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
            return  # a closure recomputes the gradients inside the step
        if self.groups is None:
            self.groups = [mom.group_of(optimizer, t.param) for t in self.targets]
        plans: dict[int, fs.GroupPlan | None] = {}
        state = optimizer.state
        for i, (t, group) in enumerate(zip(self.targets, self.groups)):
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
                self.taken.append((i, grad, plan))
                t.param.grad = None

    def finish(self, optimizer: Any, momentum_beta: float) -> set[int]:
        """After the SGD step: the fused update of the held-back parameters, which also folds
        their gradients into the own momentum (average weight ``1 - momentum_beta``) where there
        is one; their indices."""
        if not self.taken:
            return set()
        done = set()
        state = optimizer.state
        # The loop writes through data pointers: no autograd op runs, so no no_grad is needed.
        for i, grad, group_plan in self.taken:
            param = self.targets[i].param
            plan = self._param_plans[i]
            if plan is None or not plan.valid_for(param, self.masks[i], self.own[i]):
                plan = self._param_plans[i] = fs.plan_param(
                    param, self.masks[i], self.own[i], 1.0 - momentum_beta
                )
            fs.run_planned(plan, group_plan, grad, state[param] if group_plan.momentum else {})
            done.add(i)
        self.give_back()
        return done

    def give_back(self) -> None:
        """Put every held gradient back on its parameter."""
        for i, grad, _ in self.taken:
            self.targets[i].param.grad = grad
        self.taken.clear()
