"""Pieces the UNet and the ViT share: timestep embedding, attention through SDPA, norms, convolutions.

Module and parameter layouts here are chosen so that state dicts match the public
checkpoints (guided-diffusion for the UNet parts, DiT for the transformer parts); the
names of submodules therefore matter and must not be changed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def check_labels(y: torch.Tensor | None, num_classes: int | None) -> None:
    """Refuse labels ``y`` unless the model is class-conditional (``num_classes`` set), and their absence if it is."""
    if (y is not None) != (num_classes is not None):
        raise ValueError(
            "class labels y must be given if and only if the model is class-conditional "
            f"(num_classes={num_classes}, y {'given' if y is not None else 'missing'})"
        )


# w enters the same sinusoids as the timestep, stretched so that guidance scales of order 1 to 10
# span the lower frequencies too (a raw w of 0..10 would only move the fastest few).
GUIDANCE_EMBED_SCALE = 100.0


def check_guidance(w: torch.Tensor | None, guidance_cond: bool) -> None:
    """Refuse a guidance scale ``w`` unless the model takes one (``guidance_cond``), and its absence if it does."""
    if (w is not None) != guidance_cond:
        raise ValueError(
            "a guidance scale w must be given if and only if the model is w-conditioned "
            f"(guidance_cond={guidance_cond}, w {'given' if w is not None else 'missing'})"
        )


def drop_labels(y: torch.Tensor, prob: float, null_class: int) -> torch.Tensor:
    """Labels with each one replaced by ``null_class`` with probability ``prob`` (classifier-free training)."""
    drop = torch.rand(y.shape[0], device=y.device) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` of (possibly fractional) timesteps.

    ``timesteps`` is a 1-D tensor of raw step indices (guided-diffusion and DiT both feed
    the unscaled index); the result is a float32 ``[N, dim]`` tensor, zero-padded by one
    column when ``dim`` is odd. Frequencies follow guided-diffusion exactly, so weights
    trained there see the same features here.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype.

    fp16 statistics overflow easily; computing them in float32 is what makes the
    half-precision torso of ``convert_to_fp16`` trainable (and what guided-diffusion does).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast keeps group_norm in float32 (it is on every backend's fp32 list), so
        # float32 inputs stay float32 inside an autocast region too.
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The standard normalisation layer: 32 groups, as guided-diffusion."""
    return GroupNorm32(32, channels)


