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


# Latent samples are drawn without clipping x_0 (latents have no fixed range). The first reverse
# step predicts x_0 = (x_T - sqrt(1 - alpha_bar_T) eps) / sqrt(alpha_bar_T), so the model's eps
# error reaches x_0 multiplied by 1 / sqrt(alpha_bar_T): 15 for Stable Diffusion's schedule, 84
# for the LDM CelebA-HQ/FFHQ one, 157 for linear-1000, but 2,029 for cosine-100 and 20,291 for
# cosine-1000. Pixel models clip x_0 to [-1, 1] and never see it; the first digits latent teacher
# did (configs/digits/latent_teacher.yaml).
UNCLIPPED_X0_GAIN_LIMIT = 1000.0


def unclipped_x0_gain(betas: np.ndarray) -> float:
    """1 / sqrt(alpha_bar_T): how much the eps error at the last timestep grows in x_0."""
    return float(1.0 / np.sqrt(np.prod(1.0 - np.asarray(betas, dtype=np.float64))))


def latent_schedule_warning(schedule_name: str, num_diffusion_timesteps: int) -> str | None:
    """A warning for a latent model on ``schedule_name``, or None where the schedule is safe unclipped."""
    gain = unclipped_x0_gain(get_named_beta_schedule(schedule_name, num_diffusion_timesteps))
    if gain <= UNCLIPPED_X0_GAIN_LIMIT:
        return None
    return (
        f"latent model on the {schedule_name} schedule over {num_diffusion_timesteps} steps: latents are sampled "
        f"without clipping x_0, and this schedule's last alpha_bar multiplies the model's eps error by {gain:,.0f} "
        "into x_0 at the first reverse step, which can blow the reverse process up (it did for a digits latent "
        "teacher: FD 166.8, 7.8 once retrained on scaled_linear). Latent diffusion uses schedules like "
        "scaled_linear:0.00085,0.012 over 1000 steps (a factor 15)"
    )
