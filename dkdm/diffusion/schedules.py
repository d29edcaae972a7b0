"""Beta schedules: ``linear`` (Ho et al., rescaled to any length) and ``cosine`` (IDDPM),
plus the two with explicit ends that other codebases use: ``linear:START,END`` (betas linear
from START to END, diffusers' ``linear``) and ``scaled_linear:START,END`` (linear in
sqrt(beta), i.e. LDM's ``linear`` with ``linear_start``/``linear_end`` and diffusers'
``scaled_linear``; Stable Diffusion's is ``scaled_linear:0.00085,0.012``, the LDM
CelebA-HQ/FFHQ models' ``scaled_linear:0.0015,0.0195``).

Arrays are float64 numpy, exactly as guided-diffusion builds them, so a checkpoint
trained there sees the same noise levels here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SCHEDULES = ("linear", "cosine", "linear:START,END", "scaled_linear:START,END")


def _ends(schedule_name: str) -> tuple[float, float]:
    kind, _, ends = schedule_name.partition(":")
    try:
        start, end = (float(v) for v in ends.split(","))
    except ValueError:
        raise ValueError(f"noise schedule '{schedule_name}': write {kind}:START,END, e.g. {kind}:0.0001,0.02") from None
    if not 0.0 < start <= end < 1.0:
        raise ValueError(f"noise schedule '{schedule_name}': need 0 < START <= END < 1")
    return start, end


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named schedule for ``num_diffusion_timesteps`` steps (float64, shape [T]).

    ``linear`` spans 1e-4..0.02 at 1000 steps and scales both ends by 1000/T, so the
    process reaches a similar noise level for any T. ``cosine`` discretises
    alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) with s = 0.008, betas capped at 0.999.
    """
    if not isinstance(num_diffusion_timesteps, (int, np.integer)) or num_diffusion_timesteps < 1:
        raise ValueError(f"the number of diffusion steps must be a positive integer, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        if num_diffusion_timesteps <= 20:
            # beta_end = 0.02 * 1000 / T reaches 1 at T = 20: x_t would forget x_0 in one step.
            raise ValueError(
                f"the linear schedule needs more than 20 steps (its last beta is 20 / steps), got "
                f"{num_diffusion_timesteps}; use more steps or the cosine schedule"
            )
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name.startswith("linear:"):
        start, end = _ends(schedule_name)
        return np.linspace(start, end, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name.startswith("scaled_linear:"):
        start, end = _ends(schedule_name)
        return np.linspace(start**0.5, end**0.5, num_diffusion_timesteps, dtype=np.float64) ** 2
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule '{schedule_name}'; choose one of: {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretise a continuous ``alpha_bar(t)``, t in [0, 1], into T steps.

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at ``max_beta`` because
    the last step of the cosine schedule would otherwise be a singular beta of 1.
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.array(betas, dtype=np.float64)
