"""Accelerator numbers for the mission's setting; prints (and writes) one JSON object.

On CUDA (defaults): sampling image-steps/s of the 57M teacher at 32 px (ancestral steps,
``inference_mode``, bf16 autocast), the DKDM step time of 57M -> 14M at b = 128 (bf16 student
and teacher, the whole ``Trainer.run_step``), peak memory of each, MFU against the device's dense
bf16 peak, and the number of host synchronisations CUDA's sync debug mode reported during the
timed steady-state steps (should be 0; tests/test_sync_free.py proves the same on a CPU).
``--cuda_graphs`` captures the fixed-shape teacher call of the DKDM step and the sampling step
as CUDA graphs (the pool's fixed shapes allow it) and times those too.

On a CPU it runs the same code at a tiny size (``--tiny``: the digits pair), so it cannot rot;
MFU is then against the fp32 matmul peak measured on the spot and memory is the process's peak
resident size.

    python benchmarks/gpu.py --out benchmarks/results/<device>_gpu.json [--cuda_graphs] [--channels_last]
    python benchmarks/gpu.py --tiny
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # the sibling benchmark: one profiler summary for both

from dkdm import dist, logger
from dkdm.config import DistillConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.fileio import emit_json
from dkdm.models import create_model, get_config
from dkdm.training.compile import compile_in_place
from dkdm.training.precision import autocast, autocast_dtype

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak(device: torch.device, override: float) -> tuple[float, str]:
    """(peak FLOP/s, what it is) for MFU on ``device``."""
    if override > 0:
        return override * 1e12, "given with --peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, tf in BF16_PEAK_TFLOPS.items():
            if frag in name:
                return tf * 1e12, f"{name} dense bf16 data-sheet peak"
        return float("nan"), f"{name}: unknown peak, give --peak_tflops"
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b), device) for _ in range(5))
    return 2 * 512**3 / best, "cpu fp32 matmul 512^2 measured now"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, n: int = 1) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _SyncCount:
    """Counts CUDA's "called a synchronizing operation" warnings (sync debug mode); 0 off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.count = 0

    def __enter__(self):
        if self.cuda:
            self._w = warnings.catch_warnings(record=True)
            self._seen = self._w.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            # The once-per-process notice that the mode is a prototype ("...does not yet detect all
            # synchronizing operations") is not a sync; the H100 runs of 2026-11-23 counted it once.
            self.count = sum("synchroniz" in str(w.message) and "prototype" not in str(w.message) for w in self._seen)
            self._w.__exit__(*exc)
        return False


