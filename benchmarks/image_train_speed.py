"""Steps per second of image_train.py's training step (default: the digits teacher on CPU).

Builds what scripts/image_train.py builds -- zoo model, diffusion, data stream, Trainer --
and times ``Trainer.run_step`` (data, forward, backward, AdamW, EMA, on-device logging)
after a warm-up. Prints one JSON object.

  python benchmarks/image_train_speed.py                       # digits teacher, batch 64
  python benchmarks/image_train_speed.py --arch cifar10-14M --batch_size 128 --precision bf16
"""

import argparse
import json
import platform
import tempfile
import time

import torch

from dkdm import dist, logger
from dkdm.config import TrainConfig
from dkdm.data import load_data
from dkdm.diffusion import create_diffusion, create_named_schedule_sampler
from dkdm.models import create_model, get_config
from dkdm.training import Trainer, batches_from_stream, diffusion_loss_fn, seed_all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="digits-teacher")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--diffusion_steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dist.setup_dist()
    seed_all(0)
    cfg = get_config(a.arch)
    model = create_model(cfg)
    diffusion = create_diffusion(steps=a.diffusion_steps, noise_schedule="cosine", learn_sigma=cfg.learn_sigma)
    sampler = create_named_schedule_sampler("uniform", diffusion)
    data = (
        load_data(dataset="digits", batch_size=a.batch_size, image_size=cfg.image_size, num_workers=0)
        if cfg.in_channels == 1
        else _synthetic(a.batch_size, cfg)
    )
    with tempfile.TemporaryDirectory() as run_dir:
        logger.configure(run_dir, format_strs=["log"])
        train = TrainConfig(
            batch_size=a.batch_size, lr=1e-4, ema_rate="0.9999", precision=a.precision, log_interval=0, save_interval=0
        )
        trainer = Trainer(model, diffusion, cfg=train, run_dir=run_dir)
        next_batch = batches_from_stream(data, dist.dev())
        loss_fn = diffusion_loss_fn(diffusion, sampler)
        for _ in range(a.warmup):
            trainer.run_step(next_batch, loss_fn)
        _sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            trainer.run_step(next_batch, loss_fn)
        _sync()
        elapsed = time.perf_counter() - t0
        logger.dumpkvs()
        del trainer  # under mpiexec/torchrun its DDP wrapper holds the group cleanup() frees
    print(
        json.dumps(
            {
                "benchmark": "image_train_speed",
                "arch": a.arch,
                "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 3),
                "batch_size": a.batch_size,
                "precision": a.precision,
                "steps": a.steps,
                "seconds": round(elapsed, 3),
                "steps_per_s": round(a.steps / elapsed, 3),
                "samples_per_s": round(a.steps * a.batch_size / elapsed, 1),
                "device": str(dist.dev()),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
            }
        )
    )
    dist.cleanup()


def _synthetic(batch_size, cfg):
    # Non-digits architectures: random images of the right shape, the speed is what matters.
    def stream():
        while True:
            yield torch.rand(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1, {}

    return stream()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
