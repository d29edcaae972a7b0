"""Networks of other frameworks presented as ``model(x, t, y=None)``: diffusers models.

A diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a bare model
folder (``config.json`` and its weights) becomes a teacher like any other: the network is
wrapped by :class:`DiffusersNet`, and the scheduler's config is turned into the fields of
our :class:`~dkdm.config.DiffusionConfig` by :func:`scheduler_to_diffusion`, which refuses,
naming the field, what our diffusion cannot represent. Nothing is downloaded: folders are
read with ``local_files_only``.

diffusers' ``learned_range`` variance is IDDPM's (the extra channels interpolate the
log-variance between the clipped posterior's and beta_t's), its ``fixed_small`` is
``sigma_small`` and its ``fixed_large`` our default, so a diffusers teacher's reverse step is
the same Gaussian here.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from dkdm.config import ConfigError, ModelConfig, load_json
from dkdm.models.export import EXPORT_NOTE

MODEL_CLASSES = ("UNet2DModel",)
# diffusers' DDPMScheduler defaults, for the keys a saved config may leave out.
_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}


def is_diffusers_folder(path: str) -> bool:
    """True for a diffusers pipeline folder or a folder holding one diffusers model."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    cfg = os.path.join(path, "config.json")
    return os.path.isfile(cfg) and "_class_name" in load_json(cfg)


def locate(folder: str) -> tuple[str, str]:
    """The model's folder and its scheduler config ("" when there is none) inside ``folder``."""
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        entries = load_json(index)
        names = [k for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[1] in MODEL_CLASSES]
        if not names:
            found = {k: v[1] for k, v in entries.items() if isinstance(v, list) and len(v) == 2}
            raise ConfigError(
                f"{index} holds no model dkdm can wrap (found {found}); supported classes: {', '.join(MODEL_CLASSES)}"
            )
        model_dir = os.path.join(folder, names[0])
        sched = os.path.join(folder, "scheduler", "scheduler_config.json")
        return model_dir, sched if os.path.isfile(sched) else ""
    cls = load_json(os.path.join(folder, "config.json")).get("_class_name")
    if cls not in MODEL_CLASSES:
        raise ConfigError(f"{folder} holds a diffusers {cls}; dkdm wraps {', '.join(MODEL_CLASSES)}")
    for sched in (
        os.path.join(folder, "scheduler_config.json"),
        os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json"),
    ):
        if os.path.isfile(sched):
            return folder, sched
    return folder, ""


def model_config(folder: str) -> ModelConfig:
    """Our description of the diffusers model in ``folder`` (``arch: diffusers``)."""
    model_dir, _ = locate(folder)
    cfg = load_json(os.path.join(model_dir, "config.json"))
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"{model_dir}: sample_size {size} is not square; dkdm samples square images")
        size = size[0]
    c_in, c_out = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    if c_out not in (c_in, 2 * c_in):
        raise ConfigError(
            f"{model_dir}: out_channels {c_out} is neither in_channels {c_in} (a fixed variance) nor twice it "
            "(a learned variance)"
        )
    classes = cfg.get("num_class_embeds")
    if cfg.get("class_embed_type") not in (None,):
        raise ConfigError(f"{model_dir}: class_embed_type {cfg['class_embed_type']!r} is not supported (only None)")
    # Our export records a classifier-free-guidance null class (the last embedding row) beside config.json.
    note_path = os.path.join(model_dir, EXPORT_NOTE)
    note = load_json(note_path) if os.path.isfile(note_path) else {}
    null = note.get("null_class")
    if null is not None and (classes is None or int(null) != int(classes) - 1):
        raise ConfigError(
            f"{note_path}: null_class {null} is not the last of num_class_embeds {classes} in config.json"
        )
    # The null class is what matters here; the training rate is recorded by our export (> 0 by definition).
    drop = float((note.get("model") or {}).get("class_dropout_prob") or 0.1) if null is not None else 0.0
    return ModelConfig(
        name=os.path.basename(os.path.normpath(folder)),
        arch="diffusers",
        pretrained=os.path.abspath(folder),
        image_size=int(size or 32),
        in_channels=c_in,
        learn_sigma=c_out == 2 * c_in,
        class_cond=classes is not None,
        num_classes=int(classes) - int(null is not None) if classes is not None else ModelConfig.num_classes,
        class_dropout_prob=drop,
    )


