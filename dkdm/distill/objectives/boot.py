"""BOOT (Gu et al. 2023), data-free by design: a student that predicts the teacher's trajectory from the noise alone.

The student ``g(eps, t)`` sees only the starting noise ``eps`` (as its image input) and a step ``t``
and predicts the *signal* ``y_t`` of the teacher's deterministic DDIM trajectory from ``x_(T-1) = eps``,
written ``x_t = alpha_t y_t + sigma_t eps`` (the noise part is known, so only the signal is learned;
at the clean end ``y = x``). Bootstrapping on a grid ``s_0 = 0 < ... < s_N = T-1`` (the consistency
grid): draw ``eps`` and ``n``, rebuild ``x^_(s_n)`` from the student's own prediction (at ``s_N``:
``eps`` itself, the boundary), let the teacher take one DDIM step to ``s_(n-1)`` and turn the result
back into a signal target; the student learns it at ``s_(n-1)``. The loss is the squared error of the
implied ``x`` (signal error times ``alpha^2``), which keeps the noisy end (``alpha`` near 0) from
dominating. This is the DDIM discretisation of BOOT's signal-ODE objective; BOOT's exact weighting and
its Heun solver are not reproduced. No pool: cost 1 teacher + 1 student (no grad) evaluation per
sample per step. One-step sampling: ``x = alpha_0 g(eps, 0) + sigma_0 eps``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dkdm.diffusion.losses import mean_flat
from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import LoopObjective, Schedule, check_same_chain, init_student
from dkdm.distill.objectives.consistency import consistency_grid

__all__ = ["BootObjective", "boot_sample"]


@torch.no_grad()
def boot_sample(model: Any, diffusion: Any, noise: Tensor, clip: bool = True) -> Tensor:
    """One evaluation: ``x_0 = alpha_0 g(eps, 0) + sigma_0 eps``."""
    sch = Schedule(diffusion)
    t = torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
    y = model(noise, diffusion.model_timesteps(t)).float()[:, : noise.shape[1]]
    x = sch.table("alpha", t, noise) * y + sch.table("sigma", t, noise) * noise
    return x.clamp(-1, 1) if clip else x


class _NoiseState:
    def __init__(self, device: torch.device, seed: int, rank: int) -> None:
        ss = np.random.SeedSequence([seed, rank, 0xB007])
        self.gen = torch.Generator(device)
        self.gen.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"].cpu())


class BootObjective(LoopObjective):
    """Data-free BOOT (signal bootstrapping, DDIM-discretised); see the module docstring."""

    name = "boot"
    uses_pool = False
    teacher_evals = 1.0

    def __init__(self, loop: Any, distill: Any) -> None:
        check_same_chain(loop.teacher_diffusion, loop.student_diffusion, "--objective boot")
        if distill.parameterization not in ("", "x0"):
            raise ObjectiveError(
                f"--parameterization {distill.parameterization}: a BOOT student outputs the signal y_t directly; "
                "leave --parameterization empty"
            )
        self.T = int(loop.teacher_diffusion.num_timesteps)
        self.grid = consistency_grid(self.T, distill.cm_steps)
        self.points = torch.as_tensor(self.grid, device=loop.device)
        self.sch = Schedule(loop.teacher_diffusion)
        self.clip = distill.step_clip
        self.shape, self.batch_size, self.device = loop.sample_shape, loop.batch_size, loop.device
        self.teacher_diffusion, self.student_diffusion = loop.teacher_diffusion, loop.student_diffusion
        self.noise = _NoiseState(loop.device, loop.train_cfg.seed, loop.rank)
        self._init_line = init_student(loop.student, loop.teacher, distill.student_init or "random")

    def extra_state(self) -> dict[str, Any]:
        return {"bootnoise": self.noise}

    def describe(self) -> str:
        return (
            f"objective boot: signal bootstrapping on {len(self.grid) - 1} intervals, no pool; 1 teacher and 1 "
            f"student (no grad) evaluation per student sample per step. {self._init_line}"
        )

    def signal(self, net: Any, eps: Tensor, t: Tensor) -> Tensor:
        return net(eps, self.student_diffusion.model_timesteps(t))[:, : eps.shape[1]].float()

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        b = self.batch_size
        eps = torch.randn((b, *self.shape), generator=self.noise.gen, device=self.device)
        n = torch.randint(1, len(self.grid), (b,), generator=self.noise.gen, device=self.device)
        t, s = self.points[n], self.points[n - 1]
        net = loop.trainer.model
        was = net.training
        net.eval()
        y = self.signal(net, eps, t)
        net.train(was)
        x_t = self.sch.table("alpha", t, eps) * y + self.sch.table("sigma", t, eps) * eps
        x_t = torch.where((t == self.T - 1).view(-1, *([1] * (eps.dim() - 1))), eps, x_t)  # the boundary x_T = eps
        out = loop.teacher_forward(x_t, t)
        x0 = self.teacher_diffusion.p_mean_variance_from_output(out, x_t, t, clip_denoised=self.clip)["pred_xstart"]
        x_s = self.sch.ddim(x_t, t, x0, s)
        target = (x_s - self.sch.table("sigma", s, eps) * eps) / self.sch.table("alpha", s, eps)
        return {"x_t": eps, "t": s, "target": target}

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        eps, s = micro["x_t"], micro["t"]
        err = mean_flat((self.signal(model, eps, s) - micro["target"]) ** 2)
        loss = err * self.sch.table("alpha", s, err).view(-1) ** 2
        return loss.mean(), {"loss": loss, "signal_mse": err, "t": s}
