"""DKDM (the paper's method) as a :class:`LoopObjective`: the pool's teacher call is the target."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dkdm.distill.objective import DKDMObjective
from dkdm.distill.objectives.base import LoopObjective

__all__ = ["DKDMLoopObjective"]


class DKDMLoopObjective(LoopObjective):
    """``L*`` of :class:`DKDMObjective` on pool batches: one teacher call per step feeds target and pool."""

    name = "dkdm"
    uses_pool = True
    teacher_evals = 1.0

    def __init__(self, objective: DKDMObjective) -> None:
        self.objective = objective

    def describe(self) -> str:
        return "objective dkdm: 1 teacher evaluation per student sample per step (it also advances the pool)"

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        batch, out = loop.pool_step()
        batch["teacher_out"] = out
        return batch

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        kwargs = {k: micro[k] for k in ("y", "w") if k in micro}
        terms = self.objective.losses(model, micro["x_t"], micro["t"], micro["teacher_out"], kwargs)
        terms["t"] = micro["t"]
        return terms["loss"].mean(), terms
