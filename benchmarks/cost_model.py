"""The paper's settings on paper: FLOPs per DKDM and per data-based step, pool memory, implied GPU times.

For CIFAR-10 32 px (57M -> 14M, b = 128), CelebA 64 px (295M -> 57M, b = 256) and latent FFHQ
256 px (LDM-VQ-4 274M -> 86M on 64x64x3 latents, b = 42, rho = 4): per-image FLOPs counted on the
meta device with torch's flop counter (the UNets are ours, parameter-identical to the released
ones; the data-based latent step also encodes every image with the VQ-f4 encoder, built from
diffusers), the pool's size and memory (fp32, as :func:`dkdm.distill.pool.estimate_pool_bytes`),
the teacher work of preparing the pool (shuffle denoise: (T - 1) / 2 teacher evaluations per
sample on average), and what a step would take on an H100 (dense bf16 peak 989 TFLOP/s) and on
8 of them (ideal data parallelism) at two efficiencies: the A100 efficiency implied by the
paper's Table 9 (A100 fp16 dense peak 312 TFLOP/s) and the fraction of peak our DKDM step
reached on this CPU (read from a roofline JSON). Prints JSON, or a Markdown table with --markdown.

    python benchmarks/cost_model.py --roofline benchmarks/results/cpu-x86_64-2core_roofline.json --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from dkdm.config import ModelConfig
from dkdm.distill.pool import estimate_pool_bytes, pool_size
from dkdm.models import create_model, get_config

A100_FP16_PEAK = 312e12
H100_BF16_PEAK = 989e12
T = 1000


def _ldm_unet(channels: int) -> ModelConfig:
    """The LDM-VQ-4 FFHQ/CelebA-HQ UNet (FACTS.md: 274,056,163 params at 224 channels, 89,535,619 at 128)."""
    return ModelConfig(
        arch="unet",
        image_size=64,
        in_channels=3,
        learn_sigma=False,
        num_channels=channels,
        num_res_blocks=2,
        channel_mult="1,2,3,4",
        attention_resolutions="32,16,8",
        num_head_channels=32,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        dropout=0.0,
    )


# name -> teacher, student, batch, rho, iterations (supplement Tables 6, 7), Table 9 s/100 it (data, ours).
SETTINGS = {
    "CIFAR-10 32": ("cifar10-57M", "cifar10-14M", 128, 0.4, 200_000, (18.00, 19.17)),
    "CelebA 64": ("celeba64-295M", "celeba64-57M", 256, 0.4, 100_000, None),
    "FFHQ 256 (latent)": (_ldm_unet(224), _ldm_unet(128), 42, 4.0, 640_000, (68.77, 55.52)),
}


def _flops(model: torch.nn.Module, shape: tuple[int, ...], backward: bool, call) -> int:
    x = torch.randn(1, *shape, device="meta")
    with FlopCounterMode(display=False) as c:
        if backward:
            call(model, x).square().mean().backward()
        else:
            with torch.no_grad():
                call(model, x)
    return int(c.get_total_flops())


def _unet_call(model, x):
    return model(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def vq_f4_encoder_flops() -> int:
    """Forward FLOPs per 256 px image of the VQ-f4 first stage's encoder (+ quant_conv)."""
    from diffusers.models.autoencoders.vae import Encoder

    with torch.device("meta"):
        enc = Encoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            block_out_channels=(128, 256, 512),
            layers_per_block=2,
            double_z=False,
        )
        quant = torch.nn.Conv2d(3, 3, 1)
    return _flops(torch.nn.Sequential(enc, quant), (3, 256, 256), False, lambda m, x: m(x))


