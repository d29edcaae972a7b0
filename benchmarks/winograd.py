"""Would Winograd convolutions written in torch ops beat oneDNN's direct 3x3 convolution here? Prints JSON.

Issue 15 asks for 1.3x over guided-diffusion, whose time is mostly the same oneDNN 3x3
convolutions ours call, already at this CPU's peak. The only lever left on them is doing fewer
multiplies: Winograd F(m x m, 3 x 3) computes an m x m output tile from an (m+2) x (m+2) input tile
with (m+2)^2 products per channel pair instead of 9 m^2 (F(2,3): 2.25x fewer, F(4,3): 4x). Torch
offers no Winograd kernel that runs here (its oneDNN convolutions use the direct algorithm, and
NNPACK refuses this CPU), so this probe builds it from torch ops, the only way the library could
use it:

    tiles (one strided gather) -> input transform (one GEMM with kron(B^T, B^T))
    -> (m+2)^2 independent [tiles, C] x [C, K] products (one torch.bmm)
    -> output transform (one GEMM with kron(A^T, A^T)) -> scatter back to [N, K, H, W]

For every distinct stride-1 3x3 convolution shape in a network's forward (``--model``, batch
``--batch``), it reports the direct convolution's time, each Winograd variant's time and both
one's largest deviation from a float64 convolution; then the network's 3x3 convolution time
summed over its layers (count x median) for the direct path, for the fastest variant per shape, and
for the fastest whose deviation stays within ``--max_err`` (1e-5, the library's fp32 tolerance) or
``--max_err_ratio`` (2) times the direct convolution's own. The weight transform is done once
outside the timing (as inference could cache it), which favours Winograd. Each probe cycles
through distinct layers of its shape whose transformed filters add up to ``--cold_weights_mb``
(64 MB, twice this CPU's L3), so each call reads its weights from memory as a network's layers do.
With one layer, whose [36, C, K] filter stayed in cache, the 14M's 4x4-pixel layers at batch 4
read 1.06-1.15x faster by Winograd; with the weights cold, 0.67-0.73x (the rule behind
``MIN_TILES``). ``--network_variant`` (F4p) then times the whole forward with every divisible
3x3 convolution routed through that variant (F4p: the library's ``use_winograd``, which leaves
layers under 16 channels, and calls under ``MIN_TILES`` tiles, direct; channels_last, as its output
is) against the direct convolutions in NCHW and channels_last, with each one's deviation from the
float64 network: the number that decides whether the library should offer it. The three
forwards run in an order that rotates round by round, and their speed-ups (over NCHW, and the
variant's over channels_last) are medians and [min, max] of the per-round ratios.

``--train_shapes`` times training's layer (forward + backward, N x C x K x side) by the direct
convolution in channels_last and by the library's training path (:class:`_WinogradGrad`, its
filter transform inside the timing, as each optimiser step pays it), with the gradients'
deviation from float64: by output tiles (N side^2 / 16), the rule behind ``MIN_TRAIN_TILES``.

    python benchmarks/winograd.py --out benchmarks/results/cpu-x86_64-2core_winograd.json
    python benchmarks/winograd.py --out benchmarks/results/cpu-epyc-avx2-2core_winograd.json
    python benchmarks/winograd.py --tiny     # seconds: the digits teacher, 2 rounds
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dkdm.fileio import emit_json
from dkdm.hostmem import describe_cpu
from dkdm.models import create_model, get_config
from dkdm.models.winograd import F4P, MIN_TRAIN_TILES, Winograd3x3, _WinogradGrad, use_winograd, winograd_eligible
from dkdm.training.compile import to_channels_last

# Winograd matrices (Lavin & Gray 2016) for the interpolation points 0, +-1, (+-2,) infinity.
_F2 = {
    "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    "G": [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
}
_F4 = {
    "BT": [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    "G": [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
}


# Lavin & Gray's F(2,3) and F(4,3) (points 0, +-1, (+-2,) infinity), and the library's F(4,3) at
# 0, +-1, 1/2, -2 (dkdm.models.winograd, F4P), whose transforms are better conditioned (Barabasz et
# al. 2020): within about 2x of the direct fp32 convolution's own error.
WINOGRAD = {"F2": _F2, "F4": _F4, "F4p": F4P}


def conv_shapes(model: torch.nn.Module, cfg, batch: int) -> dict[tuple[int, int, int, int, int], int]:
    """(N, C, K, H, W) of every stride-1 padding-1 3x3 convolution in one forward -> how many layers have it."""
    found: dict[tuple[int, int, int, int, int], int] = {}

    def hook(mod, inputs, _out):
        if winograd_eligible(mod):
            x = inputs[0]
            key = (x.shape[0], mod.in_channels, mod.out_channels, x.shape[2], x.shape[3])
            found[key] = found.get(key, 0) + 1

    handles = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, torch.nn.Conv2d)]
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.full((batch,), 10, dtype=torch.long)
    kwargs = {"y": torch.zeros(batch, dtype=torch.long)} if cfg.class_cond else {}
    with torch.inference_mode():
        model(x, t, **kwargs)
    for h in handles:
        h.remove()
    return found


def _mean_time(fn, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _each(fn, items) -> None:
    for item in items:  # each output freed before the next call, as in a network's forward
        fn(item)


def weight_copies(c: int, k: int, cold_weights_mb: float) -> int:
    """How many distinct layers of one shape a probe cycles through so that their Winograd filters
    ([36, C, K] fp32 each) add up to ``cold_weights_mb``: more than the last-level cache, so each
    call reads its weights from memory, as every layer of a network does (a 14M UNet's transformed
    filters are 171 MB at F(4,3)). 0: one layer, whose weights stay in cache between calls.

    Sized on the Winograd filter, so the direct path's own weights (9 C K each) add up to a
    quarter of that: 16 MB at the default, which may stay in a 32 MB L3. A check with both paths'
    weights at 64 MB (a throwaway run, 5 rounds) read the same verdicts: Winograd 0.73x direct
    channels_last at 4 tiles, 1.08-1.33x at 16."""
    if cold_weights_mb <= 0:
        return 1
    return max(1, min(MAX_WEIGHT_COPIES, math.ceil(cold_weights_mb * 2**20 / (36 * c * k * 4))))


MAX_WEIGHT_COPIES = 128


def probe_shape(shape, rounds: int, repeats: int, seed: int = 0, cold_weights_mb: float = 0.0) -> dict:
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    copies = weight_copies(c, k, cold_weights_mb)
    weights = [torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5 for _ in range(copies)]
    weight = weights[0]
    bias = torch.randn(k, generator=g)
    with torch.inference_mode():
        ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        row = {
            "N": n,
            "C": c,
            "K": k,
            "H": h,
            "W": w,
            "GFLOP": round(2 * n * h * w * c * k * 9 / 1e9, 4),
            "weight_copies": copies,
            "direct_max_abs_err_vs_float64": float((F.conv2d(x, weight, bias, padding=1).double() - ref).abs().max()),
        }
        xcl = x.contiguous(memory_format=torch.channels_last)
        wcls = [wt.contiguous(memory_format=torch.channels_last) for wt in weights]
        fns = {  # each call of a timed function is one pass over the copies, keeping no output
            "direct": lambda: _each(lambda wt: F.conv2d(x, wt, bias, padding=1), weights),
            "direct_channels_last": lambda: _each(lambda wt: F.conv2d(xcl, wt, bias, padding=1), wcls),
        }
        for name, mats in WINOGRAD.items():
            m = len(mats["AT"])
            if h % m == 0 and w % m == 0:
                winos = [Winograd3x3(wt, bias, mats) for wt in weights]
                row[f"{name}_max_abs_err_vs_float64"] = float((winos[0](x).double() - ref).abs().max())
                fns[name] = lambda winos=winos: _each(lambda wino: wino(xcl), winos)
        for fn in fns.values():  # warm-up
            fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):  # interleaved, so load changes hit every variant alike
            for name, fn in fns.items():
                times[name].append(_mean_time(fn, repeats) / copies)
    for name, ts in times.items():
        row[f"{name}_ms"] = round(1e3 * statistics.median(ts), 4)
    for name in fns:
        if name != "direct":
            row[f"{name}_speedup"] = round(row["direct_ms"] / row[f"{name}_ms"], 3)
    return row


def probe_train_shape(shape, rounds: int, repeats: int, seed: int = 0) -> dict:
    """One training layer, forward + backward: direct (channels_last) against :class:`_WinogradGrad`."""
    n, c, k, side = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(k, generator=g)
    dy = torch.randn(n, k, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]

    def direct():
        return torch.autograd.grad(F.conv2d(x, weight, bias, padding=1), leaves, dy)

    def winograd():  # the filter transform each call, as after every optimiser step
        return torch.autograd.grad(_WinogradGrad.apply(x, weight, bias, Winograd3x3(weight, bias)), leaves, dy)

    ref = [t.double().detach().requires_grad_() for t in leaves]
    want = torch.autograd.grad(F.conv2d(*ref, padding=1), ref, dy.double())

    def err(grads):  # each gradient's largest deviation relative to its largest entry
        return max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(grads, want))

    row = {
        "N": n,
        "C": c,
        "K": k,
        "side": side,
        "tiles": n * side * side // 16,
        "direct_grad_rel_err_vs_float64": err(direct()),
        "winograd_grad_rel_err_vs_float64": err(winograd()),
    }
    times = {"direct": [], "winograd": []}
    for r in range(rounds):  # the order alternates round by round
        for name in ("direct", "winograd") if r % 2 == 0 else ("winograd", "direct"):
            times[name].append(_mean_time(direct if name == "direct" else winograd, repeats))
    for name, ts in times.items():
        row[f"{name}_ms"] = round(1e3 * statistics.median(ts), 4)
    ratios = [d / w for d, w in zip(times["direct"], times["winograd"])]
    row["winograd_speedup"] = round(statistics.median(ratios), 3)
    row["winograd_speedup_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return row


def with_winograd(model: torch.nn.Module, variant: str) -> int:
    """Route every stride-1 padding-1 3x3 convolution of ``model`` (inference) through ``variant``; returns how many.

    F4p is the library's own switch (:func:`dkdm.models.winograd.use_winograd`, what ``sample.py
    --winograd`` runs). The other variants replace each layer's forward; layers whose input sides
    are not multiples of the tile fall back to ``F.conv2d`` per call.
    """
    if variant == "F4p":
        return use_winograd(model)
    mats = WINOGRAD[variant]
    m = len(mats["AT"])
    count = 0
    for mod in model.modules():
        if winograd_eligible(mod):
            wino = Winograd3x3(mod.weight, mod.bias, mats)

            def forward(x, mod=mod, wino=wino):
                if x.shape[2] % m or x.shape[3] % m:
                    return F.conv2d(x, mod.weight, mod.bias, padding=1)
                return wino(x)

            mod.forward = forward
            count += 1
    return count


def network_forward(model: torch.nn.Module, cfg, a: argparse.Namespace) -> dict:
    """The whole forward (batch ``a.batch``): direct NCHW, direct channels_last, and channels_last with Winograd.

    The freshly built model's zero-initialised output layers get seeded noise first (on a copy), so
    every convolution contributes to the output whose deviation from float64 is reported.
    """
    g = torch.Generator().manual_seed(1)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=g))
    x = torch.randn(a.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)
    kwargs = {"y": torch.zeros(a.batch, dtype=torch.long)} if cfg.class_cond else {}
    wino = to_channels_last(copy.deepcopy(model))
    layers = with_winograd(wino, a.network_variant)
    if not layers:  # a ViT: nothing to route
        return None
    channels_last = to_channels_last(copy.deepcopy(model))
    ref = copy.deepcopy(model).double()
    ref.dtype = torch.float64  # the UNet's compute dtype
    ref.time_embed.register_forward_pre_hook(lambda _mod, args: (args[0].double(),))  # its input is float32
    nets = {"direct": model, "direct_channels_last": channels_last, a.network_variant: wino}
    out = {"variant": a.network_variant, "winograd_layers": layers}
    with torch.inference_mode():
        want = ref(x.double(), t, **kwargs)
        for name, net in nets.items():
            out[f"{name}_max_abs_err_vs_float64"] = float((net(x, t, **kwargs).double() - want).abs().max())
        times = {name: [] for name in nets}
        names = list(nets)
        for r in range(a.rounds):  # the order rotates round by round: no network always goes first
            for name in names[r % len(names) :] + names[: r % len(names)]:
                net = nets[name]
                times[name].append(_mean_time(lambda net=net: net(x, t, **kwargs), max(1, a.repeats // 2)))
    for name, ts in times.items():
        out[f"{name}_ms"] = round(1e3 * statistics.median(ts), 2)
        out[f"{name}_ms_min_max"] = [round(1e3 * min(ts), 2), round(1e3 * max(ts), 2)]

    def ratios(num: str, den: str) -> tuple[float, list[float]]:  # per round: median, [min, max]
        rs = [n / d for n, d in zip(times[num], times[den])]
        return round(statistics.median(rs), 3), [round(min(rs), 3), round(max(rs), 3)]

    for name in names[1:]:
        out[f"{name}_speedup"], out[f"{name}_speedup_min_max"] = ratios("direct", name)
    key = f"{a.network_variant}_over_channels_last"
    out[f"{key}_speedup"], out[f"{key}_speedup_min_max"] = ratios("direct_channels_last", a.network_variant)
    return out


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    cfg = get_config(a.model)
    model = create_model(cfg).eval()
    shapes = conv_shapes(model, cfg, a.batch)
    rows = []
    totals = {"direct": 0.0, "best": 0.0, "best_accurate": 0.0}
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][3]):
        row = probe_shape(shape, a.rounds, a.repeats, cold_weights_mb=a.cold_weights_mb)
        row["layers"] = count
        variants = [v for v in WINOGRAD if f"{v}_ms" in row]
        limit = max(a.max_err, a.max_err_ratio * row["direct_max_abs_err_vs_float64"])
        accurate = [v for v in variants if row[f"{v}_max_abs_err_vs_float64"] <= limit]
        totals["direct"] += count * row["direct_ms"]
        totals["best"] += count * min([row["direct_ms"]] + [row[f"{v}_ms"] for v in variants])
        totals["best_accurate"] += count * min([row["direct_ms"]] + [row[f"{v}_ms"] for v in accurate])
        rows.append(row)
    return {
        "benchmark": "winograd",
        "argv": a.argv,
        "machine": platform.machine(),
        "cpu": describe_cpu(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": a.threads,
        "model": a.model,
        "batch": a.batch,
        "rounds": a.rounds,
        "cold_weights_mb": a.cold_weights_mb,
        "shapes": rows,
        "max_err": a.max_err,
        "max_err_ratio": a.max_err_ratio,
        "network_3x3_conv_ms_direct": round(totals["direct"], 3),
        "network_3x3_conv_ms_best_of_direct_and_winograd": round(totals["best"], 3),
        "network_3x3_conv_ms_best_within_max_err": round(totals["best_accurate"], 3),
        "network_forward": network_forward(model, cfg, a) if a.network_variant else None,
        "min_train_tiles": MIN_TRAIN_TILES,
        "train_shapes": [probe_train_shape(s, a.rounds, a.repeats) for s in a.train_shapes],
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar10-14M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5, help="calls per timed round")
    p.add_argument(
        "--cold_weights_mb",
        type=float,
        default=64.0,
        help="each shape's probe cycles through distinct layers whose Winograd filters add up to this "
        "(beyond the last-level cache, as in a network); 0: one layer, its weights warm in cache",
    )
    p.add_argument(
        "--max_err", type=float, default=1e-5, help="a variant further than this from float64 does not count as usable"
    )
    p.add_argument(
        "--max_err_ratio",
        type=float,
        default=2.0,
        help="... or no further than this many times the direct fp32 convolution's own deviation",
    )
    p.add_argument(
        "--network_variant",
        default="F4p",
        choices=["", *WINOGRAD],
        help="also time the whole forward with every divisible 3x3 convolution through it ('' skips)",
    )
    p.add_argument(
        "--train_shapes",
        default="4x64x64x32,4x128x128x16,4x128x128x8,16x128x128x8,4x256x256x16,16x256x256x8,4x256x256x8,"
        "64x256x256x4,16x256x256x4,4x256x256x4",
        help="training layers to time forward + backward, NxCxKxside, comma-separated ('' skips)",
    )
    p.add_argument("--tiny", action="store_true", help="the digits teacher, 2 rounds of 1 call (a test)")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.batch, a.rounds, a.repeats, a.train_shapes = "digits-teacher", 2, 2, 1, "2x16x16x8"
        a.cold_weights_mb = min(a.cold_weights_mb, 1.0)
    a.train_shapes = [tuple(int(v) for v in t.split("x")) for t in a.train_shapes.split(",") if t]
    a.argv = argv
    return a


def main(argv: list[str]) -> dict:
    a = parse(argv)
    out = run(a)
    emit_json(out, a.out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
