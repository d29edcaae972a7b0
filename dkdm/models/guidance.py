"""Classifier-free guidance: the guided output of a teacher from one network call.

Convention (DiT's ``cfg_scale`` and diffusers' ``guidance_scale``): on the prediction channels

    guided = out_u + w (out_c - out_u),

``out_c`` the output for the label ``y`` and ``out_u`` for the null label. ``w = 1`` is the
plain conditional model, ``w = 0`` the unconditional one, ``w > 1`` guides. (Ho & Salimans
and Meng et al. write ``(1 + w') out_c - w' out_u``: their ``w'`` is our ``w - 1``.) The
combination has weights summing to one, so it commutes with the affine epsilon <-> x_0
conversion: guiding epsilon predictions or x_0 predictions is the same thing.

The variance channels of a ``learn_sigma`` teacher are taken from the *conditional* pass.
The guided prediction is not the output of any model, so it has no variance of its own; the
conditional pass's variance is what the guided samplers of GLIDE and DiT use with it (DiT's
``forward_with_cfg`` keeps the conditional half's variance), so a student trained towards it
reproduces the guided *sampler* a user would run on the teacher, and the pool advances with
that same sampler.

Both passes go through the network as one batch of ``2B`` (conditional first, then null):
still one teacher call per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GuidanceError", "Guided", "WithScale", "check_guidable", "for_sampling", "null_class"]


class GuidanceError(ValueError):
    """Guidance asked of a model that cannot be guided; the message says why and what to do."""


def null_class(model: nn.Module) -> int | None:
    """The null label of a class-conditional model trained with label dropout, else None."""
    return getattr(model, "null_class", None)


def check_guidable(model: nn.Module, who: str = "teacher", flag: str = "--guidance_scale") -> int:
    """The model's null label; refuses an unconditional model or one without a null class."""
    if getattr(model, "num_classes", None) is None:
        raise GuidanceError(
            f"{flag} needs a class-conditional {who}, but this {who} is unconditional (class_cond false); drop {flag}"
        )
    null = null_class(model)
    if null is None:
        raise GuidanceError(
            f"{flag} needs a {who} trained with label dropout (a null class: class_dropout_prob > 0), but this "
            f"{who} has none (class_dropout_prob 0); drop {flag} or use a {who} trained with --class_dropout_prob"
        )
    return null


def guide(out: Tensor, w: Tensor | float, channels: int) -> Tensor:
    """Combine a ``[2B, ...]`` output (conditional half first) into the ``[B, ...]`` guided one.

    ``w`` is a number or a ``[B]`` tensor (one scale per sample); ``channels`` is the number of
    prediction channels (the rest, the variance channels, come from the conditional half).
    """
    b = out.shape[0] // 2
    cond, uncond = out[:b], out[b:]
    if isinstance(w, Tensor):
        w = w.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
    pred = uncond[:, :channels] + w * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([pred, cond[:, channels:]], dim=1) if out.shape[1] > channels else pred


class Guided(nn.Module):
    """A class-conditional model with a null class, presented as its guided output.

    ``forward(x, t, y, w=None)`` runs ``model`` once on the doubled batch ``(x, x)``,
    ``(t, t)``, ``(y, null)`` and returns :func:`guide` of it at ``w`` (a number or ``[B]``;
    ``None``: the ``scale`` given here).
    """

    def __init__(self, model: nn.Module, scale: float = 1.0, who: str = "teacher") -> None:
        super().__init__()
        self.null = check_guidable(model, who)
        self.model = model
        self.scale = float(scale)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, w: Tensor | float | None = None) -> Tensor:
        null = torch.full_like(y, self.null)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
        # Combined in float32 at least: w (c - u) amplifies the rounding of a half-precision output.
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        return guide(out, self.scale if w is None else w, x.shape[1])


class WithScale(nn.Module):
    """A w-conditioned model (``guidance_cond``) at one guidance scale: passes ``w`` to every call."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model = model
        self.scale = float(scale)

    def forward(self, x: Tensor, t: Tensor, **kwargs: Tensor) -> Tensor:
        w = torch.full((x.shape[0],), self.scale, device=x.device, dtype=torch.float32)
        return self.model(x, t, w=w, **kwargs)


def for_sampling(model: nn.Module, scale: float = 1.0) -> nn.Module:
    """``model`` as sampled at guidance scale ``scale`` (``model(x, t, y=...)`` either way).

    A w-conditioned model gets ``w = scale`` as its input; otherwise ``scale != 1`` wraps a
    guidable model in :class:`Guided` and is refused for any other; ``scale == 1`` is the
    model itself.
    """
    if getattr(model, "guidance_cond", False):
        return WithScale(model, scale)
    if scale == 1.0:
        return model
    return Guided(model, scale, who="model")
