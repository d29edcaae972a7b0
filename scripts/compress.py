"""Cut a student from a teacher (block removal) or prune it (Diff-Pruning on pool samples), data-free.

  python scripts/compress.py --out runs/cut --remove middle_block,attention@2      (BK-SDM-style removal)
  python scripts/compress.py --out runs/cut --recipe bk-small --teacher_arch cifar10-57M --teacher_path t.pt \\
      --diffusion configs/diffusion/linear-1000-learned.yaml
  python scripts/compress.py --out runs/pruned --prune 0.3                        (torch-pruning, Taylor importance)
Without --teacher_path the embedded digits teacher is used. --out gets student.yaml, student.pt and compress.json;
distill from it with
  python scripts/dkdm_train.py --student_arch runs/cut/student.yaml --student_init runs/cut/student.pt
"""

import argparse
import json
import os
import sys

import torch

from dkdm.config import DiffusionConfig, ModelConfig, load_yaml, update
from dkdm.diffusion import create_diffusion
from dkdm.distill.compress import prune_from_images, teacher_images
from dkdm.distill.loop import teacher_id
from dkdm.models import create_model, get_config, load_checkpoint
from dkdm.models.compress import recipe, removable, remove_blocks, save_student

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dkdm", "assets")


def teacher(args) -> tuple[torch.nn.Module, DiffusionConfig, str]:
    if not args.teacher_path:
        with open(os.path.join(ASSETS, "digits_teacher.json")) as f:
            meta = json.load(f)
        path = os.path.join(ASSETS, "digits_teacher.pt")
        cfg, diff = get_config(ModelConfig(**meta["model"])), update(DiffusionConfig(), meta["diffusion"])
    else:
        if not args.teacher_arch:
            raise ValueError("--teacher_path needs --teacher_arch (a zoo name or a model YAML)")
        path, cfg = args.teacher_path, get_config(args.teacher_arch)
        diff = None
        if args.diffusion:
            data = load_yaml(args.diffusion)
            diff = update(DiffusionConfig(), data.get("diffusion", data), args.diffusion)
    return load_checkpoint(create_model(cfg), path).eval(), diff, path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for student.yaml, student.pt, compress.json")
    p.add_argument("--teacher_path", default="", help="teacher checkpoint ('' = the embedded digits teacher)")
    p.add_argument("--teacher_arch", default="", help="teacher architecture: zoo name or model YAML")
    p.add_argument("--diffusion", default="", help="the teacher's diffusion YAML (pruning; embedded teacher: its own)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", help="comma-separated blocks to remove (--list shows them)")
    how.add_argument("--recipe", help="bk-base, bk-small or bk-tiny")
    how.add_argument("--prune", type=float, help="channel pruning ratio in (0, 1)")
    how.add_argument("--list", action="store_true", help="print the teacher's removable blocks and stop")
    p.add_argument("--threshold", type=float, default=0.05, help="Diff-Pruning's loss threshold for late steps")
    p.add_argument("--images", type=int, default=64, help="teacher images (from the pool) for the importance")
    p.add_argument("--rho", type=float, default=0.1, help="pool size round(rho*T) * images (lowest t used)")
    p.add_argument("--pool_cache_dir", default="", help="reuse / keep the prepared pool here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        net, diff_cfg, path = teacher(args)
        if args.list:
            print("\n".join(removable(net)))
            return 0
        before = sum(v.numel() for v in net.state_dict().values())
        prov = {"teacher": os.path.abspath(path), "teacher_model": net.config, "command": " ".join(sys.argv)}
        if args.prune is not None:
            if not 0.0 < args.prune < 1.0:
                raise ValueError(f"--prune must lie strictly between 0 and 1, got {args.prune}")
            if diff_cfg is None:
                raise ValueError("pruning needs the teacher's diffusion: pass --diffusion <diffusion YAML>")
            diffusion = create_diffusion(diff_cfg)
            torch.manual_seed(args.seed)
            x0 = teacher_images(
                net,
                diffusion,
                args.images,
                rho=args.rho,
                seed=args.seed,
                teacher_id=teacher_id(path, net.config),
                cache_dir=args.pool_cache_dir,
            )
            cfg, sd, stats = prune_from_images(net, diffusion, x0, args.prune, threshold=args.threshold, seed=args.seed)
            prov.update(method="prune", ratio=args.prune, threshold=args.threshold, images=args.images, **stats)
        else:
            blocks = recipe(args.recipe, net) if args.recipe else [b for b in args.remove.split(",") if b]
            cfg, sd = remove_blocks(net, blocks)
            prov.update(method="remove", recipe=args.recipe or "", removed=blocks)
        after = sum(v.numel() for v in sd.values())
        prov.update(parameters_teacher=before, parameters_student=after)
        paths = save_student(args.out, cfg, sd, prov)
    except (ValueError, TypeError, OSError) as e:
        print(f"compress.py: error: {e}", file=sys.stderr)
        return 1
    print(f"student {cfg.name}: {after:,} parameters (teacher {before:,}); wrote {paths['config']}, {paths['weights']}")
    print(
        f"distill it: python scripts/dkdm_train.py --student_arch {paths['config']} --student_init {paths['weights']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
