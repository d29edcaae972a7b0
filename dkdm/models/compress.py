"""Students cut from their teacher: block removal for the ADM UNet and the ViT.

BK-SDM (Kim et al., "On Architectural Compression of Text-to-Image Diffusion Models")
removes residual and attention blocks from a teacher and keeps every other weight. Here
the same surgery is done on our networks; the result is an ordinary ``ModelConfig`` (which
:func:`dkdm.models.create_model` rebuilds, so a run's ``config.yaml`` describes the student)
and a state dict that loads into it strictly.

What a removal list may name (``removable(model)`` lists them for a given network):

* ``input_blocks.K`` -- a residual block (with its attention) on the way down;
* ``output_blocks.K`` -- a residual block on the way up, except those holding an upsampler.
  Each level's way up has one block more than its way down (one per skip), so a level must
  lose as many blocks up as down, or a skip connection would have no consumer;
* ``middle_block`` (the whole middle) or ``middle_block.1`` (its attention only);
* ``attention@R`` -- every attention block at feature-map resolution ``R`` (both ways);
* ``innermost_stage`` -- the lowest-resolution level and the downsampler leading to it
  (BK-SDM-Tiny's cut); possible where that level is as wide as the one above it;
* for the ViT, ``blocks.K``.

The ViT can also be made narrower (:func:`narrow_vit`): it keeps the first ``heads`` attention
heads of every block, so the width becomes ``heads * head_dim`` (the MLP follows by
``mlp_ratio``), and every weight is the teacher's restricted to the kept channels. The fixed
sin-cos position table is rebuilt at the new width. Unlike block removal this does not keep
the teacher's function on a kept path (every LayerNorm now averages over fewer channels); it
is an initialisation near the teacher, for DKDM to finish.

The named recipes transpose BK-SDM's to our UNet: ``bk-base`` removes the last residual block
down and the last one before the upsampler up at every level that has two or more;
``bk-small`` adds the middle block; ``bk-tiny`` adds the innermost stage. A recipe that
empties a level, leaves a skip unconsumed or changes the channels reaching a kept block is
refused with a ``ValueError`` naming the block.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from .unet import AttentionBlock, Downsample, ResBlock, UNetModel, Upsample
from .vit import ViT
from .zoo import create_model, unet_kwargs

__all__ = [
    "RECIPES",
    "build_student",
    "narrow_vit",
    "recipe",
    "removable",
    "remove_blocks",
    "save_student",
    "unet_layout",
]

RECIPES = ("bk-base", "bk-small", "bk-tiny")


# --------------------------------------------------------------------------- layout


def unet_layout(per_level: Sequence[int]) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Roles of ``input_blocks`` and ``output_blocks`` by index: ``(role, level, position)``.

    Down: ``conv``, then per level its ``res`` blocks and (except the last level) a ``down``.
    Up, from the innermost level out: ``res`` blocks and, in every level but the first, an
    ``up`` block (a residual block holding the upsampler) last.
    """
    last = len(per_level) - 1
    down: list[tuple[str, int, int]] = [("conv", -1, 0)]
    for level, n in enumerate(per_level):
        down += [("res", level, j) for j in range(n)]
        if level != last:
            down.append(("down", level, n))
    up = [
        ("up" if level and i == n else "res", level, i)
        for level, n in reversed(list(enumerate(per_level)))
        for i in range(n + 1)
    ]
    return down, up


def _kind(module: nn.Module) -> str:
    if isinstance(module, AttentionBlock):
        return "attn"
    if isinstance(module, (Upsample, Downsample)):
        return "resample"
    if isinstance(module, ResBlock):
        return "resample" if module.updown else "res"
    return "conv"


def _align(student: Sequence[str], teacher: Sequence[str]) -> list[int]:
    """Teacher child index for each student child: the student's kinds are a subsequence."""
    out, j = [], 0
    for kind in student:
        while j < len(teacher) and teacher[j] != kind:
            j += 1
        if j == len(teacher):
            raise AssertionError(f"student block {list(student)} is not a part of teacher block {list(teacher)}")
        out.append(j)
        j += 1
    return out


def _resolutions(cfg: ModelConfig) -> list[int]:
    return [int(r) for r in cfg.attention_resolutions.replace(" ", "").split(",") if r]


