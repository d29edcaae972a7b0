"""Configs are data: one dataclass per concern, YAML presets, command-line overrides.

Resolution order, lowest first: dataclass defaults, a named preset (a zoo architecture,
resolved by the caller), ``--config`` YAML files (in the order given), then flags.

A script declares its *groups*, e.g. ``{"model": ModelConfig, "diffusion":
DiffusionConfig, "train": TrainConfig}``. Every field of every group is a flag
``--group.field``. Plain ``--field`` flags set the field in every group listed as
*plain* that has it: ``--learn_sigma`` sets both ``model.learn_sigma`` and
``diffusion.learn_sigma``, as guided-diffusion's single flag does. A YAML config has one
mapping per group (``model:``, ``diffusion:``, ...); keys outside a group are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from dkdm.fileio import atomic_write


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message says what and how to fix it."""


# --------------------------------------------------------------------------- dataclasses


@dataclass
class ModelConfig:
    """A network of the zoo. Field names follow guided-diffusion's flags.

    ``arch`` picks the family (``unet``, ``vit``, or ``diffusers`` for a model of that library
    loaded from the folder ``pretrained``); the UNet fields are guided-diffusion's
    ``create_model`` arguments, the ViT fields DiT's. ``name`` records the zoo entry the
    config came from (informational; the fields are what is built).
    """

    name: str = ""
    arch: str = "unet"
    pretrained: str = ""  # arch diffusers: the pipeline or model folder the network and weights come from
    # Latent models: the first stage whose latents the network models (a diffusers AutoencoderKL/VQModel folder,
    # or a CompVis .ckpt holding first_stage_model.*); "" = pixel space. Its scale factor (0: the recorded one).
    first_stage: str = ""
    first_stage_scale: float = 0.0
    use_ema: bool = False  # CompVis LDM checkpoints: load the model_ema.* weights
    image_size: int = 32
    in_channels: int = 3
    learn_sigma: bool = False
    class_cond: bool = False
    num_classes: int = 1000
    dropout: float = 0.0
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 4
    # UNet
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str = ""  # "" = guided-diffusion's default for image_size
    attention_resolutions: str = "16,8"
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    conv_resample: bool = True
    level_res_blocks: str = ""  # residual blocks per level on the way down, e.g. "2,1,2" ("" = num_res_blocks each)
    mid_block: str = "full"  # full (res, attention, res) | res (no attention) | none
    channel_widths: str = ""  # a pruned network's narrowed layers, name:a,b;... (dkdm.models.prune)
    # ViT (DiT-style)
    hidden_size: int = 384
    depth: int = 12
    patch_size: int = 2
    mlp_ratio: float = 4.0
    # Classifier-free guidance (both families): > 0 adds a null class (label num_classes) and drops
    # training labels to it at this rate; guidance_cond makes the network take the guidance scale w.
    class_dropout_prob: float = 0.0
    guidance_cond: bool = False


@dataclass
class DiffusionConfig:
    """A Gaussian diffusion, with guided-diffusion's ``create_gaussian_diffusion`` keywords."""

    steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    predict_v: bool = False  # v-prediction (Salimans & Ho); exclusive with predict_xstart
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False
    timestep_respacing: str = ""


