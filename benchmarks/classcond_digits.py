"""Class-conditional and guided DKDM on the embedded digits: label accuracy and FD per guidance scale.

    OMP_NUM_THREADS=1 python benchmarks/classcond_digits.py \
        [--steps 1200] [--num_samples 500] [--scales 0,1,2,4] [--w_range 0,4] [--fixed_w 1] [--work DIR] \
        [--timestep_respacing 25] \
        > benchmarks/results/cpu-x86_64-2core_classcond_digits.json

Distils students data-free from the embedded class-conditional teacher
(``dkdm/assets/digits_teacher_cond.pt``) with ``scripts/dkdm_train.py --config
configs/digits/dkdm_cond.yaml``:

* ``student_w<w>``: a class-conditional digits-student learning the teacher's guided output at
  one ``w`` (``--guidance_scale w``; ``w = 1`` is the plain conditional teacher);
* ``student_wcond``: the same network with ``guidance_cond``, learning every ``w`` in
  ``--w_range`` at once (``--w_min/--w_max``, one ``w`` per pool sample).

Then the teacher (guided at each scale), each fixed-``w`` student (at its own ``w``) and the
w-conditioned student (at each scale) draw ``--num_samples`` images with ``scripts/sample.py``
(labels uniform from the sampling seed, written to ``arr_1``), scored by the digits classifier:
``accuracy`` is the fraction classified as the requested label, ``fd`` the Frechet distance of
its features to the 1,797 real digits. Prints one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "dkdm", "assets", "digits_teacher_cond.pt")


def _run(script, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    # The scripts' logs go to stderr: stdout carries only the JSON.
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *flags]
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    return time.perf_counter() - t0


def _score(path, classifier, reference):
    from dkdm import digits_metric

    with np.load(path) as z:
        images, labels = z["arr_0"], z["arr_1"]
    acts = digits_metric.activations(images, classifier)
    accuracy, per_class = digits_metric.label_accuracy(acts, labels)
    return {
        "accuracy": accuracy,
        "accuracy_per_class": per_class,
        "fd": digits_metric.score(acts, reference)["fd"],
        "num_samples": len(labels),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="distillation steps of each student")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--scales", default="0,1,2,4", help="guidance scales for the teacher and the w-conditioned student")
    p.add_argument("--w_range", default="0,4", help="w_min,w_max of the w-conditioned student")
    p.add_argument("--fixed_w", default="1", help="one fixed-w student per value")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--timestep_respacing", default="", help="sampling steps (default: the teacher's 100)")
    p.add_argument("--work", default="", help="directory for runs and samples (default: a temporary one)")
    args = p.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    w_min, w_max = (float(s) for s in args.w_range.split(","))
    work = args.work or tempfile.mkdtemp(prefix="classcond_digits_")
    config = os.path.join(ROOT, "configs", "digits", "dkdm_cond.yaml")
    common = ["--config", config, "--teacher_path", TEACHER, "--max_steps", str(args.steps)]
    common += ["--lr_anneal_steps", str(args.steps), "--save_interval", str(args.steps)]
    students, seconds = {}, {}
    for w in [float(s) for s in args.fixed_w.split(",")]:
        name = f"student_w{w:g}"
        seconds[name] = _run("dkdm_train.py", *common, "--guidance_scale", str(w), "--log_dir", f"{work}/{name}")
        students[name] = ([w], f"{work}/{name}/ema_0.995_{args.steps:06d}.pt")
    seconds["student_wcond"] = _run(
        "dkdm_train.py",
        *common,
        "--student.guidance_cond",
        "true",
        "--w_min",
        str(w_min),
        "--w_max",
        str(w_max),
        "--log_dir",
        f"{work}/student_wcond",
    )
    students["student_wcond"] = (scales, f"{work}/student_wcond/ema_0.995_{args.steps:06d}.pt")

    from dkdm import digits_metric

    classifier = digits_metric.load_classifier()
    reference = digits_metric.activations(digits_metric.real_digits()[0], classifier)
    rows = []
    for name, (ws, path) in {"teacher": (scales, TEACHER), **students}.items():
        for w in ws:
            out = f"{work}/{name}_w{w:g}.npz"
            flags = ["--model_path", path, "--num_samples", str(args.num_samples), "--batch_size", "500"]
            flags += ["--timestep_respacing", args.timestep_respacing] if args.timestep_respacing else []
            secs = _run("sample.py", *flags, "--seed", str(args.seed), "--guidance_scale", str(w), "--output", out)
            rows.append({"model": name, "w": w, **_score(out, classifier, reference), "sample_seconds": secs})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "accuracy_per_class"}), file=sys.stderr)
    result = {
        "benchmark": "classcond_digits",
        "command": " ".join(["python", "benchmarks/classcond_digits.py", *sys.argv[1:]]),
        "teacher": os.path.relpath(TEACHER, ROOT),
        "distill_steps": args.steps,
        "sampling_steps": args.timestep_respacing or "100",
        "w_range": [w_min, w_max],
        "distill_seconds": seconds,
        "rows": rows,
        "note": "small runs on a shared 2-core CPU: times are disturbed by other jobs",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
