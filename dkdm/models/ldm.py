"""CompVis latent-diffusion checkpoints: the UNet, its EMA, the first stage and the schedule inside.

A LatentDiffusion Lightning ``.ckpt`` holds ``state_dict`` with ``model.diffusion_model.*``
(an unconditional UNet in guided-diffusion's layout, so it loads strictly into our ADM UNet),
``first_stage_model.*`` (the autoencoder, see :mod:`dkdm.models.first_stage`), optionally
``model_ema.*`` (the EMA, named by the parameter's name with the dots removed, plus
``model_ema.decay`` and ``model_ema.num_updates``), the schedule buffers (``betas``,
``alphas_cumprod``, ...) and, for scale-by-std models, ``scale_factor``. Every key is accounted
for: a checkpoint with anything else (a conditioning stage, another layout) is refused naming
what was found. Files are read with ``weights_only=True`` and memory-mapped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import torch

from dkdm.config import ConfigError

UNET = "model.diffusion_model."
FIRST_STAGE = "first_stage_model."
EMA = "model_ema."
EMA_META = ("model_ema.decay", "model_ema.num_updates")
# LatentDiffusion's registered schedule buffers, and the scale-by-std factor.
BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "scale_factor",
        "logvar",
    }
)
LAYOUTS = (
    (
        "a CompVis LatentDiffusion .ckpt (state_dict with model.diffusion_model.*, first_stage_model.*, "
        "optionally model_ema.*)"
    ),
    "a bare CompVis autoencoder .ckpt (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)",
)


def _prefixes(keys) -> str:
    tops = sorted({k.split(".")[0] + ("." if "." in k else "") for k in keys})
    return ", ".join(tops[:12]) + (" ..." if len(tops) > 12 else "")


def read(path: str) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a CompVis ``.ckpt`` (its ``state_dict``, or the file itself when flat).

    Memory-mapped and remembered for the last file read (the resolver asks several questions of it).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint file not found: {path}")
    st = os.stat(path)
    return dict(_read(os.path.abspath(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=1)
def _read(path: str, mtime: int, size: int) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{path} cannot be read as a weights-only checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        top = ", ".join(map(str, obj))[:200] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConfigError(f"{path} holds no tensor state dict (top-level entries: {top}); dkdm reads " + LAYOUTS[0])
    return dict(obj)


def is_ldm(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(UNET) for k in sd)


def check_layout(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse, naming what was found, a LatentDiffusion state dict with keys of no known part."""
    known = (UNET, FIRST_STAGE, EMA)
    other = [k for k in sd if not k.startswith(known) and k not in BUFFERS]
    if not is_ldm(sd) or other:
        what = f"keys of no known part: {', '.join(other[:6])}" if is_ldm(sd) else f"prefixes {_prefixes(sd)}"
        hint = (
            " (a conditional LDM: only unconditional ones are supported)"
            if any("cond_stage" in k for k in other)
            else ""
        )
        raise ConfigError(f"{source} has {what}{hint}; dkdm reads {LAYOUTS[0]}, or {LAYOUTS[1]} as a first stage")


def ema_name(name: str) -> str:
    """The ``model_ema.*`` key of UNet parameter ``name`` (LitEma drops the dots)."""
    return EMA + ("diffusion_model." + name).replace(".", "")


def unet_state_dict(sd: Mapping[str, torch.Tensor], use_ema: bool = False, source: str = "the checkpoint") -> dict:
    """The UNet's weights (guided-diffusion names), from the EMA when ``use_ema``; every EMA key must be used."""
    check_layout(sd, source)
    unet = {k[len(UNET) :]: v for k, v in sd.items() if k.startswith(UNET)}
    if not use_ema:
        return unet
    ema = {k for k in sd if k.startswith(EMA) and k not in EMA_META}
    if not ema:
        raise ConfigError(f"{source} has no model_ema.* weights; drop --use_ema to load the trained weights")
    out, missing = {}, []
    for name, tensor in unet.items():
        key = ema_name(name)
        if key in ema:
            if sd[key].shape != tensor.shape:
                raise ConfigError(f"{source}: {key} {tuple(sd[key].shape)} != {UNET}{name} {tuple(tensor.shape)}")
            out[name] = sd[key]
            ema.discard(key)
        elif tensor.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            missing.append(key)
        else:
            out[name] = tensor
    if missing or ema:
        raise ConfigError(
            f"{source}: the EMA does not match the UNet: {len(missing)} parameters have no EMA "
            f"({', '.join(missing[:4])}), {len(ema)} EMA keys match no parameter ({', '.join(sorted(ema)[:4])})"
        )
    return out


