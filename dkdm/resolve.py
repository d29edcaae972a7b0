"""What network and what diffusion a description means: the one resolver.

Every script that builds a model asks the same question -- "which network is this, with
which diffusion, over which sample space?" -- and this module is the only place that
answers it. A description is any mix of:

- a zoo name (``cifar10-57M``), a model YAML, or a family (``unet``, ``vit``) in ``arch``;
- field overrides from ``--config`` YAML files and flags (the caller's :class:`ParsedArgs`
  has already merged them, flags winning over YAML);
- a checkpoint, with the ``config.yaml`` our runs write beside it, or a provenance
  ``.json`` of the same stem (the embedded teacher's layout), or neither; or a diffusers
  pipeline/model folder, which describes itself (``dkdm.models.foreign``).

Precedence, highest first: **flags > YAML > the config found beside the checkpoint > the
zoo default**. An ``arch`` naming a zoo entry or YAML replaces the found config as the
base; a family name (``unet``/``vit``) only changes the family of whatever base applies.
A checkpoint that nothing describes is refused with the flags that would describe it.

``learn_sigma`` has one owner. The network's output channels and the diffusion's variance
type are two views of it, so :func:`resolve` takes it from wherever it was set (the model
or the diffusion overrides, or the base network) and writes the same value into both;
setting the two sides to different values is refused, naming both flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dkdm.config import ConfigError, DiffusionConfig, ModelConfig, from_dict, load_yaml, to_dict, update
from dkdm.diffusion.schedules import get_named_beta_schedule, latent_schedule_warning
from dkdm.models import create_model, foreign, get_config, ldm, load_checkpoint

FAMILIES = ("unet", "vit", "diffusers")
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
EMBEDDED_TEACHER = os.path.join(ASSETS, "digits_teacher.pt")  # provenance in digits_teacher.json beside it
DEFAULT_TEACHER = "digits-teacher"  # the zoo entry of the embedded teacher
DEFAULT_STUDENT = "digits-student"

# Where a run's config.yaml keeps the trained network and its diffusion (image_train.py
# writes ``model``, dkdm_train.py ``student``); provenance files may use the longer names.
_MODEL_KEYS = ("model", "student", "model_config")
_DIFFUSION_KEYS = ("diffusion", "student_diffusion", "diffusion_config")


@dataclass(frozen=True)
class SampleSpace:
    """What one sample of a model is: its tensor shape and its label space (0: unconditional).

    A latent space also names its first stage (``first_stage``, with ``first_stage_scale``, 0 for
    the recorded one): the network, the pool and the objective see latents of ``shape``; only
    sampling (decode) and data-based training (encode) load the first stage.
    """

    shape: tuple[int, int, int]
    num_classes: int = 0
    first_stage: str = ""
    first_stage_scale: float = 0.0

    @classmethod
    def of(cls, model: ModelConfig) -> SampleSpace:
        return cls(
            (model.in_channels, model.image_size, model.image_size),
            model.num_classes if model.class_cond else 0,
            model.first_stage,
            model.first_stage_scale,
        )

    @property
    def latent(self) -> bool:
        return bool(self.first_stage)

    def load_first_stage(self, **kw: Any):
        """The :class:`~dkdm.models.first_stage.FirstStage` of a latent space, checked against ``shape``.

        Keywords (``chunk_size``, ``precision``) go to the first stage.
        """
        from dkdm.models.first_stage import load_first_stage

        if not self.latent:
            raise ConfigError("this model works on pixels: it has no first stage (set --first_stage for a latent one)")
        path = self.first_stage
        if not os.path.exists(path) and os.path.exists(os.path.join(ASSETS, path)):
            path = os.path.join(ASSETS, path)  # a shipped first stage, named relative to dkdm/assets
        stage = load_first_stage(path, scale_factor=self.first_stage_scale or None, **kw)
        if stage.latent_channels != self.shape[0]:
            raise ConfigError(
                f"the first stage {self.first_stage} makes {stage.latent_channels}-channel latents but the network "
                f"takes {self.shape[0]} channels (in_channels); they must agree: give the first stage it was trained on"
            )
        return stage


@dataclass
class Resolved:
    """A network and its diffusion, resolved; ``build`` makes the network (with its weights).

    ``checkpoint`` is the weights file ("" for a fresh network) and ``source`` says where
    the base description came from (a zoo name, a file beside the checkpoint, flags).
    """

    model: ModelConfig
    diffusion: DiffusionConfig
    checkpoint: str = ""
    source: str = ""

    @property
    def space(self) -> SampleSpace:
        return SampleSpace.of(self.model)

    @property
    def name(self) -> str:
        return self.model.name or self.model.arch

    def build(self) -> torch.nn.Module:
        """The network, with the checkpoint's weights loaded strictly when there is one."""
        return build_network(self.model, self.checkpoint)

    def create_diffusion(self) -> Any:
        """The diffusion; for a latent space, a warning where its schedule is unsafe without clipping."""
        from dkdm import logger
        from dkdm.diffusion import create_diffusion

        if self.space.latent:
            warning = latent_schedule_warning(self.diffusion.noise_schedule, self.diffusion.steps)
            if warning:
                logger.warn(warning)
        return create_diffusion(self.diffusion)


