"""Timestep samplers for training: uniform, and IDDPM's loss-second-moment importance sampling.

Both draw on the training device and keep their state there, so a training step never
waits for the host. Samples come with importance weights that keep the objective
unbiased: weight = 1 / (T * p(t)).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion: Any) -> ScheduleSampler:
    """The sampler called ``name`` (``uniform`` or ``loss-second-moment``) for ``diffusion``'s steps."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")


class ScheduleSampler(ABC):
    """A distribution over a diffusion's timesteps, used by importance sampling."""

    def __init__(self, diffusion: Any) -> None:
        self.diffusion = diffusion
        self.num_timesteps = int(diffusion.num_timesteps)

    @abstractmethod
    def weights(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Unnormalised positive sampling weights, one per timestep (float64 [T])."""

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` timesteps on ``device``: ``(t LongTensor[B], weights FloatTensor[B])``."""
        w = self.weights(device)
        p = w / w.sum()
        t = torch.multinomial(p, batch_size, replacement=True)
        weights = (1.0 / (self.num_timesteps * p[t])).float()
        return t, weights

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Feed this rank's per-sample losses; samplers that do not learn ignore them."""

    def state_dict(self) -> dict:
        """What a resumed run needs to draw the same distribution (empty when stateless)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output."""


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all weights are 1."""

    def weights(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64, device=device)

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return t, torch.ones(batch_size, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler that reweights timesteps from observed losses, identically on every rank."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Feed this rank's timesteps and per-sample losses; with torch.distributed initialised
        they are gathered from all ranks first, so every rank keeps the same weights.

        Call it from every rank (a collective). Without torch.distributed it only uses the
        local losses. Ranks may hold different batch sizes.
        """
        local_ts = local_ts.detach().reshape(-1)
        local_losses = local_losses.detach().reshape(-1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ws = dist.get_world_size()
            size = torch.tensor([local_ts.numel()], dtype=torch.long, device=local_ts.device)
            sizes = [torch.zeros_like(size) for _ in range(ws)]
            dist.all_gather(sizes, size)
            # One small host read per update, only in multi-rank runs: padding to the
            # largest batch needs its size.
            sizes_host = torch.cat(sizes).tolist()
            max_bs = max(sizes_host)
            pad = max_bs - local_ts.numel()
            ts_pad = torch.nn.functional.pad(local_ts, (0, pad))
            loss_pad = torch.nn.functional.pad(local_losses.to(torch.float64), (0, pad))
            ts_all = [torch.zeros_like(ts_pad) for _ in range(ws)]
            loss_all = [torch.zeros_like(loss_pad) for _ in range(ws)]
            dist.all_gather(ts_all, ts_pad)
            dist.all_gather(loss_all, loss_pad)
            local_ts = torch.cat([x[:n] for x, n in zip(ts_all, sizes_host)])
            local_losses = torch.cat([x[:n] for x, n in zip(loss_all, sizes_host)])
        self.update_with_all_losses(local_ts, local_losses)

    @abstractmethod
    def update_with_all_losses(self, ts: torch.Tensor | Sequence[int], losses: torch.Tensor | Sequence[float]) -> None:
        """Update from the losses of all ranks (same arguments on every rank; deterministic)."""


class LossSecondMomentResampler(LossAwareSampler):
    """IDDPM's sampler: p(t) proportional to sqrt(E[L_t^2]) over the last ``history_per_term`` losses.

    Until every timestep has that many losses it samples uniformly; afterwards a
    ``uniform_prob`` share stays uniform so no step starves. The history lives on the
    device of the tensors it is fed, as a ring buffer per timestep.
    """

    def __init__(self, diffusion: Any, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(diffusion)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        # One spare column receives the writes of losses that a batch already pushed out
        # of the history, so the update needs neither a mask gather nor a host sync.
        self._history = torch.zeros(self.num_timesteps, self.history_per_term + 1, dtype=torch.float64)
        self._seen = torch.zeros(self.num_timesteps, dtype=torch.long)

    def _to(self, device: torch.device | str | None) -> None:
        if device is not None and self._history.device != torch.device(device):
            self._history = self._history.to(device)
            self._seen = self._seen.to(device)

    def weights(self, device: torch.device | str | None = None) -> torch.Tensor:
        self._to(device)
        T, H = self.num_timesteps, self.history_per_term
        hist = self._history[:, :H]
        w = torch.sqrt((hist**2).mean(dim=-1))
        w = w / w.sum()
        w = w * (1 - self.uniform_prob) + self.uniform_prob / T
        warmed_up = (self._seen >= H).all()
        return torch.where(warmed_up, w, torch.ones_like(w))

    def update_with_all_losses(self, ts: torch.Tensor | Sequence[int], losses: torch.Tensor | Sequence[float]) -> None:
        device = self._history.device
        if isinstance(ts, torch.Tensor):
            self._to(ts.device)
            device = ts.device
        ts = torch.as_tensor(ts, dtype=torch.long, device=device).reshape(-1)
        losses = torch.as_tensor(losses, device=device).to(torch.float64).reshape(-1)
        H = self.history_per_term
        # Within a batch a timestep may repeat; later entries are newer. Order each
        # timestep's entries, number them, and keep only the newest H of them.
        order = torch.sort(ts, stable=True).indices
        ts, losses = ts[order], losses[order]
        counts = torch.bincount(ts, minlength=self.num_timesteps)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(ts.numel(), device=device) - first[ts]
        keep = rank >= counts[ts] - H
        slot = torch.where(keep, (self._seen[ts] + rank) % H, torch.full_like(rank, H))
        self._history[ts, slot] = losses
        self._seen += counts

    def state_dict(self) -> dict:
        return {"loss_history": self._history[:, : self.history_per_term].cpu(), "seen": self._seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        hist = torch.as_tensor(state["loss_history"], dtype=torch.float64)
        if tuple(hist.shape) != (self.num_timesteps, self.history_per_term):
            raise ValueError(
                f"sampler state has a loss history of shape {tuple(hist.shape)}, this sampler expects "
                f"{(self.num_timesteps, self.history_per_term)} (steps, history_per_term)"
            )
        device = self._history.device
        self._history = torch.cat([hist, torch.zeros(self.num_timesteps, 1, dtype=torch.float64)], dim=1).to(device)
        self._seen = torch.as_tensor(state["seen"], dtype=torch.long).to(device)
