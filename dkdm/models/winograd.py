"""Winograd F(4x4, 3x3) for the 3x3 convolutions of CPU fp32 networks: sampling (``sample.py
--winograd``), a distillation's teacher (``--teacher_winograd``) and training (the training
scripts' ``--winograd``, forward and backward).

A stride-1, padding-1 3x3 convolution computed on 6x6 input tiles: each tile and each filter is
carried into the transform space (B^T d B, G g G^T), multiplied there channel by channel (36
batched products, 2.25x fewer multiply-adds than the direct convolution), and brought back to a
4x4 output tile (A^T m A). The interpolation points are 0, +-1, 1/2, -2 (and infinity), whose
transforms are better conditioned than Lavin & Gray's 0, +-1, +-2 (the choice follows Barabasz
et al. 2020 on Winograd accuracy); the matrices are built here in float64 by :func:`cook_toom`.
Training uses the exact adjoint of the same transforms (:class:`_WinogradGrad`): the weight and
input gradients are two more batched products of the same size.

Measured (``benchmarks/winograd.py``, ``benchmarks/vs_guided_diffusion.py``,
benchmarks/results/README.md), one thread, on the 2-core AVX2 EPYC: the 14M UNet's forward at
batch 4 1.1-1.25x faster than the direct convolutions in channels_last, its output 3.9e-6 from
the float64 network (direct: 1.8e-6); its sampling loops and its training step faster than
guided-diffusion's by the ratios in that README. On the AVX-512 EPYC, whose oneDNN direct kernels
run 2.5x faster than MKL's ``bmm``, the 3x3 layers were no faster, and on a Zen 4 EPYC the 14M's
forward 1.02x (its 32x32 layers 0.79-1.02x, the smaller ones up to 1.32x), so it is a switch, off
by default. A layer takes the Winograd path when the input is fp32 on a CPU outside autocast and
compilation, its sides are multiples of 4 and the call has :data:`MIN_TILES` output tiles; with
autograd on, only if it was switched for training and the call has :data:`MIN_TRAIN_TILES`;
otherwise the layer's own forward. The filter transform is done once per weight version, in
float64, and redone whenever the weight changes in place (the trainers' fused AdamW advances the version counters itself:
dkdm.training.trainer.make_adamw); weights made under ``inference_mode``, which keep no version
counter, take the layer's own forward. A write the version counter does not see (through
``.data``, or another fused optimiser's step) is not seen by the cache either: after one, call
``torch.autograd.graph.increment_version`` on the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dkdm.config import ConfigError

POINTS = (0.0, 1.0, -1.0, 0.5, -2.0)  # with infinity: F(4, 3)'s six points
TILE = 4


def cook_toom(points: list[float] | tuple[float, ...], m: int, r: int = 3) -> dict[str, torch.Tensor]:
    """Winograd matrices for F(m, r) at the given finite interpolation points and infinity, in float64.

    A^T[i, j] = p_j^i and G[j, k] = p_j^k / prod_{l != j}(p_j - p_l) (Lavin & Gray's construction,
    the fractions in G, which is applied to the weights once); B^T is then the unique matrix with
    sum_j A^T[i, j] G[j, k] B^T[j, l] = [l == i + k], solved for and checked exact.
    """
    n = m + r - 1
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m},{r}) needs {n - 1} distinct finite points, got {list(points)}")
    p = torch.tensor(points, dtype=torch.float64)
    at = torch.zeros(m, n, dtype=torch.float64)
    g = torch.zeros(n, r, dtype=torch.float64)
    for j in range(n - 1):
        f = torch.prod(p[j] - torch.cat([p[:j], p[j + 1 :]]))
        at[:, j] = p[j] ** torch.arange(m, dtype=torch.float64)
        g[j] = p[j] ** torch.arange(r, dtype=torch.float64) / f
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    lhs = torch.stack([at[i] * g[:, k] for i in range(m) for k in range(r)])  # [m r, n]
    rhs = torch.zeros(m * r, n, dtype=torch.float64)
    for i in range(m):
        for k in range(r):
            rhs[i * r + k, i + k] = 1.0
    bt = torch.linalg.lstsq(lhs, rhs).solution
    if (lhs @ bt - rhs).abs().max() > 1e-10:
        raise ValueError(f"no exact F({m},{r}) for points {list(points)}")
    bt = torch.where(bt.abs() < 1e-12, torch.zeros_like(bt), bt)
    return {"BT": bt, "G": g, "AT": at}


class Winograd3x3:
    """A stride-1, padding-1 3x3 convolution by Winograd F(m x m, 3x3) (``mats``: F4p by default),
    for inputs whose sides are multiples of m.

    The result is written channels_last (the layout its output transform produces without a
    transposing copy); its values do not depend on the input's memory format. The filter
    transform is done here, once, in float64; :class:`_WinogradGrad` reuses it for training.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mats: dict | None = None):
        mats = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in (mats or F4P).items()}
        self.m = mats["AT"].shape[0]
        self.a = self.m + 2
        self.kb = torch.kron(mats["BT"], mats["BT"]).to(weight.dtype)  # [a^2, a^2]
        self.ka = torch.kron(mats["AT"], mats["AT"]).to(weight.dtype)  # [m^2, a^2]
        kg = torch.kron(mats["G"], mats["G"])  # [a^2, 9]
        self.kg_t = kg.T.contiguous().to(weight.dtype)  # [9, a^2]: the weight gradient's way back
        k, c = weight.shape[:2]
        w = weight.detach().double().permute(2, 3, 1, 0).reshape(9, c * k)
        self.u = (kg @ w).view(self.a**2, c, k).to(weight.dtype)  # [a^2, C, K], transformed in float64
        self.bias = None if bias is None else bias.detach()

    def tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The input's overlapping a x a tiles carried into the transform space: ``[a^2, P, C]``."""
        n, c, h, w = x.shape
        m, a = self.m, self.a
        if h % m or w % m:
            raise ValueError(f"F({m},3) needs output sides divisible by {m}, got {h}x{w}")
        th, tw = h // m, w // m
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [N, H+2, W+2, C], contiguous
        hp, wp = h + 2, w + 2
        tiles = xp.as_strided((a, a, n, th, tw, c), (wp * c, c, hp * wp * c, m * wp * c, m * c, 1))
        p = n * th * tw
        return (self.kb @ tiles.reshape(a * a, p * c)).view(a * a, p, c), (n, c, h, w)

    def untile(self, prod: torch.Tensor, dims: tuple[int, ...], bias: torch.Tensor | None) -> torch.Tensor:
        """The products ``[a^2, P, K]`` brought back to the output ``[N, K, H, W]`` (channels_last)."""
        n, _, h, w = dims
        m, a = self.m, self.a
        p, k = prod.shape[1:]
        y = (self.ka @ prod.view(a * a, p * k)).view(m, m, n, h // m, w // m, k).permute(2, 3, 0, 4, 1, 5)
        if bias is not None:
            y = y + bias
        return y.reshape(n, h, w, k).permute(0, 3, 1, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v, dims = self.tiles(x)
        return self.untile(torch.bmm(v, self.u), dims, self.bias)


class _WinogradGrad(torch.autograd.Function):
    """:class:`Winograd3x3` with its exact adjoint as the backward, for training (``--winograd``).

    Forward as in inference, keeping the transformed tiles V ``[a^2, P, C]``. With dY's 4x4 tiles
    carried back through A (dM = A dY A^T per tile, ``[a^2, P, K]``), the weight gradient is
    G^T (V^T dM) G, summed over tiles by one batched product, and the input gradient is
    B (dM U^T) B^T, whose overlapping tiles are added back into place: the same 2.25x fewer
    multiply-adds as the forward, against the direct convolution's two backward products.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan: Winograd3x3):
        v, dims = plan.tiles(x)
        ctx.save_for_backward(v)
        ctx.plan, ctx.dims, ctx.has_bias = plan, dims, bias is not None
        return plan.untile(torch.bmm(v, plan.u), dims, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (v,) = ctx.saved_tensors
        plan = ctx.plan
        n, c, h, w = ctx.dims
        m, a = plan.m, plan.a
        th, tw, k = h // m, w // m, dy.shape[1]
        p = n * th * tw
        dyt = dy.permute(0, 2, 3, 1).reshape(n, th, m, tw, m, k).permute(2, 4, 0, 1, 3, 5).reshape(m * m, p * k)
        dprod = (plan.ka.T @ dyt).view(a * a, p, k)
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            du = torch.bmm(v.transpose(1, 2), dprod)  # [a^2, C, K]
            gw = (plan.kg_t @ du.view(a * a, c * k)).view(3, 3, c, k).permute(3, 2, 0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = dy.sum((0, 2, 3))
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(dprod, plan.u.transpose(1, 2))  # [a^2, P, C]
            dt = (plan.kb.T @ dv.view(a * a, p * c)).view(a, a, n, th, tw, c)
            # Tile (i, j) covers padded rows m i .. m i + a - 1: its first m rows and columns are its
            # own block, the last a - m spill into the next block's first rows or columns.
            acc = dt.new_zeros(n, th + 1, m, tw + 1, m, c)
            o = a - m
            acc[:, :th, :, :tw] += dt[:m, :m].permute(2, 3, 0, 4, 1, 5)
            acc[:, 1:, :o, :tw] += dt[m:, :m].permute(2, 3, 0, 4, 1, 5)
            acc[:, :th, :, 1:, :o] += dt[:m, m:].permute(2, 3, 0, 4, 1, 5)
            acc[:, 1:, :o, 1:, :o] += dt[m:, m:].permute(2, 3, 0, 4, 1, 5)
            gx = acc.view(n, (th + 1) * m, (tw + 1) * m, c)[:, 1 : h + 1, 1 : w + 1].permute(0, 3, 1, 2)
        return gx, gw, gb, None


F4P = cook_toom(POINTS, TILE)


def winograd_eligible(mod: torch.nn.Module) -> bool:
    """A plain stride-1, padding-1 (zeros) 3x3 convolution: what :class:`Winograd3x3` computes."""
    return (
        isinstance(mod, torch.nn.Conv2d)
        and mod.kernel_size == (3, 3)
        and mod.stride == (1, 1)
        and mod.padding == (1, 1)
        and mod.dilation == (1, 1)
        and mod.groups == 1
        and mod.padding_mode == "zeros"
    )


class _WinogradConv:
    """Mixin placed in front of an eligible convolution's class by :func:`use_winograd`."""

    def _winograd_applies(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.dim() == 4
            and x.shape[2] % TILE == 0
            and x.shape[3] % TILE == 0
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            # Parameters made under inference_mode keep no version counter, so a change in place
            # could not be seen: such a layer keeps its own forward.
            and not self.weight.is_inference()
            and (self.bias is None or not self.bias.is_inference())
        )

    def _winograd(self) -> Winograd3x3:
        key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.bias) if t is not None)
        if getattr(self, "_winograd_key", None) != key:  # a new or changed weight: transform it again
            self._winograd_cache = Winograd3x3(self.weight, self.bias)
            self._winograd_key = key
        return self._winograd_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._winograd_applies(x):
            tiles = x.shape[0] * x.shape[2] * x.shape[3] // TILE**2
            if not torch.is_grad_enabled():
                if tiles >= MIN_TILES:
                    return self._winograd()(x)
            elif getattr(self, "_winograd_train", False) and tiles >= MIN_TRAIN_TILES:
                return _WinogradGrad.apply(x, self.weight, self.bias, self._winograd())
        return super().forward(x)


