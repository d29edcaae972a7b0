"""Draw samples from a trained model into an ADM-format npz (+ a PNG grid of the first 64).

With no flags it samples the embedded digits teacher:
  python scripts/sample.py --num_samples 256 --output x.npz
  python scripts/sample.py --model_path runs/exp/ema_0.9999_200000.pt --timestep_respacing 50 --output runs/exp/
  mpiexec -n 8 python scripts/sample.py --model_path teacher.pt --arch cifar10-57M \
      --config configs/diffusion/cosine-1000-learned.yaml --timestep_respacing 1000 --num_samples 50000
  python scripts/sample.py --model_path dkdm/assets/digits_teacher_cond.pt --guidance_scale 3 --output g3.npz
--guidance_scale w samples a class-conditional model with a null class with classifier-free guidance
(w = 1: the plain conditional model), or a w-conditioned student at w.
The architecture and diffusion come from the run's config.yaml beside the checkpoint (or
--arch / --config / flags). A latent model's samples are decoded by its first stage (--first_stage,
recorded with the model) into images, --decode_chunk at a time; latents are never clipped. Shards land in <output>.shards/ as they finish; rerunning the
same command resumes, a different seed or configuration there is refused.
"""

import os
import sys

from tqdm import tqdm

from dkdm import dist, fileio, logger, sampling
from dkdm.config import ConfigParser, DiffusionConfig, ModelConfig, SampleConfig
from dkdm.distill.objectives.sampling import step_sampler_for
from dkdm.hostmem import tune_host_allocator
from dkdm.models.guidance import for_sampling
from dkdm.models.winograd import check_winograd_run, use_winograd
from dkdm.resolve import EMBEDDED_TEACHER, resolve
from dkdm.training.compile import FirstCallClock, compile_in_place, to_channels_last


def main(argv: list[str]) -> None:
    groups = {"model": ModelConfig, "diffusion": DiffusionConfig, "sample": SampleConfig}
    parser = ConfigParser(__doc__, groups)
    parser.add_argument("--decode_chunk", type=int, default=64, help="latent models: images decoded at once")
    args = parser.parse(argv)
    cfg = args.resolve("sample")
    dist.setup_dist()
    tune_host_allocator()  # before the model's first allocations (dkdm.hostmem)
    path = cfg.model_path or EMBEDDED_TEACHER
    net = resolve(args.overrides["model"], args.overrides["diffusion"], checkpoint=path)
    model_cfg, diff_cfg, shape = net.model, net.diffusion, net.space.shape
    model = for_sampling(net.build(), cfg.guidance_scale).to(dist.dev())  # guided, or w for a w-conditioned net
    if cfg.channels_last:
        to_channels_last(model)
    if cfg.winograd:
        check_winograd_run("--winograd", dist.dev().type, cfg.compile)
        routed = use_winograd(model)
    if cfg.compile:
        compile_in_place(model, cfg.compile_backend)
    diffusion = net.create_diffusion()  # validate everything before the manifest binds the output
    # A step-distilled student (luhman / progressive / tract / consistency / boot run) samples with its own sampler.
    diffusion = step_sampler_for(path, diff_cfg) or diffusion
    stage = None
    if net.space.latent:  # sample latents, store decoded images
        stage = net.space.load_first_stage(chunk_size=args.extras["decode_chunk"], precision=cfg.precision)
        stage = stage.to(dist.dev())
    image_shape = stage.image_shape(shape) if stage is not None else shape
    output = sampling.resolve_output(cfg.output or os.path.join("runs", "samples"), cfg.num_samples, image_shape)
    manifest = sampling.make_manifest(model_cfg, diff_cfg, cfg, fileio.file_sha256(path), dist.dev().type)
    store = sampling.ShardStore(sampling.shard_dir_for(output), manifest)
    error = None
    if dist.is_main():
        try:
            store.prepare()  # unwritable output or foreign shards: stop before drawing anything
        except sampling.SamplingError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise sampling.SamplingError(error)
    how = f"{diff_cfg.timestep_respacing or diff_cfg.steps} {'DDIM' if cfg.use_ddim else 'IDDPM'} steps"
    how = diffusion.describe() if hasattr(diffusion, "describe") else how
    logger.log(
        f"sampling {path} ({net.name}, config from {net.source}), "
        f"{how}, "
        f"{cfg.num_samples} images on {dist.get_world_size()} process(es) -> {output}"
    )
    if cfg.winograd:
        logger.log(f"winograd: {routed} 3x3 convolution(s) by F(4x4,3x3), the others direct")
    sizes = sampling.shard_sizes(cfg.num_samples, cfg.batch_size)
    mine = sum(sizes[dist.get_rank() :: dist.get_world_size()])
    bar = tqdm(total=mine, unit="img", desc="rank 0", disable=not dist.is_main())

    clock = FirstCallClock("batch", cfg.compile_backend) if cfg.compile else None

    def progress(n: int, drawn: bool) -> None:
        if not drawn:  # already on disk: out of the count, so img/s stays honest
            bar.total -= n
        elif clock is not None:
            clock.stop()
        bar.update(n if drawn else 0)

    if clock is not None:
        clock.start()

    stats = sampling.draw_shards(
        model,
        diffusion,
        store,
        cfg,
        shape,
        num_classes=net.space.num_classes,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=dist.dev(),
        on_shard=progress,
        decode=stage.decode_uint8 if stage is not None else None,
    )
    bar.close()
    dist.barrier()
    if dist.is_main():
        if stats.shards_skipped:
            logger.log(f"resumed: {stats.shards_skipped} finished shard(s) on rank 0 were kept, not redrawn")
        images, _ = sampling.finish(store, cfg, output, keep_shards=cfg.keep_shards)
        logger.log(
            f"saved {output} ({list(images.shape)} uint8) and {output[:-4]}.png; "
            f"rank 0 drew {stats.images_per_second:.1f} images/s"
        )
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, SamplingError are ValueErrors
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # torch's own refusals (a device string, a shape): one line unless debugging
        if os.environ.get("DKDM_DEBUG"):
            raise
        print(f"sample.py: error: {str(e).splitlines()[0]} (DKDM_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
