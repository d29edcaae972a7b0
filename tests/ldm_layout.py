"""CompVis latent-diffusion tensor names and shapes, enumerated from a config's facts.

Written from the public module definitions' structure (``ldm/modules/diffusionmodules/model.py``
Encoder/Decoder, ``openaimodel.py`` UNetModel, ``VectorQuantizer2``, LitEma), independently of
dkdm's key map, so tests can build random-weight checkpoints with the exact names a CompVis
checkpoint has. ``python tests/ldm_layout.py`` rewrites ``tests/data/ldm_vq4_256_keys.json``, the
manifest of the CelebA-HQ / FFHQ LDM-VQ-4 checkpoints (both share one config).
"""

from __future__ import annotations

import json
import os

import torch

# The public celebahq-ldm-vq-4 / ffhq-ldm-vq-4 configs (model.params.unet_config / first_stage_config).
VQ4_UNET = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 224,
    "attention_resolutions": [8, 4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 3, 4],
    "num_head_channels": 32,
}
VQ4_FIRST_STAGE = {
    "embed_dim": 3,
    "n_embed": 8192,
    "double_z": False,
    "z_channels": 3,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
}
VQ4_SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}
MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ldm_vq4_256_keys.json")


def _norm(out: dict, name: str, ch: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = [ch], [ch]


def _conv(out: dict, name: str, c_out: int, c_in: int, k: int, dims: int = 2) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = [c_out, c_in] + [k] * dims, [c_out]


def first_stage_shapes(cfg: dict, kind: str = "vq") -> dict[str, list[int]]:
    """Names and shapes of a CompVis VQModel / AutoencoderKL (attn_resolutions [] only)."""
    assert not cfg["attn_resolutions"]
    out: dict[str, list[int]] = {}
    ch, mult, nrb, z = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]

    def resnet(name: str, c_in: int, c_out: int) -> None:
        _norm(out, f"{name}.norm1", c_in)
        _conv(out, f"{name}.conv1", c_out, c_in, 3)
        _norm(out, f"{name}.norm2", c_out)
        _conv(out, f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            _conv(out, f"{name}.nin_shortcut", c_out, c_in, 1)

    def mid(part: str, c: int) -> None:
        resnet(f"{part}.mid.block_1", c, c)
        _norm(out, f"{part}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            _conv(out, f"{part}.mid.attn_1.{p}", c, c, 1)
        resnet(f"{part}.mid.block_2", c, c)

    _conv(out, "encoder.conv_in", ch, cfg["in_channels"], 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i != len(mult) - 1:
            _conv(out, f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    _norm(out, "encoder.norm_out", c)
    double = kind == "kl"
    _conv(out, "encoder.conv_out", 2 * z if double else z, c, 3)
    c = ch * mult[-1]
    _conv(out, "decoder.conv_in", c, z, 3)
    mid("decoder", c)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i != 0:
            _conv(out, f"decoder.up.{i}.upsample.conv", c, c, 3)
    _norm(out, "decoder.norm_out", c)
    _conv(out, "decoder.conv_out", cfg["out_ch"], c, 3)
    e = cfg["embed_dim"]
    if kind == "vq":
        _conv(out, "quant_conv", e, z, 1)
        out["quantize.embedding.weight"] = [cfg["n_embed"], e]
        _conv(out, "post_quant_conv", z, e, 1)
    else:
        _conv(out, "quant_conv", 2 * e, 2 * z, 1)
        _conv(out, "post_quant_conv", z, e, 1)
    return out


def unet_shapes(cfg: dict) -> dict[str, list[int]]:
    """Names and shapes of CompVis's unconditional ``openaimodel.UNetModel`` (its defaults otherwise:
    no scale-shift norm, conv resampling, legacy attention order)."""
    out: dict[str, list[int]] = {}
    mc, mult, nrb = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    emb = 4 * mc

    def res(name: str, c_in: int, c_out: int) -> None:
        _norm(out, f"{name}.in_layers.0", c_in)
        _conv(out, f"{name}.in_layers.2", c_out, c_in, 3)
        out[f"{name}.emb_layers.1.weight"], out[f"{name}.emb_layers.1.bias"] = [c_out, emb], [c_out]
        _norm(out, f"{name}.out_layers.0", c_out)
        _conv(out, f"{name}.out_layers.3", c_out, c_out, 3)
        if c_in != c_out:
            _conv(out, f"{name}.skip_connection", c_out, c_in, 1)

    def attn(name: str, c: int) -> None:
        _norm(out, f"{name}.norm", c)
        _conv(out, f"{name}.qkv", 3 * c, c, 1, dims=1)
        _conv(out, f"{name}.proj_out", c, c, 1, dims=1)

    out["time_embed.0.weight"], out["time_embed.0.bias"] = [emb, mc], [emb]
    out["time_embed.2.weight"], out["time_embed.2.bias"] = [emb, emb], [emb]
    _conv(out, "input_blocks.0.0", mc, cfg["in_channels"], 3)
    chans, c, ds, n = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            res(f"input_blocks.{n}.0", c, m * mc)
            c = m * mc
            if ds in cfg["attention_resolutions"]:
                attn(f"input_blocks.{n}.1", c)
            chans.append(c)
            n += 1
        if level != len(mult) - 1:
            _conv(out, f"input_blocks.{n}.0.op", c, c, 3)
            chans.append(c)
            n += 1
            ds *= 2
    res("middle_block.0", c, c)
    attn("middle_block.1", c)
    res("middle_block.2", c, c)
    n = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            res(f"output_blocks.{n}.0", c + chans.pop(), m * mc)
            c = m * mc
            k = 1
            if ds in cfg["attention_resolutions"]:
                attn(f"output_blocks.{n}.1", c)
                k = 2
            if level and i == nrb:
                _conv(out, f"output_blocks.{n}.{k}.conv", c, c, 3)
                ds //= 2
            n += 1
    _norm(out, "out.0", c)
    _conv(out, "out.2", cfg["out_channels"], mc, 3)
    return out


def manifest() -> dict:
    return {
        "about": (
            "Tensor names and shapes of the public CompVis CelebA-HQ-256 / FFHQ-256 LDM-VQ-4 checkpoints "
            "(state_dict of a LatentDiffusion .ckpt), enumerated by tests/ldm_layout.py from the configs below"
        ),
        "unet_config": VQ4_UNET,
        "first_stage_config": VQ4_FIRST_STAGE,
        "schedule": VQ4_SCHEDULE,
        "ema": "model_ema.<'diffusion_model.' + name with the dots removed> per UNet parameter, "
        "plus model_ema.decay and model_ema.num_updates",
        "buffers": [
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
        ],
        "model.diffusion_model": unet_shapes(VQ4_UNET),
        "first_stage_model": first_stage_shapes(VQ4_FIRST_STAGE, "vq"),
    }


def ldm_state_dict(
    unet: dict,
    first_stage: dict,
    *,
    ema: bool = False,
    betas: torch.Tensor | None = None,
    device: str = "cpu",
    seed: int = 0,
    scale_factor: float | None = None,
) -> dict[str, torch.Tensor]:
    """A random-weight LatentDiffusion state dict with these names and shapes (meta tensors on ``meta``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape: list[int]) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * 0.05

    sd = {f"model.diffusion_model.{k}": rand(s) for k, s in unet.items()}
    sd.update({f"first_stage_model.{k}": rand(s) for k, s in first_stage.items()})
    if ema:
        sd.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): rand(s) for k, s in unet.items()})
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0, dtype=torch.int)
    if betas is not None:
        sd["betas"] = betas.float()
        ac = torch.cumprod(1 - betas.double(), 0)
        sd["alphas_cumprod"] = ac.float()
        sd["sqrt_alphas_cumprod"] = ac.sqrt().float()
    if scale_factor is not None:
        sd["scale_factor"] = torch.tensor(scale_factor)
    return sd


if __name__ == "__main__":
    with open(MANIFEST, "w") as f:
        json.dump(manifest(), f, indent=1)
        f.write("\n")