def first_stage_state_dict(sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> dict:
    """The first stage's tensors (CompVis names): ``first_stage_model.*`` of an LDM, or a bare autoencoder."""
    if is_ldm(sd):
        check_layout(sd, source)
        stage = {k[len(FIRST_STAGE) :]: v for k, v in sd.items() if k.startswith(FIRST_STAGE)}
        if not stage:
            raise ConfigError(f"{source} is an LDM without first_stage_model.* weights; pass --first_stage")
        return stage
    if any(k.startswith("encoder.") for k in sd) and any(k.startswith("decoder.") for k in sd):
        return dict(sd)
    raise ConfigError(f"{source} has prefixes {_prefixes(sd)}; a first stage is {LAYOUTS[1]}, or inside {LAYOUTS[0]}")


def is_compvis_config(data: Mapping) -> bool:
    """True for a CompVis config YAML (``model: {target: ldm...., params: ...}``)."""
    model = data.get("model")
    return isinstance(model, Mapping) and str(model.get("target", "")).startswith("ldm.")


def configs_from_compvis(data: Mapping, source: str = "the config") -> tuple[dict, dict]:
    """Our model and diffusion fields from a CompVis LatentDiffusion config (unconditional UNets only)."""
    params = dict(data["model"].get("params") or {})
    unet = dict((params.get("unet_config") or {}).get("params") or {})
    if not unet:
        raise ConfigError(f"{source}: model.params.unet_config.params is missing; not a LatentDiffusion config")
    for key in ("use_spatial_transformer", "context_dim", "num_classes"):
        if unet.get(key):
            raise ConfigError(f"{source}: unet_config has {key} = {unet[key]!r}; only unconditional LDMs are supported")
    if params.get("cond_stage_config") not in (None, "__is_unconditional__"):
        raise ConfigError(f"{source}: a conditional LDM (cond_stage_config); only unconditional ones are supported")
    size, c_in, c_out = int(unet["image_size"]), int(unet["in_channels"]), int(unet["out_channels"])
    if c_out not in (c_in, 2 * c_in):
        raise ConfigError(f"{source}: out_channels {c_out} is neither in_channels {c_in} nor twice it")
    model = {
        "arch": "unet",
        "image_size": size,
        "in_channels": c_in,
        "learn_sigma": c_out == 2 * c_in,
        "num_channels": int(unet["model_channels"]),
        "num_res_blocks": int(unet["num_res_blocks"]),
        "channel_mult": ",".join(str(m) for m in unet.get("channel_mult", (1, 2, 4, 8))),
        # CompVis lists downsampling rates; ours are feature-map resolutions.
        "attention_resolutions": ",".join(str(size // int(r)) for r in unet["attention_resolutions"]),
        "num_heads": int(unet.get("num_heads", -1)),
        "num_head_channels": int(unet.get("num_head_channels", -1)),
        "num_heads_upsample": int(unet.get("num_heads_upsample", -1)),
        "dropout": float(unet.get("dropout", 0.0)),
        "use_scale_shift_norm": bool(unet.get("use_scale_shift_norm", False)),
        "resblock_updown": bool(unet.get("resblock_updown", False)),
        "use_new_attention_order": bool(unet.get("use_new_attention_order", False)),
        "conv_resample": bool(unet.get("conv_resample", True)),
        "first_stage_scale": float(params.get("scale_factor", 1.0)),
    }
    kind = params.get("beta_schedule", "linear")
    start, end = float(params.get("linear_start", 1e-4)), float(params.get("linear_end", 2e-2))
    schedules = {"linear": f"scaled_linear:{start},{end}", "cosine": "cosine"}
    if kind not in schedules:
        raise ConfigError(f"{source}: beta_schedule {kind!r} is none of {', '.join(schedules)}")
    parameterization = params.get("parameterization", "eps")
    pred = {"eps": {}, "x0": {"predict_xstart": True}, "v": {"predict_v": True}}
    if parameterization not in pred:
        raise ConfigError(f"{source}: parameterization {parameterization!r} is none of {', '.join(pred)}")
    diffusion = {
        "steps": int(params.get("timesteps", 1000)),
        "noise_schedule": schedules[kind],
        "learn_sigma": model["learn_sigma"],
        # LDM samples with the posterior variance (v_posterior 0): our sigma_small.
        "sigma_small": True,
        **pred[parameterization],
    }
    return model, diffusion
