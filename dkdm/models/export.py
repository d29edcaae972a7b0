"""A trained network written out for other tools: guided-diffusion ``.pt`` and a diffusers folder.

*guided-diffusion*: our UNet's state dict already has guided-diffusion's key names and shapes
(``tests/test_models.py`` pins them against its ``UNetModel``), so the export is the plain
state dict in float32, plus the command-line flags its scripts would need to rebuild the
network and its diffusion (:func:`guided_diffusion_flags`), and what those scripts cannot
express without an edit (``NUM_CLASSES`` is fixed at 1000 there, ``in_channels`` at 3).

*diffusers*, a UNet: the same network as a ``UNet2DModel`` (:func:`diffusers_unet_config`) with
every weight moved by an explicit map (:func:`diffusers_state_dict`: every key of ours used once,
every parameter of theirs filled, shapes checked, the fused ``qkv`` split into
``to_q/to_k/to_v`` in the model's attention order), and the diffusion as a ``DDPMScheduler``
config (:func:`diffusers_scheduler_config`). Both are written by diffusers itself as a
``DDPMPipeline`` folder; :func:`export_diffusers` also records the null class of a
classifier-free-guidance model in ``unet/dkdm_export.json`` (diffusers has no field for it),
which :mod:`dkdm.models.foreign` reads back. What diffusers cannot represent is refused with
the reason: BigGAN up/downsampling (``resblock_updown``), pooling downsamplers, a first level
wider or narrower than ``num_channels``, per-level head sizes, a w-conditioned network.

*diffusers*, a ViT: a ``DiTTransformer2DModel`` (:func:`diffusers_dit_config`,
:func:`diffusers_dit_state_dict`) in ``transformer/`` beside ``scheduler/``; no pipeline file,
since diffusers' ``DiTPipeline`` needs a VAE (and hard-codes ImageNet's null class 1000). Two
differences of the class are met as follows. (1) diffusers' DiT is class-conditional only, so
an unconditional ViT is written as a one-class model whose label rows (the class and diffusers'
null row) are zero; the conditioning ``t_emb + y_emb`` is then the timestep's alone, exactly,
for label 0 (recorded as ``unconditional_label``). (2) diffusers' DiT embeds the timestep at
frequencies ``10000^(-i/127)`` where ours (and DiT's) are ``10000^(-i/128)`` (its
``Timesteps(downscale_freq_shift=1)`` is hard-coded); no weight or config value makes the two
equal, and the difference is not small (phases apart by up to 2.9 rad at t = 999). So a ViT is
refused unless ``dit_frequency_fix`` accepts a folder that records ``TIMESTEP_SHIFT_KEY = 0`` in
its ``config.json`` (diffusers warns that it ignores the key on every load), which
:mod:`dkdm.models.foreign` applies (setting every block's ``norm1.emb.time_proj
.downscale_freq_shift`` to 0) and any other loader must apply by hand; with it the forward is
ours to float32 rounding (``tests/test_export_dit.py``). Refused too: a w-conditioned or latent
ViT, an ``mlp_ratio`` other than 4, and ``pos_embed`` other than the sin-cos table diffusers
recomputes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from dkdm.config import DiffusionConfig, ModelConfig, to_dict

__all__ = [
    "EXPORT_NOTE",
    "TIMESTEP_SHIFT_KEY",
    "ExportError",
    "diffusers_dit_config",
    "diffusers_dit_state_dict",
    "diffusers_scheduler_config",
    "diffusers_state_dict",
    "diffusers_unet_config",
    "export_diffusers",
    "export_guided_diffusion",
    "guided_diffusion_flags",
]

EXPORT_NOTE = "dkdm_export.json"  # beside the diffusers model's config.json: what diffusers has no field for


class ExportError(ValueError):
    """A network or diffusion the target format cannot represent; the message says which field and why."""


def _unet(net: torch.nn.Module, fmt: str):
    from dkdm.models.unet import UNetModel

    if not isinstance(net, UNetModel):
        hint = (
            "; export_diffusers writes a ViT as a DiTTransformer2DModel (diffusers_dit_*)" if fmt == "diffusers" else ""
        )
        raise ExportError(f"{fmt} export writes ADM UNets here; this network is a {type(net).__name__}{hint}")
    _refuse_guidance(net.guidance_cond, fmt)
    cfg = getattr(net, "config", None)
    _refuse_latent(getattr(cfg, "first_stage", ""), fmt)
    _refuse_compressed(
        len(set(net.level_res_blocks)) > 1 or net.level_res_blocks[0] != net.num_res_blocks,
        net.mid_block,
        getattr(cfg, "channel_widths", ""),
        fmt,
    )
    return net


def _refuse_guidance(guidance_cond: bool, fmt: str) -> None:
    if guidance_cond:
        raise ExportError(
            f"{fmt} has no input for the guidance scale w of a w-conditioned network (guidance_cond); "
            "export a student distilled at one --guidance_scale instead"
        )


def _refuse_latent(first_stage: str, fmt: str) -> None:
    if first_stage:
        raise ExportError(
            f"this network works on the latents of the first stage {first_stage}; a {fmt} export would hold the "
            "denoiser without its decoder (a DDPMPipeline or image_sample.py would draw latents, not images)"
        )


def _refuse_compressed(uneven_blocks: bool, mid_block: str, channel_widths: str, fmt: str) -> None:
    """A student cut or pruned by scripts/compress.py has no layout in ``fmt``: say which cut."""
    why = []
    if uneven_blocks:
        why.append("residual blocks removed from some levels (level_res_blocks)")
    if mid_block != "full":
        why.append(f"a cut middle block (mid_block {mid_block})")
    if channel_widths:
        why.append("pruned layer widths (channel_widths)")
    if why:
        raise ExportError(
            f"{fmt} builds the full ADM UNet; this network is compressed ({'; '.join(why)}), which it cannot "
            "represent; sample it with scripts/sample.py, or export an uncompressed network"
        )


# ---------------------------------------------------------------------------- guided-diffusion


def guided_diffusion_flags(model: ModelConfig, diffusion: DiffusionConfig) -> tuple[dict[str, Any], list[str]]:
    """guided-diffusion's script flags for this network and diffusion, and what they cannot say.

    The flags are ``model_and_diffusion_defaults()``'s keys. The notes list the edits its
    scripts need (a 1-channel model, a number of classes other than 1000, a null class,
    ``sigma_small``), since those are not flags there.
    """
    if model.arch != "unet":
        raise ExportError(f"guided-diffusion builds ADM UNets; this model's arch is {model.arch}")
    if model.guidance_cond:
        raise ExportError("guided-diffusion has no input for the guidance scale w (guidance_cond)")
    _refuse_latent(model.first_stage, "guided-diffusion")
    _refuse_compressed(bool(model.level_res_blocks), model.mid_block, model.channel_widths, "guided-diffusion")
    if diffusion.predict_v:
        raise ExportError("guided-diffusion has no v-prediction (predict_v); export to diffusers instead")
    if diffusion.noise_schedule not in ("linear", "cosine"):
        raise ExportError(
            f"guided-diffusion knows the noise schedules linear and cosine, not {diffusion.noise_schedule}; "
            "export to diffusers instead"
        )
    flags: dict[str, Any] = {
        "image_size": model.image_size,
        "num_channels": model.num_channels,
        "num_res_blocks": model.num_res_blocks,
        "channel_mult": model.channel_mult,
        "num_heads": model.num_heads,
        "num_heads_upsample": model.num_heads_upsample,
        "num_head_channels": model.num_head_channels,
        "attention_resolutions": model.attention_resolutions,
        "dropout": model.dropout,
        "class_cond": model.class_cond,
        "use_checkpoint": False,
        "use_scale_shift_norm": model.use_scale_shift_norm,
        "resblock_updown": model.resblock_updown,
        "use_fp16": model.use_fp16,
        "use_new_attention_order": model.use_new_attention_order,
        "learn_sigma": model.learn_sigma,
        "diffusion_steps": diffusion.steps,
        "noise_schedule": diffusion.noise_schedule,
        "timestep_respacing": diffusion.timestep_respacing,
        "use_kl": diffusion.use_kl,
        "predict_xstart": diffusion.predict_xstart,
        "rescale_timesteps": diffusion.rescale_timesteps,
        "rescale_learned_sigmas": diffusion.rescale_learned_sigmas,
    }
    notes = []
    if model.in_channels != 3:
        notes.append(f"in_channels is {model.in_channels}: guided-diffusion's create_model builds 3-channel models")
    if not model.conv_resample:
        notes.append("conv_resample is false: guided-diffusion's create_model always resamples with convolutions")
    if model.class_cond:
        rows = model.num_classes + int(model.class_dropout_prob > 0)
        notes.append(
            f"label_emb has {rows} rows ({model.num_classes} classes"
            + (f" and the null class {model.num_classes}" if rows > model.num_classes else "")
            + f"): set NUM_CLASSES = {rows} in guided_diffusion/script_util.py (it is 1000 there)"
        )
    if diffusion.sigma_small and not diffusion.learn_sigma:
        notes.append("sigma_small: create_gaussian_diffusion(sigma_small=True); its scripts have no flag for it")
    return flags, notes


def export_guided_diffusion(net: torch.nn.Module, model: ModelConfig, diffusion: DiffusionConfig, path: str) -> dict:
    """Write ``net``'s weights as guided-diffusion's ``.pt`` (a plain float32 state dict) and its flags.

    The flags and notes go to ``<path stem>.flags.json`` beside it (also returned), together
    with the ``--flag value`` line its ``image_sample.py`` takes.
    """
    from dkdm.fileio import atomic_save, atomic_write

    _unet(net, "guided-diffusion")
    flags, notes = guided_diffusion_flags(model, diffusion)
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()}
    atomic_save(state, path)
    line = " ".join(f"--{k} {v if not isinstance(v, bool) else str(v)}" for k, v in flags.items() if v != "")
    info = {"format": "guided-diffusion", "weights": os.path.basename(path), "flags": flags, "command_line": line}
    info["notes"] = notes
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(os.path.splitext(path)[0] + ".flags.json", lambda f: f.write(text), mode="w")
    return info


# ---------------------------------------------------------------------------- diffusers


def _attention_head_dim(net) -> int | None:
    """diffusers' single ``attention_head_dim`` for every attention of ``net`` (None: one head each)."""
    from dkdm.models.unet import AttentionBlock

    blocks = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    if all(b.num_heads == 1 for b in blocks) and net.num_head_channels == -1:
        return None  # diffusers then uses each block's width: one head
    dims = {b.channels // b.num_heads for b in blocks}
    if len(dims) != 1:
        raise ExportError(
            f"the attention blocks have head sizes {sorted(dims)} (num_heads {net.num_heads} on levels of different "
            "widths); diffusers' UNet2DModel has one attention_head_dim: train with --num_head_channels instead"
        )
    return dims.pop()


def diffusers_unet_config(net: torch.nn.Module) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments that build the same network as our UNet ``net``."""
    net = _unet(net, "diffusers")
    if net.input_blocks[0][0].weight.dim() != 4:
        raise ExportError("diffusers' UNet2DModel is 2-D; this UNet is not (dims != 2)")
    ch0 = int(net.channel_mult[0] * net.model_channels)
    if ch0 != net.model_channels:
        raise ExportError(
            f"channel_mult starts at {net.channel_mult[0]}: the first level has {ch0} channels but the timestep "
            f"embedding {net.model_channels}; diffusers' UNet2DModel ties the two (block_out_channels[0])"
        )
    if any(getattr(m, "updown", False) for m in net.modules()):
        raise ExportError("resblock_updown (BigGAN-style resampling residual blocks) has no UNet2DModel block")
    if not net.conv_resample:
        raise ExportError("conv_resample false (pooling/plain resampling): UNet2DModel's blocks resample by conv")
    attn = [2**level in net.attention_resolutions for level in range(len(net.channel_mult))]
    scale_shift = net.input_blocks[1][0].use_scale_shift_norm
    classes = net.label_emb.num_embeddings if net.num_classes is not None else None
    return {
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # ours is [cos, sin] of t * 10000^(-i/half): flipped, no frequency shift
        "freq_shift": 0,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "block_out_channels": tuple(int(m * net.model_channels) for m in net.channel_mult),
        "layers_per_block": net.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "dropout": float(net.dropout),
        "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(net),
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # else the middle attention of a scale-shift UNet would have no norm
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if scale_shift else "default",
        "add_attention": True,
        "num_class_embeds": classes,
    }


def _linear(dst: dict, name: str, module: torch.nn.Module) -> list[str]:
    """A conv/linear/norm/embedding module's parameters under ``name``; returns the source keys."""
    dst.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return list(module.state_dict())


def _split_qkv(w: torch.Tensor, b: torch.Tensor, heads: int, legacy: bool) -> dict[str, torch.Tensor]:
    """``to_q/to_k/to_v`` weights and biases from a fused ``qkv`` projection ``w`` [3C, C], ``b`` [3C].

    legacy (the UNet's QKVAttentionLegacy): per head [q, k, v]; otherwise (the UNet's QKVAttention
    and the ViT's timm layout) q of every head, then k, then v.
    """
    c = w.shape[1]
    d = c // heads
    shape = (heads, 3, d) if legacy else (3, heads, d)
    axis = 1 if legacy else 0
    w4, b3 = w.reshape(*shape, c), b.reshape(*shape)
    out = {}
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        out[f"{part}.weight"] = w4.select(axis, i).reshape(c, c)
        out[f"{part}.bias"] = b3.select(axis, i).reshape(c)
    return out


def diffusers_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s weights under ``UNet2DModel``'s names (see :func:`diffusers_unet_config`).

    Raises :class:`ExportError` unless every one of our keys was used exactly once.
    """
    from dkdm.models.unet import AttentionBlock, Downsample, ResBlock, Upsample

    net = _unet(net, "diffusers")
    out: dict[str, torch.Tensor] = {}
    used: list[str] = []

    def put(ours: str, theirs: str, module: torch.nn.Module) -> None:
        if isinstance(module, ResBlock):
            pairs = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj")]
            pairs += [("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
            if not isinstance(module.skip_connection, torch.nn.Identity):
                if module.skip_connection.kernel_size != (1, 1):
                    raise ExportError(f"{ours}: a 3x3 skip convolution (use_conv) has no UNet2DModel counterpart")
                pairs.append(("skip_connection", "conv_shortcut"))
            for a, b in pairs:
                used.extend(f"{ours}.{a}.{k}" for k in _linear(out, f"{theirs}.{b}", module.get_submodule(a)))
        elif isinstance(module, AttentionBlock):
            used.extend(f"{ours}.norm.{k}" for k in _linear(out, f"{theirs}.group_norm", module.norm))
            c = module.channels
            qkv = _split_qkv(module.qkv.weight.reshape(3 * c, c), module.qkv.bias, module.num_heads, module.legacy)
            out.update({f"{theirs}.{k}": v for k, v in qkv.items()})
            used.extend([f"{ours}.qkv.weight", f"{ours}.qkv.bias"])
            out[f"{theirs}.to_out.0.weight"] = module.proj_out.weight.reshape(module.channels, module.channels)
            out[f"{theirs}.to_out.0.bias"] = module.proj_out.bias
            used.extend([f"{ours}.proj_out.weight", f"{ours}.proj_out.bias"])
        elif isinstance(module, (Downsample, Upsample)):
            conv = module.op if isinstance(module, Downsample) else module.conv
            inner = "op" if isinstance(module, Downsample) else "conv"
            used.extend(f"{ours}.{inner}.{k}" for k in _linear(out, f"{theirs}.conv", conv))
        else:  # pragma: no cover - the UNet holds nothing else
            raise ExportError(f"{ours}: no diffusers counterpart for {type(module).__name__}")

    used.extend(f"time_embed.0.{k}" for k in _linear(out, "time_embedding.linear_1", net.time_embed[0]))
    used.extend(f"time_embed.2.{k}" for k in _linear(out, "time_embedding.linear_2", net.time_embed[2]))
    if net.num_classes is not None:
        used.extend(f"label_emb.{k}" for k in _linear(out, "class_embedding", net.label_emb))
    used.extend(f"input_blocks.0.0.{k}" for k in _linear(out, "conv_in", net.input_blocks[0][0]))
    k = 1
    levels = len(net.channel_mult)
    for level in range(levels):
        for j in range(net.num_res_blocks):
            block = net.input_blocks[k]
            put(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", block[0])
            if len(block) > 1:
                put(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", block[1])
            k += 1
        if level != levels - 1:
            put(f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", net.input_blocks[k][0])
            k += 1
    for i, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        put(f"middle_block.{i}", f"mid_block.{name}", net.middle_block[i])
    k = 0
    for r in range(levels):  # up_blocks[r] is level levels-1-r
        for j in range(net.num_res_blocks + 1):
            block = net.output_blocks[k]
            put(f"output_blocks.{k}.0", f"up_blocks.{r}.resnets.{j}", block[0])
            for i in range(1, len(block)):
                if isinstance(block[i], AttentionBlock):
                    put(f"output_blocks.{k}.{i}", f"up_blocks.{r}.attentions.{j}", block[i])
                else:
                    put(f"output_blocks.{k}.{i}", f"up_blocks.{r}.upsamplers.0", block[i])
            k += 1
    used.extend(f"out.0.{k}" for k in _linear(out, "conv_norm_out", net.out[0]))
    used.extend(f"out.2.{k}" for k in _linear(out, "conv_out", net.out[2]))
    _check_used(net, used, "UNet")
    return {k: v.detach().clone() for k, v in out.items()}


def _check_used(net: torch.nn.Module, used: list[str], what: str) -> None:
    """Refuse a map that did not take every key of ``net`` exactly once."""
    ours = set(net.state_dict())
    if len(used) != len(set(used)) or set(used) != ours:
        twice = sorted({k for k in used if used.count(k) > 1})
        raise ExportError(
            f"the diffusers map left {sorted(ours - set(used))[:5]} unused and used {twice[:5]} twice "
            f"({len(ours)} keys); the {what}'s layout changed and export.py does not know it"
        )


# ---------------------------------------------------------------------------- diffusers: the ViT

# diffusers' CombinedTimestepLabelEmbeddings builds Timesteps(256, flip_sin_to_cos=True,
# downscale_freq_shift=1), frequencies 10000^(-i/127); ours (DiT's) are 10000^(-i/128), the same
# [cos, sin] order with a shift of 0. Its config has no field for it: the export records the
# value under this config.json key and the loader sets it on every block.
TIMESTEP_SHIFT_KEY = "dkdm_time_proj_downscale_freq_shift"
_HALF = 128  # half of the 256 sinusoid channels, in both


def _vit(net: torch.nn.Module, fmt: str):
    from dkdm.models.vit import ViT

    if not isinstance(net, ViT):
        raise ExportError(f"{fmt} DiTTransformer2DModel export writes our ViT; this network is a {type(net).__name__}")
    _refuse_guidance(net.guidance_cond, fmt)
    _refuse_latent(getattr(getattr(net, "config", None), "first_stage", ""), fmt)
    hidden, mlp = net.pos_embed.shape[-1], net.blocks[0].mlp.fc1.out_features
    if mlp != 4 * hidden:
        raise ExportError(
            f"the MLP is {mlp} wide for {hidden} channels (mlp_ratio {mlp / hidden:g}); diffusers' "
            "DiTTransformer2DModel always builds its feed-forward 4 times the width: export a ViT with mlp_ratio 4"
        )
    if net.t_embedder.frequency_embedding_size != 2 * _HALF:
        raise ExportError(
            f"the timestep sinusoid has {net.t_embedder.frequency_embedding_size} channels; "
            f"diffusers' DiT embedder has {2 * _HALF}"
        )
    return net


def diffusers_dit_config(net: torch.nn.Module) -> dict[str, Any]:
    """``DiTTransformer2DModel`` keyword arguments that build the same network as our ViT ``net``.

    An unconditional ViT becomes a one-class model (diffusers' DiT always adds a label
    embedding), whose label rows are zero: see :func:`diffusers_dit_state_dict`.
    """
    net = _vit(net, "diffusers")
    hidden = net.pos_embed.shape[-1]
    return {
        "num_attention_heads": net.num_heads,
        "attention_head_dim": hidden // net.num_heads,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,  # 2 * in_channels with learn_sigma
        "num_layers": len(net.blocks),
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": net.image_size,
        "patch_size": net.patch_size,
        "activation_fn": "gelu-approximate",  # the Mlp's tanh GELU
        "num_embeds_ada_norm": net.num_classes if net.num_classes is not None else 1,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # every LayerNorm of ours; diffusers fixes its norm1 and norm_out at 1e-6 already
    }


def diffusers_dit_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s weights under ``DiTTransformer2DModel``'s names (see :func:`diffusers_dit_config`).

    diffusers gives every block its own adaLN embedder (``transformer_blocks.N.norm1.emb``: the
    timestep MLP and the label table; the final layer uses block 0's); ours is one shared
    ``t_embedder``/``y_embedder``, so each block gets a copy. Its label table always has a null
    row after the classes: ours when the ViT has one, else zeros (unused by ``net``). An
    unconditional ViT gets a one-class table of zeros, so the conditioning t_emb + y_emb is the
    timestep's alone for label 0 (or 1). ``pos_embed`` has no weight there (diffusers recomputes
    the table; :func:`export_diffusers` checks it is ours). Raises :class:`ExportError` unless
    every other key of ours was used, the shared embedder's once.
    """
    net = _vit(net, "diffusers")
    hidden = net.pos_embed.shape[-1]
    out: dict[str, torch.Tensor] = {}
    used: list[str] = ["pos_embed"]

    def put(ours: str, theirs: str, dst: dict = out) -> None:
        used.extend(f"{ours}.{k}" for k in _linear(dst, theirs, net.get_submodule(ours)))

    put("x_embedder.proj", "pos_embed.proj")
    embedder: dict[str, torch.Tensor] = {}
    put("t_embedder.mlp.0", "timestep_embedder.linear_1", embedder)
    put("t_embedder.mlp.2", "timestep_embedder.linear_2", embedder)
    like = net.t_embedder.mlp[0].weight
    table = torch.zeros((net.num_classes or 1) + 1, hidden, dtype=like.dtype, device=like.device)
    if net.num_classes is not None:
        ours_table = net.y_embedder.embedding_table.weight  # the classes, and the null class if any
        table[: ours_table.shape[0]] = ours_table.detach()
        used.append("y_embedder.embedding_table.weight")
    embedder["class_embedder.embedding_table.weight"] = table
    for i, block in enumerate(net.blocks):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        out.update({f"{theirs}.norm1.emb.{k}": v for k, v in embedder.items()})
        # both chunk the modulation as (shift, scale, gate) of the attention, then of the MLP
        put(f"{ours}.adaLN_modulation.1", f"{theirs}.norm1.linear")
        attn = block.attn
        qkv = _split_qkv(attn.qkv.weight, attn.qkv.bias, attn.num_heads, legacy=False)
        out.update({f"{theirs}.attn1.{k}": v for k, v in qkv.items()})
        used.extend([f"{ours}.attn.qkv.weight", f"{ours}.attn.qkv.bias"])
        put(f"{ours}.attn.proj", f"{theirs}.attn1.to_out.0")
        put(f"{ours}.mlp.fc1", f"{theirs}.ff.net.0.proj")
        put(f"{ours}.mlp.fc2", f"{theirs}.ff.net.2")
    put("final_layer.adaLN_modulation.1", "proj_out_1")  # both chunk it as (shift, scale)
    put("final_layer.linear", "proj_out_2")
    _check_used(net, used, "ViT")
    return {k: v.detach().clone() for k, v in out.items()}


def diffusers_scheduler_config(diffusion: DiffusionConfig) -> dict[str, Any]:
    """``DDPMScheduler`` keyword arguments for our diffusion (its full process; respacing is a sampling choice)."""
    d = diffusion
    if d.rescale_timesteps and d.steps != 1000:
        raise ExportError(
            f"rescale_timesteps feeds the network t * 1000 / {d.steps}; diffusers feeds the raw step index"
        )
    name = d.noise_schedule
    if name == "linear":  # Ho et al.'s ends, rescaled by 1000 / steps as ours
        scale = 1000.0 / d.steps
        sched = {"beta_schedule": "linear", "beta_start": scale * 0.0001, "beta_end": scale * 0.02}
    elif name == "cosine":
        sched = {"beta_schedule": "squaredcos_cap_v2"}  # IDDPM's cosine, betas capped at 0.999 as ours
    elif name.startswith(("linear:", "scaled_linear:")):
        kind, ends = name.split(":", 1)
        start, end = (float(v) for v in ends.split(","))
        sched = {"beta_schedule": kind, "beta_start": start, "beta_end": end}
    else:
        raise ExportError(f"noise_schedule {name} has no DDPMScheduler beta_schedule")
    if d.learn_sigma:
        variance = "learned_range"
    else:
        variance = "fixed_small" if d.sigma_small else "fixed_large"
    prediction = "v_prediction" if d.predict_v else "sample" if d.predict_xstart else "epsilon"
    return {
        "num_train_timesteps": d.steps,
        **sched,
        "variance_type": variance,
        "prediction_type": prediction,
        "clip_sample": True,  # our samplers' default (clip_denoised)
        "clip_sample_range": 1.0,
    }


def _fill(theirs: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` (as float32) into the diffusers model ``theirs``: every key, every shape, or refuse."""
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    expected = theirs.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra or wrong:
        raise ExportError(
            f"diffusers {type(theirs).__name__} mismatch: missing {missing[:5]}, extra {extra[:5]}, shapes {wrong[:5]}"
        )
    theirs.load_state_dict(weights, strict=True)


def export_diffusers(
    net: torch.nn.Module,
    model: ModelConfig,
    diffusion: DiffusionConfig,
    folder: str,
    source: str = "",
    dit_frequency_fix: bool = False,
) -> dict:
    """Write ``net`` and ``diffusion`` as a diffusers folder; returns what its ``dkdm_export.json`` records.

    A UNet becomes a ``DDPMPipeline`` folder (``unet/``, ``scheduler/``): the model built by
    diffusers from :func:`diffusers_unet_config`, filled strictly from :func:`diffusers_state_dict`.
    A ViT becomes ``transformer/`` (a ``DiTTransformer2DModel`` from :func:`diffusers_dit_config`
    and :func:`diffusers_dit_state_dict`) and ``scheduler/``; it is refused unless
    ``dit_frequency_fix`` accepts that the folder computes ``net`` only once its loader sets the
    timestep frequencies (see the module docstring). Both are saved by diffusers' own
    ``save_pretrained``; the note holds the source, our configs and the null class.
    """
    try:
        import diffusers
    except ImportError:
        raise ExportError("diffusers export needs the diffusers package: pip install -e .[latent]") from None
    from dkdm.models.vit import ViT

    if isinstance(net, ViT):
        return _export_dit(diffusers, net, model, diffusion, folder, source, dit_frequency_fix)
    config = diffusers_unet_config(net)
    scheduler = diffusers.DDPMScheduler(**diffusers_scheduler_config(diffusion))
    theirs = diffusers.UNet2DModel(**config)
    _fill(theirs, diffusers_state_dict(net))
    diffusers.DDPMPipeline(unet=theirs, scheduler=scheduler).save_pretrained(folder)
    return _write_note(os.path.join(folder, "unet"), net, model, diffusion, source)


def _write_note(model_dir: str, net, model: ModelConfig, diffusion: DiffusionConfig, source: str, **extra) -> dict:
    note = {
        "source": source,
        "null_class": getattr(net, "null_class", None),
        "num_classes": net.num_classes,
        "model": to_dict(model),
        "diffusion": to_dict(diffusion),
        **extra,
    }
    with open(os.path.join(model_dir, EXPORT_NOTE), "w") as f:
        json.dump(note, f, indent=2)
    return note


def _export_dit(diffusers, net, model: ModelConfig, diffusion: DiffusionConfig, folder: str, source: str, fix: bool):
    """The ViT half of :func:`export_diffusers`: every refusal first, then ``transformer/`` and ``scheduler/``."""
    config = diffusers_dit_config(net)
    weights = diffusers_dit_state_dict(net)
    scheduler = diffusers.DDPMScheduler(**diffusers_scheduler_config(diffusion))
    theirs = diffusers.DiTTransformer2DModel(**config)
    _fill(theirs, weights)
    # diffusers' PatchEmbed recomputes its sin-cos table (a buffer it does not save): ours must be that table.
    table = theirs.pos_embed.pos_embed
    gap = (net.pos_embed.detach().to("cpu", torch.float32) - table).abs().max().item()
    if gap > 1e-5:
        raise ExportError(
            f"pos_embed differs by up to {gap:.3g} from the 2-D sin-cos table diffusers' PatchEmbed recomputes "
            "(and does not store); a ViT with other positions has no DiTTransformer2DModel form"
        )
    if not fix:
        phase = (diffusion.steps - 1) * max(10000 ** (-i / _HALF) - 10000 ** (-i / (_HALF - 1)) for i in range(_HALF))
        raise ExportError(
            f"diffusers' DiTTransformer2DModel embeds the timestep at frequencies 10000^(-i/{_HALF - 1}) (its "
            f"Timesteps(downscale_freq_shift=1) is fixed in code, not in config.json); this ViT, as DiT, at "
            f"10000^(-i/{_HALF}): at t = {diffusion.steps - 1} the phases differ by up to {phase:.2f} rad, so the "
            "folder loaded as it is would compute another network. Pass --dit_frequency_fix (export_diffusers("
            f"dit_frequency_fix=True)) to write it anyway, recording {TIMESTEP_SHIFT_KEY} = 0 in its "
            "config.json: dkdm applies it when it loads the folder, any other loader must set "
            "time_proj.downscale_freq_shift = 0 in every block's norm1.emb after from_pretrained (README, Export)"
        )
    theirs.register_to_config(**{TIMESTEP_SHIFT_KEY: 0})
    theirs.save_pretrained(os.path.join(folder, "transformer"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    extra = {"unconditional_label": 0} if net.num_classes is None else {}
    return _write_note(os.path.join(folder, "transformer"), net, model, diffusion, source, **extra)
