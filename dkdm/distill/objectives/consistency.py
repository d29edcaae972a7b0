"""Consistency distillation (Song et al. 2023), data-free: ``x_(t_(n+1))`` comes from the pool.

Grid ``s_0 = 0 < s_1 < ... < s_N = T-1`` (``s_j`` of :func:`step_grid` for ``j >= 1``). A pool
batch ``(x, t)``, advanced by the teacher (one evaluation, as in DKDM), is moved to the grid
point ``s_(n+1)`` nearest ``t`` by a DDIM jump with that evaluation's x_0; the teacher takes one
deterministic DDIM step (the ODE solver) to ``s_n``; the target is the EMA target network's
consistency function there, ``f_(theta^-)(x^_(s_n), s_n)``, and the student matches it from
``(x_(s_(n+1)), s_(n+1))`` in squared error. The consistency function is the skip/out form of
:class:`~dkdm.distill.objectives.base.Parameterization` (``skip-v`` by default), so
``f(x, s_0) = x`` holds exactly; a student without it is refused. The target network is
``theta^- <- mu theta^- + (1 - mu) theta`` after every optimizer step (applied lazily at the
start of the next step, so it is exact across resume) and rides in the checkpoints
(``targetNNNNNN.pt``). Cost: 2 teacher evaluations (pool, ODE step) and 1 target-network
evaluation per student sample per step. Sample with :func:`~dkdm.distill.objectives.sampling.consistency_sample`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from dkdm.diffusion.losses import mean_flat
from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import (
    GridProjector,
    LoopObjective,
    Parameterization,
    check_same_chain,
    ema_update_,
    init_student,
    step_grid,
)

__all__ = ["ConsistencyObjective", "consistency_grid"]


def consistency_grid(num_timesteps: int, n: int) -> list[int]:
    """``[0, s_1, ..., s_N = T-1]``: N intervals of the chain, ascending, all distinct."""
    if n < 1 or 3 * n > 2 * num_timesteps:
        raise ObjectiveError(
            f"--cm_steps {n}: a consistency grid of N intervals needs 1 <= N <= 2T/3 = {2 * num_timesteps // 3} "
            f"on a chain of T = {num_timesteps} (its points must be distinct steps)"
        )
    return [0, *step_grid(num_timesteps, n)[1:]]


class _Target:
    """The EMA target network ``theta^-`` (checkpointed as ``targetNNNNNN.pt``)."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.net, self.decay = net, float(decay)
        self.params = [p.detach() for p in net.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])


class ConsistencyObjective(LoopObjective):
    """Data-free consistency distillation on the loop; see the module docstring."""

    name = "consistency"
    uses_pool = True
    teacher_evals = 2.0

    def __init__(self, loop: Any, distill: Any) -> None:
        check_same_chain(loop.teacher_diffusion, loop.student_diffusion, "--objective consistency")
        spec = distill.parameterization or "skip-v"
        if not spec.startswith("skip-"):
            raise ObjectiveError(
                f"--parameterization {spec}: a consistency student needs the skip/out parameterisation "
                f"f = c_skip x + c_out F, which gives f(x, t_min) = x; use skip-{spec} (or skip-v)"
            )
        if not 0.0 <= distill.cm_ema < 1.0:
            raise ObjectiveError(f"--cm_ema must lie in [0, 1), got {distill.cm_ema}")
        self.T = int(loop.teacher_diffusion.num_timesteps)
        self.grid = consistency_grid(self.T, distill.cm_steps)
        self.param = Parameterization(spec, loop.student_diffusion, distill.sigma_data)
        self.sch = self.param.schedule
        self.clip = distill.step_clip
        self.teacher_diffusion, self.student_diffusion = loop.teacher_diffusion, loop.student_diffusion
        self._init_line = init_student(loop.student, loop.teacher, distill.student_init or "teacher")
        net = copy.deepcopy(loop.student).to(loop.device).eval().requires_grad_(False)
        self.target_net = _Target(net, distill.cm_ema)
        self.points = torch.as_tensor(self.grid, device=loop.device)
        self.proj = GridProjector(self.T, self.grid[1:], loop.device)

    def extra_state(self) -> dict[str, Any]:
        return {"target": self.target_net}

    def describe(self) -> str:
        return (
            f"objective consistency: {self.param.spec} student on {len(self.grid) - 1} intervals, target EMA "
            f"{self.target_net.decay}; 2 teacher evaluations (pool, ODE step) and 1 target-network evaluation per "
            f"student sample per step. {self._init_line}"
        )

    def consistency_fn(self, net: Any, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t)`` of a network: the skip/out form around its output."""
        return self.param.x0(net(x, self.student_diffusion.model_timesteps(t)), x, t)

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        if loop.trainer.step > 0:  # theta^- follows the weights of the step just taken
            src = [p.detach() for p in loop.trainer.model.parameters()]
            ema_update_(self.target_net.params, src, self.target_net.decay)
        batch, out = loop.pool_step()
        x, t = batch["x_t"], batch["t"]
        x0 = self.teacher_diffusion.p_mean_variance_from_output(out, x, t, clip_denoised=self.clip)["pred_xstart"]
        n1 = self.proj.index(t) + 1  # grid index n+1 in 1..N
        t1, t0 = self.points[n1], self.points[n1 - 1]
        z = self.sch.ddim(x, t, x0, t1)
        tout = loop.teacher_forward(z, t1)
        tx0 = self.teacher_diffusion.p_mean_variance_from_output(tout, z, t1, clip_denoised=self.clip)["pred_xstart"]
        z_prev = self.sch.ddim(z, t1, tx0, t0)
        target = self.consistency_fn(self.target_net.net, z_prev, t0).float()
        return {"x_t": z, "t": t1, "target": target}

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        pred = self.consistency_fn(model, micro["x_t"], micro["t"]).float()
        mse = mean_flat((pred - micro["target"]) ** 2)
        return mse.mean(), {"loss": mse, "t": micro["t"]}
