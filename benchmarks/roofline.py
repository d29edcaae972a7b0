"""How close the networks and the DKDM step come to this machine's peak; prints (and writes) one JSON object.

* ``peak``: fp32 matmul (n x n) and a large 3x3 convolution, GFLOP/s per thread count.
* ``flops``: FLOPs per image (``torch.utils.flop_counter``) of the zoo's UNets and ViTs at their
  own resolutions, forward and forward + backward, counted on the ``meta`` device (no compute).
* ``achieved``: per thread count, the teacher forward (inference), the student forward +
  backward, a whole DKDM step (``Trainer.run_step`` on ``DistillLoop``: draw, teacher, pool
  update, objective, backward, AdamW, EMA) and one ancestral sampling step, each as GFLOP/s and
  as a fraction of the matmul peak and of the best peak probe (matmul or convolution, whichever
  ran faster) measured in the same round.
* ``switches``: the teacher forward with ``channels_last``, ``no_grad`` vs ``inference_mode``,
  with guided-diffusion's two-matmul attention instead of the library's SDPA (``attention_bmm``)
  and with the 1x1 convolutions left to torch's kernel choice instead of oneDNN
  (``pointwise_torch``) and with its 3x3 convolutions by Winograd F(4x4,3x3) (``winograd``,
  ``--teacher_winograd``); the student's forward + backward with the attention and 1x1
  switches; each as the speed-up over the library's own call (< 1: the library's choice is
  faster), timed as a pair with it in every round, the order alternating. ``teacher_fwd_copy``
  is the control, an unchanged copy of the teacher timed the same way: how far it reads from 1
  is what a pair's ratio means on the machine of the run. Also SDPA vs a batched-matmul
  attention alone at the teacher's attention shapes (same outputs to 1e-5), outside the network.
* ``profile``: where the teacher forward and the student step spend their time (profiler self
  time by category: conv, attention, matmul, norm, elementwise, copy/layout).

Every timed thing runs once per round, for ``--rounds`` rounds; medians and [min, max] are
reported, and fractions/ratios are taken within a round (a switch's within its pair), so a change
of load from other processes hits both sides alike.

    python benchmarks/roofline.py --out benchmarks/results/cpu-x86_64-2core_roofline.json
    python benchmarks/roofline.py --tiny            # seconds: the digits pair, small peak sizes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dkdm import logger
from dkdm.config import DistillConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.fileio import emit_json
from dkdm.hostmem import describe_cpu
from dkdm.models import create_model, get_config
from dkdm.models.winograd import use_winograd, winograd_eligible

ZOO_FOR_FLOPS = [
    "cifar10-57M",
    "cifar10-44M",
    "cifar10-32M",
    "cifar10-24M",
    "cifar10-14M",
    "cifar10-vit-19M",
    "celeba64-295M",
    "celeba64-57M",
    "dit-s2-256",
    "dit-b2-256",
    "dit-xl2-256",
    "digits-teacher",
    "digits-student",
    "digits-vit",
]
CATEGORIES = {
    "conv": ("conv",),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "bmm", "baddbmm", "softmax"),
    "matmul": ("addmm", "aten::mm", "matmul", "linear"),
    "norm": ("group_norm", "layer_norm", "batch_norm"),
    "copy/layout": ("copy_", "contiguous", "clone", "_to_copy", "cat", "empty_like", "as_strided"),
}


# --------------------------------------------------------------------------- FLOPs


def _inputs(cfg, batch: int, device: str = "cpu"):
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    kw = {"y": torch.randint(0, cfg.num_classes, (batch,), device=device)} if cfg.class_cond else {}
    return x, t, kw


def _cpu_flash(query, key, value, *args, out_val=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    # The model's backward (four matmuls, twice the forward), as counted on meta; the flash kernel's
    # recomputation of the scores is the kernel's cost, not the network's.
    return 2 * flop_counter.sdpa_flop_count(query, key, value)


# torch's flop counter has no formula for the CPU flash-attention kernels, so a real CPU run counts
# no attention FLOPs at all (on the meta device SDPA decomposes into counted bmm's): add them.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_flops(model: torch.nn.Module, cfg, batch: int = 1, backward: bool = False, device: str = "cpu") -> int:
    """FLOPs of one forward (and backward when ``backward``) on ``batch`` images."""
    x, t, kw = _inputs(cfg, batch, device)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        if backward:
            model(x, t, **kw).square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t, **kw)
    return int(counter.get_total_flops())


def zoo_flops(names: list[str], meta_above: float = 5e6) -> dict:
    """Per-image forward and forward+backward FLOPs of zoo models.

    Models over ``meta_above`` parameters are counted on the meta device (shapes only, no
    compute); smaller ones run for real, which is quicker than the meta kernels.
    """
    out = {}
    for name in names:
        cfg = get_config(name)
        with torch.device("meta"):
            model = create_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        device = "meta" if params > meta_above else "cpu"
        if device == "cpu":
            model = create_model(cfg)
        fwd = count_flops(model, cfg, device=device)
        fb = count_flops(model, cfg, backward=True, device=device)
        out[name] = {
            "arch": cfg.arch,
            "image_size": cfg.image_size,
            "in_channels": cfg.in_channels,
            "params_M": round(params / 1e6, 3),
            "counted_on": device,
            "fwd_GFLOP_per_image": round(fwd / 1e9, 4),
            "fwd_bwd_GFLOP_per_image": round(fb / 1e9, 4),
        }
    return out


# --------------------------------------------------------------------------- timing


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(values: list[float], digits: int = 4) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def time_switch_pairs(
    switches: dict[str, tuple[Callable[[], object], Callable[[], object]]], round_index: int, clock=_time
) -> dict[str, float]:
    """One round of the switches: each (library call, variant) pair timed back to back, the one
    first in even positions (round + switch index) the other first in odd ones; returns each
    switch's library time over its variant's time (> 1: the variant is faster)."""
    out = {}
    for i, (name, (base, variant)) in enumerate(switches.items()):
        if (round_index + i) % 2:
            t_variant, t_base = clock(variant), clock(base)
        else:
            t_base, t_variant = clock(base), clock(variant)
        out[name] = t_base / t_variant
    return out


def peak_kernels(n: int, conv_batch: int, conv_channels: int, conv_size: int) -> dict[str, tuple[Callable, int]]:
    """The peak probes: name -> (callable, FLOPs per call)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    conv = torch.nn.Conv2d(conv_channels, conv_channels, 3, padding=1).requires_grad_(False)
    x = torch.randn(conv_batch, conv_channels, conv_size, conv_size)
    conv_cl = torch.nn.Conv2d(conv_channels, conv_channels, 3, padding=1).requires_grad_(False)
    conv_cl = conv_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    conv_flops = 2 * conv_batch * conv_channels * conv_size * conv_size * conv_channels * 9
    return {
        "matmul_fp32": (lambda: torch.mm(a, b), 2 * n**3),
        "conv3x3_fp32": (lambda: conv(x), conv_flops),
        "conv3x3_fp32_channels_last": (lambda: conv_cl(x_cl), conv_flops),
    }


