"""Cost of DKDM's machinery over the unavoidable work; prints one JSON object.

* ``step_overhead_ratio``: a distillation step (pool draw, one teacher forward, pool update,
  student step on the DKDM objective) / (the same teacher forward + a plain data-based
  student training step on the same batch), both through ``Trainer.run_step`` in this one
  process. Target <= 1.05. Measured for the digits pair and for cifar10 14M-from-57M at a
  small batch.
* ``prep_throughput_ratio``: useful teacher evaluations per second during pool preparation /
  samples per second of the raw batched teacher forward at the same batch. Target >= 0.95.
* pool memory per sample and in total for the paper's three pixel settings (rho = 0.4,
  T = 1000), on one device and per rank on 8.
* ``latent``: the same step ratio in latent space (LDM-VQ-4 UNets at reduced width on 16x16x3
  latents, L*simple, scaled_linear schedule; the first stage is never called while distilling),
  and the data-based baseline's cost per step on those latents with the dataset's encodings
  cached (dkdm.data.latents) against encoding each 64x64 pixel batch with the first stage (a
  VQ-f4 at half width) every step, as CompVis's LatentDiffusion does.

    python benchmarks/dkdm_step.py [--threads 1] [--rounds 5] [--skip_cifar] [--skip_latent]

Timings interleave the two sides round by round and report medians, so load from other
processes hits both alike.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from dkdm import logger
from dkdm.config import DistillConfig, TrainConfig
from dkdm.diffusion import create_diffusion, create_named_schedule_sampler
from dkdm.distill.loop import DistillLoop
from dkdm.distill.pool import estimate_pool_bytes, pool_size
from dkdm.models import create_model, load_checkpoint
from dkdm.training import diffusion_loss_fn

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dkdm", "assets", "digits_teacher.pt")


def _median_time(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_overhead(
    teacher_name, student_name, steps, batch, rounds, per_round, teacher_path=None, diffusion=None, **distill_kw
):
    torch.manual_seed(0)
    teacher, student = create_model(teacher_name), create_model(student_name)
    if teacher_path and os.path.isfile(teacher_path):
        load_checkpoint(teacher, teacher_path)
    d = diffusion or create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=True)
    run_dir = tempfile.mkdtemp(prefix="dkdm_bench_")
    logger.configure(run_dir, format_strs=["log"])
    train = TrainConfig(batch_size=batch, lr=1e-4, ema_rate="0.9999", log_interval=0, save_interval=0)
    # rho just large enough for a few batches: the step cost does not depend on the pool size.
    loop = DistillLoop(
        teacher,
        student,
        d,
        d,
        train=train,
        run_dir=run_dir,
        distill=DistillConfig(rho=2.0 / steps, teacher_batch=batch, pool_cache_dir="", **distill_kw),
    )
    loop.pool.prepared = True  # the pool's contents do not change the step's cost
    trainer = loop.trainer
    plain = diffusion_loss_fn(d, create_named_schedule_sampler("uniform", d))
    x = torch.randn(batch, *loop.pool.sample_shape).clamp(-1, 1)
    t = torch.randint(0, steps, (batch,))
    plain_batch = lambda: {"x": x}
    distill_t, base_t = [], []
    for _ in range(2):  # warm up
        trainer.run_step(loop.next_batch, loop.loss_fn)
        trainer.run_step(plain_batch, plain)
    # One distillation step, then one teacher forward and one plain step, cycle after cycle:
    # a change of load from other processes hits both sides of each ratio alike.
    for _ in range(rounds * per_round):
        distill_t.append(_median_time(lambda: trainer.run_step(loop.next_batch, loop.loss_fn), 1))
        tf = _median_time(lambda: loop.teacher_forward(x, t), 1)
        ts = _median_time(lambda: trainer.run_step(plain_batch, plain), 1)
        base_t.append(tf + ts)
    ratios = [a / b for a, b in zip(distill_t, base_t)]
    return {
        "step_overhead_ratio": round(statistics.median(ratios), 4),
        "distill_step_s": round(statistics.median(distill_t), 5),
        "teacher_forward_plus_plain_step_s": round(statistics.median(base_t), 5),
        "batch": batch,
        "_trainer": trainer,
        "_plain": plain,
    }


def latent_case(rounds, per_round, batch=4):
    """DKDM's step ratio on latents, and the data-based baseline with and without cached encodings."""
    import numpy as np

    from dkdm.data.latents import LatentSource
    from dkdm.models import first_stage, get_config

    small = {"image_size": 16, "attention_resolutions": "8,4,2", "first_stage": "benchmark-vq-f4"}
    teacher = get_config("ldm-vq4-274M", num_channels=64, **small)
    student = get_config("ldm-vq4-89M", num_channels=32, **small)
    d = create_diffusion(steps=1000, noise_schedule="scaled_linear:0.0015,0.0195", sigma_small=True)
    calls = {"encode": 0, "decode": 0}
    originals = {k: getattr(first_stage.FirstStage, k) for k in calls}

    def counting(name):
        def fn(self, *a, **kw):
            calls[name] += 1
            return originals[name](self, *a, **kw)

        return fn

    for k in calls:
        setattr(first_stage.FirstStage, k, counting(k))
    torch.manual_seed(0)
    stage = first_stage.FirstStage(first_stage.Spec("vq", 3, 3, (64, 128, 256), 2, 3, 3, 8192).build(), 1.0)
    out = step_overhead(teacher, student, 1000, batch, rounds, per_round, diffusion=d, simple_only=True)
    out["first_stage_calls_while_distilling"] = dict(calls)
    trainer, plain = out.pop("_trainer"), out.pop("_plain")
    n = 256
    pixels = torch.rand(n, 3, 64, 64) * 2 - 1
    source = LatentSource(stage.encode(pixels[:batch]).repeat(n // batch, 1, 1, 1), None, None)
    gen = np.random.default_rng(0)

    def cached():
        x, _ = source.batch(gen.choice(n, batch, replace=False), np.zeros(batch, dtype=bool))
        return {"x": x}

    def encoded():
        return {"x": stage.encode(pixels[torch.from_numpy(gen.choice(n, batch, replace=False))])}

    for _ in range(2):
        trainer.run_step(cached, plain)
        trainer.run_step(encoded, plain)
    with_cache, without = [], []
    for _ in range(rounds * per_round):
        with_cache.append(_median_time(lambda: trainer.run_step(cached, plain), 1))
        without.append(_median_time(lambda: trainer.run_step(encoded, plain), 1))
    for k, fn in originals.items():
        setattr(first_stage.FirstStage, k, fn)
    out["data_based_step_s_cached_encodings"] = round(statistics.median(with_cache), 5)
    out["data_based_step_s_encoding_every_step"] = round(statistics.median(without), 5)
    out["dkdm_step_over_data_based_encoding_every_step"] = round(
        out["distill_step_s"] / out["data_based_step_s_encoding_every_step"], 4
    )
    out["shapes"] = {"pixels": [3, 64, 64], "latents": [3, 16, 16]}
    return out


def prep_throughput(teacher_name, steps, teacher_batch, rho, rounds, teacher_path=None):
    torch.manual_seed(0)
    teacher = create_model(teacher_name)
    if teacher_path and os.path.isfile(teacher_path):
        load_checkpoint(teacher, teacher_path)
    student = create_model("digits-student")
    d = create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=True)
    results = []
    for r in range(rounds):
        run_dir = tempfile.mkdtemp(prefix="dkdm_bench_")
        logger.configure(run_dir, format_strs=["log"])
        loop = DistillLoop(
            teacher,
            student,
            d,
            d,
            run_dir=run_dir,
            train=TrainConfig(batch_size=64, log_interval=0, save_interval=0, seed=r),
            distill=DistillConfig(rho=rho, teacher_batch=teacher_batch, pool_cache_dir=""),
        )
        loop.pool.prepare(loop.teacher_forward, progress=False)  # no cache
        stats = loop.pool.prep_stats
        x = torch.randn(teacher_batch, *loop.pool.sample_shape)
        t = torch.randint(0, steps, (teacher_batch,))
        iters = max(3, int(stats["total_evals"] // teacher_batch // 4))
        forward = loop.teacher_forward
        raw = teacher_batch / _median_time(lambda f=forward, x=x, t=t: f(x, t), iters)
        results.append((stats["evals_per_s"] / raw, stats, raw))
    ratio, stats, raw = sorted(results, key=lambda r: r[0])[len(results) // 2]
    return {
        "prep_throughput_ratio": round(ratio, 4),
        "prep_useful_evals_per_s": round(stats["evals_per_s"], 1),
        "raw_teacher_samples_per_s": round(raw, 1),
        "packing_efficiency": round(stats["useful_evals"] / stats["total_evals"], 4),
        "pool_size": pool_size("dynamic", rho, steps, 64),
        "teacher_batch": teacher_batch,
    }


def memory_table():
    out = {}
    for name, (shape, batch) in {
        "cifar10_32": ((3, 32, 32), 128),
        "celeba_64": ((3, 64, 64), 256),
        "imagenet_32": ((3, 32, 32), 512),
    }.items():
        one = estimate_pool_bytes(pool_size("dynamic", 0.4, 1000, batch), shape, batch, 1024)
        per_rank = estimate_pool_bytes(pool_size("dynamic", 0.4, 1000, batch // 8), shape, batch // 8, 1024)
        out[name] = {
            "bytes_per_sample": one["per_sample"],
            "samples_one_device": pool_size("dynamic", 0.4, 1000, batch),
            "pool_GiB_one_device": round(one["pool"] / 2**30, 3),
            "pool_GiB_per_rank_of_8": round(per_rank["pool"] / 2**30, 3),
        }
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip_cifar", action="store_true")
    p.add_argument("--skip_latent", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = {"device": "cpu", "threads": a.threads, "torch": torch.__version__}
    out["digits"] = step_overhead("digits-teacher", "digits-student", 100, 64, a.rounds, 8, ASSET)
    if not a.skip_cifar:
        out["cifar10_14M_from_57M"] = step_overhead("cifar10-57M", "cifar10-14M", 1000, 4, max(3, a.rounds // 2), 3)
    if not a.skip_latent:
        out["latent"] = latent_case(max(3, a.rounds // 2), 3)
    for v in out.values():
        if isinstance(v, dict):
            v.pop("_trainer", None), v.pop("_plain", None)
    out["step_overhead_ratio"] = max(v["step_overhead_ratio"] for k, v in out.items() if isinstance(v, dict))
    out["prep"] = prep_throughput("digits-teacher", 100, 256, 0.1, max(3, a.rounds // 2), ASSET)
    out["prep_throughput_ratio"] = out["prep"]["prep_throughput_ratio"]
    out["pool_memory"] = memory_table()
    logger.reset()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