@dataclass
class TrainConfig:
    """What every training loop shares (data-based training and distillation alike)."""

    dataset: str = "digits"  # "digits", or "" when data_dir is given
    data_dir: str = ""
    batch_size: int = 64  # global batch, split over ranks
    microbatch: int = -1  # -1: no microbatching
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0  # guided-diffusion's meaning: anneal to 0 over this many steps, then stop
    max_steps: int = 0  # 0: no limit other than lr_anneal_steps
    ema_rate: str = "0.9999"
    precision: str = "fp32"  # fp32 | fp16 | bf16
    compile: bool = False  # torch.compile the trained network (and a distillation's teacher) in place
    compile_backend: str = "inductor"  # inductor | aot_eager | eager | cudagraphs
    channels_last: bool = False  # the trained network's weights (and so its activations) in NHWC memory order
    # CPU fp32: the trained network's 3x3 convolutions, forward and backward, by Winograd F(4x4,3x3)
    winograd: bool = False
    fp16_scale_growth: float = 1e-3
    grad_clip: float = 0.0  # 0: off
    schedule_sampler: str = "uniform"  # uniform | loss-second-moment
    log_interval: int = 10
    save_interval: int = 10000
    log_dir: str = ""
    resume_checkpoint: str = ""
    save_safetensors: bool = False  # also write model/EMA weights as .safetensors beside the .pt files
    trust_checkpoints: bool = False  # allow optNNNNNN.pt / pool files that need arbitrary unpickling (old or foreign)
    seed: int = 0
    num_workers: int = 2
    deterministic: bool = False
    random_flip: bool = True

    def __post_init__(self) -> None:
        for name in ("lr_anneal_steps", "max_steps", "log_interval", "save_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 or more (0: {_ZERO_MEANS[name]}), got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be at least 1, got {self.batch_size}")
        check_compile_backend(self.compile_backend)
        check_winograd_config(self.winograd, self.precision, self.compile)
        if self.max_steps and self.lr_anneal_steps and self.max_steps > self.lr_anneal_steps:
            raise ConfigError(
                f"--max_steps {self.max_steps} lies past --lr_anneal_steps {self.lr_anneal_steps}, where the "
                f"learning rate has reached 0; set --lr_anneal_steps {self.max_steps} to anneal over the whole run, "
                "or --lr_anneal_steps 0 for a constant learning rate"
            )


# torch's own compile backends that need nothing beyond torch: inductor generates kernels (the fast
# one), aot_eager traces forward and backward without generating code (a cheap check of the
# tracing), eager only runs dynamo, cudagraphs replays captured CUDA graphs (GPU only).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def check_compile_backend(backend: str) -> None:
    """Raise ConfigError for a ``--compile_backend`` outside :data:`COMPILE_BACKENDS`."""
    if backend not in COMPILE_BACKENDS:
        raise ConfigError(f"--compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")


def check_winograd_config(winograd: bool, precision: str, compile: bool) -> None:
    """Raise ConfigError for ``--winograd`` (sampling or training) with what it cannot run beside."""
    if winograd and (compile or precision != "fp32"):
        raise ConfigError(
            "--winograd replaces the eager fp32 CPU network's 3x3 convolutions: it needs --precision fp32 "
            f"and --compile false (got precision={precision!r}, compile={compile}); drop one of them"
        )


_ZERO_MEANS = {
    "lr_anneal_steps": "constant learning rate",
    "max_steps": "stop at lr_anneal_steps",
    "log_interval": "log only at the end",
    "save_interval": "save only at the end",
}


