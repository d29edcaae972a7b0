"""Cut a student from a teacher (block removal) or prune it (Diff-Pruning on pool samples), data-free.

  python scripts/compress.py --out runs/cut --remove middle_block,attention@2      (BK-SDM-style removal)
  python scripts/compress.py --out runs/cut --recipe bk-small --teacher_path t.pt --teacher.arch cifar10-57M \\
      --diffusion configs/diffusion/linear-1000-learned.yaml
  python scripts/compress.py --out runs/pruned --pruning_ratio 0.3                       (torch-pruning, Taylor importance)
  python scripts/compress.py --out runs/narrow --vit_heads 2 --teacher_path vit.pt            (a narrower ViT)
The teacher is resolved as dkdm_train.py resolves it (the embedded digits teacher without --teacher_path; the
config beside a checkpoint, else --teacher.arch and --diffusion). --out gets config.yaml (the student's network
and the teacher's diffusion), student.pt and compress.json; distill from it with
  python scripts/dkdm_train.py --student_init runs/cut/student.pt
"""

import argparse
import os
import sys

import torch

from dkdm.config import load_yaml
from dkdm.distill.compress import prune_from_images, teacher_images
from dkdm.distill.loop import teacher_id
from dkdm.models.compress import narrow_vit, recipe, removable, remove_blocks, save_student
from dkdm.resolve import EMBEDDED_TEACHER, resolve


def teacher(args) -> tuple[torch.nn.Module, object, str]:
    """The teacher network (weights loaded), its resolved diffusion config and its checkpoint path."""
    path = args.teacher_path or EMBEDDED_TEACHER
    over = {"arch": args.teacher_arch} if args.teacher_arch else {}
    dover = {}
    if args.diffusion:
        data = load_yaml(args.diffusion)
        dover = dict(data.get("diffusion", data))
    r = resolve(
        over, dover, checkpoint=path, diffusion_changes={"timestep_respacing": ""}, prefix="teacher.", dprefix=""
    )
    return r.build().eval(), r.diffusion, path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for config.yaml, student.pt, compress.json")
    p.add_argument("--teacher_path", default="", help="teacher checkpoint ('' = the embedded digits teacher)")
    p.add_argument("--teacher.arch", dest="teacher_arch", default="", help="teacher architecture: zoo name or YAML")
    p.add_argument("--diffusion", default="", help="the teacher's diffusion YAML, if nothing beside it records one")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", help="comma-separated blocks to remove (--list shows them)")
    how.add_argument("--recipe", help="bk-base, bk-small or bk-tiny")
    how.add_argument("--pruning_ratio", type=float, help="prune this share of channels per group, in (0, 1)")
    how.add_argument("--vit_heads", type=int, help="a narrower ViT: keep this many attention heads per block")
    how.add_argument("--list", action="store_true", help="print the teacher's removable blocks and stop")
    p.add_argument("--threshold", type=float, default=0.05, help="Diff-Pruning's loss threshold for late steps")
    p.add_argument("--images", type=int, default=64, help="teacher images (from the pool) for the importance")
    p.add_argument("--rho", type=float, default=0.1, help="pool size round(rho*T) * images (lowest t used)")
    p.add_argument("--pool_cache_dir", default="", help="reuse / keep the prepared pool here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.pruning_ratio is not None and not 0.0 < args.pruning_ratio < 1.0:
            raise ValueError(f"--pruning_ratio must lie strictly between 0 and 1, got {args.pruning_ratio}")
        if not 0.0 <= args.threshold < 1.0:
            raise ValueError(f"--threshold must lie in [0, 1) (a share of the largest loss), got {args.threshold}")
        if args.images < 1:
            raise ValueError(f"--images must be at least 1, got {args.images}")
        net, diff_cfg, path = teacher(args)
        if args.list:
            print("\n".join(removable(net)))
            return 0
        before = sum(v.numel() for v in net.state_dict().values())
        prov = {"teacher": os.path.abspath(path), "teacher_model": net.config, "command": " ".join(sys.argv)}
        if args.pruning_ratio is not None:
            from dkdm.diffusion import create_diffusion

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
            cfg, sd, stats = prune_from_images(
                net, diffusion, x0, args.pruning_ratio, threshold=args.threshold, seed=args.seed
            )
            prov.update(method="prune", ratio=args.pruning_ratio, threshold=args.threshold, images=args.images, **stats)
        elif args.vit_heads is not None:
            cfg, sd = narrow_vit(net, args.vit_heads)
            prov.update(method="narrow", heads=args.vit_heads)
        else:
            blocks = recipe(args.recipe, net) if args.recipe else [b for b in args.remove.split(",") if b]
            cfg, sd = remove_blocks(net, blocks)
            prov.update(method="remove", recipe=args.recipe or "", removed=blocks)
        after = sum(v.numel() for v in sd.values())
        prov.update(parameters_teacher=before, parameters_student=after)
        paths = save_student(args.out, cfg, sd, prov, diffusion=diff_cfg)
    except (ValueError, TypeError, OSError) as e:
        print(f"compress.py: error: {e}", file=sys.stderr)
        return 1
    print(f"student {cfg.name}: {after:,} parameters (teacher {before:,}); wrote {paths['config']}, {paths['weights']}")
    print(f"distill it: python scripts/dkdm_train.py --student_init {paths['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
