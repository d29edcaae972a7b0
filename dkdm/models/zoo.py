"""Named architectures: the single source of truth from name to ``ModelConfig``.

``configs/arch/<name>.yaml`` are exported from ``ZOO`` (``python -m dkdm.models.zoo
--export configs/arch``) and a test keeps them in sync. Translating a ``ModelConfig``
into constructor arguments follows guided-diffusion's ``create_model``: the default
``channel_mult`` depends on the image size, ``attention_resolutions`` lists feature-map
*resolutions* that become downsampling rates, and ``learn_sigma`` doubles the output
channels.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, dump_yaml, load_yaml, update
from .unet import UNetModel
from .vit import ViT


def _cifar(**kw) -> ModelConfig:
    """The DDPM-IP / IDDPM CIFAR-10 recipe the paper's 32 px models share."""
    base = {
        "arch": "unet",
        "image_size": 32,
        "in_channels": 3,
        "learn_sigma": True,
        "num_channels": 128,
        "num_res_blocks": 3,
        "channel_mult": "1,2,2,2",
        "attention_resolutions": "16,8",
        "num_heads": 4,
        "num_head_channels": 32,
        "dropout": 0.3,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "use_new_attention_order": True,
    }
    return ModelConfig(**{**base, **kw})


def _celeba(**kw) -> ModelConfig:
    """The DDPM-IP CelebA 64 px recipe."""
    base = {
        "arch": "unet",
        "image_size": 64,
        "in_channels": 3,
        "learn_sigma": True,
        "num_channels": 192,
        "num_res_blocks": 3,
        "channel_mult": "1,2,3,4",
        "attention_resolutions": "32,16,8",
        "num_heads": 4,
        "num_head_channels": 64,
        "dropout": 0.1,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "use_new_attention_order": True,
    }
    return ModelConfig(**{**base, **kw})


def _digits(**kw) -> ModelConfig:
    """Tiny 8x8 single-channel UNets for the embedded default (sklearn digits).

    Sized for a 2-core CPU: preparing the distillation pool takes ~128k teacher
    evaluations, so the 8x8 level stays at the narrowest width 32-group normalisation
    allows and capacity goes to the cheap 2x2 level. The student's size is bounded below
    by the same 32-channel floor (about a third of the teacher, not a quarter).
    """
    base = {
        "arch": "unet",
        "image_size": 8,
        "in_channels": 1,
        "learn_sigma": True,
        "num_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": "1,1,2",
        "attention_resolutions": "4,2",
        "num_heads": 4,
        "num_head_channels": 32,
        "dropout": 0.1,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_new_attention_order": True,
    }
    return ModelConfig(**{**base, **kw})


def _ldm(**kw) -> ModelConfig:
    """CompVis's unconditional LDM UNet on VQ-f4 latents (CelebA-HQ / FFHQ 256: 64x64x3 latents).

    CompVis's ``openaimodel.UNetModel`` defaults otherwise: no scale-shift norm, conv resampling,
    legacy attention order, epsilon prediction with a fixed variance (3 output channels).
    """
    base = {
        "arch": "unet",
        "image_size": 64,
        "in_channels": 3,
        "learn_sigma": False,
        "num_channels": 224,
        "num_res_blocks": 2,
        "channel_mult": "1,2,3,4",
        "attention_resolutions": "32,16,8",
        "num_heads": 4,  # overridden by num_head_channels, as in CompVis's configs
        "num_head_channels": 32,
        "dropout": 0.0,
        "use_scale_shift_norm": False,
        "resblock_updown": False,
        "use_new_attention_order": False,
    }
    return ModelConfig(**{**base, **kw})


def _dit(hidden_size: int, depth: int, num_heads: int, image_size: int = 256, patch_size: int = 2) -> ModelConfig:
    """DiT's published models (Peebles & Xie, Table 1): class-conditional ImageNet on SD-VAE
    latents (4 channels, 1/8 of the image size), learned sigma, label dropout 0.1 (a null
    class for classifier-free guidance). Our ViT uses DiT's module names, so the official
    checkpoints load strictly."""
    return ModelConfig(
        arch="vit",
        image_size=image_size // 8,
        in_channels=4,
        learn_sigma=True,
        class_cond=True,
        num_classes=1000,
        class_dropout_prob=0.1,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        mlp_ratio=4.0,
        dropout=0.0,
    )