def _attention_bmm(m: torch.nn.Module) -> None:
    if hasattr(m, "attention_impl"):
        m.attention_impl = "bmm"


def _winograd(m: torch.nn.Module) -> None:
    if winograd_eligible(m):
        use_winograd(m)


def _winograd_train(m: torch.nn.Module) -> None:
    if winograd_eligible(m):
        use_winograd(m, train=True)


def _pointwise_torch(m: torch.nn.Module) -> None:
    if hasattr(m, "onednn_pointwise"):
        m.onednn_pointwise = False


class Workload:
    """The teacher, the student, their DKDM loop and one diffusion, built once per run."""

    def __init__(
        self, teacher: str, student: str, batch: int, steps: int, run_dir: str, winograd: bool = False
    ) -> None:
        torch.manual_seed(0)
        self.tcfg, self.scfg = get_config(teacher), get_config(student)
        self.teacher, self.student = create_model(self.tcfg), create_model(self.scfg)
        with torch.no_grad():  # output layers start at zero: give both networks something to say,
            for net in (self.teacher, self.student):  # or a switch's deviation reads 0 whatever it does
                for p in net.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        self.batch = batch
        self.diffusion = create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=self.tcfg.learn_sigma)
        logger.configure(run_dir, format_strs=["log"])
        # winograd: the loop as --teacher_winograd --winograd builds it (the teacher's and the student's
        # 3x3 convolutions by Winograd F(4x4,3x3), the student's forward and backward)
        train = TrainConfig(
            batch_size=batch, lr=1e-4, ema_rate="0.9999", log_interval=0, save_interval=0, winograd=winograd
        )
        distill = DistillConfig(rho=2.0 / steps, teacher_batch=batch, pool_cache_dir="", teacher_winograd=winograd)
        self.loop = DistillLoop(
            self.teacher, self.student, self.diffusion, self.diffusion, train=train, distill=distill, run_dir=run_dir
        )
        self.loop.pool.prepared = True  # the pool's contents do not change the step's cost
        self.x, self.t, self.kw = _inputs(self.tcfg, batch)
        self.t = self.t % steps
        self.teacher_cl = None
        self.variants: dict[str, torch.nn.Module] = {}
        self.variant_diff: dict[str, float] = {}

    def flops(self) -> dict[str, int]:
        tf = count_flops(self.teacher, self.tcfg, self.batch)
        sfb = count_flops(self.student, self.scfg, self.batch, backward=True)
        self.student.zero_grad(set_to_none=True)
        return {"teacher_fwd": tf, "student_fwd_bwd": sfb, "dkdm_step": tf + sfb, "sampling_step": tf}

    def teacher_fwd(self) -> None:
        with torch.inference_mode():
            self.teacher(self.x, self.t, **self.kw)

    def teacher_fwd_no_grad(self) -> None:
        with torch.no_grad():
            self.teacher(self.x, self.t, **self.kw)

    def teacher_fwd_channels_last(self) -> None:
        if self.teacher_cl is None:
            self.teacher_cl = create_model(self.tcfg)
            self.teacher_cl.load_state_dict(self.teacher.state_dict())
            self.teacher_cl.to(memory_format=torch.channels_last)
            self.x_cl = self.x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            self.teacher_cl(self.x_cl, self.t, **self.kw)

    def _variant(self, name: str, role: str, change: Callable[[torch.nn.Module], None] | None) -> torch.nn.Module:
        """A copy of the teacher or the student (``role``) with ``change`` applied to every module
        (None: an unchanged copy, the control); its deviation from the original, both in eval mode
        so dropout draws nothing, goes into ``variant_diff``."""
        key = f"{role}_{name}"
        if key not in self.variants:
            base, cfg = (self.teacher, self.tcfg) if role == "teacher" else (self.student, self.scfg)
            model = create_model(cfg)
            model.load_state_dict(base.state_dict())
            for m in model.modules() if change is not None else ():
                change(m)
            training = base.training
            base.eval(), model.eval()
            with torch.inference_mode():  # the switch changes the kernels, not the function
                ref, out = base(self.x, self.t, **self.kw), model(self.x, self.t, **self.kw)
            base.train(training), model.train(training)
            self.variants[key] = model
            self.variant_diff[key] = float((ref - out).abs().max())
        return self.variants[key]

    def _teacher_variant_fwd(self, name: str, change) -> None:
        model = self._variant(name, "teacher", change)  # built outside inference mode, as a run builds it
        with torch.inference_mode():
            model(self.x, self.t, **self.kw)

    def _fwd_bwd(self, model: torch.nn.Module) -> None:
        model(self.x, self.t, **self.kw).square().mean().backward()
        model.zero_grad(set_to_none=True)

    def _student_variant_fwd_bwd(self, name: str, change) -> None:
        self._fwd_bwd(self._variant(name, "student", change))

    def student_fwd_bwd_winograd(self) -> None:
        """The student with its 3x3 convolutions by Winograd F(4x4,3x3), forward and backward
        (``--winograd``). Its weights are marked changed first, as an optimiser step marks them,
        so each call pays the filter transforms a training step pays."""
        model = self._variant("winograd", "student", _winograd_train)
        torch.autograd.graph.increment_version(list(model.parameters()))
        self._fwd_bwd(model)

    def teacher_fwd_copy(self) -> None:
        """The control: an unchanged copy of the teacher, timed as a switch is."""
        self._teacher_variant_fwd("copy", None)

    def teacher_fwd_attention_bmm(self) -> None:
        """The teacher with guided-diffusion's two-matmul attention instead of SDPA."""
        self._teacher_variant_fwd("bmm", _attention_bmm)

    def teacher_fwd_pointwise_torch(self) -> None:
        """The teacher with its 1x1 convolutions left to torch's choice of kernel."""
        self._teacher_variant_fwd("pw", _pointwise_torch)

    def teacher_fwd_winograd(self) -> None:
        """The teacher with its 3x3 convolutions by Winograd F(4x4,3x3) (``--teacher_winograd``)."""
        self._teacher_variant_fwd("winograd", _winograd)

    def student_fwd_bwd_attention_bmm(self) -> None:
        self._student_variant_fwd_bwd("bmm", _attention_bmm)

    def student_fwd_bwd_pointwise_torch(self) -> None:
        self._student_variant_fwd_bwd("pw", _pointwise_torch)

    def student_fwd_bwd(self) -> None:
        self._fwd_bwd(self.student)

    def dkdm_step(self) -> None:
        self.loop.trainer.run_step(self.loop.next_batch, self.loop.loss_fn)

    def sampling_step(self) -> None:
        with torch.inference_mode():
            self.diffusion.p_sample(self.teacher, self.x, self.t, clip_denoised=True)


