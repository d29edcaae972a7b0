"""dkdm against guided-diffusion on identical weights, in one process, alternating; prints one JSON object.

Builds guided-diffusion's ``UNetModel`` and diffusion (imported from a local checkout named by
``GUIDED_DIFFUSION_PATH``; nothing of it is part of this repository) and ours for the same zoo
architecture, loads guided-diffusion's weights into ours with ``strict=True``, then times, round
by round with the order swapped every round: an IDDPM (ancestral) sampling loop, a DDIM loop and
a training step (``training_losses`` + backward + AdamW). Outputs must agree to ``--tol``
(sampling from the same noise and the same global RNG stream; the training loss and the
updated weights). ``ratio`` = guided-diffusion's time / ours (> 1: we are faster). Each side
steps its own trainer's optimiser (guided-diffusion's AdamW, ours ``make_adamw``) on its own
copy of the networks, so the sampling loops keep the weights whose agreement was checked.
``--ours_winograd`` routes ours's 3x3 convolutions through Winograd F(4x4,3x3): sample.py's
``--winograd`` for the loops, the training scripts' ``--winograd`` (forward and backward) for
the step.
``--ours_channels_last`` puts ours in channels_last (the library's ``--channels_last``, which
sample.py and the training scripts offer alike). ``--host_allocator tuned`` applies dkdm's
scripts' glibc settings (:mod:`dkdm.hostmem`) to the whole process, so both sides run with them;
``--device cuda`` times on a GPU (synchronised, TF32 off).

    GUIDED_DIFFUSION_PATH=/path/to/guided-diffusion python benchmarks/vs_guided_diffusion.py \\
        [--arch cifar10-14M] [--batch 16] [--respacing 10] [--rounds 3] [--threads 1] \\
        [--host_allocator default|tuned] [--device cpu|cuda] [--ours_compile] [--ours_channels_last] [--ours_winograd]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import types

import torch

from dkdm.diffusion import create_diffusion
from dkdm.fileio import emit_json
from dkdm.hostmem import describe_cpu, tune_host_allocator
from dkdm.models import create_model, get_config
from dkdm.models.winograd import use_winograd
from dkdm.training.compile import compile_in_place, to_channels_last
from dkdm.training.trainer import make_adamw


def load_guided_diffusion(path: str):
    if not path or not os.path.isdir(os.path.join(path, "guided_diffusion")):
        raise SystemExit(f"set GUIDED_DIFFUSION_PATH to a guided-diffusion checkout (got {path!r})")
    sys.path.insert(0, path)
    from guided_diffusion import script_util

    return script_util


def build(arch: str, respacing: str, steps: int, seed: int = 0):
    su = load_guided_diffusion(os.environ.get("GUIDED_DIFFUSION_PATH", ""))
    cfg = get_config(arch, dropout=0.0)
    torch.manual_seed(seed)  # the weights, and so the agreement figures, are the same every run
    theirs = su.create_model(
        image_size=cfg.image_size,
        num_channels=cfg.num_channels,
        num_res_blocks=cfg.num_res_blocks,
        channel_mult=cfg.channel_mult,
        learn_sigma=cfg.learn_sigma,
        attention_resolutions=cfg.attention_resolutions,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        dropout=0.0,
        resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order,
    )
    with torch.no_grad():  # zero-initialised output layers would make the comparison trivial
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = create_model(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    diff = {}
    for name, spec in (("iddpm", respacing), ("ddim", f"ddim{respacing}"), ("train", "")):
        kw = {"steps": steps, "learn_sigma": cfg.learn_sigma, "noise_schedule": "cosine", "timestep_respacing": spec}
        diff[name] = (su.create_gaussian_diffusion(**kw), create_diffusion(**kw))
    return cfg, theirs.eval(), ours.eval(), diff


def float64_copy(theirs: torch.nn.Module) -> torch.nn.Module:
    """guided-diffusion's network computing in float64 (the agreement's reference).

    Its own float32 pins (``self.dtype``, ``GroupNorm32``'s ``.float()``, the float32 timestep
    features) are lifted on the copy only.
    """
    ref = copy.deepcopy(theirs).double()
    ref.dtype = torch.float64
    for m in ref.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.forward = types.MethodType(torch.nn.GroupNorm.forward, m)
    ref.time_embed.register_forward_pre_hook(lambda m, args: tuple(z.double() for z in args))
    return ref


@contextlib.contextmanager
def float32_noise():
    """``torch.randn_like`` draws float32 and casts: a float64 loop sees the float32 loops' noise."""
    randn_like = torch.randn_like
    torch.randn_like = lambda x, **kw: randn_like(x, dtype=torch.float32).to(x.dtype)
    try:
        yield
    finally:
        torch.randn_like = randn_like


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    # process-wide: guided-diffusion's side gets it too
    host_allocator = tune_host_allocator() if a.host_allocator == "tuned" else "default"
    device = torch.device(a.device)
    if device.type == "cuda":  # fp32 means fp32 here: TF32 products would not agree to 1e-4
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg, theirs, ours, diff = build(a.arch, a.respacing, a.steps, a.seed)
    reference = float64_copy(theirs).to(device)
    theirs, ours = theirs.to(device), ours.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # The training step steps copies: the loops keep the weights checked below, and a network
    # whose weights stay put keeps its Winograd filter transforms, as in sample.py.
    theirs_t, ours_t = copy.deepcopy(theirs), copy.deepcopy(ours)
    for net in (ours, ours_t):
        if a.ours_channels_last:  # the library's --channels_last switch (before compiling, as the scripts do)
            to_channels_last(net)
        if a.ours_winograd:  # the library's --winograd switches: sample.py's for the loops, the trainer's for the step
            use_winograd(net, train=net is ours_t)
        if a.ours_compile:  # the library's --compile switch (in place; the agreement pass below compiles)
            compile_in_place(net, "inductor")
    shape = (a.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    x0 = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(device)
    t = torch.randint(0, a.steps, (a.batch,), generator=torch.Generator().manual_seed(3)).to(device)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)
    # Each side's optimiser as its trainer builds it: guided-diffusion's AdamW, ours make_adamw.
    opts = {
        "theirs": torch.optim.AdamW(theirs_t.parameters(), lr=1e-4),
        "ours": make_adamw(list(ours_t.parameters()), 1e-4, 0.0),
    }
    train_d = {"theirs": diff["train"][0], "ours": diff["train"][1]}

    def sample(which: str, kind: str):
        d = diff[kind][1] if which == "ours" else diff[kind][0]
        model = {"theirs": theirs, "ours": ours, "float64": reference}[which]
        torch.manual_seed(5)  # the IDDPM loop's per-step noise: the same stream for both
        with torch.no_grad():
            loop = d.ddim_sample_loop if kind == "ddim" else d.p_sample_loop
            if which != "float64":
                return loop(model, shape, noise=noise.clone(), clip_denoised=True)
            with float32_noise():
                return loop(model, shape, noise=noise.double(), clip_denoised=True)

    def train(which: str):
        model, opt = (theirs_t, opts["theirs"]) if which == "theirs" else (ours_t, opts["ours"])
        model.train()
        opt.zero_grad(set_to_none=True)
        d = train_d[which]
        loss = d.training_losses(model, x0, t, noise=eps)["loss"].mean()
        loss.backward()
        opt.step()
        model.eval()
        return loss.detach()

    out = {
        "benchmark": "vs_guided_diffusion",
        "arch": a.arch,
        "batch": a.batch,
        "respacing": a.respacing,
        "threads": a.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": describe_cpu(),
        "host_allocator": host_allocator,
        "rounds": a.rounds,
        "ours_compiled": a.ours_compile,
        "ours_channels_last": a.ours_channels_last,
        "ours_winograd": a.ours_winograd,
        "torch": torch.__version__,
        "note": "order swapped every round; medians and [min, max] of the per-round ratios",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "command": "GUIDED_DIFFUSION_PATH=... python benchmarks/vs_guided_diffusion.py " + " ".join(a.argv),
    }
    # Agreement first (also the warm-up). The loops are also run by guided-diffusion's network in
    # float64 (same noise): the ancestral loop's first step multiplies the network's
    # float32 rounding by up to 1/sqrt(alpha_bar_T) (~10^4, cosine), so on some weights
    # guided-diffusion's own float32 loop strays from its float64 one by more than 1e-4. A loop
    # agrees when ours is within tol of theirs, or no further from float64 than tol + 2x theirs.
    agree, vs64, loops_ok = {}, {}, []
    for kind in ("iddpm", "ddim"):
        t32, o32, f64 = sample("theirs", kind), sample("ours", kind), sample("float64", kind)
        agree[kind] = float((t32 - o32).abs().max())
        vs64[kind] = {k: float((v.double() - f64).abs().max()) for k, v in (("theirs", t32), ("ours", o32))}
        loops_ok.append(agree[kind] <= a.tol or vs64[kind]["ours"] <= a.tol + 2 * vs64[kind]["theirs"])
    loss_t, loss_o = train("theirs"), train("ours")
    agree["train_loss"] = float((loss_t - loss_o).abs())
    agree["weights_after_step"] = max(
        float((p - q).abs().max()) for p, q in zip(theirs_t.state_dict().values(), ours_t.state_dict().values())
    )
    out["max_abs_diff"] = agree
    out["max_abs_diff_from_float64"] = vs64
    out["agree_to_tol"] = all(loops_ok) and agree["train_loss"] <= a.tol and agree["weights_after_step"] <= a.tol
    times: dict[str, dict[str, list[float]]] = {k: {"theirs": [], "ours": []} for k in ("iddpm", "ddim", "train")}
    for r in range(a.rounds):
        order = ("theirs", "ours") if r % 2 == 0 else ("ours", "theirs")
        for kind in ("iddpm", "ddim", "train"):
            for which in order:
                sync()
                t0 = time.perf_counter()
                sample(which, kind) if kind != "train" else train(which)
                sync()
                times[kind][which].append(time.perf_counter() - t0)
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    for kind, tt in times.items():
        ratios = [x / y for x, y in zip(tt["theirs"], tt["ours"])]
        out[kind] = {
            "theirs_s": round(statistics.median(tt["theirs"]), 4),
            "ours_s": round(statistics.median(tt["ours"]), 4),
            "ratio_theirs_over_ours": {
                "median": round(statistics.median(ratios), 3),
                "min": round(min(ratios), 3),
                "max": round(max(ratios), 3),
            },
        }
    return out


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="cifar10-14M")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--respacing", default="10", help="sampling steps of both loops (IDDPM '10', DDIM 'ddim10')")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of the shared weights")
    p.add_argument("--ours_compile", action="store_true", help="ours under torch.compile (inductor), as --compile")
    p.add_argument(
        "--ours_channels_last",
        action="store_true",
        help="ours in channels_last, as --channels_last (theirs as shipped)",
    )
    p.add_argument(
        "--ours_winograd",
        action="store_true",
        help="ours with Winograd F(4x4,3x3): sample.py --winograd in the loops, the trainer's --winograd in the step (CPU fp32)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--host_allocator",
        choices=("default", "tuned"),
        default="default",
        help="tuned: dkdm.hostmem's glibc settings, as dkdm's scripts apply them (for the whole process: both sides)",
    )
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    a.argv = argv
    out = run(a)
    emit_json(out, a.out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