def scheduler_to_diffusion(path: str) -> dict[str, Any]:
    """The ``DiffusionConfig`` fields a diffusers scheduler config describes (refusing the rest).

    The training process is decided by the betas, the prediction type and (for ancestral
    sampling) the variance type; the scheduler class and its sampling-only settings
    (``timestep_spacing``, ``steps_offset``, ``clip_sample``) do not change it.
    """
    raw = load_json(path)
    cfg = {**_SCHEDULER_DEFAULTS, **raw}

    def refuse(field: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {field} = {cfg.get(field)!r} {why}; dkdm's diffusion cannot represent it")

    if cfg["trained_betas"] is not None:
        raise refuse("trained_betas", "lists betas by hand")
    if cfg["rescale_betas_zero_snr"]:
        raise refuse("rescale_betas_zero_snr", "rescales the schedule to zero terminal SNR")
    if cfg["thresholding"]:
        raise refuse("thresholding", "asks for dynamic thresholding")
    if float(cfg["clip_sample_range"]) != 1.0:
        raise refuse("clip_sample_range", "clips x_0 to another range than [-1, 1]")
    start, end, kind = float(cfg["beta_start"]), float(cfg["beta_end"]), cfg["beta_schedule"]
    schedules = {"linear": f"linear:{start},{end}", "scaled_linear": f"scaled_linear:{start},{end}"}
    schedules["squaredcos_cap_v2"] = "cosine"  # IDDPM's cosine, betas capped at 0.999, as ours
    if kind not in schedules:
        raise refuse("beta_schedule", f"is none of {', '.join(schedules)}")
    out: dict[str, Any] = {"steps": int(cfg["num_train_timesteps"]), "noise_schedule": schedules[kind]}
    prediction = {"epsilon": {}, "sample": {"predict_xstart": True}, "v_prediction": {"predict_v": True}}
    if cfg["prediction_type"] not in prediction:
        raise refuse("prediction_type", f"is none of {', '.join(prediction)}")
    out.update(prediction[cfg["prediction_type"]])
    # Schedulers without a variance type (DDIM and the ODE solvers) get DDPM's default, fixed_small.
    variance = raw.get("variance_type") or "fixed_small"
    variances = {
        "fixed_small": {"sigma_small": True, "learn_sigma": False},
        "fixed_small_log": {"sigma_small": True, "learn_sigma": False},
        "fixed_large": {"sigma_small": False, "learn_sigma": False},
        "fixed_large_log": {"sigma_small": False, "learn_sigma": False},
        "learned_range": {"learn_sigma": True},
    }
    if variance not in variances:
        raise refuse("variance_type", f"is none of {', '.join(variances)}")
    out.update(variances[variance])
    return out


class DiffusersNet(nn.Module):
    """A diffusers model called as ``model(x, t, y=None)``, returning the output tensor.

    ``num_classes`` (None: unconditional) and ``null_class`` (None: no classifier-free null
    label) are what the distillation loop and guidance read, as from our own networks.
    """

    def __init__(self, net: nn.Module, num_classes: int | None = None, null_class: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.class_cond = getattr(net.config, "num_class_embeds", None) is not None
        if num_classes is None and self.class_cond:
            num_classes = int(net.config.num_class_embeds)
        self.num_classes = num_classes
        self.null_class = null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None and not self.class_cond:
            raise ValueError("labels given to an unconditional diffusers model (its num_class_embeds is None)")
        return self.net(x, t, class_labels=y, return_dict=False)[0]


def load(cfg: ModelConfig) -> DiffusersNet:
    """The diffusers model that ``cfg.pretrained`` names, with its weights, wrapped."""
    if not cfg.pretrained:
        raise ConfigError("arch diffusers needs --pretrained: a diffusers pipeline or model folder")
    try:
        import diffusers
    except ImportError:
        raise ConfigError("arch diffusers needs the diffusers package: pip install -e .[latent]") from None
    model_dir, _ = locate(cfg.pretrained)
    cls_name = load_json(os.path.join(model_dir, "config.json"))["_class_name"]
    net = getattr(diffusers, cls_name).from_pretrained(model_dir, local_files_only=True)
    classes = cfg.num_classes if cfg.class_cond else None
    null = classes if classes is not None and cfg.class_dropout_prob > 0 else None
    return DiffusersNet(net.float(), classes, null)
