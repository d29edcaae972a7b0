"""What a distillation method gives the loop, and the few-step maths the step-distillation methods share.

:class:`LoopObjective` is the interface between :class:`~dkdm.distill.loop.DistillLoop` and a method:

* ``uses_pool`` -- whether the loop builds, prepares and checkpoints the pool for it;
* ``extra_state()`` -- per-rank objects with ``state_dict``/``load_state_dict`` that ride in the
  trainer's checkpoints beside the pool (an EMA target network, a round counter, a generator);
* ``next_batch(loop)`` -- one optimizer step's batch, targets included, made with the loop's
  teacher (and the pool, through :meth:`DistillLoop.pool_step`); runs under no_grad;
* ``loss_fn(model, micro)`` -- ``(mean loss, per-sample terms)`` of a microbatch, terms a dict
  of ``[B]`` tensors with ``"loss"`` (and ``"t"`` for per-quartile logging);
* ``teacher_evals`` -- teacher network evaluations per student sample per optimizer step.

The rest of the module is the deterministic (eta = 0) DDIM arithmetic on an *extended* step
index: ``t = -1`` is the clean end of the chain (``abar = 1``), so the last step of a few-step
sampler lands on an image. :func:`step_grid` gives the nested grids of progressive distillation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dkdm.diffusion.gaussian import ModelMeanType
from dkdm.distill.objective import ObjectiveError

__all__ = [
    "HEADS",
    "LoopObjective",
    "Parameterization",
    "Schedule",
    "check_same_chain",
    "init_student",
    "respaced_grid",
    "step_grid",
]

HEADS = ("x0", "v", "eps")


class LoopObjective:
    """A distillation method on the shared loop; see the module docstring."""

    name = ""
    uses_pool = True
    teacher_evals = 1.0

    def extra_state(self) -> dict[str, Any]:
        return {}

    def next_batch(self, loop: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def finish(self, loop: Any) -> None:
        """Called once the trainer has stopped (e.g. to write the last round's checkpoint)."""

    def describe(self) -> str:
        """One line for the log: the method and what it spends."""
        return f"objective {self.name}: {self.teacher_evals:g} teacher evaluations per student sample per step"


def step_grid(num_timesteps: int, steps: int) -> list[int]:
    """The ``steps``-step sampling grid ``[-1, t_1, ..., t_steps = T-1]`` (ascending; -1 is the clean image).

    ``t_j = floor(j T / steps + 1/2) - 1``, in integers. Halving the step count keeps every
    second point (``t_j`` of ``steps / 2`` is ``t_2j`` of ``steps``), which progressive
    distillation needs: a student step spans exactly two steps of its teacher.
    """
    if steps < 1 or steps > num_timesteps:
        raise ObjectiveError(f"a grid of {steps} sampling steps needs 1 <= steps <= T = {num_timesteps}")
    return [(2 * j * num_timesteps + steps) // (2 * steps) - 1 for j in range(steps + 1)]


def respaced_grid(diffusion: Any, steps: int) -> list[int]:
    """``[-1, s_0, ..., s_{steps-1}]``: guided-diffusion's ``timestep_respacing=steps`` DDIM grid, ascending."""
    from dkdm.diffusion import space_timesteps

    n = int(diffusion.num_timesteps)
    if not 1 <= steps <= n:
        raise ObjectiveError(f"{steps} DDIM steps on a chain of T = {n}: choose 1 <= steps <= {n}")
    return [-1, *sorted(space_timesteps(n, str(steps)))]


def _is_respaced(diffusion: Any) -> bool:
    tmap = getattr(diffusion, "timestep_map", None)
    orig = getattr(diffusion, "original_num_steps", None)
    return tmap is not None and orig is not None and len(tmap) != orig


def check_same_chain(teacher_diffusion: Any, student_diffusion: Any, what: str) -> None:
    """Refuse a teacher/student pair that does not share one unrespaced chain (T and betas)."""
    for who, d in (("teacher", teacher_diffusion), ("student", student_diffusion)):
        if _is_respaced(d):
            raise ObjectiveError(
                f"{what}: the {who} diffusion is respaced; train on the full chain and leave "
                "--timestep_respacing empty (the step count is the objective's own setting)"
            )
        if d.model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ObjectiveError(f"{what}: the {who} predicts x_(t-1) (PREVIOUS_X); use epsilon or x_0 models")
    if teacher_diffusion.num_timesteps != student_diffusion.num_timesteps or not np.allclose(
        teacher_diffusion.betas, student_diffusion.betas, rtol=1e-6, atol=1e-9
    ):
        raise ObjectiveError(
            f"{what}: teacher and student diffusions differ (T {teacher_diffusion.num_timesteps} vs "
            f"{student_diffusion.num_timesteps}, or betas); set --diffusion_steps and --noise_schedule to the teacher's"
        )


class Schedule:
    """``alpha_t = sqrt(abar_t)`` and ``sigma_t = sqrt(1 - abar_t)`` on the extended index ``t >= -1``.

    Tables are float64 numpy, read as torch copies cached per (device, dtype) like the diffusion's
    coefficients, so the hot path only gathers. ``ddim`` is the deterministic DDIM jump.
    """

    def __init__(self, diffusion: Any) -> None:
        abar = np.concatenate([[1.0], np.asarray(diffusion.alphas_cumprod, dtype=np.float64)])
        self.np = {"alpha": np.sqrt(abar), "sigma": np.sqrt(1.0 - abar), "snr": abar / np.maximum(1.0 - abar, 1e-300)}
        self._cache: dict = {}

    def table(self, name: str, t: Tensor, ref: Tensor) -> Tensor:
        """``name`` (alpha, sigma, snr) at extended steps ``t``, shaped ``[B, 1, ...]`` like ``ref``."""
        dtype = torch.promote_types(ref.dtype, torch.float32)
        key = (name, ref.device, dtype)
        tab = self._cache.get(key)
        if tab is None:
            tab = torch.from_numpy(self.np[name]).to(device=ref.device, dtype=dtype)
            self._cache[key] = tab
        return tab[t + 1].view(-1, *([1] * (ref.dim() - 1)))

    def ddim(self, x: Tensor, t: Tensor, x0: Tensor, s: Tensor) -> Tensor:
        """Deterministic DDIM from ``x`` at ``t >= 0`` to ``s`` (any extended step) given an x_0 prediction."""
        eps = (x - self.table("alpha", t, x) * x0) / self.table("sigma", t, x)
        return self.table("alpha", s, x) * x0 + self.table("sigma", s, x) * eps


class Parameterization:
    """How a step student's output is read as an x_0 estimate.

    ``head``: ``x0`` (the output is x_0), ``v`` (x_0 = alpha x_t - sigma v, Salimans & Ho) or
    ``eps`` (x_0 = (x_t - sigma eps) / alpha). With ``skip`` the estimate is the consistency
    function ``f = c_skip(t) x_t + c_out(t) x0_head`` (Song et al.'s skip/out form on the VE
    sigma ``s_t = sigma_t / alpha_t``): ``c_skip = s_d^2 / ((s_t - s_min)^2 + s_d^2)``,
    ``c_out = (s_t - s_min) / sqrt((s_t - s_min)^2 + s_d^2)``, so ``f(x, t_min = 0) = x``
    exactly and ``f`` tends to the head's x_0 at high noise. A learned-variance output (2C
    channels) is read from its first C channels.
    """

    def __init__(self, spec: str, diffusion: Any, sigma_data: float = 0.5) -> None:
        self.spec = spec
        self.skip = spec.startswith("skip-")
        self.head = spec[len("skip-") :] if self.skip else spec
        if self.head not in HEADS:
            choices = ", ".join([*HEADS, *(f"skip-{h}" for h in HEADS)])
            raise ObjectiveError(f"unknown --parameterization {spec!r}; choose one of {choices}")
        if sigma_data <= 0:
            raise ObjectiveError(f"--sigma_data must be positive, got {sigma_data}")
        self.diffusion = diffusion
        self.schedule = Schedule(diffusion)
        ve = self.schedule.np["sigma"][1:] / self.schedule.np["alpha"][1:]
        d = ve - ve[0]
        # Index 0 of these tables is extended step -1 (never a student input): a copy of step 0.
        c_skip = sigma_data**2 / (d**2 + sigma_data**2)
        c_out = d / np.sqrt(d**2 + sigma_data**2)
        self.schedule.np["c_skip"] = np.concatenate([[1.0], c_skip])
        self.schedule.np["c_out"] = np.concatenate([[0.0], c_out])

    def x0(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The x_0 estimate (the consistency function's value under ``skip``) of ``output`` at ``(x_t, t)``."""
        out = output[:, : x_t.shape[1]]
        x0 = out
        if self.head != "x0":  # the diffusion's own closed forms (t >= 0 here: a student never sees step -1)
            kind = ModelMeanType.VELOCITY if self.head == "v" else ModelMeanType.EPSILON
            x0 = self.diffusion.convert_prediction(x_t, t, out, kind, ModelMeanType.START_X)
        if not self.skip:
            return x0
        sch = self.schedule
        return sch.table("c_skip", t, x_t) * x_t + sch.table("c_out", t, x_t) * x0


def ema_update_(target: list[Tensor], source: list[Tensor], decay: float) -> None:
    """``target <- decay * target + (1 - decay) * source`` in place (on the device, no host read)."""
    torch._foreach_lerp_(target, source, 1.0 - decay)


def init_student(student: Any, teacher: Any, spec: str) -> str:
    """Initialise ``student`` as ``spec`` says: ``random`` (as built), ``teacher`` (its weights) or a checkpoint path.

    Returns a line for the log. The trainer's resume overwrites these weights afterwards.
    """
    if spec in ("", "random"):
        return "student: initialised as built"
    if spec == "teacher":
        t_sd, s_sd = teacher.state_dict(), student.state_dict()
        bad = [k for k in s_sd if k not in t_sd or t_sd[k].shape != s_sd[k].shape] + [k for k in t_sd if k not in s_sd]
        if bad:
            raise ObjectiveError(
                f"--student_init teacher needs the student to have the teacher's architecture ({len(bad)} tensors "
                f"differ, e.g. {bad[0]}); give the student the teacher's arch (--student.arch) or --student_init random"
            )
        student.load_state_dict(t_sd)
        return "student: initialised from the teacher's weights"
    from dkdm.models import load_checkpoint

    load_checkpoint(student, spec)
    return f"student: initialised from {spec}"


class GridProjector:
    """Moves pool samples onto a grid: each ``(x_t, t)`` goes to the grid point nearest ``t``.

    ``points`` are the allowed grid steps (ascending, all >= 0). The move is the deterministic
    DDIM jump with the x_0 the teacher predicted on the pool batch (the evaluation that also
    advanced the pool), so no extra teacher call is spent; the jump is at most half a grid
    interval. ``nearest`` is a ``[T]`` table (built once on the host): pool step -> index into ``points``.
    """

    def __init__(self, num_timesteps: int, points: list[int], device: torch.device) -> None:
        pts = np.asarray(points, dtype=np.int64)
        if (pts < 0).any() or (np.diff(pts) <= 0).any():
            raise ValueError(f"grid points must be ascending and >= 0, got {points}")
        dist_ = np.abs(np.arange(num_timesteps)[:, None] - pts[None, :])
        self.points = torch.as_tensor(pts, device=device)
        self.nearest = torch.as_tensor(dist_.argmin(axis=1), device=device)

    def index(self, t: Tensor) -> Tensor:
        """Index into ``points`` of the grid point nearest each pool step ``t``."""
        return self.nearest[t]
