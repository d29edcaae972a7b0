"""Data-free compression inputs: the pool stands in for the data (Diff-Pruning without a dataset).

Diff-Pruning (Fang et al., "Structural Pruning for Diffusion Models") ranks channels by the
first-order Taylor term ``|w * dL/dw|`` of the denoising loss summed over timesteps
``t = 0, 1, ...``, and stops at the first ``t`` whose loss falls below ``threshold`` times the
largest loss seen so far: the late, noisy steps carry little information about the network's
structure. Its loss needs clean images ``x_0``; here they are the teacher's own: the pool's
samples nearest to ``t = 0`` and the teacher's ``x_0`` prediction from them
(:func:`pool_images`), re-noised at every ``t`` with fixed noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dkdm.diffusion.gaussian import ModelMeanType
from dkdm.distill.pool import DynamicPool
from dkdm.models.prune import prune

__all__ = ["diff_pruning_accumulator", "pool_images", "prune_from_images", "teacher_images"]


@torch.no_grad()
def pool_images(teacher_fn: Callable[[Tensor, Tensor], Tensor], diffusion: Any, pool: DynamicPool, n: int) -> Tensor:
    """The teacher's clipped ``x_0`` predictions for the ``n`` prepared pool samples with the smallest ``t``."""
    if not pool.prepared:
        raise ValueError("the pool is not prepared; call pool.prepare(...) first")
    if not 0 < n <= pool.size:
        raise ValueError(f"asked for {n} images from a pool of {pool.size} samples")
    idx = torch.argsort(pool.t, stable=True)[:n]
    x, t = pool.x[idx].to(pool.device), pool.t[idx].to(pool.device)
    out = diffusion.p_mean_variance_from_output(teacher_fn(x, t), x, t, clip_denoised=True)
    return out["pred_xstart"]


def teacher_images(
    teacher: nn.Module,
    diffusion: Any,
    n: int,
    *,
    rho: float = 0.1,
    teacher_batch: int = 256,
    seed: int = 0,
    teacher_id: str = "",
    cache_dir: str = "",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """``n`` images from a dynamic pool of ``round(rho*T) * n`` teacher samples (prepared or cached)."""
    cfg = teacher.config
    teacher = teacher.to(device).eval()

    def teacher_fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return teacher(x, diffusion.model_timesteps(t))

    pool = DynamicPool(
        diffusion,
        (cfg.in_channels, cfg.image_size, cfg.image_size),
        n,
        rho=rho,
        device=device,
        teacher_batch=teacher_batch,
        seed=seed,
    )
    pool.prepare(teacher_fn, teacher_id=teacher_id, cache_dir=cache_dir, progress=progress)
    return pool_images(teacher_fn, diffusion, pool, n)


def diff_pruning_accumulator(
    diffusion: Any,
    x0: Tensor,
    *,
    threshold: float = 0.05,
    stride: int = 1,
    seed: int = 0,
    stats: dict | None = None,
) -> Callable[[nn.Module], None]:
    """``accumulate(model)`` for :func:`dkdm.models.prune.prune`: Diff-Pruning's gradient sum.

    For ``t = 0, stride, 2 stride, ...`` it backpropagates the denoising loss (mean squared
    error of the predicted epsilon, or x_0 for an x_0-predicting diffusion, against the truth)
    of ``x0`` noised to ``t``, and stops after the first ``t`` whose loss is below
    ``threshold`` times the largest so far. ``stats`` (if given) receives the steps and losses.
    A threshold outside [0, 1) raises ``ValueError``.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"the Diff-Pruning threshold must lie in [0, 1), got {threshold}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    C = x0.shape[1]
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    predicts_x0 = diffusion.model_mean_type == ModelMeanType.START_X

    def accumulate(model: nn.Module) -> None:
        loss_max = 0.0
        steps, losses = [], []
        for step in range(0, diffusion.num_timesteps, stride):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            x_t = diffusion.q_sample(x0, t, noise)
            pred = model(x_t, diffusion.model_timesteps(t))[:, :C]
            loss = ((pred - (x0 if predicts_x0 else noise)) ** 2).mean()
            loss.backward()
            value = float(loss.detach())  # a one-off ranking pass, not a training step: reading it is fine
            steps.append(step)
            losses.append(value)
            loss_max = max(loss_max, value)
            if value < threshold * loss_max:
                break
        if stats is not None:
            stats.update(steps=steps, losses=losses)

    return accumulate


def prune_from_images(
    teacher: nn.Module,
    diffusion: Any,
    x0: Tensor,
    ratio: float,
    *,
    threshold: float = 0.05,
    stride: int = 1,
    seed: int = 0,
) -> tuple[Any, dict[str, Tensor], dict]:
    """Prune ``teacher`` by ``ratio`` with Diff-Pruning's importance on images ``x0``.

    Returns ``(config, state_dict, stats)``; ``stats`` holds the timesteps whose gradients
    were summed and their losses. The teacher is not modified.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    stats: dict = {}
    acc = diff_pruning_accumulator(diffusion, x0, threshold=threshold, stride=stride, seed=seed, stats=stats)
    example = (x0[:1], torch.zeros(1, dtype=torch.long, device=x0.device))
    cfg, sd = prune(teacher, ratio, acc, example)
    return cfg, sd, stats
