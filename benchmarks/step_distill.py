"""Data-free step distillation on the embedded digits teacher: digits-metric FD at 1, 2, 4 and 8 sampling steps.

Rows (``--methods`` picks, ``--append`` adds them to an existing JSON): the teacher with DDIM (sample.py's respaced grid) at 1, 2, 4, 8 and 50 steps (the reference line);
the DKDM student (digits-student as configs/digits/dkdm.yaml trains it, EMA weights, DDIM at 1, 2, 4, 8 steps); Luhman & Luhman (1 step); BOOT (1 step, no pool); progressive distillation (rounds 8 -> 4 -> 2 -> 1, each round's checkpoint
sampled at its own step count); TRACT (phases 64 -> 8 -> 1, sampled at 8 and 1); consistency
distillation (multistep sampling at 1, 2, 4, 8 steps). The progressive and TRACT runs spend the same
number of optimizer steps. ``--figure`` draws FD against steps (matplotlib).
Every step student has the teacher's architecture and starts from its weights (the DKDM student is the
smaller digits-student, trained from scratch); all are trained with the pool / teacher only (no data), the
step students sampled from their raw (not EMA) weights. FD is the digits classifier's
(``dkdm/digits_metric.py``) against all 1,797 real digits. Each method records the teacher-network
evaluations it spent (pool preparation included). Prints one JSON object and writes it to ``--out``.

    python benchmarks/step_distill.py --quick            # ~15 min on 2 CPU cores: 1 seed, short runs
    python benchmarks/step_distill.py --seeds 0,1        # the full setting: longer runs, two seeds

``--budget_scale`` multiplies every training budget (named in the JSON as ``budget_scale``).

``--quick`` is named in the JSON (``"mode": "quick"``): its students are trained for a few hundred
steps and are not what the methods reach with a real budget.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from dkdm import digits_metric, logger
from dkdm.config import DistillConfig, TrainConfig, update
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.distill.objectives.sampling import StepSampler
from dkdm.models import create_model, load_checkpoint
from dkdm.resolve import DEFAULT_STUDENT, EMBEDDED_TEACHER, build_network, resolve
from dkdm.sampling import to_uint8

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STEPS = (1, 2, 4, 8)
METHODS = ("teacher", "dkdm", "luhman", "boot", "progressive", "tract", "consistency")


def teacher_setup():
    """The embedded teacher's model and diffusion configs, as the resolver reads them."""
    net = resolve(checkpoint=EMBEDDED_TEACHER)
    return net.model, net.diffusion


def load_teacher(mcfg):
    return build_network(mcfg, EMBEDDED_TEACHER).eval()


def get_student_config():
    """The DKDM student of configs/digits/dkdm.yaml (the resolver's default student)."""
    return resolve({"arch": DEFAULT_STUDENT}).model