def check_winograd_run(flag: str, device_type: str, compiled: bool) -> None:
    """Refuse ``flag`` (``--winograd``, ``--teacher_winograd``) where the network would never take
    the Winograd path, so a run's record never names numerics it did not use: off the CPU (other
    devices' libraries choose their own algorithms) or compiled. (fp16/bf16 are refused by the
    configs.)"""
    if device_type != "cpu" or compiled:
        where = device_type + (" compiled" if compiled else "")
        raise ConfigError(
            f"{flag} replaces the eager CPU fp32 network's 3x3 convolutions, but this run's network runs on "
            f"{where}: drop {flag}, or run on the CPU (DKDM_DEVICE=cpu) without --compile"
        )


_CLASSES: dict[type, type] = {}


MIN_CHANNELS = 16
# Training: a layer call with fewer 4x4 output tiles (N H W / 16) than this keeps the direct
# convolution. Below it the weight-sized work (the filter transform each step, the [36, C, K]
# weight gradient in the transform space: 4x the weight) outweighs the products saved. One thread
# on the AVX2 EPYC, forward + backward against direct channels_last (benchmarks/winograd.py
# --train_shapes, cpu-epyc-avx2-2core_winograd_train.json): 1.25-1.79x at 64-256 tiles,
# 0.69-1.02x at 16, 0.41x at 4.
MIN_TRAIN_TILES = 64
# Inference: a call with fewer output tiles than this keeps the direct convolution. Its transformed
# filter is 4x the weight ([36, C, K]), read from memory by each call (a network's filters do not
# stay in cache: the 14M's are 171 MB), and at a few tiles that read is the layer's time. One thread
# on the AVX2 EPYC, cycling through enough layers that their weights come from memory
# (benchmarks/winograd.py, cpu-epyc-avx2-2core_winograd.json), against direct channels_last:
# 0.67-0.73x at 4 tiles, 1.20-1.32x at 16.
MIN_TILES = 16


