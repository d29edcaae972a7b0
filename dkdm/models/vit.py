"""A DiT-style vision transformer for diffusion (Peebles & Xie), any-architecture student.

Parameter names follow facebookresearch/DiT (``x_embedder.proj``, ``t_embedder.mlp``,
``y_embedder.embedding_table``, ``blocks.N.*``, ``final_layer.*``, the frozen
``pos_embed``) so DiT checkpoints load strictly. Unlike DiT, the label embedder exists
only for class-conditional models, so an unconditional ViT carries no unused table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    GUIDANCE_EMBED_SCALE,
    check_guidance,
    check_labels,
    drop_labels,
    get_2d_sincos_pos_embed,
    maybe_checkpoint,
    timestep_embedding,
)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches to tokens by a strided conv: [N, C, H, W] -> [N, T, D]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Raw timestep index -> 256-d sinusoid -> MLP -> hidden size (DiT's)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)  # float32, as DiT's
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; with ``dropout_prob`` > 0 an extra "null" row serves
    classifier-free guidance and labels are dropped to it at that rate in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            y = drop_labels(y, self.dropout_prob, self.num_classes)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout, as DiT uses)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two linear layers with tanh-approximated GELU between them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning regresses shift, scale and a
    zero-initialised gate for both the attention and the MLP branch."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class ViT(nn.Module):
    """DiT: patchify, add fixed sin-cos positions, adaLN-Zero blocks, unpatchify.

    ``forward(x, t, y=None)`` maps [N, C, H, W] to [N, C or 2C, H, W] (``learn_sigma``
    doubles the channels, the second half being the variance interpolation value).
    ``num_classes=None`` builds an unconditional model. ``class_dropout_prob`` > 0 adds the
    null class (label ``num_classes``); ``guidance_cond`` adds ``w_embedder``, an embedding of
    the guidance scale ``w`` added to the timestep embedding (Meng et al.), zero-initialised, and
    ``forward`` then takes ``w`` [N]. The defaults are DiT-S/2's transformer (hidden size 384,
    depth 12, 6 heads, patch 2, MLP ratio 4) on 32x32 RGB pixels.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.0,
        num_classes: int | None = None,
        learn_sigma: bool = True,
        use_checkpoint: bool = False,
        guidance_cond: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden size {hidden_size} must be divisible by 4 for 2-D sin-cos positions")
        self.image_size = image_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.grid = image_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes is not None:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.null_class = num_classes if num_classes is not None and class_dropout_prob > 0 else None
        self.guidance_cond = guidance_cond
        if guidance_cond:
            self.w_embedder = TimestepEmbedder(hidden_size)
        # A frozen parameter, not a buffer: DiT checkpoints store it under this name.
        pos = torch.tensor(get_2d_sincos_pos_embed(hidden_size, self.grid), dtype=torch.float32)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zeroed adaLN and output layers (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.guidance_cond:
            nn.init.normal_(self.w_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.w_embedder.mlp[2].weight)  # w starts with no effect
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (
            *self.final_layer.adaLN_modulation[-1].parameters(),
            *self.final_layer.linear.parameters(),
        ):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] tokens back to [N, C, H, W] images."""
        n, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from noisy ``x`` at raw timestep indices ``t`` (labels ``y`` when conditional,
        guidance scales ``w`` when w-conditioned)."""
        check_labels(y, self.num_classes)
        check_guidance(w, self.guidance_cond)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        if y is not None:
            c = c + self.y_embedder(y)
        if w is not None:
            c = c + self.w_embedder(w * GUIDANCE_EMBED_SCALE)
        for block in self.blocks:
            h = maybe_checkpoint(block, h, c, enabled=self.use_checkpoint)
        return self.unpatchify(self.final_layer(h, c)).to(x.dtype)