def build_network(model: ModelConfig, checkpoint: str = "") -> torch.nn.Module:
    """``model``'s network with ``checkpoint``'s weights (strict); a diffusers folder brings its own.

    A CompVis ``.ckpt`` gives its ``model.diffusion_model.*`` (``model_ema.*`` with ``use_ema``).
    """
    net = create_model(model)
    if checkpoint and model.arch != "diffusers":
        if checkpoint.endswith(".ckpt"):
            net = load_checkpoint(net, ldm.unet_state_dict(ldm.read(checkpoint), model.use_ema, checkpoint))
        elif model.use_ema:
            raise ConfigError(f"--use_ema picks the EMA inside a CompVis .ckpt; {checkpoint} is not one: drop it")
        else:
            net = load_checkpoint(net, checkpoint)
    return net


def configs_beside(checkpoint: str) -> tuple[dict | None, dict | None, str]:
    """The model and diffusion configs recorded beside ``checkpoint``, and the file they came from.

    Looks for the run directory's ``config.yaml``, then for a ``.json`` of the same stem
    (provenance, possibly nesting the configs under ``config``). ``(None, None, "")`` when
    neither exists. A diffusers folder describes itself: its model's ``config.json`` and its
    scheduler's config.
    """
    if foreign.is_diffusers_folder(checkpoint):
        _, sched = foreign.locate(checkpoint)
        model = to_dict(foreign.model_config(checkpoint))
        diffusion = to_dict(update(DiffusionConfig(), foreign.scheduler_to_diffusion(sched))) if sched else None
        if diffusion is not None and diffusion["learn_sigma"] != model["learn_sigma"]:
            raise ConfigError(
                f"{checkpoint}: the model has {'2x' if model['learn_sigma'] else '1x'} in_channels outputs but the "
                f"scheduler's variance_type {'is not' if model['learn_sigma'] else 'is'} learned_range; they disagree"
            )
        return model, diffusion, checkpoint
    run_yaml = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
    side_json = os.path.splitext(checkpoint)[0] + ".json"
    if os.path.isfile(run_yaml) and ldm.is_compvis_config(data := load_yaml(run_yaml)):
        model, diffusion = ldm.configs_from_compvis(data, run_yaml)
        return model, diffusion, run_yaml
    if checkpoint.endswith(".ckpt") and not os.path.isfile(run_yaml) and os.path.isfile(checkpoint):
        recorded = ldm_schedule(ldm.read(checkpoint), checkpoint)
        return None, recorded, checkpoint if recorded else ""
    if os.path.isfile(run_yaml):
        data, source = load_yaml(run_yaml), run_yaml
    elif os.path.isfile(side_json):
        with open(side_json) as f:
            try:
                data, source = json.load(f), side_json
            except json.JSONDecodeError as e:
                raise ConfigError(f"{side_json} beside the checkpoint is not valid JSON: {e}") from None
    else:
        return None, None, ""
    if isinstance(data.get("config"), dict):
        data = data["config"]
    model = next((data[k] for k in _MODEL_KEYS if isinstance(data.get(k), dict)), None)
    diffusion = next((data[k] for k in _DIFFUSION_KEYS if isinstance(data.get(k), dict)), None)
    return model, diffusion, source


