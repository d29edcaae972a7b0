"""Train a diffusion model on images: teachers, and the paper's data-based baselines.

With no flags it trains the embedded digits teacher (configs/digits/teacher.yaml).
  python scripts/image_train.py --max_steps 100
  python scripts/image_train.py --arch cifar10-14M --data_dir cifar_train/ --config my.yaml
  mpiexec -n 8 python scripts/image_train.py --config exp.yaml --log_dir runs/exp
--arch is a zoo name (see dkdm.models.list_models), a model YAML, or a family (unet, vit).
Rerunning with the same --log_dir resumes from its newest complete checkpoint.
With --first_stage (a diffusers AutoencoderKL/VQModel folder or a CompVis .ckpt) the model learns latents:
the dataset is encoded once into <log_dir>/latent_cache and batches are sliced from it.
"""

import datetime
import os
import sys

from dkdm import dist, logger
from dkdm.config import ConfigParser, DiffusionConfig, ModelConfig, TrainConfig
from dkdm.data import load_data, per_rank_batch
from dkdm.diffusion import create_named_schedule_sampler
from dkdm.hostmem import tune_host_allocator
from dkdm.resolve import DEFAULT_TEACHER, resolve
from dkdm.training import Trainer, batches_from_stream, diffusion_loss_fn, seed_all

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "digits", "teacher.yaml")


def main(argv: list[str]) -> None:
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEFAULT_CONFIG, *argv]
    groups = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig}
    args = ConfigParser(__doc__, groups).parse(argv)
    net = resolve(args.overrides["model"], args.overrides["diffusion"], default=DEFAULT_TEACHER)
    model_cfg, diff_cfg, train = net.model, net.diffusion, args.resolve("train")

    dist.setup_dist()
    allocator = tune_host_allocator()  # before the run directory: a bad DKDM_HOST_ALLOCATOR leaves none
    batch = per_rank_batch(train.batch_size, dist.get_world_size())
    run_dir = train.log_dir or dist.broadcast_object(
        os.path.join("runs", f"{model_cfg.name or model_cfg.arch}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    )
    logger.configure(run_dir)
    logger.log(f"host allocator: {allocator}")
    if net.space.latent:  # encode the dataset once with the first stage (cached), then stream latents
        from dkdm.data.latents import load_latent_data

        data, info = load_latent_data(
            net.space,
            dataset=train.dataset,
            data_dir=train.data_dir,
            batch_size=batch,
            class_cond=model_cfg.class_cond,
            deterministic=train.deterministic,
            seed=train.seed,
            cache_dir=os.path.join(run_dir, "latent_cache"),
            device=dist.dev(),
        )
        how = "cached" if info["cached"] else f"encoded in {info['seconds']:.1f} s"
        logger.log(f"latents: {info['path']} ({how})")
    else:
        data = load_data(
            dataset=train.dataset,
            data_dir=train.data_dir,
            batch_size=batch,
            image_size=model_cfg.image_size,
            class_cond=model_cfg.class_cond,
            num_classes=model_cfg.num_classes,
            deterministic=train.deterministic,
            random_flip=train.random_flip,
            num_workers=train.num_workers,
            seed=train.seed,
        )
    seed_all(train.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = net.build()
    diffusion = net.create_diffusion()
    sampler = create_named_schedule_sampler(train.schedule_sampler, diffusion)
    logger.log(
        f"{model_cfg.name or model_cfg.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{dist.get_world_size()} process(es), run dir {run_dir}"
    )
    trainer = Trainer(
        model,
        diffusion,
        cfg=train,
        run_dir=run_dir,
        config_to_save={"model": model_cfg, "diffusion": diff_cfg, "train": train},
        loop_state={"data": data, "schedule_sampler": sampler},
    )
    trainer.run(batches_from_stream(data, dist.dev(), net.space.shape), diffusion_loss_fn(diffusion, sampler))
    del trainer  # its DDP wrapper holds the process group, which cleanup() can free only once unheld
    dist.cleanup()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError) as e:  # ConfigError, DataError are ValueErrors
        print(f"image_train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # torch's own refusals (a device string, a shape): one line unless debugging
        if os.environ.get("DKDM_DEBUG"):
            raise
        print(f"image_train.py: error: {str(e).splitlines()[0]} (DKDM_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