def use_winograd(model: torch.nn.Module, min_channels: int = MIN_CHANNELS, train: bool = False) -> int:
    """Route every eligible 3x3 convolution of ``model`` with at least ``min_channels`` input and
    output channels through Winograd F(4x4,3x3) when it applies (module docstring); returns how
    many layers. A UNet's first and last convolutions (3 in, 6 out) are left direct: there the
    transforms cost more than the products they save (0.48-0.57x, benchmarks/winograd.py) and
    the input layer's error was 4.7x the direct one's. With ``train`` (``--winograd`` of the
    training scripts) the layers also take it with autograd on, forward and backward
    (:class:`_WinogradGrad`), where a call has at least :data:`MIN_TRAIN_TILES` output tiles;
    without it, autograd keeps the layers' own forward. Parameters and state-dict keys are
    unchanged; the switch is idempotent."""
    count = 0
    for mod in model.modules():
        if winograd_eligible(mod) and min(mod.in_channels, mod.out_channels) >= min_channels:
            cls = type(mod)
            if not issubclass(cls, _WinogradConv):
                if cls not in _CLASSES:
                    _CLASSES[cls] = type(f"Winograd{cls.__name__}", (_WinogradConv, cls), {})
                mod.__class__ = _CLASSES[cls]
            if train:
                mod._winograd_train = True
            count += 1
    return count
