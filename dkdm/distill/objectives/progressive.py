"""Progressive distillation (Salimans & Ho 2022), data-free: ``x_t`` comes from the pool.

Rounds halve the student's step count, ``progressive_start -> ... -> progressive_end``, each
``round_steps`` optimizer steps long. In a round with ``N`` student steps on the grid
``u_j`` (:func:`step_grid` of ``N``), the round's teacher samples on the grid of ``2N``
steps, which holds every ``u_j`` and a midpoint between each two. A pool batch ``(x, t)``
(advanced by the *original* teacher, one evaluation, as in DKDM) is moved to the nearest
``u_j`` by a DDIM jump with that evaluation's x_0; the round's teacher then takes two DDIM
steps ``u_j -> mid -> u_(j-1)`` from there, and the student learns the x_0 that makes one
DDIM step land on the same point::

    x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a)      (a, s: alpha, sigma; z'' at u_(j-1), z at u_j)

(``x~ = z''`` when ``u_(j-1)`` is the clean end). Loss ``w(t) |x~ - x^|^2`` with Salimans & Ho's
truncated SNR weight ``max(SNR, 1)`` (or ``SNR + 1``, the v-loss). Round 0's teacher is the
original teacher; round ``r``'s is round ``r-1``'s final student. The student starts from the
teacher's weights (``student_init``). Each finished round's student is written to
``round<r>_<N>steps.pt``; the round and its teacher ride in the checkpoints (``roundsNNNNNN.pt``),
so a run resumes mid-round. Cost: 1 (pool) + 2 (targets) teacher evaluations per student sample per step.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor

from dkdm import dist, logger
from dkdm.diffusion.losses import mean_flat
from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import (
    GridProjector,
    LoopObjective,
    Parameterization,
    Schedule,
    check_same_chain,
    init_student,
    step_grid,
)
from dkdm.fileio import atomic_save

__all__ = ["ProgressiveObjective", "round_schedule", "two_step_target"]

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def round_schedule(start: int, end: int, num_timesteps: int) -> list[int]:
    """``[start, start/2, ..., end]``; refuses what halving cannot reach or the chain cannot hold."""
    if start < 1 or end < 1 or end > start:
        raise ObjectiveError(
            f"progressive rounds go from --progressive_start {start} down to --progressive_end {end}: "
            "both must be >= 1 and end <= start"
        )
    full = [start]
    while full[-1] % 2 == 0:
        full.append(full[-1] // 2)
    if end not in full:
        raise ObjectiveError(
            f"progressive rounds halve the step count from --progressive_start {start}: "
            f"{', '.join(map(str, full))}; --progressive_end {end} is not on that schedule"
        )
    sched = full[: full.index(end) + 1]
    if 2 * start > num_timesteps:
        raise ObjectiveError(
            f"the first round's teacher takes 2 x {start} = {2 * start} DDIM steps but the chain has "
            f"T = {num_timesteps}; use --progressive_start <= {num_timesteps // 2}"
        )
    return sched


def two_step_target(sch: Schedule, z: Tensor, t: Tensor, z2: Tensor, s: Tensor) -> Tensor:
    """The x_0 whose DDIM step from ``(z, t)`` to ``s`` lands on ``z2``."""
    ratio = sch.table("sigma", s, z) / sch.table("sigma", t, z)
    return (z2 - ratio * z) / (sch.table("alpha", s, z) - ratio * sch.table("alpha", t, z))


class _Rounds:
    """The round counter and the round's teacher weights (checkpointed as ``roundsNNNNNN.pt``)."""

    def __init__(self, schedule: list[int], round_steps: int, net: torch.nn.Module, flags: str) -> None:
        self.schedule, self.round_steps, self.net = list(schedule), int(round_steps), net
        self.flags = flags  # the method's schedule flags, named by the resume refusal
        self.round = 0

    def state_dict(self) -> dict[str, Any]:
        teacher = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()} if self.round else None
        return {"schedule": self.schedule, "round_steps": self.round_steps, "round": self.round, "teacher": teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["schedule"]) != self.schedule or int(state["round_steps"]) != self.round_steps:
            raise ObjectiveError(
                f"this run was trained on the rounds {state['schedule']} of {state['round_steps']} steps "
                f"each; resuming on {self.schedule} of {self.round_steps} would mix two schedules. Resume with the "
                f"saved {self.flags}, or give a new --log_dir"
            )
        self.round = int(state["round"])
        if state["teacher"] is not None:
            self.net.load_state_dict(state["teacher"])


