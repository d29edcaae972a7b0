"""The whole pipeline on the embedded default, in minutes on a laptop CPU (`make demo`).

1. distil a digits student from the shipped teacher with dynamic iterative distillation
   (`python scripts/dkdm_train.py`, its defaults; no real digit is touched),
2. draw --num_samples images from teacher and student (--timestep_respacing IDDPM steps),
3. score both with the digits metric (FD, IS, precision, recall against the real digits),
4. print a table and write it (results.md, results.json) to --out, with the student's run in
   distill/ and each model's npz and PNG grid of 64 samples in teacher/ and student/.
Each run starts afresh (the previous run's student in --out is replaced).

--space latent does the same in latent space as well: the shipped latent teacher
(dkdm/assets/digits_latent_teacher.pt, on the 4x4x2 latents of dkdm/assets/digits_autoencoder/)
teaches a latent digits-student data-free; their samples are decoded by the first stage and
scored next to the pixel-space teacher and student (rows pixel-*, latent-*).
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
from dkdm.resolve import ASSETS, EMBEDDED_TEACHER, resolve

HERE = os.path.dirname(os.path.abspath(__file__))
LATENT_TEACHER = os.path.join(ASSETS, "digits_latent_teacher.pt")
# The latent student: digits-student on the teacher's 4x4x2 latents (its first stage comes from the teacher).
LATENT_STUDENT = ["--teacher_path", LATENT_TEACHER, "--student.image_size", "4", "--student.in_channels", "2"]


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
    stage = net.space.load_first_stage() if net.space.latent else None  # latents are decoded to images
    image_shape = stage.image_shape(shape) if stage is not None else shape
    output = sampling.resolve_output(os.path.join(out, name), cfg.num_samples, image_shape)
    manifest = sampling.make_manifest(model_cfg, diff_cfg, cfg, fileio.file_sha256(path), "cpu")
    store = sampling.ShardStore(sampling.shard_dir_for(output), manifest)
    store.prepare()
    decode = stage.decode_uint8 if stage is not None else None
    stats = sampling.draw_shards(model, net.create_diffusion(), store, cfg, shape, decode=decode)
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
    p.add_argument("--space", choices=("pixel", "latent"), default="pixel", help="latent: pixel and latent rows")
    args = p.parse_args()
    start = time.time()
    runs = {"": ("distill", [], EMBEDDED_TEACHER)}
    if args.space == "latent":
        runs = {"pixel-": runs[""], "latent-": ("distill_latent", LATENT_STUDENT, LATENT_TEACHER)}
    distill_s = 0.0
    for prefix, (folder, extra, _) in runs.items():
        student_dir = os.path.join(args.out, folder)
        if os.path.isdir(student_dir):
            shutil.rmtree(student_dir)  # a rerun would otherwise resume the finished run and skip training
        cmd = [sys.executable, os.path.join(HERE, "dkdm_train.py"), "--log_dir", student_dir, *extra]
        cmd += args.distill_args.split()
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        if subprocess.run(cmd, check=False).returncode:
            print(f"demo.py: error: the {prefix or 'pixel-'}distillation failed (see above)", file=sys.stderr)
            return 1
        distill_s += time.time() - t0
    cfg = SampleConfig(num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed)
    rows = []
    for prefix, (folder, _, teacher) in runs.items():
        rows.append(sample(f"{prefix}teacher", teacher, cfg, args.timestep_respacing, args.out))
        rows.append(sample(f"{prefix}student", newest_ema(os.path.join(args.out, folder)), cfg,
                           args.timestep_respacing, args.out))  # fmt: skip
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
    print("grids: " + ", ".join(r["grid"] for r in rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        sys.exit(1)
