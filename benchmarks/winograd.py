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
for the fastest whose deviation stays within ``--max_err`` (1e-5, the library's fp32 tolerance). The weight transform is done once outside the timing (as inference could cache it), which
favours Winograd.

    python benchmarks/winograd.py --out benchmarks/results/cpu-x86_64-2core_winograd.json
    python benchmarks/winograd.py --tiny     # seconds: the digits teacher, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dkdm.fileio import emit_json
from dkdm.models import create_model, get_config

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
WINOGRAD = {2: _F2, 4: _F4}


class Winograd3x3:
    """F(m x m, 3 x 3) for a stride-1, padding-1 3x3 convolution whose output sides are multiples of m."""

    def __init__(self, m: int, weight: torch.Tensor, bias: torch.Tensor | None):
        mats = {k: torch.tensor(v, dtype=torch.float64) for k, v in WINOGRAD[m].items()}
        self.m, self.a = m, m + 2
        self.kb = torch.kron(mats["BT"], mats["BT"]).to(weight.dtype)  # [a^2, a^2]
        self.ka = torch.kron(mats["AT"], mats["AT"]).to(weight.dtype)  # [m^2, a^2]
        kg = torch.kron(mats["G"], mats["G"])  # [a^2, 9]
        k, c = weight.shape[:2]
        u = kg @ weight.detach().double().reshape(k * c, 9).T  # transformed in float64, once
        self.u = u.reshape(self.a**2, k, c).transpose(1, 2).contiguous().to(weight.dtype)  # [a^2, C, K]
        self.bias = None if bias is None else bias.detach().view(1, k, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a = self.m, self.a
        if h % m or w % m:
            raise ValueError(f"F({m},3) needs output sides divisible by {m}, got {h}x{w}")
        th, tw = h // m, w // m
        xp = F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)  # [N, H+2, W+2, C] in memory
        hp, wp = h + 2, w + 2
        tiles = xp.as_strided((a, a, n, th, tw, c), (wp * c, c, hp * wp * c, m * wp * c, m * c, 1))
        p = n * th * tw
        v = (self.kb @ tiles.reshape(a * a, p * c)).view(a * a, p, c)
        prod = torch.bmm(v, self.u)  # [a^2, P, K]
        k = prod.shape[2]
        y = (self.ka @ prod.view(a * a, p * k)).view(m, m, n, th, tw, k)
        y = y.permute(2, 5, 3, 0, 4, 1).reshape(n, k, h, w)
        return y if self.bias is None else y + self.bias


def conv_shapes(model: torch.nn.Module, cfg, batch: int) -> dict[tuple[int, int, int, int, int], int]:
    """(N, C, K, H, W) of every stride-1 padding-1 3x3 convolution in one forward -> how many layers have it."""
    found: dict[tuple[int, int, int, int, int], int] = {}

    def hook(mod, inputs, _out):
        if mod.kernel_size == (3, 3) and mod.stride == (1, 1) and mod.padding == (1, 1) and mod.groups == 1:
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


def probe_shape(shape, rounds: int, repeats: int, seed: int = 0) -> dict:
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5
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
            "direct_max_abs_err_vs_float64": float((F.conv2d(x, weight, bias, padding=1).double() - ref).abs().max()),
        }
        fns = {"direct": lambda: F.conv2d(x, weight, bias, padding=1)}
        for m in WINOGRAD:
            if h % m == 0 and w % m == 0:
                wino = Winograd3x3(m, weight, bias)
                row[f"F{m}_max_abs_err_vs_float64"] = float((wino(x).double() - ref).abs().max())
                fns[f"F{m}"] = lambda wino=wino: wino(x)
        for fn in fns.values():  # warm-up
            fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):  # interleaved, so load changes hit every variant alike
            for name, fn in fns.items():
                times[name].append(_mean_time(fn, repeats))
    for name, ts in times.items():
        row[f"{name}_ms"] = round(1e3 * statistics.median(ts), 4)
    for name in fns:
        if name != "direct":
            row[f"{name}_speedup"] = round(row["direct_ms"] / row[f"{name}_ms"], 3)
    return row


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    cfg = get_config(a.model)
    model = create_model(cfg).eval()
    shapes = conv_shapes(model, cfg, a.batch)
    rows = []
    totals = {"direct": 0.0, "best": 0.0, "best_accurate": 0.0}
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][3]):
        row = probe_shape(shape, a.rounds, a.repeats)
        row["layers"] = count
        variants = [f"F{m}" for m in WINOGRAD if f"F{m}_ms" in row]
        accurate = [v for v in variants if row[f"{v}_max_abs_err_vs_float64"] <= a.max_err]
        totals["direct"] += count * row["direct_ms"]
        totals["best"] += count * min([row["direct_ms"]] + [row[f"{v}_ms"] for v in variants])
        totals["best_accurate"] += count * min([row["direct_ms"]] + [row[f"{v}_ms"] for v in accurate])
        rows.append(row)
    return {
        "benchmark": "winograd",
        "argv": a.argv,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": a.threads,
        "model": a.model,
        "batch": a.batch,
        "rounds": a.rounds,
        "shapes": rows,
        "max_err": a.max_err,
        "network_3x3_conv_ms_direct": round(totals["direct"], 3),
        "network_3x3_conv_ms_best_of_direct_and_winograd": round(totals["best"], 3),
        "network_3x3_conv_ms_best_within_max_err": round(totals["best_accurate"], 3),
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
        "--max_err", type=float, default=1e-5, help="a variant further than this from float64 does not count as usable"
    )
    p.add_argument("--tiny", action="store_true", help="the digits teacher, 2 rounds of 1 call (a test)")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.batch, a.rounds, a.repeats = "digits-teacher", 2, 2, 1
    a.argv = argv
    return a


def main(argv: list[str]) -> dict:
    a = parse(argv)
    out = run(a)
    emit_json(out, a.out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
