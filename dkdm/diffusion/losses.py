"""Likelihood pieces of the variational bound: Gaussian KL and a discretised decoder.

These follow the formulas of Ho et al. (2020) and IDDPM (Nichol & Dhariwal, 2021) as
guided-diffusion states them, so bits-per-dim numbers are comparable with theirs.
"""

from __future__ import annotations

import math

import torch

Number = float | int
TensorOrNumber = torch.Tensor | float | int


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first (batch): ``[B, ...] -> [B]``."""
    if x.ndim <= 1:
        return x
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: TensorOrNumber, logvar1: TensorOrNumber, mean2: TensorOrNumber, logvar2: TensorOrNumber
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other and may be Python numbers, but at least one
    must be a tensor (its dtype and device are used for the numbers).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # exp() does not accept Python numbers, so the log-variances become tensors.
    # Made in ref's dtype directly: torch.tensor(number) would round a float64 log-variance to float32 first.
    lv1 = logvar1 if isinstance(logvar1, torch.Tensor) else torch.tensor(logvar1, dtype=ref.dtype, device=ref.device)
    lv2 = logvar2 if isinstance(logvar2, torch.Tensor) else torch.tensor(logvar2, dtype=ref.dtype, device=ref.device)
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (mean1 - mean2) ** 2 * torch.exp(-lv2))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by DDPM's decoder."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability (nats, elementwise) of 8-bit images ``x`` in [-1, 1] under a Gaussian.

    Each pixel owns the bin of width 2/255 around its value; the two extreme bins extend
    to infinity, as in DDPM's decoder ``p(x_0 | x_1)``.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
