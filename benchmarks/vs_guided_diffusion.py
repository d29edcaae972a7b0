"""dkdm against guided-diffusion on identical weights, in one process, alternating; prints one JSON object.

Builds guided-diffusion's ``UNetModel`` and diffusion (imported from a local checkout named by
``GUIDED_DIFFUSION_PATH``; nothing of it is part of this repository) and ours for the same zoo
architecture, loads guided-diffusion's weights into ours with ``strict=True``, then times, round
by round with the order swapped every round: an IDDPM (ancestral) sampling loop, a DDIM loop and
a training step (``training_losses`` + backward + AdamW). Outputs must agree to ``--tol``
(sampling from the same noise and the same global RNG stream; the training loss and the
updated weights). ``ratio`` = guided-diffusion's time / ours (> 1: we are faster).

    GUIDED_DIFFUSION_PATH=/path/to/guided-diffusion python benchmarks/vs_guided_diffusion.py \\
        [--arch cifar10-14M] [--batch 16] [--respacing 10] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from dkdm.diffusion import create_diffusion
from dkdm.fileio import emit_json
from dkdm.models import create_model, get_config
from dkdm.training.compile import compile_in_place


def load_guided_diffusion(path: str):
    if not path or not os.path.isdir(os.path.join(path, "guided_diffusion")):
        raise SystemExit(f"set GUIDED_DIFFUSION_PATH to a guided-diffusion checkout (got {path!r})")
    sys.path.insert(0, path)
    from guided_diffusion import script_util

    return script_util


def build(arch: str, respacing: str, steps: int):
    su = load_guided_diffusion(os.environ.get("GUIDED_DIFFUSION_PATH", ""))
    cfg = get_config(arch, dropout=0.0)
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
    torch.manual_seed(0)
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


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    cfg, theirs, ours, diff = build(a.arch, a.respacing, a.steps)
    if a.ours_compile:  # the library's --compile switch (in place; the agreement pass below compiles)
        compile_in_place(ours, "inductor")
    shape = (a.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x0 = torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    t = torch.randint(0, a.steps, (a.batch,), generator=torch.Generator().manual_seed(3))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in (("theirs", theirs), ("ours", ours))}
    train_d = {"theirs": diff["train"][0], "ours": diff["train"][1]}

    def sample(which: str, kind: str):
        d = diff[kind][0 if which == "theirs" else 1]
        model = theirs if which == "theirs" else ours
        torch.manual_seed(5)  # the IDDPM loop's per-step noise: the same stream for both
        with torch.no_grad():
            loop = d.ddim_sample_loop if kind == "ddim" else d.p_sample_loop
            return loop(model, shape, noise=noise.clone(), clip_denoised=True)

    def train(which: str):
        model, opt = (theirs, opts["theirs"]) if which == "theirs" else (ours, opts["ours"])
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
        "rounds": a.rounds,
        "ours_compiled": a.ours_compile,
        "torch": torch.__version__,
        "note": "order swapped every round; medians and [min, max] of the per-round ratios",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "command": "GUIDED_DIFFUSION_PATH=... python benchmarks/vs_guided_diffusion.py " + " ".join(a.argv),
    }
    # Agreement first (also the warm-up).
    agree = {}
    for kind in ("iddpm", "ddim"):
        agree[kind] = float((sample("theirs", kind) - sample("ours", kind)).abs().max())
    loss_t, loss_o = train("theirs"), train("ours")
    agree["train_loss"] = float((loss_t - loss_o).abs())
    agree["weights_after_step"] = max(
        float((p - q).abs().max()) for p, q in zip(theirs.state_dict().values(), ours.state_dict().values())
    )
    out["max_abs_diff"] = agree
    out["agree_to_tol"] = all(v <= a.tol for v in agree.values())
    times: dict[str, dict[str, list[float]]] = {k: {"theirs": [], "ours": []} for k in ("iddpm", "ddim", "train")}
    for r in range(a.rounds):
        order = ("theirs", "ours") if r % 2 == 0 else ("ours", "theirs")
        for kind in ("iddpm", "ddim", "train"):
            for which in order:
                t0 = time.perf_counter()
                sample(which, kind) if kind != "train" else train(which)
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
    p.add_argument("--ours_compile", action="store_true", help="ours under torch.compile (inductor), as --compile")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    a.argv = argv
    out = run(a)
    emit_json(out, a.out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