@dataclass
class DistillConfig:
    """The DKDM method: the teacher, the dynamic iterative batch pool, the objective."""

    teacher_path: str = ""  # "" = the embedded digits teacher
    rho: float = 0.4
    pool: str = "dynamic"  # dynamic | shuffled | iterative
    discard_prob: float = 0.0
    teacher_batch: int = 1024
    pool_device: str = "auto"  # auto (training device) | cpu
    pool_cache_dir: str = ""  # "" = <log_dir>/pool_cache
    warmup: str = "full"  # how each pool sample reaches its end step: full | respaced
    warmup_jumps: int = 20  # respaced warm-up: DDIM jumps on a grid of about T / warmup_jumps steps
    warmup_exact: int = 10  # respaced warm-up: exact ancestral steps before each end step
    prep_checkpoint_s: float = 300.0  # save pool-preparation progress this often (seconds)
    simple_only: bool = False
    clip_teacher_mean: bool = False  # True: the official release's variance term (teacher mean from clipped x_0)
    teacher_precision: str = "fp32"  # fp32 | fp16 | bf16
    teacher_channels_last: bool = False  # the teacher's weights (and so its activations) in NHWC memory order
    teacher_winograd: bool = False  # CPU fp32: the teacher's 3x3 convolutions by Winograd F(4x4,3x3)
    # Class-conditional teachers: pool labels in proportion to these weights ("" = uniform); a .npy
    # or text file of num_classes non-negative numbers.
    class_weights: str = ""
    # Classifier-free guidance (dkdm/models/guidance.py): the target is out_u + w (out_c - out_u);
    # 1 = the plain conditional teacher. A w-conditioned student (--student.guidance_cond) learns
    # every w in [w_min, w_max] instead, one w drawn per pool sample.
    guidance_scale: float = 1.0
    w_min: float = 0.0
    w_max: float = 0.0

    # Step distillation (dkdm.distill.objectives): which objective, and each one's settings.
    objective: str = "dkdm"  # dkdm | luhman | progressive | tract | consistency | boot
    # "" = the objective's default | random | teacher | a checkpoint path (e.g. scripts/compress.py's
    # student.pt: the config.yaml beside it describes the student network)
    student_init: str = ""
    parameterization: str = ""  # step students: x0 | v | eps | skip-<one of those>; "" = objective's default
    step_clip: bool = True  # teacher DDIM targets clip x_0 to [-1, 1], as sample.py's DDIM does
    luhman_steps: int = 25  # luhman: teacher DDIM steps per (noise, image) pair
    progressive_start: int = 32  # progressive: the first round's student steps (its teacher takes twice as many)
    progressive_end: int = 1  # progressive: the last round's student steps (halving from progressive_start)
    round_steps: int = 500  # progressive, tract: optimizer steps per round (phase)
    step_weighting: str = "truncated_snr"  # progressive: truncated_snr (max(SNR, 1)) | snr_plus_one
    tract_steps: str = "64,8,1"  # tract: the teacher's grid steps, then each phase's student steps
    tract_ema: float = 0.95  # tract: EMA decay of the self-teacher
    cm_steps: int = 18  # consistency, boot: N, the number of grid intervals
    cm_ema: float = 0.95  # consistency: EMA decay of the target network
    sigma_data: float = 0.5  # consistency: sigma_data of the skip/out parameterisation
    # Compression (dkdm.models.compress, dkdm.distill.features): feature KD on the pool's teacher call.
    feature_kd_weight: float = 0.0  # lambda_feat: adds lambda * feature MSE of named stages (0: off)
    feature_kd_layers: str = ""  # stages for feature KD, e.g. down0,mid,up1 ("" = every stage both networks have)

    def __post_init__(self) -> None:
        if self.feature_kd_weight < 0:
            raise ConfigError(f"--feature_kd_weight must be 0 (off) or positive, got {self.feature_kd_weight}")
        if self.w_min > self.w_max:
            raise ConfigError(f"--w_min {self.w_min} lies above --w_max {self.w_max}; give w_min <= w_max")
        objectives = ("dkdm", "luhman", "progressive", "tract", "consistency", "boot")
        if self.objective not in objectives:
            raise ConfigError(f"--objective must be one of {', '.join(objectives)}, got {self.objective!r}")
        dev = self.pool_device
        if not (dev in ("", "auto", "cpu") or dev == "cuda" or re.fullmatch(r"cuda:\d+", dev)):
            raise ConfigError(f"--pool_device must be auto (the training device), cpu or cuda[:N], got {dev!r}")
        if self.teacher_precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"--teacher_precision must be fp32, fp16 or bf16, got {self.teacher_precision!r}")
        if self.teacher_winograd and self.teacher_precision != "fp32":
            raise ConfigError(
                "--teacher_winograd replaces the fp32 teacher's 3x3 convolutions: it needs --teacher_precision "
                f"fp32 (got {self.teacher_precision!r}); drop one of them"
            )

    @property
    def student_checkpoint(self) -> str:
        """The checkpoint ``student_init`` names ("" for the named inits ``random`` and ``teacher``)."""
        return "" if self.student_init in ("", "random", "teacher") else self.student_init


