"""The ADM UNet (Dhariwal & Nichol), with guided-diffusion's options and state-dict layout.

Every submodule name and index mirrors guided-diffusion's ``UNetModel`` so that its
checkpoints (and improved-diffusion's and DDPM-IP's, which share the layout) load with
``strict=True``, and so that our students load in their tools. Attention runs through
``scaled_dot_product_attention``; both of guided-diffusion's qkv channel orders are kept
because the order is baked into trained weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    GUIDANCE_EMBED_SCALE,
    avg_pool_nd,
    check_guidance,
    check_labels,
    conv_nd,
    drop_labels,
    maybe_checkpoint,
    normalization,
    qkv_attention,
    qkv_attention_tokens,
    timestep_embedding,
    upsample_nearest2x,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the timestep embedding to the children that take one.

    Subclassing ``nn.Sequential`` keeps the children's state-dict names numeric
    (``input_blocks.3.0``, ``input_blocks.3.1``), as in guided-diffusion.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two axes for 3-D), optionally followed by a conv."""

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest2x(x, self.dims)
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling by a strided conv (``use_conv``) or average pooling."""

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError(
                    f"pooling cannot change channels ({channels} -> {self.out_channels}); use conv_resample"
                )
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    With ``use_scale_shift_norm`` the embedding gives a FiLM scale and shift applied
    after the second norm; otherwise it is added before it. ``up`` / ``down`` resample
    both branches between the first norm and the first conv (BigGAN-style).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = (
                Upsample(channels, False, dims),
                Upsample(channels, False, dims),
            )
        elif down:
            self.h_upd, self.x_upd = (
                Downsample(channels, False, dims),
                Downsample(channels, False, dims),
            )
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            k = 3 if use_conv else 1
            self.skip_connection = conv_nd(dims, channels, self.out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out[(..., *([None] * (h.ndim - 2)))]  # unsqueeze, not reshape: torch-pruning traces it
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a zero-initialised output projection."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = channels // num_head_channels if num_head_channels != -1 else num_heads
        self.use_checkpoint = use_checkpoint
        self.legacy = not use_new_attention_order
        self.attention_impl = "auto"  # qkv_attention's impl; a plain attribute, for measurements
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        if self.attention_impl in ("auto", "sdpa") and x.dim() == 4 and _channels_last_only(x):
            return self._forward_tokens(x)
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy, self.attention_impl)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The block on a channels_last input, token-major: ``[B*T, C]`` is a view of it.

        The norm runs on the 4-D tensor (torch's channels_last kernel), the two 1x1 projections
        are matrix products over the tokens, and the result is channels_last again. Same maths
        and parameters as the channel-major path; on the AVX2 EPYC it made the 14M's channels_last
        forward at batch 4 1.04x faster (the 1x1 Conv1d over ``[B, C, T]`` views of a
        channels_last tensor ran at a third of the matmul's speed at the qkv shape).
        """
        b, c, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)
        qkv = F.linear(h, self.qkv.weight.flatten(1), self.qkv.bias)
        h = qkv_attention_tokens(qkv, self.num_heads, self.legacy)
        out = tokens + F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return out.view(b, height, width, c).permute(0, 3, 1, 2)