@torch.no_grad()
def draw(sample_fn, n, batch, seed):
    """``n`` images (uint8 NHWC) from ``sample_fn(noise)``, noise from a seeded generator, in batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        torch.manual_seed(seed * 100003 + i)  # consistency renoising draws from the global generator
        noise = torch.randn((min(batch, n - i), 1, 8, 8), generator=gen)
        out.append(to_uint8(sample_fn(noise)))
    return np.concatenate(out)


def fd(images, classifier, reference):
    return digits_metric.score(digits_metric.activations(images, classifier), reference)["fd"]


def train(objective, mcfg, dcfg, seed, steps, batch, lr, extra, work, student_cfg=None, **train_kw):
    run_dir = os.path.join(work, f"{objective}-{seed}")
    logger.configure(run_dir, format_strs=["log", "csv"])
    d = create_diffusion(dcfg)
    torch.manual_seed(seed)
    distill = DistillConfig(objective=objective, rho=0.1, teacher_batch=256, warmup="respaced", **extra)
    tcfg = TrainConfig(
        batch_size=batch,
        lr=lr,
        max_steps=steps,
        ema_rate="0.995",
        seed=seed,
        log_interval=100,
        save_interval=0,
        **train_kw,
    )
    student = create_model(student_cfg or mcfg)
    loop = DistillLoop(load_teacher(mcfg), student, d, d, train=tcfg, distill=distill, run_dir=run_dir)
    t0 = time.perf_counter()
    loop.run(progress=False)
    secs = time.perf_counter() - t0
    prep = loop.pool.prep_stats.get("total_evals", 0.0) if loop.pool is not None else 0.0
    per_step = loop.method.teacher_evals * batch
    return (
        loop,
        run_dir,
        {
            "seconds": round(secs, 1),
            "pool_prep_teacher_evals": int(prep),
            "step_teacher_evals": int(per_step * steps),
            "teacher_evals_total": int(prep + per_step * steps),
        },
    )


def student_fn(net, sampler):
    net = net.eval()
    return lambda noise: sampler.sample(net, noise)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, one seed (named 'quick' in the JSON)")
    p.add_argument("--seeds", default="0", help="comma-separated training/sampling seeds")
    p.add_argument("--num_samples", type=int, default=0, help="samples per FD (default 1000 quick, 1797 full)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--append", action="store_true", help="add these rows to the JSON already at --out")
    p.add_argument("--figure", default="", help="also draw FD against sampling steps into this PNG")
    p.add_argument("--budget_scale", type=float, default=1.0, help="multiply every training budget (smoke tests)")
    p.add_argument(
        "--out", default="", help="JSON path (default benchmarks/results/cpu-x86_64-2core_step_distill[_quick].json)"
    )
    p.add_argument(
        "--combine", default="", help="comma-separated JSONs of runs with other seeds: join their rows into --out"
    )
    p.add_argument("--table", action="store_true", help="print the markdown table of the JSON at --out and stop")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine.split(","), args.out, args.figure)
    if args.table:
        with open(args.out) as f:
            return print("\n".join(table(json.load(f))))
    torch.set_num_threads(args.threads)
    quick = args.quick
    seeds = [int(s) for s in args.seeds.split(",")]
    n = args.num_samples or (1000 if quick else 1797)
    batch, lr = 64, 3e-4
    budget = {"dkdm": 1200, "luhman": 300, "boot": 600, "progressive_round": 150, "tract_phase": 300}
    budget["consistency"] = 600
    if not quick:
        budget = {"dkdm": 1200, "luhman": 2000, "boot": 4000, "progressive_round": 1000, "tract_phase": 2000}
        budget["consistency"] = 4000
    budget = {k: max(1, round(v * args.budget_scale)) for k, v in budget.items()}
    mcfg, dcfg = teacher_setup()
    classifier = digits_metric.load_classifier()
    reference = digits_metric.activations(digits_metric.real_digits()[0], classifier)
    work = tempfile.mkdtemp(prefix="dkdm_step_distill_")
    rows = []
    teacher = load_teacher(mcfg)
    methods = set(args.methods.split(","))

    def row(method, seed, k, imgs, **more):
        rows.append({"method": method, "seed": seed, "steps": k, "fd": fd(imgs, classifier, reference), **more})
        print(json.dumps(rows[-1]), file=sys.stderr)

    def sample_round(loop, run_dir, k):
        net = create_model(mcfg)
        load_checkpoint(net, loop.method.round_path(run_dir, loop.method.schedule.index(k)))
        return draw(student_fn(net, StepSampler(d, loop.cfg, k)), n, 250, seed)

    d = create_diffusion(dcfg)
    for seed in seeds:
        if "teacher" in methods:
            for k in (*STEPS, 50):
                spaced = create_diffusion(update(dcfg, {"timestep_respacing": str(k)}))
                imgs = draw(lambda z, s=spaced: s.ddim_sample_loop(teacher, tuple(z.shape), noise=z), n, 250, seed)
                row("teacher DDIM", seed, k, imgs, teacher_evals_per_sample=k)
        if "dkdm" in methods:
            # configs/digits/dkdm.yaml's run (lr 1e-3 annealed to 0, EMA 0.995), sampled like the teacher.
            scfg = update(get_student_config(), {"learn_sigma": mcfg.learn_sigma})
            loop, _, cost = train(
                "dkdm", mcfg, dcfg, seed, budget["dkdm"], batch, 1e-3, {}, work, scfg, lr_anneal_steps=budget["dkdm"]
            )
            net = create_model(scfg)
            net.load_state_dict(loop.trainer.ema_state_dict("0.995"))
            net.eval()
            for k in STEPS:
                spaced = create_diffusion(update(dcfg, {"timestep_respacing": str(k)}))
                imgs = draw(lambda z, s=spaced, m=net: s.ddim_sample_loop(m, tuple(z.shape), noise=z), n, 250, seed)
                row("dkdm student DDIM", seed, k, imgs, **cost, note="digits-student, EMA 0.995, from scratch")
        if "luhman" in methods:
            extra = {"luhman_steps": 8, "student_init": "teacher", "parameterization": "x0"}
            loop, _, cost = train("luhman", mcfg, dcfg, seed, budget["luhman"], batch, lr, extra, work)
            imgs = draw(student_fn(loop.trainer.model, StepSampler(d, loop.cfg, 1)), n, 250, seed)
            row("luhman", seed, 1, imgs, **cost, note="target: the teacher's 8-step DDIM sample")
        if "boot" in methods:
            extra = {"cm_steps": 18, "student_init": "teacher"}
            loop, _, cost = train("boot", mcfg, dcfg, seed, budget["boot"], batch, lr, extra, work)
            imgs = draw(student_fn(loop.trainer.model, StepSampler(d, loop.cfg, 1)), n, 250, seed)
            row("boot", seed, 1, imgs, **cost, note="no pool; 1 teacher + 1 student (no grad) eval per sample per step")
        if "progressive" in methods:
            r = budget["progressive_round"]
            extra = {"progressive_start": 8, "progressive_end": 1, "round_steps": r}
            loop, run_dir, cost = train("progressive", mcfg, dcfg, seed, 4 * r, batch, lr, extra, work)
            for k in STEPS[::-1]:
                row(
                    "progressive",
                    seed,
                    k,
                    sample_round(loop, run_dir, k),
                    **cost,
                    trained_steps=(loop.method.schedule.index(k) + 1) * r,
                    note="round checkpoint; cost is the whole 8->1 run (1 pool + 2 round-teacher evals/step)",
                )
        if "tract" in methods:
            r = budget["tract_phase"]
            extra = {"tract_steps": "64,8,1", "round_steps": r, "tract_ema": 0.95}
            loop, run_dir, cost = train("tract", mcfg, dcfg, seed, 2 * r, batch, lr, extra, work)
            for k in (8, 1):
                row(
                    "tract",
                    seed,
                    k,
                    sample_round(loop, run_dir, k),
                    **cost,
                    trained_steps=(loop.method.schedule.index(k) + 1) * r,
                    note="phases 64 -> 8 -> 1; 2 teacher + 1 self-teacher evals/step; 2 and 4 steps not on this schedule",
                )
        if "consistency" in methods:
            extra = {"cm_steps": 18, "cm_ema": 0.95}
            loop, _, cost = train("consistency", mcfg, dcfg, seed, budget["consistency"], batch, lr, extra, work)
            for k in STEPS:
                imgs = draw(student_fn(loop.trainer.model, StepSampler(d, loop.cfg, k)), n, 250, seed)
                row(
                    "consistency",
                    seed,
                    k,
                    imgs,
                    **cost,
                    note="2 teacher evals + 1 target-network eval per sample per step",
                )

    result = {
        "benchmark": "step_distill",
        "mode": "quick" if quick else "full",
        "command": "python benchmarks/step_distill.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
        f"{args.threads} thread(s)",
        "num_samples": n,
        "batch_size": batch,
        "lr": lr,
        "budget_steps": budget,
        "budget_scale": args.budget_scale,
        "rows": rows,
    }
    out = args.out or os.path.join(
        ROOT, "benchmarks", "results", f"cpu-x86_64-2core_step_distill{'_quick' if quick else ''}.json"
    )
    if args.append and os.path.isfile(out):
        with open(out) as f:
            old = json.load(f)
        if old.get("mode") != result["mode"]:
            raise SystemExit(
                f"{out} holds a {old.get('mode')} run; --append adds {result['mode']} rows only to a like one"
            )
        result["rows"] = old["rows"] + rows
        result["command"] = old["command"] + " && " + result["command"]
        result["budget_steps"] = {**old.get("budget_steps", {}), **budget}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))
    if args.figure:
        figure(result, args.figure)


def combine(paths, out, fig=""):
    """One JSON from runs of one setting that differ in their seeds or ``--methods`` (run side by side).

    A path not ending in ``.json`` is the stderr of a run stopped early: the rows it printed as it
    went (one JSON object a line) join the result, and the file is named under ``rows_from_logs``.
    """
    parts, logs = [], []
    for path in paths:
        with open(path) as f:
            if path.endswith(".json"):
                parts.append(json.load(f))
            else:
                rows = [json.loads(line) for line in f if line.startswith('{"method"')]
                logs.append({"path": path, "rows": rows})
    if not parts:
        raise SystemExit("--combine needs at least one finished run's JSON for the setting")
    same = ("mode", "num_samples", "batch_size", "lr", "budget_steps", "budget_scale")
    for part, path in zip(parts[1:], paths[1:]):
        bad = [k for k in same if part.get(k) != parts[0].get(k)]
        if bad:
            raise SystemExit(f"{path} differs from {paths[0]} in {', '.join(bad)}; combine only runs of one setting")
    result = {
        **parts[0],
        "rows": [r for part in parts for r in part["rows"]] + [r for log in logs for r in log["rows"]],
    }
    order = ["teacher DDIM", "dkdm student DDIM", *METHODS[2:]]
    result["rows"].sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["seed"], r["steps"]))
    if logs:
        result["rows_from_logs"] = [os.path.basename(log["path"]) for log in logs]
    result["command"] = " ; ".join(part["command"] for part in parts)
    result["date"] = " ; ".join(part["date"] for part in parts)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    if fig:
        figure(result, fig)


def table(result):
    """Markdown: FD per method and step count (mean over seeds, the seeds' range), teacher evaluations spent."""
    by, cost = {}, {}
    for row in result["rows"]:
        by.setdefault(row["method"], {}).setdefault(row["steps"], []).append(row["fd"])
        if "teacher_evals_total" in row:
            cost.setdefault(row["method"], {})[row["seed"]] = row["teacher_evals_total"]
    seeds = sorted({r["seed"] for r in result["rows"]})
    cols = [*STEPS, 50]
    lines = [
        "| method | " + " | ".join(f"FD, {k} step{'s' if k > 1 else ''}" for k in cols) + " | teacher evals spent |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for method, pts in by.items():
        cells = []
        for k in cols:
            v = pts.get(k)
            if not v:
                cells.append("—")
            elif len(v) == 1:
                cells.append(f"{v[0]:.1f}")
            else:
                cells.append(f"{np.mean(v):.1f} ({min(v):.1f}–{max(v):.1f})")
        if method in cost:
            spent = f"{np.mean(list(cost[method].values())) / 1e3:.0f}k in training"
        else:
            spent = "none in training; k per sample when sampling"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {spent} |")
    lines.append("")
    lines.append(
        f"{result['mode']} budget (x{result.get('budget_scale', 1.0):g}): {result['budget_steps']} optimizer steps, "
        f"batch {result['batch_size']}; {result['num_samples']} samples per FD; seeds {seeds}; mean (range over seeds)."
    )
    return lines


def figure(result, path):
    """FD (mean over seeds) against sampling steps, one line per method, the teacher's 50-step FD dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for row in result["rows"]:
        by.setdefault(row["method"], {}).setdefault(row["steps"], []).append(row["fd"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ref = by.get("teacher DDIM", {}).pop(50, None)
    for method, pts in by.items():
        ks = sorted(pts)
        ax.plot(ks, [float(np.mean(pts[k])) for k in ks], marker="o", label=method)
    if ref:
        ax.axhline(float(np.mean(ref)), color="gray", ls="--", lw=1, label="teacher DDIM, 50 steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(STEPS))
    ax.set_xticklabels([str(k) for k in STEPS])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("digits FD (lower is better)")
    seeds = sorted({r["seed"] for r in result["rows"]})
    ax.set_title(f"data-free step distillation, digits ({result['mode']}, seeds {seeds})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main(sys.argv[1:])
