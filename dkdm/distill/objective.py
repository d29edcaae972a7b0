"""The DKDM objective (paper eq. 19-21): a student matches a teacher's reverse process.

``L* = L*_simple + lambda * L*_vlb`` where

- ``L*_simple`` is the mean over dimensions of the squared difference between the teacher's
  and the student's predictions in the *student's* output space (epsilon, x_0 or v), eq. 20;
- ``L*_vlb`` is ``KL(p_teacher(x_{t-1}|x_t) || p_student(x_{t-1}|x_t))`` in bits per dimension
  (mean over dimensions / log 2), eq. 21, computed only when the student learns its variance.
  As in IDDPM's hybrid loss, the student's mean is detached inside this term, so it trains the
  variance channels only and ``L*_simple`` alone trains the mean.

``lambda``: the paper's 0.001 multiplies the *full-sum* VLB (``T`` per-timestep terms), so per
uniformly drawn timestep it is ``0.001 * T``. We use guided-diffusion's weighting, which is the
same thing: the per-timestep term is added with weight 1, times ``T / 1000`` under
``rescale_learned_sigmas`` (its ``RESCALED_MSE`` loss type).

Everything is computed from two model outputs; nothing here calls a network except
:meth:`DKDMObjective.losses`, which runs the student once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dkdm.diffusion.gaussian import LossType, ModelMeanType, ModelVarType
from dkdm.diffusion.losses import mean_flat, normal_kl

__all__ = ["DKDMObjective", "ObjectiveError", "check_compatible"]


class ObjectiveError(ValueError):
    """Teacher and student cannot be paired as configured; the message says why and what to do."""


_LEARNED = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


def _is_respaced(diffusion: Any) -> bool:
    tmap = getattr(diffusion, "timestep_map", None)
    orig = getattr(diffusion, "original_num_steps", None)
    if tmap is None or orig is None:
        return False
    return len(tmap) != orig


def check_compatible(teacher_diffusion: Any, student_diffusion: Any, simple_only: bool = False) -> list[str]:
    """Refuse teacher/student pairings for which no meaningful target exists; return warnings.

    The student learns the teacher's reverse chain, so both must share the noise schedule
    (same ``T`` and betas) on the full, unrespaced chain. Output parameterisations epsilon,
    x_0 and v convert into each other through the schedule; ``previous_x`` (a mean, not a noise or
    image estimate) is refused. A student with fixed variance is trained with ``L*_simple``
    alone. A student that learns its variance is trained towards the teacher's variance,
    which is defined also for a fixed-variance teacher (``beta_t`` or ``beta~_t``): the
    student then learns to reproduce the teacher's sampler (returned as a warning, since
    such a teacher usually calls for ``simple_only`` and a fixed-variance student).
    ``simple_only`` with a variance-learning student is refused: its variance channels would
    never be trained and its samples would be noise.
    """
    warnings: list[str] = []
    for who, d in (("teacher", teacher_diffusion), ("student", student_diffusion)):
        if d.model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ObjectiveError(
                f"the {who} predicts x_(t-1) directly (model_mean_type PREVIOUS_X); DKDM converts "
                "between epsilon, x_0 and v predictions only. Use a teacher/student predicting "
                "epsilon (default), x_0 (--predict_xstart) or v (--predict_v)."
            )
        if _is_respaced(d):
            raise ObjectiveError(
                f"the {who} diffusion is respaced (timestep_respacing set); distillation runs on the "
                "teacher's full chain. Leave --timestep_respacing empty for training (use it when sampling)."
            )
    if teacher_diffusion.num_timesteps != student_diffusion.num_timesteps:
        raise ObjectiveError(
            f"teacher has {teacher_diffusion.num_timesteps} diffusion steps but the student "
            f"{student_diffusion.num_timesteps}; the student learns the teacher's chain, so set "
            f"--diffusion_steps {teacher_diffusion.num_timesteps}."
        )
    tb = torch.as_tensor(teacher_diffusion.betas, dtype=torch.float64)
    sb = torch.as_tensor(student_diffusion.betas, dtype=torch.float64)
    if not torch.allclose(tb, sb, rtol=1e-6, atol=1e-9):
        raise ObjectiveError(
            "teacher and student use different noise schedules (betas differ); set the student's "
            "--noise_schedule to the teacher's."
        )
    student_learns = student_diffusion.model_var_type in _LEARNED
    teacher_learns = teacher_diffusion.model_var_type in _LEARNED
    if simple_only and student_learns:
        raise ObjectiveError(
            "--simple_only trains the mean only, but the student learns its variance (learn_sigma); "
            "its variance channels would stay untrained. Use a fixed-variance student "
            "(--learn_sigma False) or drop --simple_only."
        )
    if student_learns and not teacher_learns and not simple_only:
        warnings.append(
            "the teacher has a fixed variance; the student's learned variance is trained to "
            "reproduce it. For an L_simple teacher consider --simple_only with --learn_sigma False."
        )
    return warnings


class DKDMObjective:
    """``L* = L*_simple + lambda L*_vlb`` between a teacher's and a student's outputs.

    ``teacher_diffusion`` and ``student_diffusion`` interpret the two outputs (they may differ
    in mean type, epsilon / x_0 / v, and variance type, learned vs fixed, but not in schedule).
    The teacher's prediction is converted into the student's target space through the
    schedule (``GaussianDiffusion.convert_prediction``: e.g. epsilon = (x_t - sqrt(abar) x_0) /
    sqrt(1 - abar), v = sqrt(abar) eps - sqrt(1 - abar) x_0), without clipping
    (clipping is a sampling device, and the eps-matching target must be the teacher's raw
    function).

    At ``t = 0`` guided-diffusion replaces the KL by the discretised decoder NLL of the data
    x_0. There is no x_0 here; the analogue "NLL of the teacher's mean under the student's
    decoder" is maximised by shrinking the student's variance to the smallest allowed value
    whatever the teacher does, so it would teach the wrong thing. We keep the KL between the
    two Gaussians at ``t = 0`` too: it is exactly eq. 21 there, it is zero iff the student's
    decoder equals the teacher's, and it is finite because both log-variances at ``t = 0``
    are bounded (guided-diffusion clips ``beta~_0`` to ``beta~_1``). Both means are computed
    with ``clip_denoised=False``, as guided-diffusion does inside its training VB term.

    With a student trained by pure KL (``use_kl``), the loss is the KL alone with the mean
    *not* detached (times ``T`` under ``RESCALED_KL``), the analogue of guided-diffusion's
    KL loss type.

    ``clip_teacher_mean=True`` reproduces the official DKDM release instead: there the variance
    term compares the student with the teacher's mean computed from its *clipped* x_0
    prediction (its configs set ``clip_denoised: true``). The target is then not the teacher's
    reverse step but its sampler's, and a student identical to the teacher still pays a
    positive KL wherever the teacher's x_0 leaves [-1, 1]. Only the variance term changes; the
    ``L*_simple`` target is the raw prediction either way.
    """

    def __init__(
        self, teacher_diffusion: Any, student_diffusion: Any, simple_only: bool = False, clip_teacher_mean: bool = False
    ) -> None:
        self.warnings = check_compatible(teacher_diffusion, student_diffusion, simple_only)
        self.teacher_diffusion = teacher_diffusion
        self.student_diffusion = student_diffusion
        self.clip_teacher_mean = clip_teacher_mean
        self.num_timesteps = student_diffusion.num_timesteps
        self.student_learns_var = student_diffusion.model_var_type in _LEARNED
        lt = student_diffusion.loss_type
        self.use_kl = lt in (LossType.KL, LossType.RESCALED_KL)
        if self.use_kl and simple_only:
            raise ObjectiveError("--simple_only contradicts --use_kl (a pure-KL student); drop one of them.")
        self.vb_weight = self.num_timesteps / 1000.0 if lt == LossType.RESCALED_MSE else 1.0
        self.kl_weight = float(self.num_timesteps) if lt == LossType.RESCALED_KL else 1.0

    # ------------------------------------------------------------------ conversions
    def teacher_target(self, teacher_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The teacher's prediction in the student's target space (epsilon, x_0 or v), [B, C, ...]."""
        pred = teacher_output[:, : x_t.shape[1]]  # the mean channels (a learned variance follows them)
        tm, sm = self.teacher_diffusion.model_mean_type, self.student_diffusion.model_mean_type
        return self.teacher_diffusion.convert_prediction(x_t, t, pred, tm, sm)

    def vb_terms(self, teacher_output: Tensor, student_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample ``KL(p_teacher || p_student)`` of ``x_{t-1}`` given ``x_t``, in bits per dim.

        ``student_output`` is used as given (the caller detaches its mean channels when the KL
        must only train the variance). Same formula at every ``t``, including 0 (see class doc).
        The teacher's mean is clipped only under ``clip_teacher_mean`` (the official release).
        """
        tout = self.teacher_diffusion.p_mean_variance_from_output(
            teacher_output, x_t, t, clip_denoised=self.clip_teacher_mean
        )
        sout = self.student_diffusion.p_mean_variance_from_output(student_output, x_t, t, clip_denoised=False)
        kl = normal_kl(tout["mean"], tout["log_variance"], sout["mean"], sout["log_variance"])
        return mean_flat(kl) / math.log(2.0)

    # ------------------------------------------------------------------ the loss
    def terms(self, student_output: Tensor, teacher_output: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Per-sample loss terms ``{"loss", "mse", "vb"}`` (``vb`` only with a learned variance).

        ``teacher_output`` is treated as a constant (it is detached here). Shapes: outputs
        ``[B, C or 2C, ...]``, ``x_t`` ``[B, C, ...]``, ``t`` ``[B]`` step indices.
        """
        teacher_output = teacher_output.detach().to(student_output.dtype)
        C = x_t.shape[1]
        out: dict[str, Tensor] = {}
        if self.use_kl:
            out["vb"] = self.vb_terms(teacher_output, student_output, x_t, t)
            out["loss"] = out["vb"] * self.kl_weight
            return out
        if self.student_learns_var:
            mean_part, var_part = student_output[:, :C], student_output[:, C:]
            frozen = torch.cat([mean_part.detach(), var_part], dim=1)
            out["vb"] = self.vb_terms(teacher_output, frozen, x_t, t) * self.vb_weight
        else:
            mean_part = student_output
        target = self.teacher_target(teacher_output, x_t, t)
        out["mse"] = mean_flat((target - mean_part) ** 2)
        out["loss"] = out["mse"] + out["vb"] if "vb" in out else out["mse"]
        return out

    def losses(
        self,
        student: Any,
        x_t: Tensor,
        t: Tensor,
        teacher_output: Tensor,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Run ``student`` once on ``(x_t, t)`` and return :meth:`terms` against ``teacher_output``."""
        student_output = student(x_t, self.student_diffusion.model_timesteps(t), **(model_kwargs or {}))
        return self.terms(student_output, teacher_output, x_t, t)
