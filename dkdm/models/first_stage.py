"""First-stage autoencoders: the map between images and the latents a latent diffusion model sees.

The autoencoders themselves are diffusers' (``AutoencoderKL``, ``VQModel``); :class:`FirstStage`
wraps one with what the rest of dkdm needs: ``encode(images) -> latents`` with the scale factor
applied, ``decode(latents) -> images`` in chunks, in a chosen precision. It is loaded from a
diffusers folder (``config.json`` + weights, e.g. the SD VAE DiT uses) or from a CompVis
latent-diffusion checkpoint (the ``first_stage_model.*`` keys of an LDM ``.ckpt``, or a bare
autoencoder checkpoint with ``encoder.*``/``decoder.*``), whose names are mapped onto diffusers'
module by :func:`compvis_to_diffusers`, strictly in both directions: every checkpoint tensor is
used, every parameter is filled, every shape checked.

Semantics follow CompVis's: a VQ first stage *encodes* to the unquantized latent (encoder,
``quant_conv``) and quantizes when it *decodes*; a KL first stage encodes to a sample of its
posterior (or its mode), multiplied by the scale factor, which must be known (1.0 for VQ).
Images are float in [-1, 1], NCHW.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dkdm.config import ConfigError, load_json

KINDS = ("kl", "vq")
_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys of a bare CompVis autoencoder checkpoint that belong to its training loss, not the model.
_LOSS_PREFIX = "loss."


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("first-stage autoencoders need the diffusers package: pip install -e .[latent]") from None
    return diffusers


@dataclass(frozen=True)
class Spec:
    """What a CompVis first stage is (its ``ddconfig`` and quantizer), as read from its tensors."""

    kind: str
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    n_embed: int = 0  # VQ codebook size

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self, scaling_factor: float = 1.0) -> dict:
        """The diffusers constructor arguments of the same network."""
        levels = len(self.block_out_channels)
        kw = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.num_res_blocks,
            "latent_channels": self.z_channels,
            "norm_num_groups": 32,
            "scaling_factor": scaling_factor,
        }
        if self.kind == "vq":
            kw.update(num_vq_embeddings=self.n_embed, vq_embed_dim=self.embed_dim)
        return kw

    def build(self, scaling_factor: float = 1.0) -> nn.Module:
        """A diffusers autoencoder of this spec with fresh weights."""
        d = _diffusers()
        cls = d.VQModel if self.kind == "vq" else d.AutoencoderKL
        return cls(**self.diffusers_kwargs(scaling_factor))


def _levels(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def infer_spec(sd: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> Spec:
    """The :class:`Spec` of a CompVis first-stage state dict (no prefix), from its tensor shapes."""
    need = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight")
    lacking = [k for k in need if k not in sd]
    if lacking:
        raise ConfigError(
            f"{source} is not a CompVis first stage: it lacks {', '.join(lacking)} (found prefixes "
            f"{', '.join(sorted({k.split('.')[0] for k in sd}))})"
        )
    attn = sorted(k for k in sd if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k))
    if attn:
        raise ConfigError(
            f"{source} has attention inside its resolution levels ({attn[0]}, ...); dkdm maps first stages "
            "with attn_resolutions [] (the LDM VQ-f4 / KL-f8 ones)"
        )
    levels = _levels(sd, "encoder.down.")
    blocks = _levels(sd, "encoder.down.0.block.")
    widths = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels)
    kind = "vq" if "quantize.embedding.weight" in sd else "kl"
    z = int(sd["decoder.conv_in.weight"].shape[1])
    embed = int(sd["post_quant_conv.weight"].shape[1])
    if kind == "kl" and embed != z:
        raise ConfigError(
            f"{source}: a KL first stage with embed_dim {embed} != z_channels {z}; diffusers needs them equal"
        )
    return Spec(
        kind=kind,
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        block_out_channels=widths,
        num_res_blocks=len(blocks),
        z_channels=z,
        embed_dim=embed,
        n_embed=int(sd["quantize.embedding.weight"].shape[0]) if kind == "vq" else 0,
    )


_RES = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_name(name: str, levels: int) -> str | None:
    """The diffusers name of a CompVis first-stage tensor name (None when it has no counterpart)."""
    if name in ("quantize.embedding.weight",) or re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", name):
        return name
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", name)
    if not m:
        return None
    part, rest = m.groups()
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    m = re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest)
    if m:
        return f"{part}.{simple[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{_RES.get(m.group(2), m.group(2))}.{m.group(3)}"
    m = re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{_ATTN[m.group(1)]}.{m.group(2)}"
    if part == "encoder":
        m = re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", rest)
        if m:
            i, j, layer, w = m.groups()
            return f"encoder.down_blocks.{i}.resnets.{j}.{_RES.get(layer, layer)}.{w}"
        m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest)
        if m:
            return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
        return None
    # CompVis numbers the decoder's levels by resolution (0 = full size); diffusers by order of use.
    m = re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)", rest)
    if m:
        i, j, layer, w = m.groups()
        return f"decoder.up_blocks.{levels - 1 - int(i)}.resnets.{j}.{_RES.get(layer, layer)}.{w}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    return None


def compvis_to_diffusers(
    sd: Mapping[str, torch.Tensor], module: nn.Module, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """``sd`` (CompVis names) renamed onto ``module``'s state dict, strictly in both directions.

    Every tensor of ``sd`` must map to a parameter of ``module`` with the same number of
    elements (CompVis's 1x1 attention convolutions become diffusers' linear layers), and every
    parameter of ``module`` must be filled; otherwise one error lists what did not fit.
    """
    own = module.state_dict()
    levels = len(module.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    unknown, shapes, misfit = [], [], set()
    for name, tensor in sd.items():
        target = diffusers_name(name, levels)
        if target is None or target not in own:
            unknown.append(name)
            continue
        want = own[target].shape
        if tensor.shape != want:
            if tensor.numel() == own[target].numel() and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
                tensor = tensor.reshape(want)
            else:
                shapes.append(f"{name} {tuple(tensor.shape)} -> {target} {tuple(want)}")
                misfit.add(target)
                continue
        out[target] = tensor
    missing = [k for k in own if k not in out and k not in misfit]
    if unknown or missing or shapes:
        lines = [
            (
                f"{source} does not fit the first stage ({len(sd)} tensors, the {type(module).__name__} has "
                f"{len(own)}): {len(unknown)} unused, {len(missing)} not filled, {len(shapes)} mis-shaped"
            )
        ]
        for what, items in (("unused", unknown), ("not filled", missing), ("mis-shaped", shapes)):
            if items:
                lines.append(f"  {what}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise ConfigError("\n".join(lines))
    return out


class FirstStage(nn.Module):
    """A diffusers autoencoder as the map between images in [-1, 1] and scaled latents.

    ``scale_factor`` multiplies what the encoder gives (and divides before decoding);
    ``chunk_size`` bounds how many images are decoded (or encoded) at once; ``precision``
    (fp32, fp16, bf16) is the autoencoder's compute dtype, its results are float32.
    """

    def __init__(
        self, autoencoder: nn.Module, scale_factor: float, chunk_size: int = 64, precision: str = "fp32"
    ) -> None:
        super().__init__()
        cls = type(autoencoder).__name__
        if cls not in _CLASSES:
            raise ConfigError(f"a first stage is an AutoencoderKL or a VQModel, not a {cls}")
        if precision not in _DTYPES:
            raise ConfigError(f"first-stage precision must be one of {', '.join(_DTYPES)}, got {precision!r}")
        if not scale_factor or scale_factor <= 0:
            raise ConfigError(f"the first stage's scale factor must be positive, got {scale_factor!r}")
        if chunk_size < 1:
            raise ConfigError(f"the first stage's chunk size must be at least 1, got {chunk_size}")
        self.kind = _CLASSES[cls]
        if precision != "fp32":
            autoencoder = autoencoder.to(_DTYPES[precision])
        self.ae = autoencoder.eval().requires_grad_(False)
        self.dtype = _DTYPES[precision]
        self.scale_factor = float(scale_factor)
        self.chunk_size = int(chunk_size)

    @property
    def latent_channels(self) -> int:
        cfg = self.ae.config
        return int(cfg.vq_embed_dim or cfg.latent_channels) if self.kind == "vq" else int(cfg.latent_channels)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ae.config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """The latent ``(C, H, W)`` of a square image of ``image_size`` pixels."""
        if image_size % self.downsampling:
            raise ConfigError(f"image size {image_size} is not divisible by the first stage's {self.downsampling}x")
        return (self.latent_channels, image_size // self.downsampling, image_size // self.downsampling)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The ``(C, H, W)`` of the images that latents of ``latent_shape`` decode to."""
        _, h, w = latent_shape
        return (int(self.ae.config.out_channels), h * self.downsampling, w * self.downsampling)

    def _chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in range(0, x.shape[0], self.chunk_size):
            yield x[i : i + self.chunk_size].to(self.dtype)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents of ``images`` [N, C, H, W] in [-1, 1]; a KL posterior is sampled (or its mode)."""
        outs = []
        for chunk in self._chunks(images):
            if self.kind == "vq":
                z = self.ae.encode(chunk).latents
            else:
                dist = self.ae.encode(chunk).latent_dist
                z = dist.sample(generator) if sample else dist.mode()
            outs.append(z.float() * self.scale_factor)
        return torch.cat(outs)

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        try:
            return self.ae.decode(z / self.scale_factor, return_dict=False)[0].float().clamp(-1, 1)
        except torch.OutOfMemoryError:
            raise RuntimeError(
                f"decoding {z.shape[0]} latents ran out of memory on {z.device}; use a smaller first-stage chunk "
                f"(now {self.chunk_size}) or decode on the CPU"
            ) from None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32) of scaled ``latents``, decoded ``chunk_size`` at a time."""
        return torch.cat([self._decode_chunk(z) for z in self._chunks(latents)])

    @torch.no_grad()
    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images on the CPU; at most one chunk of float images exists at a time."""
        outs = []
        for z in self._chunks(latents):
            img = self._decode_chunk(z)
            outs.append(((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(outs)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def from_compvis_state_dict(
    sd: Mapping[str, torch.Tensor],
    kind: str = "",
    scale_factor: float | None = None,
    source: str = "the checkpoint",
    **kw,
) -> FirstStage:
    """A :class:`FirstStage` from a CompVis first-stage state dict (names without ``first_stage_model.``).

    ``kind`` ("kl"/"vq", or "" to take what the tensors say) is checked against the tensors.
    A VQ first stage's scale factor defaults to 1.0; a KL one's must be given.
    """
    sd = {k: v for k, v in sd.items() if not k.startswith(_LOSS_PREFIX)}
    spec = infer_spec(sd, source)
    if kind and kind not in KINDS:
        raise ConfigError(f"first-stage kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind and kind != spec.kind:
        has = "a VQ codebook (quantize.embedding.weight)" if spec.kind == "vq" else "no VQ codebook"
        raise ConfigError(f"{source} is a {spec.kind.upper()} first stage ({has}) but {kind.upper()} was asked for")
    if scale_factor is None:
        if spec.kind == "kl":
            raise ConfigError(
                f"{source}: a KL first stage needs its scale factor (the LDM config's scale_factor, e.g. 0.18215); "
                "pass it (--first_stage_scale)"
            )
        scale_factor = 1.0
    module = spec.build(scale_factor)
    module.load_state_dict(compvis_to_diffusers(sd, module, source), strict=True)
    return FirstStage(module, scale_factor, **kw)


def from_diffusers_folder(folder: str, kind: str = "", scale_factor: float | None = None, **kw) -> FirstStage:
    """A :class:`FirstStage` from a diffusers ``AutoencoderKL``/``VQModel`` folder (or a pipeline's ``vae/``)."""
    if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isdir(os.path.join(folder, "vae")):
        folder = os.path.join(folder, "vae")
    cfg = load_json(os.path.join(folder, "config.json"))
    cls = cfg.get("_class_name")
    if cls not in _CLASSES:
        raise ConfigError(f"{folder} holds a diffusers {cls}; a first stage is one of {', '.join(_CLASSES)}")
    found = _CLASSES[cls]
    if kind and kind != found:
        raise ConfigError(f"{folder} is a {found.upper()} first stage ({cls}) but {kind.upper()} was asked for")
    if scale_factor is None:
        if "scaling_factor" in cfg:
            scale_factor = float(cfg["scaling_factor"])
        elif found == "vq":
            scale_factor = 1.0
        else:
            raise ConfigError(
                f"{folder}/config.json records no scaling_factor for its AutoencoderKL; pass it (--first_stage_scale)"
            )
    ae = getattr(_diffusers(), cls).from_pretrained(folder, local_files_only=True)
    return FirstStage(ae.float(), scale_factor, **kw)


def load_first_stage(path: str, kind: str = "", scale_factor: float | None = None, **kw) -> FirstStage:
    """The first stage at ``path``: a diffusers folder, or a CompVis ``.ckpt`` (an LDM's or a bare autoencoder's).

    ``scale_factor`` (None: the one the source records; VQ: 1.0) multiplies encoded latents.
    Remaining keywords (``chunk_size``, ``precision``) go to :class:`FirstStage`.
    """
    if not path:
        raise ConfigError("no first stage given: pass --first_stage (a diffusers folder or a CompVis .ckpt)")
    if os.path.isdir(path):
        return from_diffusers_folder(path, kind, scale_factor, **kw)
    from dkdm.models import ldm

    sd = ldm.read(path)
    stage = ldm.first_stage_state_dict(sd, path)
    if scale_factor is None and "scale_factor" in sd:
        scale_factor = float(sd["scale_factor"])
    return from_compvis_state_dict(stage, kind, scale_factor, source=path, **kw)