def setting(name: str, cpu_fraction: float | None) -> dict:
    teacher, student, b, rho, iters, table9 = SETTINGS[name]
    tcfg = get_config(teacher) if isinstance(teacher, str) else teacher
    scfg = get_config(student) if isinstance(student, str) else student
    shape = (tcfg.in_channels, tcfg.image_size, tcfg.image_size)
    with torch.device("meta"):
        tm, sm = create_model(tcfg), create_model(scfg)
    t_fwd = _flops(tm, shape, False, _unet_call)
    s_fb = _flops(sm, shape, True, _unet_call)
    enc = vq_f4_encoder_flops() if "latent" in name else 0
    dkdm = b * (t_fwd + s_fb)
    data = b * (s_fb + enc)
    n = pool_size("dynamic", rho, T, b)
    mem = estimate_pool_bytes(n, shape, b, 1024)
    prep_evals = n * (T - 1) / 2
    out = {
        "teacher_params_M": round(sum(p.numel() for p in tm.parameters()) / 1e6, 2),
        "student_params_M": round(sum(p.numel() for p in sm.parameters()) / 1e6, 2),
        "batch": b,
        "rho": rho,
        "iterations": iters,
        "teacher_fwd_GFLOP_per_image": round(t_fwd / 1e9, 2),
        "student_fwd_bwd_GFLOP_per_image": round(s_fb / 1e9, 2),
        "first_stage_encoder_GFLOP_per_image": round(enc / 1e9, 2),
        "dkdm_step_TFLOP": round(dkdm / 1e12, 3),
        "data_step_TFLOP": round(data / 1e12, 3),
        "dkdm_over_data_flops": round(dkdm / data, 3),
        "pool_samples": n,
        "pool_GiB": round(mem["pool"] / 2**30, 3),
        "pool_GiB_per_rank_of_8": round(estimate_pool_bytes(n // 8, shape, b // 8, 1024)["pool"] / 2**30, 3),
        "prep_teacher_evals_M": round(prep_evals / 1e6, 2),
        "prep_PFLOP": round(prep_evals * t_fwd / 1e15, 1),
        "prep_in_dkdm_steps_of_teacher_work": round(prep_evals / b),
    }
    scenarios = {}
    if table9:
        data_s, dkdm_s = table9[0] / 100, table9[1] / 100
        out["table9_A100_s_per_step"] = {"data": data_s, "dkdm": dkdm_s}
        mfu = dkdm / dkdm_s / A100_FP16_PEAK
        out["table9_A100_MFU"] = {"data": round(data / data_s / A100_FP16_PEAK, 4), "dkdm": round(mfu, 4)}
        scenarios["A100 Table 9 efficiency"] = mfu
    if cpu_fraction:
        scenarios["this CPU's DKDM-step fraction of peak"] = cpu_fraction
    out["implied"] = {}
    for label, eff in scenarios.items():
        step = dkdm / (eff * H100_BF16_PEAK)
        out["implied"][label] = {
            "efficiency": round(eff, 4),
            "H100_s_per_step": round(step, 4),
            "H100_hours_total": round(step * iters / 3600, 2),
            "8xH100_hours_total": round(step * iters / 3600 / 8, 2),
            "8xH100_prep_minutes": round(prep_evals * t_fwd / (eff * H100_BF16_PEAK) / 8 / 60, 1),
        }
    return out


def markdown(res: dict) -> str:
    head = (
        "| setting | teacher -> student | b, rho | GFLOP/img T fwd, S fwd+bwd | TFLOP per DKDM step / data step | pool "
        "(samples, GiB) | prep (teacher evals, = DKDM steps of teacher work) | Table 9 A100 s/step data, ours "
        "(implied MFU ours) | H100 s/step, 8xH100 h total (A100 MFU) | same at this CPU's fraction |"
    )
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["settings"].items():
        t9 = r.get("table9_A100_s_per_step")
        t9s = f"{t9['data']:.4f}, {t9['dkdm']:.4f} ({r['table9_A100_MFU']['dkdm']:.1%})" if t9 else "not reported"
        imp = r["implied"]
        a = imp.get("A100 Table 9 efficiency")
        c = imp.get("this CPU's DKDM-step fraction of peak")
        fa = f"{a['H100_s_per_step']:.4f}, {a['8xH100_hours_total']:.1f} h" if a else "-"
        fc = f"{c['H100_s_per_step']:.4f}, {c['8xH100_hours_total']:.1f} h" if c else "-"
        enc = f" + enc {r['first_stage_encoder_GFLOP_per_image']}" if r["first_stage_encoder_GFLOP_per_image"] else ""
        rows.append(
            f"| {name} | {r['teacher_params_M']}M -> {r['student_params_M']}M | {r['batch']}, {r['rho']} | "
            f"{r['teacher_fwd_GFLOP_per_image']}, {r['student_fwd_bwd_GFLOP_per_image']}{enc} | "
            f"{r['dkdm_step_TFLOP']} / {r['data_step_TFLOP']} | {r['pool_samples']}, {r['pool_GiB']} | "
            f"{r['prep_teacher_evals_M']}M, {r['prep_in_dkdm_steps_of_teacher_work']} | {t9s} | {fa} | {fc} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--roofline", default="", help="roofline JSON whose 1-thread DKDM-step fraction of peak to use")
    p.add_argument("--cpu_fraction", type=float, default=0.0, help="or give that fraction directly")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    frac = a.cpu_fraction or None
    if a.roofline and os.path.isfile(a.roofline):
        with open(a.roofline) as f:
            roof = json.load(f)
        step = roof["per_threads"]["1"]["achieved"]["dkdm_step"]
        frac = step.get("fraction_of_best_peak", step["fraction_of_matmul_peak"])["median"]
    res = {"cpu_fraction": frac, "settings": {n: setting(n, frac) for n in a.settings.split(",") if n}}
    print(markdown(res) if a.markdown else json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
