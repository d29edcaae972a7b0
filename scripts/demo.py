"""The whole pipeline on the embedded default, in minutes on a laptop CPU (`make demo`).

1. distil a digits student from the shipped teacher with dynamic iterative distillation
   (`python scripts/dkdm_train.py`, its defaults; no real digit is touched),
2. draw --num_samples images from teacher and student (--timestep_respacing IDDPM steps),
3. score both with the digits metric (FD, IS, precision, recall against the real digits),
4. print a table and write it (results.md, results.json) to --out, with the student's run in
   distill/ and each model's npz and PNG grid of 64 samples in teacher/ and student/.
Each run starts afresh (the previous run's student in --out is replaced).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from dkdm import digits_metric, fileio, sampling
from dkdm.config import SampleConfig
from dkdm.resolve import EMBEDDED_TEACHER, resolve

HERE = os.path.dirname(os.path.abspath(__file__))


def newest_ema(run_dir: str) -> str:
    """The newest EMA checkpoint of a run (the weights a distilled student is sampled with)."""
    files = sorted(glob.glob(os.path.join(run_dir, "ema_*_*.pt")), key=lambda p: (p.rsplit("_", 1)[-1], p))
    if not files:
        raise FileNotFoundError(f"no ema_*.pt checkpoint in {run_dir}; did the distillation finish?")
    return files[-1]


def sample(name: str, path: str, cfg: SampleConfig, respacing: str, out: str) -> dict:
    """Draw cfg.num_samples images from the checkpoint at ``path``; return its row of the table."""
    net = resolve({}, {"timestep_respacing": respacing}, checkpoint=path)
    model_cfg, diff_cfg, shape = net.model, net.diffusion, net.space.shape
    model = net.build()
    output = sampling.resolve_output(os.path.join(out, name), cfg.num_samples, shape)
    manifest = sampling.make_manifest(model_cfg, diff_cfg, cfg, fileio.file_sha256(path), "cpu")
    store = sampling.ShardStore(sampling.shard_dir_for(output), manifest)
    store.prepare()
    stats = sampling.draw_shards(model, net.create_diffusion(), store, cfg, shape)
    images, _ = sampling.finish(store, cfg, output)
    print(f"{name}: {len(images)} images -> {output} ({stats.images_per_second:.0f} images/s)", flush=True)
    return {
        "model": name,
        "checkpoint": os.path.relpath(path),
        "params": sum(p.numel() for p in model.parameters()),
        "images_per_s": stats.images_per_second,
        "npz": output,
        "grid": output[:-4] + ".png",
        **digits_metric.evaluate(images),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--timestep_respacing", default="50")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill_args", default="", help="extra flags for dkdm_train.py (default: none, its defaults)")
    args = p.parse_args()
    start = time.time()
    student_dir = os.path.join(args.out, "distill")
    if os.path.isdir(student_dir):
        shutil.rmtree(student_dir)  # a rerun would otherwise resume the finished run and skip training
    cmd = [sys.executable, os.path.join(HERE, "dkdm_train.py"), "--log_dir", student_dir, *args.distill_args.split()]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, check=False).returncode:
        print("demo.py: error: the distillation failed (see above)", file=sys.stderr)
        return 1
    distill_s = time.time() - t0
    cfg = SampleConfig(num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed)
    rows = [
        sample("teacher", EMBEDDED_TEACHER, cfg, args.timestep_respacing, args.out),
        sample("student", newest_ema(student_dir), cfg, args.timestep_respacing, args.out),
    ]
    lines = [
        "| model | params | FD | IS | precision | recall | sampling images/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['fd']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | "
        f"{r['recall']:.3f} | {r['images_per_s']:.0f} |"
        for r in rows
    ]
    note = (
        f"{args.num_samples} samples each, {args.timestep_respacing} IDDPM steps, seed {args.seed}, "
        f"{torch.get_num_threads()} CPU threads; metrics against the 1,797 real digits "
        f"(digits classifier features); distillation {distill_s:.0f} s, whole demo {time.time() - start:.0f} s"
    )
    print("\n" + "\n".join(lines) + "\n\n" + note)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n\n" + note + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "note": note}, f, indent=2)
    print(f"grids: {rows[0]['grid']}, {rows[1]['grid']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        sys.exit(1)