def ldm_schedule(sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> dict | None:
    """The ``DiffusionConfig`` fields (steps, noise_schedule) of the ``betas`` an LDM recorded; None if absent.

    LDM's ``linear`` is linear in sqrt(beta) (our ``scaled_linear:START,END``); its ``cosine``
    and plain-linear variants are matched too. Betas none of them reproduce are refused.
    """
    if "betas" not in sd:
        return None
    betas = sd["betas"].double().numpy()
    steps = int(betas.shape[0])
    # The buffers are float32: the ends are written back with the 6 significant digits configs use.
    start, end = float(f"{betas[0]:.6g}"), float(f"{betas[-1]:.6g}")
    for name in (f"scaled_linear:{start},{end}", f"linear:{start},{end}", "cosine"):
        try:
            ours = get_named_beta_schedule(name, steps)
        except ValueError:
            continue
        if np.allclose(ours, betas, rtol=1e-5, atol=1e-9):
            # LDM's sampler uses the posterior variance (v_posterior 0): our sigma_small.
            return {"steps": steps, "noise_schedule": name, "sigma_small": True}
    raise ConfigError(
        f"{source}: its {steps} betas ({start:.6g} .. {end:.6g}) follow none of scaled_linear, linear, cosine; "
        "dkdm's diffusion cannot represent them"
    )


def _model_from_dict(values: Mapping[str, Any], source: str) -> ModelConfig:
    values = dict(values)
    named = values.get("arch")
    if named not in (None, *FAMILIES):  # a zoo name left unresolved in a hand-written config
        return update(get_config(named), {k: v for k, v in values.items() if k != "arch"}, source)
    return from_dict(ModelConfig, values, source)


_PROCESS_FIELDS = {"steps", "noise_schedule"}  # what a user must state when nothing records the process


def _no_diffusion(checkpoint: str, dprefix: str) -> str:
    return (
        f"nothing beside {checkpoint} records the diffusion it was trained with; say it: --config "
        f"configs/diffusion/<schedule>.yaml, or --{dprefix}steps and --{dprefix}noise_schedule (linear, cosine, ...)"
    )


def _bool(value: Any, where: str) -> bool:
    return update(DiffusionConfig(), {"learn_sigma": value}, where).learn_sigma


def _learn_sigma(model_over: Mapping, diffusion_over: Mapping, base: bool, prefix: str, dprefix: str) -> bool:
    m = model_over.get("learn_sigma")
    d = diffusion_over.get("learn_sigma")
    prefix = prefix or "model."
    m = None if m is None else _bool(m, f"{prefix}learn_sigma")
    d = None if d is None else _bool(d, f"{dprefix}learn_sigma")
    if m is not None and d is not None and m != d:
        raise ConfigError(
            f"--{prefix}learn_sigma {m} and --{dprefix}learn_sigma {d} disagree; the network's output channels "
            "and the diffusion's variance come from one value: set it once (--learn_sigma, or one of the two)"
        )
    return base if m is None and d is None else (m if m is not None else d)


def resolve(
    model_over: Mapping[str, Any] | None = None,
    diffusion_over: Mapping[str, Any] | None = None,
    *,
    checkpoint: str = "",
    default: str = "",
    diffusion_base: DiffusionConfig | None = None,
    diffusion_changes: Mapping[str, Any] | None = None,
    prefix: str = "",
    dprefix: str = "diffusion.",
) -> Resolved:
    """One network and its diffusion from a description (see the module docstring).

    ``model_over`` / ``diffusion_over``: the merged YAML and flag overrides of the model's and
    the diffusion's groups (``arch`` among the model's). ``checkpoint``: the weights, whose
    neighbouring config is the base below the overrides. ``default``: the zoo entry used when
    neither ``arch`` nor a checkpoint says what the network is. ``diffusion_base``: the
    diffusion used when nothing beside the checkpoint records one (else the defaults);
    ``diffusion_changes`` apply on top of whichever base before the overrides. ``prefix`` and
    ``dprefix`` are the flag prefixes (``teacher.``) that error messages name.
    """
    model_over = dict(model_over or {})
    diffusion_over = dict(diffusion_over or {})
    arch = model_over.pop("arch", None)
    missing = ConfigError(f"checkpoint not found: {checkpoint}")
    found_model, found_diffusion, found_at = configs_beside(checkpoint) if checkpoint else (None, None, "")
    if arch and arch not in FAMILIES:
        base, source = get_config(arch), arch
    elif found_model is not None:
        base, source = _model_from_dict(found_model, found_at), found_at
        base = update(base, {"arch": arch}) if arch else base
    elif arch:
        base, source = ModelConfig(arch=arch), "flags"
    elif checkpoint and not os.path.exists(checkpoint):
        raise missing
    elif checkpoint and checkpoint.endswith(".ckpt"):
        raise ConfigError(
            f"no config.yaml beside {checkpoint} says which network it holds; pass --{prefix}arch (ldm-vq4-274M "
            "for the CelebA-HQ / FFHQ LDM-VQ-4 models, or a model YAML), or put its CompVis config.yaml beside it"
        )
    elif checkpoint:
        raise ConfigError(
            f"no config.yaml or .json beside {checkpoint} says which network it holds; pass --{prefix}arch "
            "(a zoo name such as cifar10-14M, or a model YAML) and the diffusion flags it was trained with "
            "(e.g. --config configs/diffusion/cosine-1000-learned.yaml)"
        )
    elif default:
        base, source = get_config(default), default
    else:
        base, source = ModelConfig(), "defaults"
    if found_diffusion is not None:
        dbase = from_dict(DiffusionConfig, found_diffusion, found_at)
    elif diffusion_base is not None:
        dbase = diffusion_base
    elif checkpoint and not _PROCESS_FIELDS & set(diffusion_over):
        raise ConfigError(_no_diffusion(checkpoint, dprefix)) if os.path.exists(checkpoint) else missing
    else:
        dbase = DiffusionConfig()
    dbase = update(dbase, diffusion_changes or {}, "diffusion")
    sigma = _learn_sigma(model_over, diffusion_over, base.learn_sigma, prefix, dprefix)
    model = update(base, {**model_over, "learn_sigma": sigma}, prefix.rstrip(".") or "model")
    own_stage = checkpoint.endswith(".ckpt") and not model.first_stage and os.path.isfile(checkpoint)
    if own_stage and any(k.startswith(ldm.FIRST_STAGE) for k in ldm.read(checkpoint)):
        model = update(model, {"first_stage": os.path.abspath(checkpoint)})  # the LDM's own autoencoder
    diffusion = update(dbase, {**diffusion_over, "learn_sigma": sigma}, dprefix.rstrip(".") or "diffusion")
    return Resolved(model, diffusion, checkpoint, source)


def recorded_diffusion(checkpoint: str) -> DiffusionConfig | None:
    """The diffusion recorded beside ``checkpoint`` (None when nothing records one)."""
    _, found, at = configs_beside(checkpoint)
    return from_dict(DiffusionConfig, found, at) if found is not None else None


def resolve_distillation(
    overrides: Mapping[str, Mapping[str, Any]], teacher_path: str = "", student_init: str = ""
) -> tuple[Resolved, Resolved]:
    """The teacher and the student of a distillation, with their diffusions.

    ``overrides`` holds the ``teacher``, ``student``, ``diffusion`` and ``teacher_diffusion``
    groups. The teacher is ``teacher_path`` (the embedded digits teacher when empty) described
    by the config beside it or ``teacher.*``; the student is ``student.*`` on the zoo default
    ``digits-student``. The student's diffusion starts from the teacher's recorded one (it
    learns that process) and the teacher's from its record, else from the student's; the
    teacher's never uses the KL term or respacing (it is only evaluated, step by step).
    ``student_init`` (a student cut or pruned from the teacher, ``scripts/compress.py``) is the
    student's checkpoint: the config beside it is the student's base, as for any checkpoint, so
    a pruned network is rebuilt at its own widths and one without its config is refused.
    """
    t_over = dict(overrides.get("teacher", {}))
    if not teacher_path:
        if t_over.get("arch", DEFAULT_TEACHER) != DEFAULT_TEACHER:
            raise ConfigError(f"the teacher is {t_over['arch']}: pass its checkpoint with --teacher_path")
        if not os.path.isfile(EMBEDDED_TEACHER):
            raise FileNotFoundError(
                f"the embedded teacher {EMBEDDED_TEACHER} is missing; train it (configs/digits/teacher.yaml) "
                "or pass --teacher_path"
            )
    path = teacher_path or EMBEDDED_TEACHER
    # What resolve() below reads beside the teacher too: nothing for a missing file, unless its run's record.
    recorded = recorded_diffusion(path)
    said = set(overrides.get("diffusion", {})) | set(overrides.get("teacher_diffusion", {}))
    if recorded is None and os.path.exists(path) and not _PROCESS_FIELDS & said:
        raise ConfigError(_no_diffusion(path, ""))
    student = resolve(
        overrides.get("student", {}),
        overrides.get("diffusion", {}),
        checkpoint=student_init,
        default=DEFAULT_STUDENT,
        diffusion_base=recorded,
        prefix="student.",
    )
    teacher = resolve(
        t_over,
        overrides.get("teacher_diffusion", {}),
        checkpoint=path,
        diffusion_base=student.diffusion,
        diffusion_changes={"use_kl": False, "timestep_respacing": ""},
        prefix="teacher.",
        dprefix="teacher_diffusion.",
    )
    # The student lives in the teacher's space: its latents decode with the teacher's first stage.
    s_over = overrides.get("student", {})
    if teacher.model.first_stage and not s_over.get("first_stage"):
        space = {"first_stage": teacher.model.first_stage, "first_stage_scale": teacher.model.first_stage_scale}
        student = Resolved(update(student.model, space), student.diffusion, student.checkpoint, student.source)
    if student.space.first_stage != teacher.space.first_stage:  # a student without one took the teacher's
        raise ConfigError(
            f"the student's first stage ({student.space.first_stage}) is not the teacher's "
            f"({teacher.space.first_stage or 'none: pixels'}); a student learns in its teacher's space"
        )
    return teacher, student
