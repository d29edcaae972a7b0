"""Gaussian diffusion: the forward process, the model's reverse process, samplers and losses.

Names and semantics follow guided-diffusion (IDDPM), so its users find their way and its
checkpoints mean the same thing here. Two things differ on purpose:

* Schedule arrays stay float64 numpy (as there), but per-timestep coefficients are read
  from torch copies cached per (device, dtype), so a training step copies nothing from
  the host and never waits for the device. Coefficients take the input's precision, at
  least float32: float32 inputs see exactly guided-diffusion's float32 coefficients,
  float64 inputs get float64 ones (guided-diffusion would round them to float32).
* ``p_mean_variance_from_output`` / ``p_sample_from_output`` interpret a model output
  computed elsewhere, so a loop can call a teacher once and use the output twice.
  ``p_mean_variance`` literally calls the former, so the two agree bit for bit.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
]

Model = Callable[..., torch.Tensor]
_LOG2 = math.log(2.0)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise
    VELOCITY = enum.auto()  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho's v-prediction)


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from.

    LEARNED: the extra C channels are the log-variance. LEARNED_RANGE: they are v in
    [-1, 1], interpolating log-variance between the posterior's (v = -1) and beta_t's
    (v = 1), eq. 12 of IDDPM. FIXED_SMALL / FIXED_LARGE: the posterior variance / beta_t.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """MSE (plus the VB term when the variance is learned), or the VB alone."""

    MSE = enum.auto()
    RESCALED_MSE = enum.auto()  # VB term multiplied by T / 1000 (IDDPM's lambda)
    KL = enum.auto()
    RESCALED_KL = enum.auto()  # VB term multiplied by T, an estimate of the full bound

    def is_vb(self) -> bool:
        """True for the loss types that optimise the variational bound alone."""
        return self in (LossType.KL, LossType.RESCALED_KL)


def _as_enum(cls: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and value.upper() in cls.__members__:
        return cls[value.upper()]
    names = ", ".join(m.lower() for m in cls.__members__)
    raise ValueError(f"unknown {cls.__name__} {value!r}; choose one of: {names}")


class GaussianDiffusion:
    """Utilities to train and sample a diffusion model over a fixed beta schedule.

    ``betas`` is a 1-D array (index 0 is the first, least noisy step); the enums say how
    model outputs are read and which loss ``training_losses`` returns (strings such as
    ``"epsilon"``, ``"learned_range"`` or ``"rescaled_mse"`` are accepted too). With
    ``rescale_timesteps`` the model receives float timesteps scaled to 0..1000.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray | list,
        model_mean_type: ModelMeanType | str,
        model_var_type: ModelVarType | str,
        loss_type: LossType | str,
        rescale_timesteps: bool = False,
    ) -> None:
        self.model_mean_type = _as_enum(ModelMeanType, model_mean_type)
        self.model_var_type = _as_enum(ModelVarType, model_var_type)
        self.loss_type = _as_enum(LossType, loss_type)
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min()} and max {betas.max()}")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) and its inversions
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log borrows t = 1's value there.
        # With a single step there is no t = 1, and beta_0 is the only sensible stand-in.
        var_1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(var_1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Derived tables, precomputed in float64 so the hot path only gathers.
        self.log_betas = np.log(betas)
        # FIXED_LARGE uses beta_t, except at t = 0 where the posterior variance of t = 1
        # gives a better decoder likelihood (as guided-diffusion does).
        self.fixed_large_variance = np.append(var_1, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)
        self.one_minus_alphas_cumprod_prev = 1.0 - self.alphas_cumprod_prev
        self.sqrt_one_minus_alphas_cumprod_prev = np.sqrt(1.0 - self.alphas_cumprod_prev)
        self.sqrt_alphas_cumprod_next = np.sqrt(self.alphas_cumprod_next)
        self.sqrt_one_minus_alphas_cumprod_next = np.sqrt(1.0 - self.alphas_cumprod_next)
        # DDIM's sigma at eta = 1: sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev).
        self.ddim_sigma_eta1 = np.sqrt(self.one_minus_alphas_cumprod_prev / self.one_minus_alphas_cumprod) * np.sqrt(
            1.0 - self.alphas_cumprod / self.alphas_cumprod_prev
        )

        self._tables: dict = {}

    # ------------------------------------------------------------------ coefficients

    def _coef(self, name: str, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Schedule array ``name`` at timesteps ``t``, shaped [B, 1, ..., 1] to broadcast with ``ref``.

        The array is copied to ``ref``'s device once and cached; afterwards this is one
        on-device gather. Its dtype is ``ref``'s, but at least float32.
        """
        dtype = torch.promote_types(ref.dtype, torch.float32)
        key = (name, ref.device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(device=ref.device, dtype=dtype)
            self._tables[key] = table
        return table[t].view(-1, *([1] * (ref.ndim - 1)))

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps a network must be called with for this diffusion's indices ``t``.

        Use it when calling a model yourself before ``p_mean_variance_from_output``: it
        applies ``rescale_timesteps`` and, for a respaced diffusion, the map back to the
        original process's indices, exactly as ``p_mean_variance`` does.
        """
        return self._scale_timesteps(t)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distribution q(x_t | x_0): ``(mean, variance, log_variance)``, each of x_start's shape."""
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._coef("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (t = 0 is one step of noise); ``noise`` fixes the Gaussian draw."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The posterior q(x_{t-1} | x_t, x_0): ``(mean, variance, log_variance_clipped)``."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} differs from x_t shape {tuple(x_t.shape)}")
        mean = self._coef("posterior_mean_coef1", t, x_t) * x_start + self._coef("posterior_mean_coef2", t, x_t) * x_t
        variance = self._coef("posterior_variance", t, x_t).expand(x_t.shape)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run ``model`` and return p(x_{t-1} | x_t) plus its x_0 prediction.

        Returns ``mean``, ``variance``, ``log_variance`` and ``pred_xstart``, each of x's
        shape. ``denoised_fn`` is applied to the x_0 prediction before ``clip_denoised``
        clamps it to [-1, 1]; ``model_kwargs`` go to the model (e.g. ``y``).
        """
        model_output = model(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(
            model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    def p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """What ``p_mean_variance`` returns, from a model output computed elsewhere.

        ``model_output`` must come from calling the network at ``model_timesteps(t)``; it
        has C channels, or 2C when the variance is learned.
        """
        mean_out, var_out = self._split_output(model_output, x)
        return self._p_from_parts(mean_out, var_out, x, t, clip_denoised, denoised_fn)

    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, C = x.shape[:2]
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        want = (B, 2 * C if learned else C, *x.shape[2:])
        if tuple(model_output.shape) != want:
            why = "the variance is learned, so 2C channels are expected" if learned else "the variance is fixed"
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {want} ({why}); "
                "check that the model's learn_sigma matches the diffusion's"
            )
        if learned:
            mean_out, var_out = torch.split(model_output, C, dim=1)
            return mean_out, var_out
        return model_output, None

    def _p_from_parts(
        self,
        mean_out: torch.Tensor,
        var_out: torch.Tensor | None,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        vt = self.model_var_type
        if vt == ModelVarType.LEARNED:
            log_variance = var_out
            variance = torch.exp(log_variance)
        elif vt == ModelVarType.LEARNED_RANGE:
            min_log = self._coef("posterior_log_variance_clipped", t, x)
            max_log = self._coef("log_betas", t, x)
            frac = (var_out + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif vt == ModelVarType.FIXED_LARGE:
            variance = self._coef("fixed_large_variance", t, x).expand(x.shape)
            log_variance = self._coef("fixed_large_log_variance", t, x).expand(x.shape)
        else:
            variance = self._coef("posterior_variance", t, x).expand(x.shape)
            log_variance = self._coef("posterior_log_variance_clipped", t, x).expand(x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        mt = self.model_mean_type
        if mt == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self.predict_xstart_from_xprev(x_t=x, t=t, xprev=mean_out))
            mean = mean_out
        else:
            if mt == ModelMeanType.START_X:
                pred_xstart = process_xstart(mean_out)
            elif mt == ModelMeanType.VELOCITY:
                pred_xstart = process_xstart(self.predict_xstart_from_v(x_t=x, t=t, v=mean_out))
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x_t=x, t=t, eps=mean_out))
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the image an epsilon prediction implies."""
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor) -> torch.Tensor:
        """x_0 from a posterior-mean prediction: inverts mean = coef1 * x_0 + coef2 * x_t."""
        return (
            self._coef("recip_posterior_mean_coef1", t, x_t) * xprev
            - self._coef("posterior_mean_coef2_over_coef1", t, x_t) * x_t
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t): the noise an x_0 prediction implies."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return self._coef("sqrt_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        return self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self._coef("sqrt_alphas_cumprod", t, x_t) * v

    def predict_v_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """v = (sqrt(abar_t) x_t - x_0) / sqrt(1 - abar_t)."""
        return (self._coef("sqrt_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._coef(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def predict_v_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = (eps - sqrt(1 - abar_t) x_t) / sqrt(abar_t)."""
        return (eps - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t) / self._coef(
            "sqrt_alphas_cumprod", t, x_t
        )

    def convert_prediction(
        self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor, source: ModelMeanType, target: ModelMeanType
    ) -> torch.Tensor:
        """A prediction of kind ``source`` (epsilon, x_0 or v) as the same estimate of kind ``target``.

        Each pair uses its direct closed form (no detour through a third kind), so a conversion
        divides by sqrt(abar_t) or sqrt(1 - abar_t) only when the target itself requires it.
        """
        kinds = (ModelMeanType.EPSILON, ModelMeanType.START_X, ModelMeanType.VELOCITY)
        if source not in kinds or target not in kinds:
            raise ValueError(f"cannot convert {source.name} into {target.name}; epsilon, x_0 and v convert")
        if source == target:
            return pred
        table = {
            (ModelMeanType.EPSILON, ModelMeanType.START_X): self.predict_xstart_from_eps,
            (ModelMeanType.EPSILON, ModelMeanType.VELOCITY): self.predict_v_from_eps,
            (ModelMeanType.START_X, ModelMeanType.EPSILON): self.predict_eps_from_xstart,
            (ModelMeanType.START_X, ModelMeanType.VELOCITY): self.predict_v_from_xstart,
            (ModelMeanType.VELOCITY, ModelMeanType.EPSILON): self.predict_eps_from_v,
            (ModelMeanType.VELOCITY, ModelMeanType.START_X): self.predict_xstart_from_v,
        }
        return table[(source, target)](x_t, t, pred)

    def ddim_jump_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor, t_next: torch.Tensor
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from ``x_t`` at ``t`` to any earlier step ``t_next`` given an x_0 prediction.

        x_{t_next} = sqrt(abar_{t_next}) x_0 + sqrt(1 - abar_{t_next}) eps, with eps implied by ``pred_xstart``.
        """
        eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        ab = self._coef("alphas_cumprod", t_next, x_t)
        return ab.sqrt() * pred_xstart + (1 - ab).sqrt() * eps

    # ------------------------------------------------------------------ guidance

    def condition_mean(
        self, cond_fn: Model, p_mean_var: dict, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Shift the mean by variance * grad log p(y | x_t), ``cond_fn``'s output (Sohl-Dickstein et al.)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self, cond_fn: Model, p_mean_var: dict, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """``p_mean_var`` with the score shifted by ``cond_fn``'s gradient (Song et al.), for DDIM."""
        alpha_bar = self._coef("alphas_cumprod", t, x)
        eps = self.predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------ ancestral sampling

    def _ancestral_step(
        self, out: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # A multiplicative mask keeps t == 0 (no noise) on the device without a branch.
        nonzero = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {
            "sample": sample,
            "pred_xstart": out["pred_xstart"],
            "mean": out["mean"],
            "log_variance": out["log_variance"],
        }

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}: ``sample``, ``pred_xstart``, ``mean``, ``log_variance``."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        return self._ancestral_step(out, x, t, noise)

    def p_sample_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        noise: torch.Tensor | None = None,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step from a model output computed elsewhere (see ``p_mean_variance_from_output``).

        Returns ``sample``, ``pred_xstart``, ``mean`` and ``log_variance``. No noise is added
        where t == 0; ``noise`` fixes the Gaussian draw.
        """
        out = self.p_mean_variance_from_output(model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        if noise is None:
            noise = torch.randn_like(x)
        return self._ancestral_step(out, x, t, noise)

    def p_sample_loop(
        self,
        model: Model,
        shape: tuple | list,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Draw samples of ``shape`` by ancestral sampling through every step; returns x_0.

        ``noise`` is the starting x_T (default: fresh Gaussian noise on ``device``, itself
        defaulting to the model's device). ``progress`` shows a tqdm bar.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple | list,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like ``p_sample_loop``, yielding ``p_sample``'s dict at every step (t = T-1 down to 0)."""
        yield from self._progressive(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def _progressive(
        self,
        step: Callable,
        model: Model,
        shape: Any,
        noise: torch.Tensor | None,
        device: Any,
        progress: bool,
        **step_kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Walk ``step`` (p_sample or ddim_sample) from t = T-1 down to 0, yielding each result."""
        img, device = self._initial_noise(model, shape, noise, device)
        for i in self._indices(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
            yield out
            img = out["sample"]

    def _initial_noise(self, model: Model, shape: Any, noise: torch.Tensor | None, device: Any) -> tuple:
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from the requested shape {tuple(shape)}")
            return noise, noise.device
        if device is None:
            params = getattr(model, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else torch.device("cpu")
        return torch.randn(*shape, device=device), torch.device(device)

    def _indices(self, progress: bool) -> Any:
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            return tqdm(indices)
        return indices

    # ------------------------------------------------------------------ DDIM

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (eq. 12 of Song et al.); ``eta`` = 0 is deterministic."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derived from x_0 so that x_0- and x_{t-1}-predicting models work too.
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        # Drawn even when unused, so a seeded run consumes the same random stream as guided-diffusion.
        noise = torch.randn_like(x)
        if eta == 0:
            mean_pred = (
                out["pred_xstart"] * self._coef("sqrt_alphas_cumprod_prev", t, x)
                + self._coef("sqrt_one_minus_alphas_cumprod_prev", t, x) * eps
            )
            return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}
        sigma = eta * self._coef("ddim_sigma_eta1", t, x)
        dir_coef = (self._coef("one_minus_alphas_cumprod_prev", t, x) - sigma**2).clamp(min=0).sqrt()
        mean_pred = out["pred_xstart"] * self._coef("sqrt_alphas_cumprod_prev", t, x) + dir_coef * eps
        nonzero = (t != 0).to(mean_pred.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One step of the deterministic DDIM ODE forwards, x_t -> x_{t+1} (encoding an image)."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample follows the deterministic ODE only; eta must be 0, got {eta}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        mean_pred = (
            out["pred_xstart"] * self._coef("sqrt_alphas_cumprod_next", t, x)
            + self._coef("sqrt_one_minus_alphas_cumprod_next", t, x) * eps
        )
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Model,
        shape: tuple | list,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Draw samples with DDIM through every step of this (usually respaced) diffusion; returns x_0."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple | list,
        noise: torch.Tensor | None = None,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like ``ddim_sample_loop``, yielding ``ddim_sample``'s dict at every step."""
        yield from self._progressive(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    # ------------------------------------------------------------------ likelihood and losses

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound in bits per dimension: ``output`` [B] and ``pred_xstart``.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL
        -log p(x_0 | x_1) at t == 0 (chosen per sample on the device).
        """
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return self._vb_terms_from_p(out, x_start, x_t, t)

    def _vb_terms_from_p(
        self, out: dict[str, torch.Tensor], x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / _LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training losses at timesteps ``t``: a dict of [B] tensors.

        ``loss`` always; with the MSE loss types also ``mse`` and, when the variance is
        learned, ``vb`` (IDDPM's hybrid loss: the VB term trains the variance only, the
        mean channels are detached inside it; ``rescaled_mse`` scales it by T / 1000).
        The KL types return the VB term alone (``rescaled_kl`` times T).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        mean_out, var_out = self._split_output(model_output, x_t)
        if var_out is not None:
            # The VB term must not pull the mean: it sees a detached copy of those channels.
            out = self._p_from_parts(mean_out.detach(), var_out, x_t, t, clip_denoised=False, denoised_fn=None)
            terms["vb"] = self._vb_terms_from_p(out, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # IDDPM's lambda = 1/1000 per step, so the VB term does not swamp the MSE.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            target = (
                self._coef("sqrt_alphas_cumprod", t, x_start) * noise
                - self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
            )
        else:
            target = noise
        terms["mse"] = mean_flat((target - mean_out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [B]; no model can change it."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / _LOG2

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The whole variational bound of ``x_start`` in bits per dimension, one model call per step.

        Returns ``total_bpd`` and ``prior_bpd`` [B], and ``vb``, ``xstart_mse``, ``mse``
        [B, T] (columns ordered from t = T-1 down to 0, as guided-diffusion orders them).
        """
        vb, xstart_mse, mse = [], [], []
        for i in self._indices(progress):
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