ZOO: dict[str, ModelConfig] = {
    "cifar10-57M": _cifar(),
    "cifar10-44M": _cifar(num_res_blocks=2),
    "cifar10-32M": _cifar(num_channels=96),
    "cifar10-24M": _cifar(num_channels=96, num_res_blocks=2),
    "cifar10-14M": _cifar(num_channels=64),
    "celeba64-295M": _celeba(),
    "celeba64-57M": _celeba(num_channels=96, num_res_blocks=2, num_head_channels=32),
    "imagenet32-57M": _cifar(),
    "imagenet32-14M": _cifar(num_channels=64),
    "cifar10-vit-19M": ModelConfig(
        arch="vit",
        image_size=32,
        in_channels=3,
        learn_sigma=True,
        patch_size=2,
        hidden_size=384,
        depth=7,
        num_heads=6,
        mlp_ratio=4.0,
        dropout=0.0,
    ),
    "digits-teacher": _digits(),
    "digits-student": _digits(channel_mult="1,1", attention_resolutions="4"),
    "digits-vit": ModelConfig(
        arch="vit",
        image_size=8,
        in_channels=1,
        learn_sigma=True,
        patch_size=2,
        hidden_size=128,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        dropout=0.0,
    ),
    "ldm-vq4-274M": _ldm(),
    "ldm-vq4-89M": _ldm(num_channels=128),
    "dit-xl2-256": _dit(1152, 28, 16),
    "dit-xl2-512": _dit(1152, 28, 16, image_size=512),
    "dit-l2-256": _dit(1024, 24, 16),
    "dit-b2-256": _dit(768, 12, 12),
    "dit-s2-256": _dit(384, 12, 6),
}
ZOO = {name: dataclasses.replace(cfg, name=name) for name, cfg in ZOO.items()}


def list_models() -> list[str]:
    """The names of the zoo's architectures, in the zoo's order."""
    return list(ZOO)


def _unknown_name(name: str) -> ConfigError:
    ranked = sorted(
        ZOO,
        key=lambda n: -difflib.SequenceMatcher(None, name.lower(), n.lower()).ratio(),
    )
    return ConfigError(
        f"unknown architecture '{name}'; valid names (closest first): {', '.join(ranked)}; "
        "or give a path to a YAML file with the model's fields"
    )


def get_config(name_or_path: str | ModelConfig, **overrides) -> ModelConfig:
    """Resolve a zoo name, a YAML file or a ``ModelConfig``, then apply ``overrides``.

    A YAML file holds ``ModelConfig`` fields, flat or under a ``model:`` section (the
    layout of ``configs/arch/*.yaml`` and of experiment files). Unknown names, files and
    fields raise ``ConfigError`` with the valid choices.
    """
    if isinstance(name_or_path, ModelConfig):
        cfg = name_or_path
    elif name_or_path in ZOO:
        cfg = ZOO[name_or_path]
    elif name_or_path.lower().endswith((".yaml", ".yml")) or os.path.sep in name_or_path:
        data = load_yaml(name_or_path)
        if set(data) == {"model"} and isinstance(data["model"], dict):
            data = data["model"]
        cfg = update(ModelConfig(), data, name_or_path)
    else:
        raise _unknown_name(name_or_path)
    return update(cfg, overrides, "model overrides") if overrides else cfg


