"""Distillation objectives on one loop: DKDM and data-free step distillation fed by the pool.

``dkdm`` is the paper's objective (the student learns the teacher's reverse process). The
step-distillation methods make students that sample in few steps, without data:

* ``luhman`` (Luhman & Luhman 2021): noise -> the teacher's deterministic DDIM sample, in one step;
* ``progressive`` (Salimans & Ho 2022): rounds that halve the step count, ``x_t`` from the pool;
  class-conditional and guided too (Meng et al. 2023, stage two: a w-conditioned student of a
  guided or w-conditioned teacher, each pool sample with its own label and ``w``);
* ``tract`` (Berthelot et al. 2023): progressive's rounds with fewer phases, each student spanning
  several teacher steps through an EMA self-teacher;
* ``consistency`` (Song et al. 2023, distillation): one teacher DDIM step between adjacent grid
  points starting from pool samples, an EMA target network, the skip/out parameterisation.

:func:`build_objective` picks one from ``DistillConfig.objective``; :mod:`.sampling` draws
samples from the students in their own step counts.
"""

from __future__ import annotations

from typing import Any

from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import (
    HEADS,
    LoopObjective,
    Parameterization,
    Schedule,
    init_student,
    respaced_grid,
    step_grid,
)

__all__ = [
    "HEADS",
    "OBJECTIVES",
    "LoopObjective",
    "Parameterization",
    "Schedule",
    "build_objective",
    "init_student",
    "respaced_grid",
    "step_grid",
]

OBJECTIVES = ("dkdm", "luhman", "progressive", "tract", "consistency", "boot")


def build_objective(loop: Any, distill: Any, *, class_cond: bool) -> LoopObjective:
    """The :class:`LoopObjective` that ``distill.objective`` names, built for ``loop`` (teacher, student, diffusions).

    ``class_cond``: whether the teacher is class-conditional (only DKDM and progressive distil such a teacher).
    """
    name = distill.objective
    if name not in OBJECTIVES:
        raise ObjectiveError(f"unknown --objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if name == "dkdm":
        from dkdm.distill.objectives.dkdm import DKDMLoopObjective

        if distill.student_init not in ("", "random"):
            from dkdm import logger

            logger.log(init_student(loop.student, loop.teacher, distill.student_init))
        return DKDMLoopObjective(loop.objective)
    if class_cond and name != "progressive":
        raise ObjectiveError(
            f"--objective {name} distills unconditional teachers only for now; use --objective dkdm or progressive "
            "for a class-conditional teacher"
        )
    if name == "luhman":
        from dkdm.distill.objectives.luhman import LuhmanObjective

        return LuhmanObjective(loop, distill)
    if name == "progressive":
        from dkdm.distill.objectives.progressive import ProgressiveObjective

        return ProgressiveObjective(loop, distill)
    if name == "tract":
        from dkdm.distill.objectives.tract import TractObjective

        return TractObjective(loop, distill)
    if name == "boot":
        from dkdm.distill.objectives.boot import BootObjective

        return BootObjective(loop, distill)
    from dkdm.distill.objectives.consistency import ConsistencyObjective

    return ConsistencyObjective(loop, distill)
