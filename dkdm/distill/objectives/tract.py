"""TRACT (Berthelot et al. 2023), data-free: transitive-closure time distillation on the round machinery.

``tract_steps`` lists step counts, e.g. ``64,8,1``: the original teacher samples on the 64-step grid
and two phases follow, 64 -> 8 and 8 -> 1 (progressive distillation would need six halvings). In a
phase whose teacher samples in ``M`` steps and whose student in ``N`` (``N`` divides ``M``), the
teacher's grid is cut into ``N`` segments of ``q = M / N`` steps. A pool batch (advanced by the
original teacher, as in DKDM) is moved by a DDIM jump to the nearest point ``v_i`` of the teacher's
grid; the phase's teacher takes one DDIM step to ``v_(i-1)``; unless that is the segment's end
``v_e``, the *self-teacher* -- an EMA of the student (``tract_ema``, reset to the student at each
phase start) -- jumps from there to ``v_e`` in one DDIM step. The student learns the x_0 whose single
DDIM step from ``(z, v_i)`` lands on that point (the target of
:func:`~dkdm.distill.objectives.progressive.two_step_target`), weighted like progressive distillation.
Phases, their teachers, round checkpoints and resume are progressive distillation's; the self-teacher
rides in the checkpoints too (``selfteacherNNNNNN.pt``). Cost per student sample per step: 2 teacher
evaluations (pool, one step) and 1 self-teacher evaluation.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import Tensor

from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import ema_update_
from dkdm.distill.objectives.consistency import _Target
from dkdm.distill.objectives.progressive import ProgressiveObjective, two_step_target

__all__ = ["TractObjective", "tract_schedule"]


def tract_schedule(spec: str, num_timesteps: int) -> tuple[list[int], list[int]]:
    """``"64,8,1"`` -> phases' student steps ``[8, 1]`` and their teachers' ``[64, 8]``; refuses what cannot work."""
    try:
        steps = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ObjectiveError(f"--tract_steps {spec!r}: expected step counts such as 64,8,1") from None
    if len(steps) < 2:
        raise ObjectiveError(f"--tract_steps {spec!r}: give the teacher's steps and at least one phase, e.g. 64,8,1")
    if steps[0] > num_timesteps:
        raise ObjectiveError(
            f"--tract_steps {spec!r}: the teacher's {steps[0]} steps exceed the chain's T = {num_timesteps}"
        )
    for m, n in itertools.pairwise(steps):
        if not (1 <= n < m and m % n == 0):
            raise ObjectiveError(
                f"--tract_steps {spec!r}: each phase must divide the step count ({m} -> {n} does not); e.g. 64,8,1"
            )
    return steps[1:], steps[:-1]


class TractObjective(ProgressiveObjective):
    """Data-free TRACT; see the module docstring."""

    name = "tract"
    teacher_evals = 2.0
    schedule_flags = "--tract_steps/--round_steps"
    project_to_teacher_grid = True

    def __init__(self, loop: Any, distill: Any) -> None:
        if not 0.0 <= distill.tract_ema < 1.0:
            raise ObjectiveError(f"--tract_ema must lie in [0, 1), got {distill.tract_ema}")
        super().__init__(loop, distill)
        net = copy.deepcopy(loop.student).to(loop.device).eval().requires_grad_(False)
        self.self_teacher = _Target(net, distill.tract_ema)
        self.ratios = [m // n for m, n in zip(self.teacher_steps, self.schedule)]

    def make_schedule(self, distill: Any) -> tuple[list[int], list[int]]:
        return tract_schedule(distill.tract_steps, self.T)

    def extra_state(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "selfteacher": self.self_teacher}

    def describe(self) -> str:
        phases = " -> ".join(map(str, [self.teacher_steps[0], *self.schedule]))
        return (
            f"objective tract: {self.param.spec} student, phases {phases} steps, {self.round_steps} optimizer steps "
            f"each, self-teacher EMA {self.self_teacher.decay}; 2 teacher evaluations (pool, one step) and 1 "
            f"self-teacher evaluation per student sample per step. {self._init_line}"
        )

    def _advance(self, loop: Any, r: int) -> None:
        super()._advance(loop, r)
        self.self_teacher.net.load_state_dict(loop.trainer.model.state_dict())

    def target(self, loop: Any, r: int, z: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
        """``(v_i, x~)``: the student's input step and the x_0 target: one teacher step, then the self-teacher."""
        fine, q = self.grids[r]["fine"], self.ratios[r]
        e = torch.div(i - 1, q, rounding_mode="floor") * q  # the segment's end (teacher-grid index)
        v, prev, end = fine[i], fine[i - 1], fine[e]
        z1 = self.sch.ddim(z, v, self.teacher_x0(loop, r, z, v), prev)
        x0 = self.param.x0(loop.run_net(self.self_teacher.net, self.student_diffusion, z1, prev).float(), z1, prev)
        x0 = x0.clamp(-1, 1) if self.clip else x0
        z2 = torch.where((i - 1 == e).view(-1, *([1] * (z.dim() - 1))), z1, self.sch.ddim(z1, prev, x0, end))
        return v, two_step_target(self.sch, z, v, z2, end)

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        r = self.round_of(loop.trainer.step)
        if r != self.rounds.round:
            self._advance(loop, r)
        elif loop.trainer.step > r * self.round_steps:  # the self-teacher follows the step just taken
            src = [p.detach() for p in loop.trainer.model.parameters()]
            ema_update_(self.self_teacher.params, src, self.self_teacher.decay)
        batch, out = loop.pool_step()
        x, t = batch["x_t"], batch["t"]
        x0 = self.teacher_diffusion.p_mean_variance_from_output(out, x, t, clip_denoised=self.clip)["pred_xstart"]
        i = self.grids[r]["proj"].index(t) + 1  # teacher-grid index 1..M
        z = self.sch.ddim(x, t, x0, self.grids[r]["fine"][i])
        v, target = self.target(loop, r, z, i)
        return {"x_t": z, "t": v, "target": target}
