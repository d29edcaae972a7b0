"""Networks of other frameworks presented as ``model(x, t, y=None)``: diffusers models.

A diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``), a folder holding
``transformer/`` and ``scheduler/`` (our ViT export, :mod:`dkdm.models.export`) or a bare model
folder (``config.json`` and its weights) of a ``UNet2DModel`` or a ``DiTTransformer2DModel``
becomes a teacher like any other: the network is wrapped by :class:`DiffusersNet`, and the
scheduler's config is turned into the fields of our :class:`~dkdm.config.DiffusionConfig` by
:func:`scheduler_to_diffusion`, which refuses, naming the field, what our diffusion cannot
represent. Nothing is downloaded: folders are read with ``local_files_only``. A DiT's label
table always ends with diffusers' null row; our export's note says whether it is a trained null
class and whether the model is conditional at all (an unconditional ViT is written as one zero
class, called here with label 0), and its ``config.json`` the timestep frequencies to set
(:func:`set_timestep_shift`).

diffusers' ``learned_range`` variance is IDDPM's (the extra channels interpolate the
log-variance between the clipped posterior's and beta_t's), its ``fixed_small`` is
``sigma_small`` and its ``fixed_large`` our default, so a diffusers teacher's reverse step is
the same Gaussian here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from dkdm.config import ConfigError, ModelConfig, load_json
from dkdm.models.export import EXPORT_NOTE, TIMESTEP_SHIFT_KEY

MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")
# A folder without model_index.json whose model is in this subfolder, beside scheduler/: our ViT export
# (diffusers' DiTPipeline needs a VAE, so there is no pipeline to name).
_MODEL_SUBFOLDER = "transformer"
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
    for cfg in (os.path.join(path, "config.json"), os.path.join(path, _MODEL_SUBFOLDER, "config.json")):
        if os.path.isfile(cfg) and "_class_name" in load_json(cfg):
            return True
    return False


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
    if not os.path.isfile(os.path.join(folder, "config.json")):
        folder = os.path.join(folder, _MODEL_SUBFOLDER)
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
    c_in, c_out = int(cfg.get("in_channels", 3)), cfg.get("out_channels", 3)
    c_out = c_in if c_out is None else int(c_out)  # DiTTransformer2DModel: None is in_channels
    if c_out not in (c_in, 2 * c_in):
        raise ConfigError(
            f"{model_dir}: out_channels {c_out} is neither in_channels {c_in} (a fixed variance) nor twice it "
            "(a learned variance)"
        )
    # Our export records a classifier-free-guidance null class (the last embedding row) beside config.json.
    note_path = os.path.join(model_dir, EXPORT_NOTE)
    note = load_json(note_path) if os.path.isfile(note_path) else {}
    null = note.get("null_class")
    if cfg.get("_class_name") == "DiTTransformer2DModel":
        classes, null = _dit_classes(cfg, note, note_path)
    else:
        classes = cfg.get("num_class_embeds")
        if cfg.get("class_embed_type") not in (None,):
            raise ConfigError(f"{model_dir}: class_embed_type {cfg['class_embed_type']!r} is not supported (only None)")
        if null is not None and (classes is None or int(null) != int(classes) - 1):
            raise ConfigError(
                f"{note_path}: null_class {null} is not the last of num_class_embeds {classes} in config.json"
            )
        classes = int(classes) - int(null is not None) if classes is not None else None
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
        num_classes=classes if classes is not None else ModelConfig.num_classes,
        class_dropout_prob=drop,
    )


def _dit_classes(cfg: dict, note: dict, note_path: str) -> tuple[int | None, int | None]:
    """A DiTTransformer2DModel's classes and null class (None: none).

    Its label table always holds ``num_embeds_ada_norm`` classes and a null row after them (the
    label diffusers' DiT drops to). Our export says whether that row is a trained null class and
    whether the model is conditional at all (an unconditional ViT is written as one zero class);
    without our note the row is taken for the null class diffusers' class trains.
    """
    classes = int(cfg["num_embeds_ada_norm"])
    if not note:
        return classes, classes
    if note.get("num_classes") is None:
        return None, None
    null = note.get("null_class")
    if int(note["num_classes"]) != classes or (null is not None and int(null) != classes):
        raise ConfigError(
            f"{note_path}: num_classes {note['num_classes']} and null_class {null} do not match "
            f"num_embeds_ada_norm {classes} in config.json (the classes, then the null row)"
        )
    return classes, null


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
        # diffusers' DiT always takes labels; ours exports an unconditional ViT as one class (label 0).
        self.dit = type(net).__name__ == "DiTTransformer2DModel"
        if self.dit:
            self.class_cond = num_classes is not None
        else:
            self.class_cond = getattr(net.config, "num_class_embeds", None) is not None
            if num_classes is None and self.class_cond:
                num_classes = int(net.config.num_class_embeds)
        self.num_classes = num_classes
        self.null_class = null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None and not self.class_cond:
            why = "our export of an unconditional ViT" if self.dit else "its num_class_embeds is None"
            raise ValueError(f"labels given to an unconditional diffusers model ({why})")
        if self.dit and y is None:
            if self.class_cond:
                raise ValueError("this DiTTransformer2DModel is class-conditional: give labels y")
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.net(x, t, class_labels=y, return_dict=False)[0]


def set_timestep_shift(net: nn.Module, shift: float) -> None:
    """Set every DiT block's timestep sinusoid to ``10000^(-i/(128 - shift))`` (diffusers fixes shift 1).

    ``shift`` 0 gives DiT's and our frequencies; :mod:`dkdm.models.export` records it in the
    exported ``config.json`` (``TIMESTEP_SHIFT_KEY``), which diffusers itself ignores.
    """
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is None:
        raise ConfigError(f"{TIMESTEP_SHIFT_KEY} is set for a {type(net).__name__}, which has no DiT blocks")
    for block in blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def load(cfg: ModelConfig) -> DiffusersNet:
    """The diffusers model that ``cfg.pretrained`` names, with its weights, wrapped."""
    if not cfg.pretrained:
        raise ConfigError("arch diffusers needs --pretrained: a diffusers pipeline or model folder")
    try:
        import diffusers
    except ImportError:
        raise ConfigError("arch diffusers needs the diffusers package: pip install -e .[latent]") from None
    model_dir, _ = locate(cfg.pretrained)
    raw = load_json(os.path.join(model_dir, "config.json"))
    shift = raw.get(TIMESTEP_SHIFT_KEY)
    config_log = logging.getLogger("diffusers.configuration_utils")
    level = config_log.level
    if shift is not None:  # diffusers warns that it ignores the key; here it is applied just below
        config_log.setLevel(logging.ERROR)
    try:
        net = getattr(diffusers, raw["_class_name"]).from_pretrained(model_dir, local_files_only=True)
    finally:
        config_log.setLevel(level)
    if shift is not None:
        set_timestep_shift(net, shift)
    classes = cfg.num_classes if cfg.class_cond else None
    null = classes if classes is not None and cfg.class_dropout_prob > 0 else None
    return DiffusersNet(net.float(), classes, null)