def _channels_last_only(x: torch.Tensor) -> bool:
    """True for a 4-D tensor stored channels_last that is not also contiguous in NCHW order."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def check_unet_args(
    image_size: int,
    model_channels: int,
    channel_mult: Sequence[float],
    attention_resolutions: Iterable[int],
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int,
    dims: int = 2,
    mid_block: str = "full",
) -> None:
    """Refuse hyperparameters the UNet cannot be built from, with the numbers involved.

    Checks that ``image_size`` survives ``len(channel_mult) - 1`` halvings, that every
    level's width fits 32-group normalisation, and that every attended level's width
    splits into the requested heads. Raises ``ValueError``.
    """
    levels = len(channel_mult)
    if levels == 0:
        raise ValueError("channel_mult is empty: give at least one level, e.g. 1,2,2,2")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, not {dims}")
    factor = 2 ** (levels - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"image size {image_size} cannot be halved {levels - 1} times "
            f"(channel_mult has {levels} levels, so it must be a multiple of {factor}); "
            f"use a shorter channel_mult or another image size"
        )
    if num_head_channels == -1 and num_heads <= 0:
        raise ValueError(f"num_heads must be positive when num_head_channels is -1, not {num_heads}")
    if num_head_channels != -1 and num_head_channels <= 0:
        raise ValueError(f"num_head_channels must be positive or -1, not {num_head_channels}")
    up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
    attention = set(attention_resolutions)
    widths = [int(model_channels * m) for m in channel_mult]
    for level, ch in enumerate(widths):
        if ch % 32:
            raise ValueError(
                f"level {level} has {ch} channels ({model_channels} x {channel_mult[level]}); "
                f"group normalisation needs a multiple of 32"
            )
        ds = 2**level
        checks = []
        if ds in attention or (level == levels - 1 and mid_block == "full"):  # the full middle block attends
            checks.append((num_heads, "num_heads"))
        if ds in attention:
            checks.append((up_heads, "num_heads_upsample"))
        for heads, where in checks:
            if num_head_channels != -1:
                if ch % num_head_channels:
                    raise ValueError(
                        f"attention at {ds}x downsampling has {ch} channels, "
                        f"not divisible by num_head_channels {num_head_channels}"
                    )
            elif ch % heads:
                raise ValueError(f"attention at {ds}x downsampling has {ch} channels, not divisible by {where} {heads}")


class UNetModel(nn.Module):
    """The ADM UNet with attention and timestep (and optional class) embedding.

    Arguments are guided-diffusion's: ``attention_resolutions`` holds downsampling
    *rates* (4 means attention where the feature map is 1/4 of the input), and
    ``num_head_channels`` (when not -1) overrides ``num_heads``. ``use_fp16`` is kept for
    compatibility; the torso switches precision only through ``convert_to_fp16()``, so a
    model built with it still runs in float32 until converted. ``forward(x, timesteps,
    y=None, w=None)`` returns ``out_channels`` channels.

    Two options beyond guided-diffusion's, both off by default (its state-dict layout is then
    unchanged): ``class_dropout_prob`` > 0 adds a null class (row ``num_classes`` of
    ``label_emb``) and drops training labels to it at that rate, for classifier-free guidance;
    ``guidance_cond`` adds ``guidance_embed``, an MLP of the guidance scale ``w`` whose output
    is added to the timestep embedding (Meng et al., stage one), zero-initialised.

    Two more exist for students cut from a teacher (:mod:`dkdm.models.compress`):
    ``level_res_blocks`` gives each level its own number of residual blocks on the way down
    (the way up always has one more, for the extra skip), and ``mid_block`` is ``"full"``
    (res, attention, res), ``"res"`` (no attention) or ``"none"`` (no middle block).
    The defaults build guided-diffusion's network.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        class_dropout_prob: float = 0.0,
        guidance_cond: bool = False,
        level_res_blocks: Sequence[int] | None = None,
        mid_block: str = "full",
    ):
        super().__init__()
        attention_resolutions = tuple(attention_resolutions)
        per_level = tuple(level_res_blocks) if level_res_blocks else (num_res_blocks,) * len(channel_mult)
        if len(per_level) != len(channel_mult) or min(per_level, default=1) < 1:
            raise ValueError(
                f"level_res_blocks {list(per_level)} must give at least one residual block for each of the "
                f"{len(channel_mult)} levels of channel_mult"
            )
        if mid_block not in ("full", "res", "none"):
            raise ValueError(f"mid_block must be full, res or none, not {mid_block!r}")
        check_unet_args(
            image_size,
            model_channels,
            channel_mult,
            attention_resolutions,
            num_heads,
            num_head_channels,
            num_heads_upsample,
            dims,
            mid_block,
        )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.level_res_blocks = per_level
        self.mid_block = mid_block
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_dropout_prob = class_dropout_prob
        self.null_class = num_classes if num_classes is not None and class_dropout_prob > 0 else None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(self.null_class is not None), emb_dim)
        self.guidance_cond = guidance_cond
        if guidance_cond:
            self.guidance_embed = nn.Sequential(
                nn.Linear(model_channels, emb_dim), nn.SiLU(), zero_module(nn.Linear(emb_dim, emb_dim))
            )

        def res(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(
                ch_in,
                emb_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        ch = int(channel_mult[0] * model_channels)
        first_ch = ch
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(per_level[level]):
                width = int(mult * model_channels)
                layers: list = [res(ch, width)]
                ch = width
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        middle = {"full": lambda: [res(ch), attn(ch, num_heads), res(ch)], "res": lambda: [res(ch), res(ch)]}
        self.middle_block = TimestepEmbedSequential(*middle.get(mid_block, list)())

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(per_level[level] + 1):
                width = int(mult * model_channels)
                layers = [res(ch + skip_chans.pop(), width)]
                ch = width
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == per_level[level]:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, first_ch, out_channels, 3, padding=1)),
        )

    def _torso(self) -> list:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def convert_to_fp16(self) -> None:
        """Cast the torso's convolutions to float16 (norms, embeddings and ``out`` stay float32).

        As guided-diffusion's: the mixed-precision recipe keeps float32 master weights
        elsewhere; GroupNorm still computes in float32.
        """
        self._convert(torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo ``convert_to_fp16``."""
        self._convert(torch.float32)

    def _convert(self, dtype: torch.dtype) -> None:
        for part in self._torso():
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    m.weight.data = m.weight.data.to(dtype)
                    if m.bias is not None:
                        m.bias.data = m.bias.data.to(dtype)
        self.dtype = dtype

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from noisy ``x`` [N, C, ...] at integer (or fractional) ``timesteps`` [N].

        ``y`` [N] are class labels, required exactly when the model is class-conditional
        (``num_classes`` is the null label when the model has one); ``w`` [N] guidance scales,
        required exactly when it is w-conditioned. The output has ``x``'s dtype even inside an
        autocast region.
        """
        check_labels(y, self.num_classes)
        check_guidance(w, self.guidance_cond)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            if self.training and self.null_class is not None:
                y = drop_labels(y, self.class_dropout_prob, self.null_class)
            emb = emb + self.label_emb(y)
        if w is not None:
            emb = emb + self.guidance_embed(timestep_embedding(w * GUIDANCE_EMBED_SCALE, self.model_channels))
        skips = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype)).to(x.dtype)
