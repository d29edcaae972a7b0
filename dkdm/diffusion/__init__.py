"""Gaussian diffusion maths (IDDPM / guided-diffusion compatible); no nn.Module inside.

``create_diffusion`` is the entry point: it takes a ``DiffusionConfig`` and/or
guided-diffusion's ``create_gaussian_diffusion`` keywords and returns a
``SpacedDiffusion`` exactly as guided-diffusion builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import ConfigError, DiffusionConfig, from_dict, update
from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import betas_for_alpha_bar, get_named_beta_schedule
from .timesteps import create_named_schedule_sampler

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "betas_for_alpha_bar",
    "create_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


def create_diffusion(cfg: DiffusionConfig | Mapping[str, Any] | None = None, **kw: Any) -> SpacedDiffusion:
    """Build the diffusion a ``DiffusionConfig`` (or a mapping of its fields) describes.

    Keywords are guided-diffusion's (``steps``, ``learn_sigma``, ``sigma_small``,
    ``noise_schedule``, ``use_kl``, ``predict_xstart``, ``predict_v``, ``rescale_timesteps``,
    ``rescale_learned_sigmas``, ``timestep_respacing``) and override ``cfg``'s fields; an
    unknown one raises ``ConfigError`` naming the closest valid name. The variance is
    learned_range with ``learn_sigma``, else fixed_large (fixed_small with
    ``sigma_small``); the loss is rescaled_kl with ``use_kl``, else rescaled_mse with
    ``rescale_learned_sigmas``, else mse. An empty ``timestep_respacing`` keeps all steps.
    """
    if cfg is None:
        cfg = DiffusionConfig()
    elif isinstance(cfg, Mapping):
        cfg = from_dict(DiffusionConfig, cfg, "diffusion config")
    elif not isinstance(cfg, DiffusionConfig):
        raise TypeError(f"create_diffusion takes a DiffusionConfig or a mapping, got {type(cfg).__name__}")
    if kw:
        cfg = update(cfg, kw, "create_diffusion")
    if cfg.steps < 1:
        raise ValueError(f"diffusion steps must be at least 1, got {cfg.steps}")
    betas = get_named_beta_schedule(cfg.noise_schedule, cfg.steps)
    if cfg.use_kl:
        loss_type = LossType.RESCALED_KL
    elif cfg.rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if cfg.learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if cfg.sigma_small else ModelVarType.FIXED_LARGE
    if cfg.predict_xstart and cfg.predict_v:
        raise ConfigError("--predict_xstart and --predict_v both set; a network predicts one of epsilon, x_0, v")
    mean_type = ModelMeanType.START_X if cfg.predict_xstart else ModelMeanType.EPSILON
    mean_type = ModelMeanType.VELOCITY if cfg.predict_v else mean_type
    respacing = cfg.timestep_respacing or [cfg.steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(cfg.steps, respacing),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=cfg.rescale_timesteps,
    )
