"""Mixed precision for training loops: fp32, fp16 with dynamic loss scaling, bf16.

Weights always stay in fp32 (they are the "master weights"); lower precision exists
only inside :meth:`Precision.autocast`, where ``torch.autocast`` casts each op's inputs.
fp16 adds ``torch.amp.GradScaler``: the loss is multiplied by a scale before backward,
gradients are unscaled before clipping, and a step whose gradients overflowed is
skipped while the scale shrinks -- guided-diffusion's ``MixedPrecisionTrainer``
behaviour, from the library piece rather than hand-written. bf16 has fp32's range and
needs no scaling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

# The compute dtype of each mode under autocast (None: plain fp32, no autocast). The one map every
# loop uses: training (here), the teacher in distillation, sampling.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = tuple(AUTOCAST_DTYPES)


def autocast_dtype(mode: str, what: str = "precision") -> torch.dtype | None:
    """The autocast dtype of ``mode`` (None for fp32); an unknown mode is a ValueError naming ``what``."""
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(AUTOCAST_DTYPES)}, got {mode!r}")
    return AUTOCAST_DTYPES[mode]


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``; a no-op context when ``dtype`` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class Precision:
    """Autocast, loss scaling, gradient unscaling and clipping for one precision mode.

    ``mode`` is ``fp32``, ``fp16`` or ``bf16``; ``device`` is where the model runs;
    ``growth_interval`` is how many overflow-free steps double the fp16 loss scale
    (guided-diffusion grows its scale by ``fp16_scale_growth`` per step instead; see
    :func:`growth_interval_from_rate`).
    """

    def __init__(self, mode: str, device: torch.device, growth_interval: int = 2000) -> None:
        self.dtype = autocast_dtype(mode) or torch.float32
        self.mode = mode
        self.device = torch.device(device)
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            init_scale=2.0**20,  # guided-diffusion's INITIAL_LOG_LOSS_SCALE = 20
            growth_interval=growth_interval,
            enabled=mode == "fp16",
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward pass (model and loss) runs in."""
        return autocast(self.device.type, autocast_dtype(self.mode))

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled in fp16)."""
        self.scaler.scale(loss).backward()

    def unscale_and_clip(
        self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_norm: float
    ) -> torch.Tensor:
        """Unscale gradients (fp16), clip them to ``max_norm`` if it is > 0, return their norm.

        The norm is a 0-d tensor on the device (no host synchronisation); it is inf or
        NaN on an fp16 step that overflowed, which :meth:`step` will then skip.
        """
        self.scaler.unscale_(optimizer)
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if max_norm > 0:
            # The clip factor min(1, max_norm / norm) is applied on device, without a sync.
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step (skipped in fp16 when gradients overflowed), then scale update."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 otherwise). Synchronises: call at log time only."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (the scaler's scale and growth tracker)."""
        return {"mode": self.mode, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a scaler saved under another mode is ignored."""
        if state.get("mode") == self.mode and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def growth_interval_from_rate(rate: float) -> int:
    """GradScaler growth interval matching guided-diffusion's ``fp16_scale_growth``.

    guided-diffusion adds ``rate`` to the log2 scale every good step, i.e. doubles it every
    ``1 / rate`` steps; GradScaler doubles it every ``growth_interval`` good steps.
    """
    return max(1, round(1.0 / rate)) if rate > 0 else 2000