def _onednn_pointwise(conv: Conv1d | Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """``conv(x)`` through oneDNN when ``conv`` is a 1x1 convolution on a CPU in plain fp32, else None.

    With one thread and a batch under 16, torch sends 1x1 convolutions to its im2col path,
    whose matrix products (MKL sgemm) ran at about half the speed of oneDNN's kernels on this
    project's AVX-512 EPYC: 106 vs 198 GFLOP/s at the attention blocks' qkv shapes, 1.07x on the
    57M teacher's forward at batch 4 (benchmarks/roofline.py, ``teacher_fwd_pointwise_torch``);
    on the AVX2 EPYC level, in the teacher's forward and the student's training step alike.
    Same maths (fp32, the products summed in another order). Left to torch under autocast (its casts apply), under
    ``torch.compile`` (the direct call has no fake-tensor kernel), when oneDNN is off, and for a
    module whose ``onednn_pointwise`` is False (measurements).
    """
    n = x.dim() - 2
    if not (
        conv.onednn_pointwise
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and n == len(conv.kernel_size)
        and conv.kernel_size == (1,) * n
        and conv.padding in ((0,) * n, "valid")
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
        and hasattr(torch, "mkldnn_convolution")  # not a documented API: a torch without it takes its own path
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return None
    return torch.mkldnn_convolution(
        x, conv.weight, conv.bias, [0] * n, list(conv.stride), list(conv.dilation), conv.groups
    )


class _OneDNNPointwise:
    """Mixin for torch's convolutions (same parameters and state-dict keys): the 1x1 CPU case runs through oneDNN."""

    onednn_pointwise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _onednn_pointwise(self, x)
        return super().forward(x) if out is None else out


class Conv1d(_OneDNNPointwise, nn.Conv1d):
    """``nn.Conv1d`` whose 1x1 CPU case runs through oneDNN."""


class Conv2d(_OneDNNPointwise, nn.Conv2d):
    """``nn.Conv2d`` whose 1x1 CPU case runs through oneDNN."""


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported number of spatial dimensions: {dims} (use 1, 2 or 3)")
    return (Conv1d, Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def upsample_nearest2x(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of the last ``min(dims, 2)`` axes (3-D: height and width only).

    Bitwise ``F.interpolate(..., mode="nearest")``; for a contiguous input it is one broadcast
    copy, which on a CPU takes a third of ``upsample_nearest2d``'s time (0.50 vs 1.55 ms at
    ``[4, 128, 16, 16]``). Other layouts (channels_last) keep ``F.interpolate``, which preserves them.
    """
    if not x.is_contiguous():
        if dims == 3:
            return F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if dims == 1:
        b, c, n = x.shape
        return x[..., None].expand(b, c, n, 2).reshape(b, c, 2 * n)
    *lead, h, w = x.shape
    return x[..., :, None, :, None].expand(*lead, h, 2, w, 2).reshape(*lead, 2 * h, 2 * w)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported number of spatial dimensions: {dims} (use 1, 2 or 3)")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place, so a residual branch starts as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def maybe_checkpoint(fn, *args, enabled: bool):
    """Run ``fn(*args)``, recomputing its activations in backward when ``enabled``.

    Only active while autograd records (training); in ``no_grad`` sampling it would
    just cost time.
    """
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy: bool, impl: str = "auto") -> torch.Tensor:
    """Multi-head self-attention over the last axis of a fused ``[B, 3*C, T]`` qkv tensor.

    The two channel layouts are guided-diffusion's: ``legacy`` splits heads first
    (``[B, H*(q,k,v)*ch, T]``, QKVAttentionLegacy), otherwise q, k, v first
    (``[B, (q,k,v)*H*ch, T]``, QKVAttention). The result is ``[B, H*ch, T]``. The maths is
    softmax(q k^T / sqrt(ch)) v, computed by ``scaled_dot_product_attention`` on q, k, v made
    contiguous in its layout (a fused kernel on CUDA; on a CPU its blocked flash kernel, with
    fp32 accumulation). ``bmm`` is the alternative: two batched matmuls in the channel-major
    layout with an fp32 softmax between, as guided-diffusion computes it. Alone at the UNets'
    shapes SDPA takes 1.5-2x the two products' time on this project's CPU
    (benchmarks/roofline.py, ``attention_sdpa_over_bmm_time``), yet inside a network it is level
    (57M teacher) or faster (14M at batch 4: 1.10x; on an H100 the 57M's sampling step 1.35x):
    it never writes and rereads the ``[B*H, T, T]`` scores. ``impl``: ``auto`` (= ``sdpa``),
    ``sdpa`` or ``bmm``, the last for tests and measurements.
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.reshape(b, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = qkv.reshape(b, 3, num_heads, ch, length).unbind(1)
    if impl not in ("auto", "bmm", "sdpa"):
        raise ValueError(f"attention impl must be auto, bmm or sdpa, got {impl!r}")
    if impl == "bmm":
        q, k, v = (z.reshape(b * num_heads, ch, length) for z in (q, k, v))
        w = torch.baddbmm(  # [BH, T, S] = q^T k / sqrt(ch); beta=0 ignores the uninitialised input
            q.new_empty(b * num_heads, length, length), q.transpose(1, 2), k, beta=0, alpha=ch**-0.5
        )
        w = torch.softmax(w.to(torch.promote_types(w.dtype, torch.float32)), dim=-1).to(w.dtype)  # >= fp32
        return torch.bmm(v, w.transpose(1, 2)).reshape(b, num_heads * ch, length)
    # SDPA wants [B, H, T, ch] with unit stride along ch: the copies are small next to the kernel.
    q, k, v = (z.transpose(-1, -2).contiguous() for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(b, num_heads * ch, length)


def qkv_attention_tokens(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """:func:`qkv_attention` on a token-major ``[B, T, 3*C]`` qkv tensor (contiguous), giving ``[B, T, C]``.

    The channel layouts (``legacy`` or not) and the maths are :func:`qkv_attention`'s; the heads
    are strided views of ``qkv`` handed to ``scaled_dot_product_attention`` as they are (unit
    stride along ch), so nothing is transposed before the kernel. This is the channels_last
    UNet's attention (:class:`~dkdm.models.unet.AttentionBlock`).
    """
    b, length, width = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = qkv.view(b, length, num_heads, 3, ch).unbind(3)
    else:
        q, k, v = qkv.view(b, length, 3, num_heads, ch).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, length, num_heads * ch)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sine-cosine positions ``[grid_size**2, embed_dim]`` (MAE / DiT layout).

    The first half of the channels encodes each token's column coordinate and the second
    half its row, in DiT's order (its meshgrid puts w first), so the ``pos_embed`` stored in
    DiT checkpoints equals a freshly built one.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for 2-D sin-cos positions")
    coords = np.arange(grid_size, dtype=np.float64)
    gw, gh = np.meshgrid(coords, coords)  # gw varies along columns

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