class GraphedCall:
    """``fn(*tensors)`` replayed from a CUDA graph captured on the first call's shapes.

    Inputs are copied into static buffers, the graph replays, and a clone of the static
    output is returned (the caller may keep it past the next call).
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graph = None

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        if self.graph is None:
            self.static_in = [a.clone() if a is not None else None for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream, as torch's graph docs require
                    self.fn(*self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.fn(*self.static_in)
        for s, a in zip(self.static_in, args):
            if s is not None:
                s.copy_(a)
        self.graph.replay()
        return self.static_out.clone()


def sampling(cfg, model, diffusion, batch: int, steps: int, dtype, device, graphs: bool, profile=False) -> dict:
    """Ancestral steps t = T-1 down: image-steps/s, seconds per step, peak memory."""
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((batch,), diffusion.num_timesteps - 1, device=device, dtype=torch.long)

    def step(x, t):
        with torch.inference_mode(), autocast(device.type, dtype):
            return diffusion.p_sample(model, x, t, clip_denoised=True)["sample"]

    fn = GraphedCall(step) if graphs else step
    # Graph capture or compilation happen here; twice, since the loop feeds back inference tensors
    # (another dispatch key than the first x, so torch.compile specialises once more).
    first = _timed(lambda: fn(fn(x, t), t), device)
    _reset_memory(device)
    state = {"x": x}

    def walk():
        for i in range(steps):
            t.fill_(diffusion.num_timesteps - 1 - i % diffusion.num_timesteps)
            state["x"] = fn(state["x"], t)

    with _SyncCount(device) as syncs:
        sec = _timed(walk, device) / steps
    out = {
        "batch": batch,
        "steps": steps,
        "first_call_s": round(first, 3),
        "s_per_step": round(sec, 6),
        "image_steps_per_s": round(batch / sec, 1),
        "peak_memory_GiB": round(_peak_memory_gib(device), 3),
        "host_syncs": syncs.count,
        "cuda_graphs": graphs,
    }
    if profile:
        out["profile"] = roofline.profile_categories(lambda: fn(x, t), 3, cuda=device.type == "cuda")
    return out


def dkdm_step(
    teacher, student, diffusion, batch: int, steps: int, precision: str, device, graphs: bool, profile=False
) -> dict:
    """Seconds per whole DKDM step (draw, teacher, pool update, objective, backward, AdamW, EMA)."""
    with tempfile.TemporaryDirectory(prefix="dkdm_gpu_") as run_dir:
        logger.configure(run_dir, format_strs=["log"])
        loop = DistillLoop(
            teacher,
            student,
            diffusion,
            diffusion,
            train=TrainConfig(batch_size=batch, lr=1e-4, ema_rate="0.9999", precision=precision, log_interval=0),
            distill=DistillConfig(rho=2.0 / diffusion.num_timesteps, teacher_batch=batch, teacher_precision=precision),
            run_dir=run_dir,
        )
        loop.pool.prepared = True  # the pool's contents do not change the step's cost
        if graphs:
            loop.teacher_forward = GraphedCall(loop.teacher_forward)
        tr = loop.trainer
        first = _timed(lambda: tr.run_step(loop.next_batch, loop.loss_fn), device)
        for _ in range(2):
            tr.run_step(loop.next_batch, loop.loss_fn)
        _reset_memory(device)
        with _SyncCount(device) as syncs:
            sec = _timed(lambda: tr.run_step(loop.next_batch, loop.loss_fn), device, steps)
        prof = None
        if profile:
            prof = roofline.profile_categories(
                lambda: tr.run_step(loop.next_batch, loop.loss_fn), 3, cuda=device.type == "cuda"
            )
        tr.dump_logs()
        logger.reset()
    return {
        "batch": batch,
        "steps": steps,
        "precision": precision,
        "first_call_s": round(first, 3),
        "s_per_step": round(sec, 5),
        "samples_per_s": round(batch / sec, 1),
        "peak_memory_GiB": round(_peak_memory_gib(device), 3),
        "host_syncs": syncs.count,
        "cuda_graphs_teacher": graphs,
        **({"profile": prof} if prof else {}),
    }


def flops_of(model, cfg, batch: int, backward: bool) -> int:
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as c:
        if backward:
            model(x, t).square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t)
    return int(c.get_total_flops())


def run(a: argparse.Namespace) -> dict:
    device = dist.dev()  # the library's choice (DKDM_DEVICE=cpu keeps it on the CPU)
    torch.manual_seed(0)
    tcfg, scfg = get_config(a.teacher), get_config(a.student)
    teacher, student = create_model(tcfg).to(device), create_model(scfg).to(device)
    with torch.no_grad():  # output layers start at zero; give the teacher something to say
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # Frozen, as in distillation; autocast then keeps no weight-cast cache to trip a graph capture.
    teacher.eval().requires_grad_(False)
    with torch.device("meta"):
        tm, sm = create_model(tcfg), create_model(scfg)
    f_teacher = flops_of(tm, tcfg, 1, False)
    f_student = flops_of(sm, scfg, 1, True)
    diffusion = create_diffusion(steps=a.diffusion_steps, noise_schedule="cosine", learn_sigma=tcfg.learn_sigma)
    peak, peak_what = device_peak(device, a.peak_tflops)
    dtype = autocast_dtype(a.precision)
    out = {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "command": "python benchmarks/gpu.py " + " ".join(a.argv),
        "teacher": a.teacher,
        "student": a.student,
        "precision": a.precision,
        "peak_TFLOP_per_s": round(peak / 1e12, 4),
        "peak_is": peak_what,
        "GFLOP_per_image": {"teacher_fwd": round(f_teacher / 1e9, 4), "student_fwd_bwd": round(f_student / 1e9, 4)},
    }
    if device.type == "cpu":
        out["note"] = "CPU run at a tiny size: checks the code path, not a performance claim"
    variants = [False, True] if a.cuda_graphs else [False]
    formats = [torch.contiguous_format, torch.channels_last] if a.channels_last else [torch.contiguous_format]
    out["sampling"] = []
    out["dkdm_step"] = []
    runs = [(fmt, graphs, False) for fmt in formats for graphs in variants]
    if a.compile:
        runs.append((torch.contiguous_format, False, True))
    for fmt, graphs, compiled in runs:
        # Weights in channels_last make cuDNN/oneDNN pick NHWC kernels; activations follow the weights.
        teacher.to(memory_format=fmt)
        student.to(memory_format=fmt)
        if compiled:  # the library's --compile: in place, the first call compiles
            compile_in_place(teacher)
            compile_in_place(student)
        first = not out["sampling"]
        tag = {"memory_format": str(fmt).removeprefix("torch."), "compiled": compiled}
        s = sampling(
            tcfg, teacher, diffusion, a.sample_batch, a.sample_steps, dtype, device, graphs, first and a.profile
        )
        s["MFU"] = round(s["image_steps_per_s"] * f_teacher / peak, 4)
        out["sampling"].append({**tag, **s})
        d = dkdm_step(
            teacher, student, diffusion, a.batch, a.dkdm_steps, a.precision, device, graphs, first and a.profile
        )
        d["MFU"] = round(d["samples_per_s"] * (f_teacher + f_student) / peak, 4)
        out["dkdm_step"].append({**tag, **d})
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="cifar10-57M")
    p.add_argument("--student", default="cifar10-14M")
    p.add_argument("--batch", type=int, default=128, help="DKDM batch b")
    p.add_argument("--sample_batch", type=int, default=256)
    p.add_argument("--sample_steps", type=int, default=50, help="timed sampling steps")
    p.add_argument("--dkdm_steps", type=int, default=20, help="timed DKDM steps")
    p.add_argument("--diffusion_steps", type=int, default=1000)
    p.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak for MFU")
    p.add_argument("--cuda_graphs", action="store_true", help="also time CUDA-graph teacher and sampling steps")
    p.add_argument("--channels_last", action="store_true", help="also time both with channels_last weights")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd teacher and student")
    p.add_argument("--profile", action="store_true", help="where the first variant's time goes, per op category")
    p.add_argument("--tiny", action="store_true", help="digits pair, a few steps (the CPU test)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.tiny:
        a.teacher, a.student, a.batch, a.sample_batch = "digits-teacher", "digits-vit", 4, 4
        a.sample_steps, a.dkdm_steps, a.diffusion_steps = 3, 2, 20
    if a.cuda_graphs and dist.dev().type != "cuda":
        p.error("--cuda_graphs needs CUDA; this run is on the CPU (no GPU, or DKDM_DEVICE=cpu)")
    a.argv = argv
    return a


def main(argv: list[str]) -> dict:
    a = parse(argv)
    out = run(a)
    emit_json(out, a.out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