def default_channel_mult(image_size: int) -> tuple:
    """guided-diffusion's channel multipliers per image size (and improved-diffusion's for 32)."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    if image_size not in table:
        raise ConfigError(
            f"no default channel_mult for image size {image_size} (known: {', '.join(map(str, table))}); "
            "give channel_mult explicitly, e.g. --channel_mult 1,2,2"
        )
    return table[image_size]


def _parse_numbers(text: str, what: str, cast=float) -> tuple:
    try:
        return tuple(cast(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, not {text!r}") from None


def unet_kwargs(cfg: ModelConfig) -> dict:
    """``UNetModel`` keyword arguments for a UNet ``ModelConfig`` (guided-diffusion's rules)."""
    if cfg.channel_mult:
        mult = tuple(int(m) if float(m).is_integer() else m for m in _parse_numbers(cfg.channel_mult, "channel_mult"))
    else:
        mult = default_channel_mult(cfg.image_size)
    resolutions = _parse_numbers(cfg.attention_resolutions, "attention_resolutions", int)
    valid = [cfg.image_size // 2**i for i in range(len(mult))]
    bad = [r for r in resolutions if r not in valid]
    if bad:
        raise ConfigError(
            f"attention resolution(s) {','.join(map(str, bad))} are not feature-map sizes of this UNet "
            f"(image size {cfg.image_size}, {len(mult)} levels: {','.join(map(str, valid))})"
        )
    return {
        "image_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "model_channels": cfg.num_channels,
        "out_channels": cfg.in_channels * (2 if cfg.learn_sigma else 1),
        "num_res_blocks": cfg.num_res_blocks,
        "attention_resolutions": tuple(cfg.image_size // r for r in resolutions),
        "dropout": cfg.dropout,
        "channel_mult": mult,
        "conv_resample": cfg.conv_resample,
        "num_classes": cfg.num_classes if cfg.class_cond else None,
        "use_checkpoint": cfg.use_checkpoint,
        "use_fp16": cfg.use_fp16,
        "num_heads": cfg.num_heads,
        "num_head_channels": cfg.num_head_channels,
        "num_heads_upsample": cfg.num_heads_upsample,
        "use_scale_shift_norm": cfg.use_scale_shift_norm,
        "resblock_updown": cfg.resblock_updown,
        "use_new_attention_order": cfg.use_new_attention_order,
        "class_dropout_prob": cfg.class_dropout_prob if cfg.class_cond else 0.0,
        "guidance_cond": cfg.guidance_cond,
        "level_res_blocks": _parse_numbers(cfg.level_res_blocks, "level_res_blocks", int) or None,
        "mid_block": cfg.mid_block,
    }


def vit_kwargs(cfg: ModelConfig) -> dict:
    """``ViT`` keyword arguments for a ViT ``ModelConfig`` (DiT's names)."""
    return {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "hidden_size": cfg.hidden_size,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "class_dropout_prob": cfg.class_dropout_prob,
        "num_classes": cfg.num_classes if cfg.class_cond else None,
        "learn_sigma": cfg.learn_sigma,
        "use_checkpoint": cfg.use_checkpoint,
        "guidance_cond": cfg.guidance_cond,
    }


def create_model(name_or_config: str | ModelConfig, **overrides) -> nn.Module:
    """Build the network for a zoo name, YAML path or ``ModelConfig`` (plus field overrides).

    The module's ``config`` attribute holds the resolved ``ModelConfig``. Inconsistent
    hyperparameters (image size the downsampling cannot divide, heads that do not split
    the channels) raise ``ConfigError`` with the numbers. ``use_fp16`` is recorded, not
    applied: call ``model.convert_to_fp16()`` as guided-diffusion's scripts do.
    """
    cfg = get_config(name_or_config, **overrides)
    try:
        if cfg.arch == "unet":
            model: nn.Module = UNetModel(**unet_kwargs(cfg))
        elif cfg.arch == "vit":
            model = ViT(**vit_kwargs(cfg))
        elif cfg.arch == "diffusers":
            from dkdm.models import foreign

            model = foreign.load(cfg)
        else:
            raise ConfigError(f"unknown arch '{cfg.arch}'; valid: unet, vit, diffusers")
    except ConfigError:
        raise
    except ValueError as e:
        label = f"'{cfg.name}'" if cfg.name else "the model config"
        raise ConfigError(f"cannot build {label}: {e}") from None
    if cfg.channel_widths:  # a pruned network: the same layers, narrower
        from .prune import apply_widths

        apply_widths(model, cfg.channel_widths)
    model.config = cfg
    return model


def count_parameters(name_or_config: str | ModelConfig, **overrides) -> int:
    """Number of parameters (``model.parameters()``, DiT's frozen ``pos_embed`` included),
    counted on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model = create_model(name_or_config, **overrides)
    return sum(p.numel() for p in model.parameters())


def export_yaml(directory: str) -> list[str]:
    """Write ``<directory>/<name>.yaml`` (a ``model:`` section) for every zoo entry; return the paths."""
    paths = []
    for name, cfg in ZOO.items():
        path = os.path.join(directory, f"{name}.yaml")
        dump_yaml({"model": cfg}, path)
        paths.append(path)
    return paths
