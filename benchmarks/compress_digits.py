"""Architectural compression + DKDM on the embedded digits: four students at equal size and equal steps.

Arms (each distilled with DKDM from the embedded digits teacher for the same ``--steps``, batch and lr):

* ``random``: the block-removed architecture with random weights (plain DKDM);
* ``removed``: BK-SDM-style block removal (``--remove``, default the middle block and all attention),
  every kept weight copied from the teacher (dkdm.models.compress), then DKDM;
* ``removed+fkd``: the same init, DKDM + feature KD (``--feature_kd_weight`` on every shared stage);
* ``pruned``: torch-pruning with Diff-Pruning's timestep-thresholded Taylor importance on pool images
  (dkdm.distill.compress), the ratio chosen so that its parameter count is nearest the removed arm's.

Every compressed student goes through the resolver as ``dkdm_train.py --student_init`` does (saved with its
config.yaml, rebuilt by ``resolve_distillation``). Reported per arm and seed: digits-metric FD (and IS,
precision, recall) of ``--samples`` EMA samples with ``--respacing`` steps against all real digits, the FD of
the init before distillation, parameters, FLOPs per image per network call (torch's FlopCounterMode,
multiply-add = 2) and per sample (x steps), and sampling speed (images/s, one thread, batch ``--samples``).

    nice -n 10 python benchmarks/compress_digits.py --steps 300 --seeds 0,1

Speed numbers taken on a shared machine are indicative only.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dkdm import logger
from dkdm.config import DistillConfig, TrainConfig
from dkdm.data.arrays import to_uint8
from dkdm.diffusion import create_diffusion
from dkdm.digits_metric import activations, load_classifier, real_digits, score
from dkdm.distill.compress import prune_from_images, teacher_images
from dkdm.distill.loop import DistillLoop, teacher_id
from dkdm.models.compress import remove_blocks, save_student
from dkdm.models.prune import parameter_count, prune
from dkdm.resolve import EMBEDDED_TEACHER, build_network, resolve, resolve_distillation

ARMS = ("random", "removed", "removed+fkd", "pruned")
LABELS = {
    "random": "random init + DKDM",
    "removed": "block-removed init + DKDM",
    "removed+fkd": "block-removed init + DKDM + feature KD",
    "pruned": "pruned init (Diff-Pruning on pool images) + DKDM",
}


def table(results: dict) -> str:
    """The README's markdown table: mean and per-seed FD, parameters, FLOPs, sampling speed."""
    rows = [
        "| student | params | MFLOPs / call | FD init | FD after DKDM (per seed) | FD mean | images/s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    t = results["teacher"]
    rows.append(
        f"| teacher (reference) | {t['params']:,} | {t['flops_per_call'] / 1e6:.1f} | | | {t['fd']:.1f} "
        f"| {t['images_per_s']:.0f} |"
    )
    for arm, runs in results["arms"].items():
        fds = [r["fd"] for r in runs]
        rows.append(
            f"| {LABELS[arm]} | {runs[0]['params']:,} | {runs[0]['flops_per_call'] / 1e6:.1f} "
            f"| {np.mean([r['fd_init'] for r in runs]):.1f} | {' / '.join(f'{v:.1f}' for v in fds)} "
            f"| {np.mean(fds):.1f} | {np.mean([r['images_per_s'] for r in runs]):.0f} |"
        )
    return "\n".join(rows)


def params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def flops_per_call(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    x, t = torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net.eval()(x, t)
    return int(fc.get_total_flops())


def matching_ratio(teacher: torch.nn.Module, target: int) -> tuple[float, int]:
    """The pruning ratio (0.01 grid) whose pruned parameter count is nearest ``target`` (counts need no data)."""
    x = torch.zeros(1, *SHAPE)
    t = torch.zeros(1, dtype=torch.long)

    def dummy(m):  # any gradient: the count depends on the ratio alone (uniform per-group pruning)
        m(x, t).sum().backward()

    best = None
    for r in np.arange(0.05, 0.45, 0.01):
        cfg, _ = prune(teacher, float(r), dummy, (x, t))
        n = parameter_count(cfg)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (round(float(r), 2), n)
    return best


SHAPE = (1, 8, 8)


def sample(net, diffusion, n: int, seed: int) -> tuple[np.ndarray, float]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *SHAPE, generator=g)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = diffusion.p_sample_loop(net.eval(), (n, *SHAPE), noise=noise, clip_denoised=True)
    return to_uint8(x), n / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="DKDM steps per arm (equal for all)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--remove", default="middle_block,attention@4,attention@2", help="blocks removed (BK-SDM style)")
    p.add_argument("--feature_kd_weight", type=float, default=1.0)
    p.add_argument("--threshold", type=float, default=0.05, help="Diff-Pruning's loss threshold")
    p.add_argument("--prune_images", type=int, default=64, help="pool images for the Taylor importance")
    p.add_argument("--samples", type=int, default=400, help="samples per arm for the FD")
    p.add_argument("--respacing", default="25", help="sampling steps")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--workdir", default="", help="runs and pool caches ('' = a temporary directory)")
    p.add_argument("--out", default="benchmarks/results/compress_digits.json")
    p.add_argument("--table", default="", help="only print the markdown table of this results JSON")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return 0
    torch.set_num_threads(1)
    arms = [a for a in args.arms.split(",") if a]
    if bad := [a for a in arms if a not in ARMS]:
        print(f"compress_digits.py: error: unknown arm(s) {bad}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 1
    work = args.workdir or tempfile.mkdtemp(prefix="dkdm_compress_")
    logger.configure(os.path.join(work, "log"), format_strs=["log"])

    t_res = resolve(checkpoint=EMBEDDED_TEACHER)
    teacher = t_res.build().eval()
    t_diff = create_diffusion(dataclasses.replace(t_res.diffusion, timestep_respacing=""))
    key = teacher_id(EMBEDDED_TEACHER, teacher.config)
    classifier = load_classifier()
    ref = activations(real_digits()[0], classifier)

    # the students' inits, saved with their configs as scripts/compress.py saves them
    removed_cfg, removed_sd = remove_blocks(teacher, args.remove.split(","))
    ratio, _ = matching_ratio(teacher, parameter_count(removed_cfg))
    x0 = teacher_images(teacher, t_diff, args.prune_images, rho=0.1, seed=0, teacher_id=key, cache_dir=work)
    pruned_cfg, pruned_sd, stats = prune_from_images(teacher, t_diff, x0, ratio, threshold=args.threshold)
    inits = {}
    for name, (cfg, sd) in {"removed": (removed_cfg, removed_sd), "pruned": (pruned_cfg, pruned_sd)}.items():
        out = os.path.join(work, f"init_{name}")
        if not os.path.exists(os.path.join(out, "student.pt")):
            save_student(out, cfg, sd, {"benchmark": "compress_digits"}, diffusion=t_res.diffusion)
        inits[name] = os.path.join(out, "student.pt")

    sample_diff = create_diffusion(dataclasses.replace(t_res.diffusion, timestep_respacing=args.respacing))
    n_steps = sample_diff.num_timesteps
    t_samples, t_speed = sample(teacher, sample_diff, args.samples, 1234)
    results = {
        "teacher": {
            "params": params(teacher),
            "flops_per_call": flops_per_call(teacher, SHAPE),
            **score(activations(t_samples, classifier), ref),
            "images_per_s": t_speed,
        },
        "pruning": {"ratio": ratio, "threshold": args.threshold, "importance_steps": stats["steps"]},
        "arms": {},
    }
    for arm in arms:
        for seed in (int(s) for s in args.seeds.split(",")):
            init = inits["pruned" if arm == "pruned" else "removed"]
            _, s_res = resolve_distillation({}, student_init=init)
            torch.manual_seed(seed)
            # random: the removed arm's architecture, fresh weights
            student = build_network(s_res.model, "" if arm == "random" else init)
            flops = flops_per_call(student, SHAPE)
            before, _ = sample(student, sample_diff, args.samples, 1234)
            run_dir = os.path.join(work, f"{arm}_s{seed}")
            distill = DistillConfig(
                rho=0.1,
                teacher_batch=256,
                pool_cache_dir=os.path.join(work, "pool_cache"),
                feature_kd_weight=args.feature_kd_weight if arm == "removed+fkd" else 0.0,
            )
            train = TrainConfig(
                batch_size=args.batch,
                lr=args.lr,
                lr_anneal_steps=args.steps,
                ema_rate="0.995",
                seed=seed,
                log_interval=0,
                save_interval=0,
                log_dir=run_dir,
            )
            torch.manual_seed(seed)
            loop = DistillLoop(
                teacher,
                student,
                t_diff,
                create_diffusion(s_res.diffusion),
                train=train,
                distill=distill,
                run_dir=run_dir,
                teacher_key=key,
            )
            loop.prepare_pool(progress=False)  # cached after the first arm of a seed; not part of train_s
            t0 = time.perf_counter()
            loop.run()
            train_s = time.perf_counter() - t0
            ema = build_network(s_res.model)
            ema.load_state_dict(loop.trainer.ema_state_dict("0.995"))
            images, speed = sample(ema, sample_diff, args.samples, 1234)
            results["arms"].setdefault(arm, []).append(
                {
                    "seed": seed,
                    "params": params(student),
                    "flops_per_call": flops,
                    "flops_per_sample": flops * n_steps,
                    "fd_init": score(activations(before, classifier), ref)["fd"],
                    **score(activations(images, classifier), ref),
                    "images_per_s": speed,
                    "train_s": train_s,
                }
            )
            print(json.dumps({arm: results["arms"][arm][-1]}), flush=True)
    results["setup"] = {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "remove": args.remove,
        "feature_kd_weight": args.feature_kd_weight,
        "samples": args.samples,
        "sampling_steps": n_steps,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), 1 torch thread",
        "command": "python benchmarks/compress_digits.py " + " ".join(argv),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
