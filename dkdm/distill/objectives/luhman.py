"""Luhman & Luhman (2021), data-free by design: one student step from noise to the teacher's DDIM sample.

Each optimizer step draws ``b`` noises ``x_T`` and runs the teacher's deterministic DDIM
(eta = 0) on guided-diffusion's ``luhman_steps``-step respaced grid, the grid ``sample.py
--use_ddim --timestep_respacing K`` uses, so the target is the image that command would draw
from the same noise. The student sees ``(x_T, T-1)`` and its output, read as x_0 (or v), is
matched in mean squared error. Cost: ``luhman_steps`` teacher evaluations per student sample
per step (pairs are made on the fly in batches of ``b``; no pool).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dkdm.diffusion.losses import mean_flat
from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import (
    LoopObjective,
    Parameterization,
    Schedule,
    check_same_chain,
    init_student,
    respaced_grid,
)

__all__ = ["LuhmanObjective", "teacher_ddim"]


@torch.no_grad()
def teacher_ddim(
    teacher_fn: Any, diffusion: Any, x: Tensor, grid: list[int], clip: bool = True, schedule: Schedule | None = None
) -> Tensor:
    """The teacher's deterministic DDIM from ``x`` at ``grid[-1]`` down the ascending ``grid`` to ``grid[0]``.

    ``teacher_fn(x, t) -> output`` runs the network; ``diffusion`` reads its output as an x_0
    prediction (clipped to [-1, 1] with ``clip``). ``grid[0] = -1`` ends on the image.
    """
    sch = schedule or Schedule(diffusion)
    b = x.shape[0]
    for i in range(len(grid) - 1, 0, -1):
        t = torch.full((b,), grid[i], dtype=torch.long, device=x.device)
        s = torch.full((b,), grid[i - 1], dtype=torch.long, device=x.device)
        out = teacher_fn(x, t)
        x0 = diffusion.p_mean_variance_from_output(out, x, t, clip_denoised=clip)["pred_xstart"]
        x = sch.ddim(x, t, x0, s)
    return x


class _NoiseState:
    """The pairs' noise generator, checkpointed per rank."""

    def __init__(self, device: torch.device, seed: int, rank: int) -> None:
        ss = np.random.SeedSequence([seed, rank, 0x1A4])
        self.gen = torch.Generator(device)
        self.gen.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))

    def state_dict(self) -> dict[str, Any]:
        return {"noise_gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["noise_gen"].cpu())


class LuhmanObjective(LoopObjective):
    """Knowledge distillation of the teacher's DDIM sampler into a one-step student (no pool)."""

    name = "luhman"
    uses_pool = False

    def __init__(self, loop: Any, distill: Any) -> None:
        check_same_chain(loop.teacher_diffusion, loop.student_diffusion, "--objective luhman")
        spec = distill.parameterization or "x0"
        if spec.endswith("eps"):
            raise ObjectiveError(
                f"--parameterization {spec}: a one-step student reading its output as epsilon divides by "
                "sqrt(abar_(T-1)), nearly 0; use x0 or v"
            )
        self.param = Parameterization(spec, loop.student_diffusion, distill.sigma_data)
        self.T = int(loop.teacher_diffusion.num_timesteps)
        self.grid = respaced_grid(loop.teacher_diffusion, distill.luhman_steps)
        self.teacher_evals = float(distill.luhman_steps)
        self.clip = distill.step_clip
        self.shape = loop.sample_shape
        self.batch_size = loop.batch_size
        self.device = loop.device
        self.student_diffusion = loop.student_diffusion
        self.schedule = Schedule(loop.teacher_diffusion)
        self.noise = _NoiseState(loop.device, loop.train_cfg.seed, loop.rank)
        self._init_line = init_student(loop.student, loop.teacher, distill.student_init or "random")

    def extra_state(self) -> dict[str, Any]:
        return {"pairs": self.noise}

    def describe(self) -> str:
        return (
            f"objective luhman: {self.param.spec} one-step student from noise to the teacher's {len(self.grid) - 1}-step "
            f"DDIM sample; {self.teacher_evals:g} teacher evaluations per student sample per step. {self._init_line}"
        )

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        x_T = torch.randn((self.batch_size, *self.shape), generator=self.noise.gen, device=self.device)
        target = teacher_ddim(loop.teacher_forward, loop.teacher_diffusion, x_T, self.grid, self.clip, self.schedule)
        return {
            "x_t": x_T,
            "t": torch.full((self.batch_size,), self.T - 1, dtype=torch.long, device=self.device),
            "target": target,
        }

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, t = micro["x_t"], micro["t"]
        pred = self.param.x0(model(x, self.student_diffusion.model_timesteps(t)), x, t)
        mse = mean_flat((pred.float() - micro["target"]) ** 2)
        return mse.mean(), {"loss": mse, "mse": mse}