def removable(model: nn.Module) -> list[str]:
    """The names :func:`remove_blocks` accepts for ``model`` (a UNet or a ViT built by the zoo)."""
    if isinstance(model, ViT):
        return [f"blocks.{k}" for k in range(len(model.blocks))]
    if not isinstance(model, UNetModel):
        raise TypeError(f"block removal supports the zoo's UNet and ViT, not {type(model).__name__}")
    down, up = unet_layout(model.level_res_blocks)
    names = [f"input_blocks.{k}" for k, (role, _, _) in enumerate(down) if role == "res"]
    names += [f"output_blocks.{k}" for k, (role, _, _) in enumerate(up) if role == "res"]
    if model.mid_block != "none":
        names.append("middle_block")
    if model.mid_block == "full":
        names.append("middle_block.1")
    cfg = _config(model)
    names += [f"attention@{r}" for r in _resolutions(cfg)]
    if len(model.channel_mult) > 1:
        names.append("innermost_stage")
    return names


def _config(model: nn.Module) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("the teacher carries no .config (ModelConfig); build it with dkdm.models.create_model")
    if getattr(cfg, "channel_widths", ""):
        raise ValueError("the teacher is a pruned network (channel_widths set); remove blocks before pruning")
    return cfg


def recipe(name: str, model: nn.Module) -> list[str]:
    """The block list of a named recipe (``RECIPES``) for ``model``; see the module docstring."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)} or list the blocks")
    if not isinstance(model, UNetModel):
        raise TypeError(f"the {name} recipe is for the UNet; for a ViT list the blocks.K to remove")
    down, up = unet_layout(model.level_res_blocks)
    out: list[str] = []
    for level, n in enumerate(model.level_res_blocks):
        if n < 2:
            only = next(k for k, (role, lv, _) in enumerate(down) if role == "res" and lv == level)
            raise ValueError(
                f"{name} removes one residual block per level, but level {level} has only input_blocks.{only}: "
                "removing it would leave the stage empty; list the blocks to remove instead"
            )
        out.append(f"input_blocks.{down.index(('res', level, n - 1))}")
        out.append(f"output_blocks.{up.index(('res', level, n - 1))}")
    if name in ("bk-small", "bk-tiny"):
        out.append("middle_block")
    if name == "bk-tiny":
        out.append("innermost_stage")
    return out


# --------------------------------------------------------------------------- removal


def remove_blocks(teacher: nn.Module, remove: Iterable[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Remove the named blocks from ``teacher``; return the student's config and state dict.

    Every weight the student keeps is copied from the teacher (clones, so the teacher is
    untouched); ``create_model(config)`` rebuilds the student and loads the state dict
    strictly (:func:`build_student`). With nothing removed the student is the teacher.
    Raises ``ValueError`` for an unknown name (listing the removable ones), an emptied
    level, an unconsumed skip, or a kept block whose input channels would change.
    """
    cfg = _config(teacher)
    remove = list(dict.fromkeys(remove))
    allowed = removable(teacher)
    unknown = [r for r in remove if r not in allowed]
    if unknown:
        raise ValueError(
            f"cannot remove {', '.join(unknown)} from {cfg.name or cfg.arch}: removable are {', '.join(allowed)} "
            "(the input conv, the resamplers and the up blocks holding an upsampler stay)"
        )
    if isinstance(teacher, ViT):
        return _remove_vit(teacher, cfg, remove)
    return _remove_unet(teacher, cfg, remove)