def attention_shapes(cfg, batch: int) -> list[tuple[int, int, int]]:
    """(batch*heads, tokens, head channels) of each attention resolution of a UNet config."""
    if cfg.arch != "unet":
        return []
    mult = [int(m) for m in str(cfg.channel_mult).split(",")]
    shapes = []
    for r in (int(v) for v in str(cfg.attention_resolutions).split(",") if v):
        level = [cfg.image_size // 2**i for i in range(len(mult))].index(r)
        ch = cfg.num_channels * mult[level]
        hc = cfg.num_head_channels if cfg.num_head_channels > 0 else ch // cfg.num_heads
        shapes.append((batch * (ch // hc), r * r, hc))
    return shapes


def bmm_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v by two batched matmuls (guided-diffusion's way)."""
    w = torch.baddbmm(
        torch.empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2), beta=0, alpha=q.shape[-1] ** -0.5
    )
    return torch.bmm(torch.softmax(w, dim=-1), v)


# --------------------------------------------------------------------------- profile


def profile_categories(fn: Callable[[], object], repeats: int = 2, cuda: bool = False) -> dict:
    """Share of profiler self time per layer category over ``repeats`` calls of ``fn``: CPU time,
    or with ``cuda`` the GPU time of the kernels each operator launched (and ``busy``: GPU time
    over wall time, under 1 where the GPU waits for the host to launch work)."""
    fn()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    totals: dict[str, float] = {c: 0.0 for c in [*CATEGORIES, "elementwise/other"]}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        us = float(ev.self_device_time_total if cuda else ev.self_cpu_time_total)
        cat = next((c for c, keys in CATEGORIES.items() if any(k in ev.key for k in keys)), "elementwise/other")
        totals[cat] += us
        top[ev.key] = top.get(ev.key, 0.0) + us
    whole = sum(totals.values()) or 1.0
    out = {
        "share": {c: round(v / whole, 4) for c, v in totals.items()},
        "top_ops": {k: round(v / whole, 4) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:10]},
    }
    if cuda:
        out["busy"] = round(whole / wall_us, 4)
    return out


# --------------------------------------------------------------------------- main


def run(a: argparse.Namespace) -> dict:
    out: dict = {
        "benchmark": "roofline",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "cpu": describe_cpu(),
        "torch": torch.__version__,
        "note": "medians of interleaved rounds, [min, max] shown; load averages say how quiet the machine was",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "command": "python benchmarks/roofline.py " + " ".join(a.argv),
        "teacher": a.teacher,
        "student": a.student,
        "batch": a.batch,
        "rounds": a.rounds,
    }
    out["flops"] = zoo_flops(a.flops_models)
    with tempfile.TemporaryDirectory(prefix="dkdm_roofline_") as run_dir:
        w = Workload(a.teacher, a.student, a.batch, a.diffusion_steps, run_dir)
        w_wino = Workload(a.teacher, a.student, a.batch, a.diffusion_steps, os.path.join(run_dir, "winograd"), True)
        flops = w.flops()
        out["flops_per_call"] = {k: v for k, v in flops.items()}
        peaks = peak_kernels(a.matmul_n, *a.conv)
        work = {
            "teacher_fwd": w.teacher_fwd,
            "student_fwd_bwd": w.student_fwd_bwd,
            "dkdm_step": w.dkdm_step,
            "sampling_step": w.sampling_step,
        }
        # Each switch is timed in a pair with the library's own call, the two back to back and their
        # order alternating round by round and switch by switch, and its ratio is taken within the
        # pair: a ratio against one base timing per round reads whatever the base's position costs
        # (a forward after the peak probes' large buffers) as a speed-up of every switch.
        switches = {
            "teacher_fwd_copy": (w.teacher_fwd, w.teacher_fwd_copy),  # the control: should read 1
            "teacher_fwd_no_grad": (w.teacher_fwd, w.teacher_fwd_no_grad),
            "teacher_fwd_channels_last": (w.teacher_fwd, w.teacher_fwd_channels_last),
            "teacher_fwd_attention_bmm": (w.teacher_fwd, w.teacher_fwd_attention_bmm),
            "teacher_fwd_pointwise_torch": (w.teacher_fwd, w.teacher_fwd_pointwise_torch),
            "teacher_fwd_winograd": (w.teacher_fwd, w.teacher_fwd_winograd),
            "student_fwd_bwd_attention_bmm": (w.student_fwd_bwd, w.student_fwd_bwd_attention_bmm),
            "student_fwd_bwd_pointwise_torch": (w.student_fwd_bwd, w.student_fwd_bwd_pointwise_torch),
            "student_fwd_bwd_winograd": (w.student_fwd_bwd, w.student_fwd_bwd_winograd),
            # the whole step with both switches, each loop stepping its own optimiser
            "dkdm_step_winograd": (w.dkdm_step, w_wino.dkdm_step),
        }
        attn = []
        for bh, n, d in attention_shapes(w.tcfg, a.batch):
            q, k, v = (torch.randn(bh, n, d) for _ in range(3))
            diff = (F.scaled_dot_product_attention(q, k, v) - bmm_attention(q, k, v)).abs().max().item()
            attn.append(((bh, n, d), q, k, v, diff))
        out["per_threads"] = {}
        for threads in a.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {k: [] for k in [*peaks, *work]}
            pairs: dict[str, list[float]] = {k: [] for k in switches}
            times.update({f"sdpa_{s}": [] for s, *_ in attn})
            times.update({f"bmm_{s}": [] for s, *_ in attn})
            for fn in [*(f for f, _ in peaks.values()), *work.values(), *(v for _, v in switches.values())]:
                fn()  # warm-up: allocator, oneDNN primitive caches, the optimizer's state
            for r in range(a.rounds):
                print(f"roofline: {threads} thread(s), round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
                for name, (fn, _) in peaks.items():
                    times[name].append(min(_time(fn) for _ in range(3)))
                for name, fn in work.items():
                    times[name].append(_time(fn))
                for name, ratio in time_switch_pairs(switches, r).items():
                    pairs[name].append(ratio)
                for s, q, k, v, _ in attn:
                    times[f"sdpa_{s}"].append(
                        min(_time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)) for _ in range(3))
                    )
                    times[f"bmm_{s}"].append(min(_time(lambda q=q, k=k, v=v: bmm_attention(q, k, v)) for _ in range(3)))
            peak = {name: _stats([f / t / 1e9 for t in times[name]], 1) for name, (_, f) in peaks.items()}
            achieved = {}
            for name in work:
                gf = [flops[name] / t / 1e9 for t in times[name]]
                frac = [g * t_mm / peaks["matmul_fp32"][1] * 1e9 for g, t_mm in zip(gf, times["matmul_fp32"])]
                # The fastest probe of the round: on an AMD CPU MKL's sgemm runs at half of oneDNN's convolution.
                best = [max(peaks[k][1] / times[k][r] for k in peaks) / 1e9 for r in range(len(gf))]
                achieved[name] = {
                    "seconds": _stats(times[name]),
                    "GFLOP_per_s": _stats(gf, 2),
                    "fraction_of_matmul_peak": _stats(frac, 3),
                    "fraction_of_best_peak": _stats([g / b for g, b in zip(gf, best)], 3),
                }
            sw = {f"{name}_speedup_over_default": _stats(pairs[name], 3) for name in switches}
            sw["attention_sdpa_over_bmm_time"] = {
                str(s): {
                    "ratio": _stats([x / y for x, y in zip(times[f"sdpa_{s}"], times[f"bmm_{s}"])], 3),
                    "max_abs_diff": diff,
                }
                for s, _, _, _, diff in attn
            }
            sw["max_abs_diff_of_the_variant_networks"] = dict(w.variant_diff)
            out["per_threads"][str(threads)] = {"peak_GFLOP_per_s": peak, "achieved": achieved, "switches": sw}
        torch.set_num_threads(a.threads[0])
        out["profile"] = {
            "threads": a.threads[0],
            "teacher_fwd": profile_categories(w.teacher_fwd),
            "student_fwd_bwd": profile_categories(w.student_fwd_bwd),
        }
        logger.reset()
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="cifar10-57M")
    p.add_argument("--student", default="cifar10-14M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--diffusion_steps", type=int, default=1000)
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--conv", default="8,256,32", help="batch,channels,size of the peak 3x3 convolution")
    p.add_argument("--flops_models", default=",".join(ZOO_FOR_FLOPS))
    p.add_argument("--tiny", action="store_true", help="digits pair, small probes, 1 thread, 2 rounds (a test)")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)
    if a.tiny:
        a.teacher, a.student, a.batch, a.threads, a.rounds = "digits-teacher", "digits-vit", 2, "1", 2
        a.diffusion_steps, a.matmul_n, a.conv, a.flops_models = 20, 128, "1,32,8", "digits-teacher,digits-vit"
    a.threads = [int(v) for v in str(a.threads).split(",")]
    a.conv = [int(v) for v in str(a.conv).split(",")]
    a.flops_models = [m for m in str(a.flops_models).split(",") if m]
    a.argv = argv
    return a


def main(argv: list[str]) -> dict:
    a = parse(argv)
    out = run(a)
    emit_json(out, a.out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
