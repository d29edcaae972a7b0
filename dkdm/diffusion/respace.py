"""Respacing: run a diffusion on a subset of its steps ("50", "ddim50", "10,15,20").

A ``SpacedDiffusion`` keeps the chosen steps' alphas_cumprod and derives new betas from
them; the network still sees the original process's timestep indices through
``timestep_map``, so a model trained on 1000 steps samples in 50 unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .gaussian import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """Which steps of a ``num_timesteps`` process to keep.

    ``section_counts`` lists step counts for equal-sized portions of the process, e.g.
    ``"10,15,20"`` over 300 steps takes 10 evenly spread steps from the first 100, 15 from
    the next 100 and 20 from the last. ``"ddimN"`` uses DDIM's fixed integer stride
    instead (steps 0, s, 2s, ...), which must give exactly N steps.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"timestep respacing '{section_counts}': expected 'ddim' followed by a number, e.g. ddim50"
                ) from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep respacing '{section_counts}': no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps; pick another count or use a plain count such as '{desired}'"
            )
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing '{section_counts}': expected comma-separated step counts such as '50' or '10,15,20', or 'ddim50'"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"timestep respacing {section_counts!r}: step counts must be non-negative and not all zero")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"timestep respacing {section_counts!r}: section {i} of {num_timesteps} steps has {size} steps, "
                f"cannot take {count} from it"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # round() (half to even) on a running float sum, as guided-diffusion does, so the
        # same spec picks the same steps there and here.
        pos = 0.0
        for _ in range(count):
            steps.append(start + round(pos))
            pos += stride
        start += size
    return set(steps)


class _WrappedModel:
    """Calls the network with the original process's timesteps (and rescaling) of a spaced diffusion."""

    def __init__(self, model: Model, diffusion: SpacedDiffusion) -> None:
        self.model = model
        self._timesteps = diffusion.model_timesteps

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(x, self._timesteps(ts), **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that takes only the steps ``use_timesteps`` of a base process.

    ``kwargs`` build the base ``GaussianDiffusion`` (``betas`` are the base's). The kept
    steps, in increasing order, form ``timestep_map``: spaced index i is original step
    ``timestep_map[i]``. Every method that runs a model wraps it so it sees original
    indices (floats scaled to 0..1000 when ``rescale_timesteps``).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = {int(i) for i in use_timesteps}
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        bad = sorted(i for i in self.use_timesteps if not 0 <= i < self.original_num_steps)
        if not self.use_timesteps or bad:
            raise ValueError(
                f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}; "
                f"got {len(self.use_timesteps)} steps{f', out of range: {bad[:5]}' if bad else ''}"
            )
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        self.timestep_map: list[int] = sorted(self.use_timesteps)
        kept = alphas_cumprod[self.timestep_map]
        # Each new beta spans the gap between consecutive kept steps, so that the kept
        # steps' alphas_cumprod stay what they were in the base process.
        new_betas = 1.0 - kept / np.append(1.0, kept[:-1])
        super().__init__(**{**kwargs, "betas": new_betas})
        self._maps: dict = {}

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original-process timesteps for spaced indices ``t`` (scaled to 0..1000 if ``rescale_timesteps``)."""
        table = self._maps.get(t.device)
        if table is None:
            table = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._maps[t.device] = table
        mapped = table[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapped model maps and scales; scaling here too would do it twice.
        return t

    def _wrap_model(self, model: Model) -> _WrappedModel:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self)

    def p_mean_variance(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn: Model, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)