def _remove_vit(teacher: ViT, cfg: ModelConfig, remove: list[str]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    drop = {int(r.split(".")[1]) for r in remove}
    keep = [k for k in range(len(teacher.blocks)) if k not in drop]
    if not keep:
        raise ValueError(f"removing {', '.join(remove)} leaves the ViT without a block; keep at least one")
    student_cfg = dataclasses.replace(cfg, depth=len(keep), name=_name(cfg, remove))
    tsd = teacher.state_dict()

    def source(key: str) -> str:
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        return f"blocks.{keep[int(m.group(1))]}.{m.group(2)}" if m else key

    return student_cfg, _copy(student_cfg, tsd, source, lambda key: key.split(".")[0], remove)


def narrow_vit(teacher: ViT, heads: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A narrower ViT cut from ``teacher``: its first ``heads`` heads per block; see the module docstring.

    Returns the student's config and state dict (loads strictly into ``create_model(config)``).
    With ``heads`` equal to the teacher's the student is the teacher. Raises ``ValueError``
    for a head count outside ``1..num_heads`` and ``TypeError`` for a network that is no ViT.
    """
    if not isinstance(teacher, ViT):
        raise TypeError(f"narrowing keeps attention heads of the zoo's ViT, not a {type(teacher).__name__}")
    cfg = _config(teacher)
    if not 1 <= heads <= cfg.num_heads:
        raise ValueError(f"--vit_heads must lie in 1..{cfg.num_heads} (the teacher's heads), got {heads}")
    hd = cfg.hidden_size // cfg.num_heads
    big_h, h = cfg.hidden_size, heads * hd
    big_m, m = int(big_h * cfg.mlp_ratio), int(h * cfg.mlp_ratio)
    name = f"{cfg.name or cfg.arch}-{heads}heads" if heads != cfg.num_heads else cfg.name
    student_cfg = dataclasses.replace(cfg, hidden_size=h, num_heads=heads, name=name)
    with torch.device("meta"):
        skeleton = create_model(student_cfg)

    def cut(t: torch.Tensor, want: tuple[int, ...], fused: bool) -> torch.Tensor:
        """The teacher's tensor on the kept channels: an axis that shrinks keeps its first h (hidden) or
        m (MLP) entries; a fused projection (qkv: 3H, adaLN: 6H or 2H) keeps the first h of each part."""
        for axis, (n, k) in enumerate(zip(t.shape, want)):
            if n == k:
                continue
            if fused and axis == 0:
                parts = n // big_h
                t = t.reshape(*t.shape[:axis], parts, big_h, *t.shape[axis + 1 :]).narrow(axis + 1, 0, h)
                t = t.reshape(*t.shape[:axis], parts * h, *t.shape[axis + 2 :])
            elif (n, k) in ((big_h, h), (big_m, m)):
                t = t.narrow(axis, 0, k)
            else:
                raise ValueError(f"narrowing the ViT: no rule takes axis {axis} from {n} to {k}")
        return t

    tsd = teacher.state_dict()
    out = {}
    for key, like in skeleton.state_dict().items():
        if key == "pos_embed":  # a fixed sin-cos table of the width, not learned: the student's own
            t = create_model(student_cfg).pos_embed.detach()
        else:
            t = cut(tsd[key], tuple(like.shape), fused=".qkv." in key or ".adaLN_modulation." in key)
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(
                f"narrowing the ViT to {heads} heads: {key} came out {tuple(t.shape)}, not {tuple(like.shape)}"
            )
        out[key] = t.detach().clone().contiguous()
    return student_cfg, out


def _name(cfg: ModelConfig, remove: list[str]) -> str:
    return f"{cfg.name or cfg.arch}-minus{len(remove)}" if remove else cfg.name


def _remove_unet(
    teacher: UNetModel, cfg: ModelConfig, remove: list[str]
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    n = list(teacher.level_res_blocks)
    last = len(n) - 1
    down, up = unet_layout(n)
    inner = "innermost_stage" in remove
    gone_down = {int(r.split(".")[1]) for r in remove if r.startswith("input_blocks.")}
    gone_up = {int(r.split(".")[1]) for r in remove if r.startswith("output_blocks.")}
    for level in range(len(n) - int(inner)):
        names_down = [f"input_blocks.{k}" for k in sorted(gone_down) if down[k][1] == level]
        names_up = [f"output_blocks.{k}" for k in sorted(gone_up) if up[k][1] == level]
        if len(names_down) == n[level]:
            raise ValueError(
                f"removing {', '.join(names_down)} leaves level {level} with no residual block on the way down "
                "(an empty stage); keep one of them"
            )
        if len(names_down) != len(names_up):
            what = ", ".join(names_down + names_up)
            kept = [f"output_blocks.{k}" for k, (r, lv, _) in enumerate(up) if lv == level and r == "res"]
            raise ValueError(
                f"removing {what} breaks a skip connection at level {level}: each block removed on the way down "
                f"must go with one on the way up ({len(names_down)} down, {len(names_up)} up; that level's "
                f"removable up blocks are {', '.join(kept)})"
            )
        n[level] -= len(names_down)
    keep_down = [
        k
        for k, (role, level, _) in enumerate(down)
        if k not in gone_down and not (inner and (level == last or (role == "down" and level == last - 1)))
    ]
    keep_up = [k for k, (_, level, _) in enumerate(up) if k not in gone_up and not (inner and level == last)]
    if inner:
        n = n[:-1]

    kw = unet_kwargs(cfg)
    resolutions = [r for r in _resolutions(cfg) if f"attention@{r}" not in remove]
    mult = list(kw["channel_mult"])
    if inner:
        innermost = cfg.image_size // 2**last
        resolutions = [r for r in resolutions if r != innermost]
        mult = mult[:-1]
    mid = teacher.mid_block
    if "middle_block" in remove:
        mid = "none"
    elif "middle_block.1" in remove:
        mid = "res"
    uniform = len(set(n)) == 1
    student_cfg = dataclasses.replace(
        cfg,
        name=_name(cfg, remove),
        channel_mult=",".join(str(m) for m in mult) if inner else cfg.channel_mult,
        attention_resolutions=",".join(str(r) for r in resolutions),
        num_res_blocks=n[0] if uniform else cfg.num_res_blocks,
        level_res_blocks="" if uniform else ",".join(map(str, n)),
        mid_block=mid,
    )
    with torch.device("meta"):
        skeleton = create_model(student_cfg)
    children: dict[tuple[str, int], list[int]] = {}
    for part, keep in (("input_blocks", keep_down), ("output_blocks", keep_up)):
        s_blocks, t_blocks = getattr(skeleton, part), getattr(teacher, part)
        assert len(s_blocks) == len(keep), (part, len(s_blocks), keep)
        for k, block in enumerate(s_blocks):
            children[(part, k)] = _align([_kind(m) for m in block], [_kind(m) for m in t_blocks[keep[k]]])
    children[("middle_block", 0)] = _align(
        [_kind(m) for m in skeleton.middle_block], [_kind(m) for m in teacher.middle_block]
    )
    blocks = {"input_blocks": keep_down, "output_blocks": keep_up}

    def source(key: str) -> str:
        parts = key.split(".")
        if parts[0] in blocks:
            k, c = int(parts[1]), int(parts[2])
            return ".".join([parts[0], str(blocks[parts[0]][k]), str(children[(parts[0], k)][c]), *parts[3:]])
        if parts[0] == "middle_block":
            return ".".join([parts[0], str(children[("middle_block", 0)][int(parts[1])]), *parts[2:]])
        return key

    def block_of(key: str) -> str:
        parts = key.split(".")
        return ".".join(parts[:2]) if parts[0] in blocks else parts[0]

    return student_cfg, _copy(student_cfg, teacher.state_dict(), source, block_of, remove)


def _copy(student_cfg: ModelConfig, tsd: dict, source, block_of, remove: list[str]) -> dict[str, torch.Tensor]:
    """The student's state dict, each tensor cloned from ``tsd[source(key)]``; shapes must agree."""
    with torch.device("meta"):
        skeleton = create_model(student_cfg)
    out = {}
    for key, like in skeleton.state_dict().items():
        src = source(key)
        t = tsd[src]
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(
                f"removing {', '.join(remove)} changes what reaches the student's {block_of(key)} (from the "
                f"teacher's {block_of(src)}): {key} needs shape {tuple(like.shape)} but the teacher's {src} is "
                f"{tuple(t.shape)}; keep the block before it"
            )
        out[key] = t.detach().clone()
    return out


def save_student(
    out_dir: str,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    provenance: dict,
    diffusion: Any = None,
) -> dict:
    """Write ``config.yaml``, ``student.pt`` and ``compress.json`` into ``out_dir``.

    ``config.yaml`` holds the student's ``model`` (and the teacher's ``diffusion`` when given)
    where the resolver looks beside a checkpoint, so ``dkdm.resolve.resolve(checkpoint=
    student.pt)`` rebuilds the network (a pruned one needs it: its widths are in the config).
    Refuses (``FileExistsError``) to overwrite a student already there. Returns the paths.
    """
    import json

    from ..config import dump_yaml
    from ..fileio import atomic_save, atomic_write

    paths = {k: os.path.join(out_dir, f) for k, f in (("config", "config.yaml"), ("weights", "student.pt"))}
    paths["provenance"] = os.path.join(out_dir, "compress.json")
    if any(os.path.exists(p) for p in paths.values()):
        raise FileExistsError(f"{out_dir} already holds a compressed student; choose another --out or remove it")
    os.makedirs(out_dir, exist_ok=True)
    atomic_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, paths["weights"])
    dump_yaml({"model": config, **({"diffusion": diffusion} if diffusion is not None else {})}, paths["config"])
    text = json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(paths["provenance"], lambda f: f.write(text), mode="w")
    return paths


def build_student(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """``create_model(config)`` with ``state_dict`` loaded strictly (a compressed student, ready to train)."""
    from .checkpoints import load_checkpoint

    return load_checkpoint(create_model(config), state_dict)