class ProgressiveObjective(LoopObjective):
    """Data-free progressive distillation on the loop; see the module docstring."""

    name = "progressive"
    uses_pool = True
    teacher_evals = 3.0

    def __init__(self, loop: Any, distill: Any) -> None:
        check_same_chain(loop.teacher_diffusion, loop.student_diffusion, f"--objective {self.name}")
        self.T = int(loop.teacher_diffusion.num_timesteps)
        self.schedule, self.teacher_steps = self.make_schedule(distill)
        if distill.round_steps < 1:
            raise ObjectiveError(f"--round_steps must be at least 1, got {distill.round_steps}")
        self.round_steps = int(distill.round_steps)
        self.total = self.round_steps * len(self.schedule)
        tc = loop.train_cfg
        if not tc.max_steps and not tc.lr_anneal_steps:
            raise ObjectiveError(
                f"{self.name} distillation runs {len(self.schedule)} rounds of {self.round_steps} steps: set "
                f"--max_steps {self.total} (or fewer to stop early and resume later)"
            )
        stop = min(s for s in (tc.max_steps, tc.lr_anneal_steps) if s)
        if stop > self.total:
            raise ObjectiveError(
                f"--max_steps/--lr_anneal_steps {stop} lies past the last round (step {self.total} = "
                f"{len(self.schedule)} rounds x {self.round_steps}); set --max_steps {self.total}"
            )
        if tc.lr_anneal_steps:
            logger.warn(f"{self.name}: --lr_anneal_steps anneals over the whole run, not per round")
        spec = distill.parameterization or "v"
        if spec.endswith("eps"):
            raise ObjectiveError(
                f"--parameterization {spec}: a few-step student reading epsilon divides by alpha_t, nearly 0 at "
                "high noise (Salimans & Ho); use v or x0"
            )
        if distill.step_weighting not in WEIGHTINGS:
            raise ObjectiveError(
                f"--step_weighting must be one of {', '.join(WEIGHTINGS)}, got {distill.step_weighting!r}"
            )
        self.weighting = distill.step_weighting
        self.param = Parameterization(spec, loop.student_diffusion, distill.sigma_data)
        self.sch = self.param.schedule
        self.clip = distill.step_clip
        self.teacher_diffusion, self.student_diffusion = loop.teacher_diffusion, loop.student_diffusion
        self._init_line = init_student(loop.student, loop.teacher, distill.student_init or "teacher")
        net = copy.deepcopy(loop.student).to(loop.device).eval().requires_grad_(False)
        self.rounds = _Rounds(self.schedule, self.round_steps, net, self.schedule_flags)
        self.grids = []
        for n, m in zip(self.schedule, self.teacher_steps):
            fine = step_grid(self.T, m)
            points = fine[1:] if self.project_to_teacher_grid else fine[m // n :: m // n]
            self.grids.append(
                {
                    "fine": torch.as_tensor(fine, device=loop.device),
                    "proj": GridProjector(self.T, points, loop.device),
                }
            )

    schedule_flags = "--progressive_start/--progressive_end/--round_steps"
    project_to_teacher_grid = False  # pool samples go to the student's grid points (TRACT: the teacher's)

    def make_schedule(self, distill: Any) -> tuple[list[int], list[int]]:
        """The rounds' student step counts and their teachers' (twice as many)."""
        sched = round_schedule(distill.progressive_start, distill.progressive_end, self.T)
        return sched, [2 * n for n in sched]

    def extra_state(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def describe(self) -> str:
        return (
            f"objective progressive: {self.param.spec} student, rounds {' -> '.join(map(str, self.schedule))} steps, "
            f"{self.round_steps} optimizer steps each ({self.total} in all), {self.weighting} weighting; 3 teacher "
            f"evaluations per student sample per step (1 pool, 2 targets). {self._init_line}"
        )

    def round_of(self, step: int) -> int:
        return min(step // self.round_steps, len(self.schedule) - 1)

    def round_path(self, run_dir: str, r: int) -> str:
        return os.path.join(run_dir, f"round{r:02d}_{self.schedule[r]}steps.pt")

    def _save_round(self, loop: Any, r: int) -> None:
        if dist.is_main():
            sd = {k: v.detach().cpu() for k, v in loop.trainer.model.state_dict().items()}
            atomic_save(sd, self.round_path(loop.run_dir, r))
            logger.log(f"{self.name}: round {r} ({self.schedule[r]} steps) done: {self.round_path(loop.run_dir, r)}")

    def _advance(self, loop: Any, r: int) -> None:
        prev = self.rounds.round
        if r == prev + 1 and loop.trainer.step == r * self.round_steps:
            self._save_round(loop, prev)
        self.rounds.net.load_state_dict(loop.trainer.model.state_dict())
        self.rounds.round = r
        logger.log(
            f"{self.name}: round {r} starts: {self.schedule[r]} student steps, its teacher {self.teacher_steps[r]}"
        )

    def finish(self, loop: Any) -> None:
        if loop.trainer.step == self.total:
            self._save_round(loop, len(self.schedule) - 1)

    def teacher_x0(self, loop: Any, r: int, z: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        """Round ``r``'s teacher's x_0 at ``(z, t)``: the original teacher in round 0, else the last round's student.

        ``cond`` holds the pool samples' labels ``y`` and guidance scales ``w`` (class-conditional
        and w-conditioned students, Meng et al.'s guided distillation): round 0's teacher gets them
        as the loop gives them to it (a guided teacher combines its two passes at ``w``), later
        rounds' students as inputs.
        """
        cond = cond or {}
        if r == 0:
            out = loop.teacher_forward(z, t, cond.get("y"), cond.get("w"))
            return self.teacher_diffusion.p_mean_variance_from_output(out, z, t, clip_denoised=self.clip)["pred_xstart"]
        out = loop.run_net(self.rounds.net, self.student_diffusion, z, t, cond.get("y"), cond.get("w"))
        x0 = self.param.x0(out.float(), z, t)
        return x0.clamp(-1, 1) if self.clip else x0

    def target(
        self, loop: Any, r: int, z: Tensor, j: Tensor, cond: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(u_j, x~)``: the student's input step and the x_0 target of two teacher DDIM steps from ``z`` at ``u_j``."""
        fine = self.grids[r]["fine"]
        u, mid, end = fine[2 * j], fine[2 * j - 1], fine[2 * j - 2]
        z1 = self.sch.ddim(z, u, self.teacher_x0(loop, r, z, u, cond), mid)
        z2 = self.sch.ddim(z1, mid, self.teacher_x0(loop, r, z1, mid, cond), end)
        return u, two_step_target(self.sch, z, u, z2, end)

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        r = self.round_of(loop.trainer.step)
        if r != self.rounds.round:
            self._advance(loop, r)
        batch, out = loop.pool_step()
        x, t = batch["x_t"], batch["t"]
        x0 = self.teacher_diffusion.p_mean_variance_from_output(out, x, t, clip_denoised=self.clip)["pred_xstart"]
        j = self.grids[r]["proj"].index(t) + 1  # student grid index 1..N
        u = self.grids[r]["fine"][2 * j]
        z = self.sch.ddim(x, t, x0, u)
        cond = {k: batch[k] for k in ("y", "w") if k in batch}
        u, target = self.target(loop, r, z, j, cond)
        return {"x_t": z, "t": u, "target": target, **cond}

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, t = micro["x_t"], micro["t"]
        cond = {k: micro[k] for k in ("y", "w") if k in micro}
        pred = self.param.x0(model(x, self.student_diffusion.model_timesteps(t), **cond), x, t).float()
        mse = mean_flat((pred - micro["target"]) ** 2)
        snr = self.sch.table("snr", t, mse).view(-1)
        w = snr.clamp(min=1.0) if self.weighting == "truncated_snr" else snr + 1.0
        return (w * mse).mean(), {"loss": w * mse, "mse": mse, "t": t}
