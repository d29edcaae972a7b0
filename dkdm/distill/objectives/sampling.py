"""Sampling step-distilled students in their own step counts (one-step, k-step DDIM grid, multistep consistency).

* ``luhman``: one step, ``x_0 = student(x_T, T-1)``; ``boot``: one step, ``x_0`` from the signal at step 0;
* ``progressive``, ``tract``: deterministic DDIM on the student's ``k``-step grid (:func:`step_grid`), ``k``
  one of its rounds' step counts (default the last);
* ``consistency``: multistep consistency sampling (Song et al., Algorithm 1) on ``k`` points of its grid.

:class:`StepSampler` presents these as a diffusion's ``ddim_sample_loop`` / ``p_sample_loop``, so
``dkdm.sampling.draw_shard`` (and ``sample.py``) draw from a step student unchanged; :func:`step_sampler_for`
builds one from the run's ``config.yaml`` beside a checkpoint (``None`` for a DKDM run or a teacher).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dkdm.distill.objective import ObjectiveError
from dkdm.distill.objectives.base import Parameterization, step_grid

__all__ = ["StepSampler", "consistency_sample", "ddim_student_sample", "step_sampler_for"]


@torch.no_grad()
def ddim_student_sample(
    model: Any,
    param: Parameterization,
    diffusion: Any,
    noise: Tensor,
    steps: int,
    clip: bool = True,
    model_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Deterministic DDIM of a student on the ``steps``-step grid from ``noise`` (x at T-1); ``steps = 1`` is one call.

    ``model_kwargs`` (labels ``y``) go to every call, as in the diffusion's loops.
    """
    model_kwargs = model_kwargs or {}
    grid = step_grid(int(diffusion.num_timesteps), steps)
    x, b = noise, noise.shape[0]
    for i in range(len(grid) - 1, 0, -1):
        t = torch.full((b,), grid[i], dtype=torch.long, device=x.device)
        s = torch.full((b,), grid[i - 1], dtype=torch.long, device=x.device)
        x0 = param.x0(model(x, diffusion.model_timesteps(t), **model_kwargs).float(), x, t)
        x0 = x0.clamp(-1, 1) if clip else x0
        x = param.schedule.ddim(x, t, x0, s)
    return x


def consistency_times(num_timesteps: int, cm_steps: int, steps: int) -> list[int]:
    """``steps`` points of the consistency grid, descending from ``T-1`` (Song et al.'s tau_1 > tau_2 > ...)."""
    from dkdm.distill.objectives.consistency import consistency_grid

    grid = consistency_grid(num_timesteps, cm_steps)
    if not 1 <= steps <= cm_steps:
        raise ObjectiveError(
            f"a consistency student on {cm_steps} intervals samples in 1..{cm_steps} steps, not {steps}"
        )
    return [grid[j + 1] for j in reversed(step_grid(cm_steps, steps)[1:])]


