"""Data-free distillation (DKDM): train a student of any architecture from a teacher alone.

With no flags it distills digits-student from the embedded digits teacher (configs/digits/dkdm.yaml).
  python scripts/dkdm_train.py --max_steps 200
  python scripts/dkdm_train.py --config configs/cifar10_32/dkdm_14M.yaml --teacher_path cifar10_57M.pt
  mpiexec -n 8 python scripts/dkdm_train.py --config exp.yaml --log_dir runs/exp   (or torchrun)
--teacher_arch / --student_arch take zoo names (dkdm.models.list_models) or model YAMLs. The teacher's
diffusion is the student's (--diffusion.*) unless --teacher_diffusion.* says otherwise.
Rerunning with the same --log_dir resumes, pool included.
"""

import dataclasses
import datetime
import json
import os
import sys

from dkdm import dist, logger
from dkdm.config import (
    ConfigError,
    ConfigParser,
    DiffusionConfig,
    DistillConfig,
    ModelConfig,
    TrainConfig,
    update,
)
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop, teacher_id
from dkdm.models import create_model, get_config, load_checkpoint
from dkdm.training import seed_all

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "digits", "dkdm.yaml")
ASSETS = os.path.join(ROOT, "dkdm", "assets")


def model_config(args, group: str, arch: str, base: ModelConfig | None) -> ModelConfig:
    arch = args.overrides[group].pop("arch", arch) or (base.name if base else "")
    if base is None or (arch and arch != base.name):
        base = ModelConfig(arch=arch) if arch in ("unet", "vit") else get_config(arch)
    return args.resolve(group, base)


def resolve(argv: list[str]) -> tuple[dict, str]:
    """The resolved config groups and the teacher checkpoint path (no model is built)."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEFAULT_CONFIG, *argv]
    groups = {
        "teacher": ModelConfig,
        "student": ModelConfig,
        "diffusion": DiffusionConfig,
        "teacher_diffusion": DiffusionConfig,
        "train": TrainConfig,
        "distill": DistillConfig,
    }
    parser = ConfigParser(__doc__, groups, plain=["student", "diffusion", "train", "distill"])
    parser.add_argument("--teacher_arch", default=None, help="teacher architecture: zoo name or model YAML")
    parser.add_argument("--student_arch", default=None, help="student architecture: zoo name or model YAML")
    args = parser.parse(argv)
    for g in ("teacher", "student"):
        if args.extras[f"{g}_arch"]:
            args.overrides[g]["arch"] = args.extras[f"{g}_arch"]
    distill = args.resolve("distill")
    path = distill.teacher_path or os.path.join(ASSETS, "digits_teacher.pt")
    t_base, d_base = None, DiffusionConfig()
    if not distill.teacher_path:  # the embedded teacher: its provenance gives its configs
        if args.overrides["teacher"].get("arch", "digits-teacher") != "digits-teacher":
            raise ConfigError(
                f"the teacher is {args.overrides['teacher']['arch']}: pass its checkpoint with --teacher_path"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the embedded teacher {path} is missing; train it (configs/digits/teacher.yaml) or pass --teacher_path"
            )
        with open(os.path.join(ASSETS, "digits_teacher.json")) as f:
            meta = json.load(f)
        meta = meta.get("config", meta)
        t_base = get_config(ModelConfig(**meta["model"]))
        d_base = update(DiffusionConfig(), meta["diffusion"], "digits_teacher.json diffusion")
    teacher_cfg = model_config(args, "teacher", "digits-teacher", t_base)
    student_cfg = model_config(args, "student", "digits-student", None)
    args.overrides["diffusion"].setdefault("learn_sigma", student_cfg.learn_sigma)
    diff_cfg = args.resolve("diffusion", d_base)
    t_diff = dataclasses.replace(
        d_base if t_base else diff_cfg, learn_sigma=teacher_cfg.learn_sigma, use_kl=False, timestep_respacing=""
    )
    t_diff_cfg = args.resolve("teacher_diffusion", t_diff)
    if diff_cfg.learn_sigma != student_cfg.learn_sigma or t_diff_cfg.learn_sigma != teacher_cfg.learn_sigma:
        raise ConfigError(
            "learn_sigma of a network and of its diffusion differ; set --learn_sigma (student) "
            "and --teacher.learn_sigma with --teacher_diffusion.learn_sigma together"
        )
    configs = {
        "teacher": teacher_cfg,
        "student": student_cfg,
        "diffusion": diff_cfg,
        "teacher_diffusion": t_diff_cfg,
        "train": args.resolve("train"),
        "distill": distill,
    }
    return configs, path


def main(argv: list[str]) -> None:
    configs, path = resolve(argv)
    teacher_cfg, student_cfg, train = configs["teacher"], configs["student"], configs["train"]
    dist.setup_dist()
    run_dir = train.log_dir or dist.broadcast_object(
        os.path.join("runs", f"dkdm-{student_cfg.name or student_cfg.arch}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    )
    logger.configure(run_dir)
    seed_all(train.seed)
    student = create_model(student_cfg)
    teacher = load_checkpoint(create_model(teacher_cfg), path)
    logger.log(
        f"teacher {teacher_cfg.name or teacher_cfg.arch} ({path}), student {student_cfg.name or student_cfg.arch}: "
        f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; {dist.get_world_size()} process(es), "
        f"run dir {run_dir}"
    )
    loop = DistillLoop(
        teacher,
        student,
        create_diffusion(configs["teacher_diffusion"]),
        create_diffusion(configs["diffusion"]),
        train=train,
        distill=configs["distill"],
        run_dir=run_dir,
        config_to_save=configs,
        teacher_key=teacher_id(path, teacher_cfg),
    )
    loop.run()
    dist.cleanup()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, MemoryError, FloatingPointError) as e:  # ConfigError, CheckpointError too
        print(f"dkdm_train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # torch's own refusals (a device string, a shape): one line unless debugging
        if os.environ.get("DKDM_DEBUG"):
            raise
        print(f"dkdm_train.py: error: {str(e).splitlines()[0]} (DKDM_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