@dataclass
class SampleConfig:
    """Drawing samples from a trained model into an ADM-format npz."""

    model_path: str = ""  # "" = the embedded digits teacher
    num_samples: int = 50000
    batch_size: int = 256
    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True
    precision: str = "fp32"
    compile: bool = False  # torch.compile the network in place (the first batch compiles)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager | cudagraphs
    channels_last: bool = False  # the network's weights (and so its activations) in NHWC memory order
    winograd: bool = False  # CPU fp32: 3x3 convolutions by Winograd F(4x4,3x3) (dkdm.models.winograd)
    seed: int = 0
    guidance_scale: float = 1.0  # classifier-free guidance (guided models) or the w input (w-conditioned students)
    output: str = ""  # a .npz path, or a folder for guided-diffusion's samples_NxHxWxC.npz; "" = runs/samples
    keep_shards: bool = False  # keep <output>.shards/ after the merge (it is the resume state)

    def __post_init__(self) -> None:
        check_compile_backend(self.compile_backend)
        check_winograd_config(self.winograd, self.precision, self.compile)


GROUP_TYPES = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "sample": SampleConfig,
}


# --------------------------------------------------------------------------- helpers


def _closest(name: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a YAML or flag value into the field's type, with a useful error."""
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "y", "on"):
            return True
        if s in ("0", "false", "no", "n", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return "" if value is None else str(value)
    try:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None


def from_dict(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the closest field."""
    return update(cls(), values, where or cls.__name__)


def update(obj: Any, values: Mapping[str, Any], where: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied (types checked)."""
    where = where or type(obj).__name__
    types = {f.name: f.type for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{where}: unknown field '{key}'{_closest(key, types)}; valid fields: {', '.join(types)}")
        changes[key] = _coerce(value, types[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where two nested mappings differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def to_dict(obj: Any) -> Any:
    """Plain data from a dataclass or a mapping of them; other values pass through."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str) -> dict:
    """Read a YAML file into a dict; a missing or malformed file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def load_json(path: str) -> Any:
    """Read a JSON file (a diffusers config, a provenance note); unreadable or malformed is a ConfigError."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def dump_yaml(groups: Mapping[str, Any], path: str) -> None:
    """Write resolved configs (group name -> dataclass or dict) to ``path`` as YAML."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = yaml.safe_dump(to_dict(groups), sort_keys=False)
    atomic_write(path, lambda f: f.write(text), mode="w")  # a reader never sees half a file


# --------------------------------------------------------------------------- parsing


@dataclass
class ParsedArgs:
    """What a script's command line said: per-group overrides and the script's own options.

    ``overrides[group]`` holds only what YAML files and flags set, so a caller can layer
    them on a preset (a zoo architecture) before the dataclass defaults matter.
    """

    overrides: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    def resolve(self, group: str, base: Any = None) -> Any:
        """The group's dataclass: ``base`` (or the defaults) with the overrides applied."""
        types = self._types[group]
        base = types() if base is None else base
        return update(base, self.overrides.get(group, {}), group)

    _types: dict = field(default_factory=dict, repr=False)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and a script option's default; a config flag's default of
    None means "not given", and its help already names the field's own default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class ConfigParser:
    """Flags for a script's config groups plus its own options.

    ``groups`` maps group names to dataclass types (two groups may share a type, e.g.
    ``teacher`` and ``student``). ``plain`` lists the groups that un-prefixed flags set;
    by default all groups whose type no other group shares. ``renamed`` maps retired flags
    (without ``--``) to their spelling now; using one is an error that names it.
    """

    def __init__(
        self,
        description: str,
        groups: Mapping[str, type],
        plain: Sequence[str] | None = None,
        renamed: Mapping[str, str] | None = None,
    ) -> None:
        self.groups = dict(groups)
        if plain is None:
            counts: dict = {}
            for t in self.groups.values():
                counts[t] = counts.get(t, 0) + 1
            plain = [g for g, t in self.groups.items() if counts[t] == 1]
        self.plain = list(plain)
        self.parser = argparse.ArgumentParser(
            description=description,
            usage="%(prog)s [--config FILE.yaml] [--field VALUE | --group.field VALUE ...]",
            formatter_class=_HelpFormatter,
            allow_abbrev=False,
        )
        self.parser.add_argument(
            "--config",
            action="append",
            default=[],
            help="experiment YAML with one mapping per group "
            f"({', '.join(self.groups)}); may be given several times, later ones win",
        )
        self._extras: list = ["config"]
        self._flag_targets: dict = {}  # dest -> list of (group, field, type)
        for g, t in self.groups.items():
            for f in fields(t):
                self._add(f"{g}.{f.name}", [(g, f.name, f.type)], f"{g}: {f.name} (default {f.default!r})")
        plain_fields: dict = {}
        for g in self.plain:
            for f in fields(self.groups[g]):
                plain_fields.setdefault(f.name, []).append((g, f.name, f.type))
        self.renamed = dict(renamed or {})
        for old, new in self.renamed.items():
            plain_fields.pop(old, None)
            self.parser.add_argument(f"--{old}", dest=f"renamed__{old}", default=None, help=f"now spelled {new}")
        for name, targets in plain_fields.items():
            self._add(name, targets, "sets " + ", ".join(f"{g}.{n}" for g, n, _ in targets))

    def _add(self, flag: str, targets: list, help_text: str) -> None:
        dest = flag.replace(".", "__")
        self._flag_targets[dest] = targets
        is_bool = all(t in (bool, "bool") for _, _, t in targets)
        self.parser.add_argument(
            f"--{flag}",
            dest=dest,
            default=None,
            metavar="V",
            help=help_text,
            # `--learn_sigma` alone means true; `--learn_sigma False` is guided-diffusion's form.
            **({"nargs": "?", "const": "true"} if is_bool else {}),
        )

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        """A script's own option (not part of any config group)."""
        action = self.parser.add_argument(*args, **kwargs)
        self._extras.append(action.dest)

    def _all_flags(self) -> list:
        return [s for a in self.parser._actions for s in a.option_strings if s.startswith("--")]

    def parse(self, argv: Sequence[str] | None = None) -> ParsedArgs:
        """Parse ``argv``; unknown flags and YAML keys are errors naming the closest valid one."""
        ns, unknown = self.parser.parse_known_args(argv)
        if unknown:
            bad = next((u for u in unknown if u.startswith("-")), unknown[0])
            name = bad.split("=")[0]
            self.parser.error(f"unknown argument {bad}{_closest(name, self._all_flags())}")
        for old, new in self.renamed.items():
            if getattr(ns, f"renamed__{old}") is not None:
                self.parser.error(f"--{old} is now spelled {new}")
        overrides: dict = {g: {} for g in self.groups}
        for path in ns.config:
            data = load_yaml(path)
            for g, values in data.items():
                if g not in self.groups:
                    raise ConfigError(
                        f"{path}: unknown section '{g}'{_closest(g, self.groups)}; "
                        f"this script reads {', '.join(self.groups)}"
                    )
                if not isinstance(values, dict):
                    raise ConfigError(f"{path}: section '{g}' must be a mapping")
                update(self.groups[g](), values, f"{path}: {g}")  # validate names and types now
                overrides[g].update(values)
        # Plain flags first, so an explicit --group.field wins over a plain one.
        ordered = sorted(self._flag_targets.items(), key=lambda kv: "__" in kv[0])
        for dest, targets in ordered:
            value = getattr(ns, dest)
            if value is None:
                continue
            for g, name, typ in targets:
                overrides[g][name] = _coerce(value, typ, f"--{dest.replace('__', '.')}")
        extras = {k: getattr(ns, k) for k in self._extras}
        return ParsedArgs(overrides=overrides, extras=extras, _types=dict(self.groups))