@torch.no_grad()
def consistency_sample(
    model: Any,
    param: Parameterization,
    diffusion: Any,
    noise: Tensor,
    times: list[int],
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """Multistep consistency sampling: ``x = f(x_T, tau_1)``; for each next tau, renoise to tau and apply ``f`` again.

    Renoising is the VE step ``x + sqrt(s_tau^2 - s_min^2) z`` of Song et al. written on the VP chain
    (``s = sigma / alpha``; ``f``'s value is the state at ``t_min = 0``).
    """
    sch = param.schedule
    b = noise.shape[0]
    alpha = sch.np["alpha"][1:]
    ve = sch.np["sigma"][1:] / alpha

    def f(x: Tensor, step: int) -> Tensor:
        t = torch.full((b,), step, dtype=torch.long, device=x.device)
        out = param.x0(model(x, diffusion.model_timesteps(t)).float(), x, t)
        return out.clamp(-1, 1) if clip else out

    x = f(noise, times[0])
    for tau in times[1:]:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        scale = float(np.sqrt(max(ve[tau] ** 2 - ve[0] ** 2, 0.0)))
        x = f(float(alpha[tau] / alpha[0]) * x + float(alpha[tau]) * scale * z, tau)
    return x


class StepSampler:
    """A step student's sampler in the shape of a diffusion's sample loops (for ``dkdm.sampling.draw_shard``).

    ``diffusion`` is the full (unrespaced) chain; ``distill`` the run's distill config (a dict or
    ``DistillConfig``); ``steps`` the sampling steps (0: the objective's default). Both loops run the
    student's own sampler; a stochastic DDIM (``eta != 0``) is refused, since these students learned a
    deterministic sampler.
    """

    def __init__(self, diffusion: Any, distill: Any, steps: int = 0, round_steps: int = 0) -> None:
        get = distill.get if isinstance(distill, dict) else lambda k, d=None: getattr(distill, k, d)
        self.objective = get("objective", "dkdm")
        self.diffusion = diffusion
        self.num_timesteps = int(diffusion.num_timesteps)
        defaults = {"luhman": "x0", "progressive": "v", "tract": "v", "consistency": "skip-v", "boot": "x0"}
        if self.objective not in defaults:
            raise ObjectiveError(f"objective {self.objective!r} has no step sampler; sample it with the diffusion")
        self.param = Parameterization(
            get("parameterization", "") or defaults[self.objective], diffusion, float(get("sigma_data", 0.5))
        )
        T = self.num_timesteps
        if self.objective in ("luhman", "boot"):
            self.steps = steps or 1
            if self.steps != 1:
                raise ObjectiveError(f"a {self.objective} student samples in one step, not {self.steps}")
        elif self.objective in ("progressive", "tract"):
            from dkdm.distill.objectives.progressive import round_schedule
            from dkdm.distill.objectives.tract import tract_schedule

            if self.objective == "tract":
                sched = tract_schedule(str(get("tract_steps", "64,8,1")), T)[0]
            else:
                sched = round_schedule(int(get("progressive_start", 32)), int(get("progressive_end", 1)), T)
            self.steps = steps or round_steps or sched[-1]
            if self.steps not in sched:
                raise ObjectiveError(
                    f"this {self.objective} student was trained on {', '.join(map(str, sched))} steps; "
                    f"{self.steps} is not among them (use a round checkpoint roundNN_<k>steps.pt for an earlier k)"
                )
        else:
            self.steps = steps or 1
            self.times = consistency_times(T, int(get("cm_steps", 18)), self.steps)

    def describe(self) -> str:
        """What this sampler does, for a log line (e.g. '1-step progressive student')."""
        kind = "multistep consistency" if self.objective == "consistency" else "deterministic"
        return f"{self.steps} step(s) of the {self.objective} student's {kind} sampler"

    def sample(
        self, model: Any, noise: Tensor, clip: bool = True, model_kwargs: dict[str, Tensor] | None = None
    ) -> Tensor:
        if model_kwargs and self.objective != "progressive":
            raise ObjectiveError(f"a {self.objective} student is unconditional; it takes no labels")
        if self.objective == "boot":
            from dkdm.distill.objectives.boot import boot_sample

            return boot_sample(model, self.diffusion, noise, clip)
        if self.objective == "consistency":
            # Renoising draws from the global generator, which draw_shard seeds per shard.
            return consistency_sample(model, self.param, self.diffusion, noise, self.times, None, clip)
        return ddim_student_sample(model, self.param, self.diffusion, noise, self.steps, clip, model_kwargs)

    def _loop(self, model: Any, shape: Any, noise: Tensor | None, kw: dict[str, Any]) -> Tensor:
        if noise is None:
            noise = torch.randn(*shape, device=kw.get("device"))
        return self.sample(model, noise, kw.get("clip_denoised", True), kw.get("model_kwargs"))

    def ddim_sample_loop(self, model: Any, shape: Any, noise: Tensor | None = None, *, eta: float = 0.0, **kw: Any):
        if eta != 0.0:
            raise ObjectiveError(
                f"a {self.objective} student learned a deterministic sampler; --eta {eta} asks for a stochastic "
                "one: use --eta 0"
            )
        return self._loop(model, shape, noise, kw)

    def p_sample_loop(self, model: Any, shape: Any, noise: Tensor | None = None, **kw: Any):
        return self._loop(model, shape, noise, kw)


def step_sampler_for(model_path: str, diffusion_cfg: Any) -> StepSampler | None:
    """The :class:`StepSampler` of a step-distilled checkpoint (from its run's ``config.yaml``), else None.

    ``diffusion_cfg.timestep_respacing`` (a plain number) gives the sampling steps; a round checkpoint
    ``roundNN_<k>steps.pt`` defaults to its own ``k``.
    """
    import dataclasses

    from dkdm.config import load_yaml
    from dkdm.diffusion import create_diffusion

    run_yaml = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.yaml")
    if not os.path.isfile(run_yaml):
        return None
    distill = load_yaml(run_yaml).get("distill") or {}
    if distill.get("objective", "dkdm") == "dkdm":
        return None
    spec = str(diffusion_cfg.timestep_respacing or "").strip()
    if spec and not spec.isdigit():
        raise ObjectiveError(
            f"a step student samples on its own grid: --timestep_respacing takes a step count, not {spec!r}"
        )
    m = re.search(r"round\d+_(\d+)steps\.pt$", os.path.basename(model_path))
    full = create_diffusion(dataclasses.replace(diffusion_cfg, timestep_respacing=""))
    return StepSampler(full, distill, int(spec) if spec else 0, int(m.group(1)) if m else 0)
