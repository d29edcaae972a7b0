"""Data-free distillation (DKDM): train a student of any architecture from a teacher alone.

With no flags it distills digits-student from the embedded digits teacher (configs/digits/dkdm.yaml).
  python scripts/dkdm_train.py --max_steps 200
  python scripts/dkdm_train.py --config configs/cifar10_32/dkdm_14M.yaml --teacher_path cifar10_57M.pt
  mpiexec -n 8 python scripts/dkdm_train.py --config exp.yaml --log_dir runs/exp   (or torchrun)
--student.arch / --teacher.arch take zoo names (dkdm.models.list_models), model YAMLs or a family (unet,
vit); the teacher is otherwise described by the config.yaml or .json beside --teacher_path. The student
learns the teacher's recorded diffusion unless --diffusion.* says otherwise (dkdm/resolve.py has the rules).
Rerunning with the same --log_dir resumes, pool included. --student_init DIR/student.pt starts from a student
cut or pruned from the teacher by scripts/compress.py (its config.yaml beside it describes the network).
"""

import datetime
import os
import sys

from dkdm import dist, logger
from dkdm.config import ConfigParser, DiffusionConfig, DistillConfig, ModelConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop, teacher_id
from dkdm.hostmem import tune_host_allocator
from dkdm.resolve import build_network, resolve_distillation
from dkdm.training import seed_all

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "digits", "dkdm.yaml")
GROUPS = {
    "teacher": ModelConfig,
    "student": ModelConfig,
    "diffusion": DiffusionConfig,
    "teacher_diffusion": DiffusionConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
}
RENAMED = {"arch": "--student.arch", "student_arch": "--student.arch", "teacher_arch": "--teacher.arch"}


def resolve(argv: list[str]) -> tuple[dict, str]:
    """The resolved config groups and the teacher checkpoint path (no model is built)."""
    default_config = not any(a == "--config" or a.startswith("--config=") for a in argv)
    if default_config:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    parser = ConfigParser(__doc__, GROUPS, plain=["student", "diffusion", "train", "distill"], renamed=RENAMED)
    args = parser.parse(argv)
    distill = args.resolve("distill")
    if distill.student_checkpoint and default_config and not any(a.startswith("--student.arch") for a in argv):
        args.overrides.get("student", {}).pop("arch", None)  # the default's digits-student: the init's config wins
    teacher, student = resolve_distillation(args.overrides, distill.teacher_path, distill.student_checkpoint)
    configs = {
        "teacher": teacher.model,
        "student": student.model,
        "diffusion": student.diffusion,
        "teacher_diffusion": teacher.diffusion,
        "train": args.resolve("train"),
        "distill": distill,
    }
    return configs, teacher.checkpoint


def main(argv: list[str]) -> None:
    configs, path = resolve(argv)
    teacher_cfg, student_cfg, train = configs["teacher"], configs["student"], configs["train"]
    dist.setup_dist()
    allocator = tune_host_allocator()  # before the run directory: a bad DKDM_HOST_ALLOCATOR leaves none
    run_dir = train.log_dir or dist.broadcast_object(
        os.path.join("runs", f"dkdm-{student_cfg.name or student_cfg.arch}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    )
    logger.configure(run_dir)
    logger.log(f"host allocator: {allocator}")
    seed_all(train.seed)
    student = build_network(student_cfg, configs["distill"].student_checkpoint)  # a compressed student's own weights
    teacher = build_network(teacher_cfg, path)
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
    del loop  # its DDP wrapper holds the process group, which cleanup() can free only once unheld
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
