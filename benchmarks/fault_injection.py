"""Kill runs at random moments (and fill their disk), resume them, compare with uninterrupted runs.

    python benchmarks/fault_injection.py                        # 10 trials per kind, 3 with two processes
    python benchmarks/fault_injection.py --trials 3 --trials2 1 --kinds distill,sample

Kinds: ``distill`` (scripts/dkdm_train.py killed while training), ``prepare`` (killed while it
shuffle-denoises the pool, with progress saved every half second), ``sample``
(scripts/sample.py killed between and during shards). Each trial SIGKILLs the whole process
group at a time drawn uniformly over the phase's duration in the uninterrupted reference
run, reruns the same command until it exits 0, and compares every result file bitwise with
the reference (the final model, EMA and pool tensors; the samples npz). ``--trials2`` does
the same under ``mpiexec -n 2``. ``disk_full`` runs a distillation whose run directory is a
small tmpfs (root only; skipped otherwise): the second save must fail with the disk-full
message, the first checkpoint must still load, and after the filesystem is enlarged the
rerun must end bitwise equal to the reference. Prints one JSON object (counts per kind) and
writes it to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
STEPS = 8
DISTILL = [
    "--max_steps",
    str(STEPS),
    "--save_interval",
    "2",
    "--log_interval",
    "4",
    "--batch_size",
    "16",
    "--rho",
    "0.05",
    "--teacher_batch",
    "64",
    "--prep_checkpoint_s",
    "0.5",
]
PREPARE = [
    "--max_steps",
    "2",
    "--save_interval",
    "2",
    "--log_interval",
    "2",
    "--batch_size",
    "16",
    "--rho",
    "0.4",
    "--teacher_batch",
    "64",
    "--prep_checkpoint_s",
    "0.5",
]
SAMPLE = ["--num_samples", "96", "--batch_size", "8", "--timestep_respacing", "20"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cmd(kind: str, out: str, nproc: int) -> list[str]:
    if kind == "sample":
        args = [os.path.join(SCRIPTS, "sample.py"), *SAMPLE, "--output", os.path.join(out, "s.npz")]
    else:
        args = [os.path.join(SCRIPTS, "dkdm_train.py"), *(DISTILL if kind == "distill" else PREPARE), "--log_dir", out]
    prefix = [MPIEXEC, "-n", str(nproc)] if nproc > 1 else []
    return [*prefix, sys.executable, *args]


def _run(cmd: list[str], kill_after: float | None = None, marker: str | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; SIGKILL the group ``kill_after`` seconds after start
    (or after a line containing ``marker`` appeared). Returns (exit code, output)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if kill_after is None:
        out, _ = proc.communicate()
        return proc.returncode, out
    lines = []
    if marker:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                break
    deadline = time.time() + kill_after
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + (proc.stdout.read() if proc.stdout else "")
    proc.wait()
    return proc.returncode, out


def _result(kind: str, out: str) -> dict[str, bytes]:
    """The bytes that must match the reference: tensors of the final checkpoint, or the npz."""
    if kind == "sample":
        with np.load(os.path.join(out, "s.npz")) as z:
            return {k: z[k].tobytes() for k in z.files}
    step = STEPS if kind == "distill" else 2
    res = {}
    for pattern in (f"model{step:06d}.pt", f"ema_*_{step:06d}.pt", f"pool{step:06d}*.pt"):
        for path in sorted(glob.glob(os.path.join(out, pattern))):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            for k, v in sorted(sd.items()):
                if isinstance(v, torch.Tensor):
                    res[f"{os.path.basename(path)}:{k}"] = v.numpy().tobytes()
    if not res:
        raise RuntimeError(f"no final checkpoint in {out}")
    return res


def trial_set(kind: str, nproc: int, n: int, work: str, rng: random.Random) -> dict:
    ref_dir = os.path.join(work, f"{kind}_np{nproc}_ref")
    t0 = time.time()
    code, text = _run(_cmd(kind, ref_dir, nproc))
    length = time.time() - t0
    if code:
        raise RuntimeError(f"reference {kind} run ({nproc} process(es)) failed:\n{text[-2000:]}")
    ref = _result(kind, ref_dir)
    # Kill inside the phase that matters: after the pool preparation started for `prepare`,
    # anywhere in the run otherwise (startup included: a kill there must be harmless too).
    marker = "shuffle-denoising" if kind == "prepare" else None
    equal, killed, reruns, failures = 0, 0, 0, []
    for i in range(n):
        out = os.path.join(work, f"{kind}_np{nproc}_{i}")
        at = rng.uniform(0.0, 2.5 if kind == "prepare" else length)
        first, _ = _run(_cmd(kind, out, nproc), kill_after=at, marker=marker)
        killed += first != 0
        codes = []
        for _ in range(3):  # a rerun must finish; a second kill is not part of the trial
            code, text = _run(_cmd(kind, out, nproc))
            codes.append(code)
            reruns += 1
            if code == 0:
                break
        got = _result(kind, out) if code == 0 else {}
        if code == 0 and got == ref:
            equal += 1
        else:  # say why: the rerun's exit codes and output, or which arrays differ and by how many bytes
            differing = {
                k: int(np.count_nonzero(np.frombuffer(ref[k], np.uint8) != np.frombuffer(got[k], np.uint8)))
                if k in got and len(got[k]) == len(ref[k])
                else "missing or resized"
                for k in ref
                if got.get(k) != ref[k]
            }
            failures.append(
                {
                    "kill_after_s": round(at, 3),
                    "killed_exit_code": first,
                    "rerun_exit_codes": codes,
                    "rerun_output_tail": text[-1500:] if code else "",
                    "differing_bytes": differing if code == 0 else {},
                    "files_after_rerun": sorted(os.listdir(out))[:40] if os.path.isdir(out) else [],
                }
            )
        shutil.rmtree(out, ignore_errors=True)
    return {
        "kind": kind,
        "processes": nproc,
        "trials": n,
        "killed_before_finishing": killed,
        "bitwise_equal_after_resume": equal,
        "reference_seconds": round(length, 2),
        "failures": failures,
    }


def disk_full_trial(work: str) -> dict:
    """A run directory on a tmpfs that holds one checkpoint but not two."""
    ref_dir = os.path.join(work, "disk_ref")
    code, text = _run(_cmd("distill", ref_dir, 1))
    if code:
        raise RuntimeError(f"reference run failed:\n{text[-2000:]}")
    one = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ref_dir, "*000002*")))
    mnt = os.path.join(work, "tmpfs")
    os.makedirs(mnt)
    size_kb = (one + one // 2 + (1 << 20)) // 1024  # checkpoint 2 fits with logs and the pool cache, 4 does not
    cache = os.path.join(work, "disk_cache")  # the pool cache lives elsewhere, as a shared cache would
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt], capture_output=True, check=False
        ).returncode
    ):
        return {"kind": "disk_full", "skipped": "cannot mount a tmpfs here (needs root)"}
    try:
        out = os.path.join(mnt, "run")
        code, text = _run([*_cmd("distill", out, 1), "--pool_cache_dir", cache])
        said = "disk full while writing" in text and "intact" in text
        first_ok = True
        try:
            torch.load(os.path.join(out, "model000002.pt"), weights_only=True)
        except Exception:  # noqa: BLE001 - any failure to read it means the checkpoint was damaged
            first_ok = False
        subprocess.run(["mount", "-o", "remount,size=200m", mnt], check=True)
        code2, _ = _run([*_cmd("distill", out, 1), "--pool_cache_dir", cache])
        equal = code2 == 0 and _result("distill", out) == _result("distill", ref_dir)
        return {
            "kind": "disk_full",
            "failed_with_message": bool(code) and said,
            "previous_checkpoint_loads": first_ok,
            "bitwise_equal_after_resume": equal,
            "tmpfs_kib": size_kb,
        }
    finally:
        subprocess.run(["umount", mnt], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="kill trials per kind with one process")
    p.add_argument("--trials2", type=int, default=3, help="kill trials per kind under mpiexec -n 2 (0: none)")
    p.add_argument("--kinds", default="distill,prepare,sample")
    p.add_argument("--no_disk_full", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fault_injection.json"))
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = set(kinds) - {"distill", "prepare", "sample"}
    if bad:
        p.error(f"unknown kind(s) {sorted(bad)}; choose from distill, prepare, sample")
    rng = random.Random(args.seed)
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dkdm-faults-") as work:
        for kind in kinds:
            rows.append(trial_set(kind, 1, args.trials, work, rng))
            if args.trials2 and os.path.exists(MPIEXEC):
                rows.append(trial_set(kind, 2, args.trials2, work, rng))
        if not args.no_disk_full:
            rows.append(disk_full_trial(work))
    report = {
        "command": "python benchmarks/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.time() - t0, 1),
        "results": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    ok = all(
        r.get("skipped")
        or (
            r.get("bitwise_equal_after_resume") == r.get("trials", 1)
            if "trials" in r
            else r["bitwise_equal_after_resume"] and r["failed_with_message"] and r["previous_checkpoint_loads"]
        )
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
