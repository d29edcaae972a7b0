"""First stages and CompVis LDM checkpoints: the committed key/shape manifest of the public
CelebA-HQ / FFHQ LDM-VQ-4 models, strict loading both ways (a missing, extra or mis-shaped key
fails), diffusers' modules against an independent float64 reading of CompVis's Encoder/Decoder,
encode/decode round trips, EMA selection and the recorded schedule."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkdm.config import ConfigError
from dkdm.models import count_parameters, create_model, first_stage, ldm
from dkdm.resolve import configs_beside, ldm_schedule, resolve
from tests import ldm_layout as L

TINY_FS = dict(L.VQ4_FIRST_STAGE, ch=32, ch_mult=[1, 2], n_embed=16)
TINY_UNET = dict(L.VQ4_UNET, image_size=8, model_channels=32, channel_mult=[1, 2], attention_resolutions=[2])
TINY_OVER = {"arch": "ldm-vq4-274M", "image_size": 8, "num_channels": 32, "channel_mult": "1,2"}
TINY_OVER["attention_resolutions"] = "4"


def ldm_betas(steps=1000, start=0.0015, end=0.0195):
    """LDM's make_beta_schedule('linear'): linear in sqrt(beta), float64 (written from its definition)."""
    return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2


def rand_sd(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


# ------------------------------------------------------------------ the manifest and the zoo


def test_manifest_is_the_enumeration_of_the_public_configs():
    with open(L.MANIFEST) as f:
        committed = json.load(f)
    assert committed == json.loads(json.dumps(L.manifest())), "python tests/ldm_layout.py rewrites it"
    unet = committed["model.diffusion_model"]
    # FACTS: 274,056,163 parameters in CompVis's openaimodel.UNetModel with this config.
    assert sum(math.prod(s) for s in unet.values()) == 274_056_163
    assert len(committed["first_stage_model"]) == 205


def test_zoo_ldm_entries_have_the_manifest_layout_and_the_paper_counts():
    with open(L.MANIFEST) as f:
        unet = json.load(f)["model.diffusion_model"]
    with torch.device("meta"):
        net = create_model("ldm-vq4-274M")
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == unet
    assert count_parameters("ldm-vq4-274M") == 274_056_163  # paper: "274M"
    assert count_parameters("ldm-vq4-89M") == 89_535_619  # supplement Table 7 prints "86M"
    student = L.unet_shapes(dict(L.VQ4_UNET, model_channels=128))
    with torch.device("meta"):
        assert {k: list(v.shape) for k, v in create_model("ldm-vq4-89M").state_dict().items()} == student


def test_full_size_vq_f4_maps_strictly_onto_diffusers_vqmodel():
    with open(L.MANIFEST) as f:
        shapes = json.load(f)["first_stage_model"]
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    spec = first_stage.infer_spec(sd)
    assert spec == first_stage.Spec("vq", 3, 3, (128, 256, 512), 2, 3, 3, 8192)
    assert spec.downsampling == 4
    with torch.device("meta"):
        module = spec.build()
    mapped = first_stage.compvis_to_diffusers(sd, module)
    assert set(mapped) == set(module.state_dict())
    assert sum(math.prod(s) for s in shapes.values()) == sum(p.numel() for p in module.parameters())


def test_full_size_ldm_vq4_checkpoint_layout_resolves_on_meta():
    """The whole LDM state dict of the manifest: every key accounted for, the UNet strict, the EMA map total."""
    with open(L.MANIFEST) as f:
        m = json.load(f)
    sd = L.ldm_state_dict(m["model.diffusion_model"], m["first_stage_model"], ema=True, device="meta")
    ldm.check_layout(sd, "manifest")
    for use_ema in (False, True):
        unet = ldm.unet_state_dict(sd, use_ema, "manifest")
        assert {k: list(v.shape) for k, v in unet.items()} == m["model.diffusion_model"]
    assert set(ldm.first_stage_state_dict(sd)) == set(m["first_stage_model"])


# ------------------------------------------------------------------ an independent CompVis reading


def _gn(x, sd, name):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _conv(x, sd, name, **kw):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def _resnet(x, sd, name):
    h = _conv(F.silu(_gn(x, sd, f"{name}.norm1")), sd, f"{name}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, f"{name}.norm2")), sd, f"{name}.conv2", padding=1)
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(x, sd, f"{name}.nin_shortcut")
    return x + h


def _attn(x, sd, name):
    b, c, hh, ww = x.shape
    h = _gn(x, sd, f"{name}.norm")
    q, k, v = (_conv(h, sd, f"{name}.{p}").reshape(b, c, hh * ww) for p in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=2)
    h = torch.einsum("bcj,bij->bci", v, w).reshape(b, c, hh, ww)
    return x + _conv(h, sd, f"{name}.proj_out")


def _mid(h, sd, part):
    h = _resnet(h, sd, f"{part}.mid.block_1")
    return _resnet(_attn(h, sd, f"{part}.mid.attn_1"), sd, f"{part}.mid.block_2")


def compvis_encode(x, sd, levels, nrb):
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(levels):
        for j in range(nrb):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}")
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", stride=2)
    h = _mid(h, sd, "encoder")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)
    return _conv(h, sd, "quant_conv")


def compvis_decode(z, sd, levels, nrb):
    if "quantize.embedding.weight" in sd:  # nearest codebook entry first (force_not_quantize=False)
        e = sd["quantize.embedding.weight"]
        flat = z.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        idx = torch.cdist(flat, e).argmin(1)
        z = e[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = _mid(h, sd, "decoder")
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = _conv(
                F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv", padding=1
            )
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_diffusers_first_stage_equals_compvis_reading_in_float64(kind):
    cfg = dict(TINY_FS, z_channels=4, embed_dim=4) if kind == "kl" else TINY_FS
    sd = rand_sd(L.first_stage_shapes(cfg, kind))
    fs = first_stage.from_compvis_state_dict(sd, kind, 0.5 if kind == "kl" else None)
    fs.ae.double()
    sd64 = {k: v.double() for k, v in sd.items()}
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    moments = compvis_encode(x, sd64, 2, 2)
    if kind == "vq":
        assert fs.scale_factor == 1.0
        got = fs.ae.encode(x).latents
        torch.testing.assert_close(got, moments, rtol=1e-9, atol=1e-9)
        z = moments
    else:
        got = fs.ae.encode(x).latent_dist.mode()
        torch.testing.assert_close(got, moments[:, :4], rtol=1e-9, atol=1e-9)
        z = moments[:, :4]
    dec = fs.ae.decode(z, return_dict=False)[0]
    torch.testing.assert_close(dec, compvis_decode(z, sd64, 2, 2), rtol=1e-9, atol=1e-9)


def test_first_stage_encode_decode_round_trip_scale_and_chunks():
    sd = rand_sd(L.first_stage_shapes(dict(TINY_FS, z_channels=4, embed_dim=4), "kl"))
    fs = first_stage.from_compvis_state_dict(sd, scale_factor=0.25, chunk_size=3)
    x = torch.rand(7, 3, 16, 16) * 2 - 1
    assert fs.latent_shape(16) == (4, 8, 8)
    z = fs.encode(x, sample=False)
    torch.testing.assert_close(z, fs.ae.encode(x).latent_dist.mode() * 0.25)
    img = fs.decode(z)
    assert img.shape == x.shape and img.abs().max() <= 1
    torch.testing.assert_close(img, fs.ae.decode(z / 0.25).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    u8 = fs.decode_uint8(z)
    assert u8.shape == (7, 16, 16, 3) and u8.dtype == torch.uint8
    torch.testing.assert_close(u8, ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(fs.encode(x, generator=g1), fs.encode(x, generator=g2))
    assert not torch.allclose(fs.encode(x), z)  # a sample of the posterior, not its mode


def test_vq_decoding_quantizes_first():
    sd = rand_sd(L.first_stage_shapes(TINY_FS, "vq"))
    fs = first_stage.from_compvis_state_dict(sd)
    z = fs.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    e = sd["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    snapped = e[torch.cdist(flat, e).argmin(1)].reshape(2, 8, 8, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(fs.decode(z), fs.decode(snapped), rtol=1e-5, atol=1e-5)


def test_first_stage_precision_and_diffusers_folder(tmp_path):
    sd = rand_sd(L.first_stage_shapes(TINY_FS, "vq"))
    fs = first_stage.from_compvis_state_dict(sd)
    fs.ae.save_pretrained(tmp_path / "vq")
    again = first_stage.load_first_stage(str(tmp_path / "vq"), precision="bf16")
    assert again.kind == "vq" and again.dtype == torch.bfloat16 and again.scale_factor == 1.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = again.encode(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, fs.encode(x), rtol=0.05, atol=0.05)
    with pytest.raises(ConfigError, match="is a VQ first stage.*KL was asked"):
        first_stage.load_first_stage(str(tmp_path / "vq"), kind="kl")
    kl = first_stage.from_compvis_state_dict(
        rand_sd(L.first_stage_shapes(dict(TINY_FS, z_channels=4, embed_dim=4), "kl")), scale_factor=0.3
    )
    kl.ae.save_pretrained(tmp_path / "kl")
    assert first_stage.load_first_stage(str(tmp_path / "kl")).scale_factor == pytest.approx(0.3)
    cfg = tmp_path / "kl" / "config.json"
    data = json.loads(cfg.read_text())
    del data["scaling_factor"]
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="no scaling_factor.*--first_stage_scale"):
        first_stage.load_first_stage(str(tmp_path / "kl"))
    assert first_stage.load_first_stage(str(tmp_path / "kl"), scale_factor=0.2).scale_factor == 0.2


# ------------------------------------------------------------------ strictness, both ways


def test_first_stage_key_map_is_strict_both_ways():
    shapes = L.first_stage_shapes(TINY_FS, "vq")
    sd = rand_sd(shapes)
    first_stage.from_compvis_state_dict(sd)  # fits
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.block.2.conv2.bias"}
    with pytest.raises(ConfigError, match=r"(?s)1 not filled.*decoder.up_blocks.0.resnets.2.conv2.bias"):
        first_stage.from_compvis_state_dict(missing)
    extra = {**sd, "decoder.up.1.block.3.conv2.bias": torch.zeros(64)}
    with pytest.raises(ConfigError, match=r"(?s)1 unused.*decoder.up.1.block.3.conv2.bias"):
        first_stage.from_compvis_state_dict(extra)
    bad = {**sd, "encoder.mid.attn_1.q.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(ConfigError, match=r"(?s)1 mis-shaped.*encoder.mid.attn_1.q.weight"):
        first_stage.from_compvis_state_dict(bad)
    with pytest.raises(ConfigError, match="is a VQ first stage.*KL was asked"):
        first_stage.from_compvis_state_dict(sd, kind="kl")
    kl = rand_sd(L.first_stage_shapes(dict(TINY_FS, z_channels=4, embed_dim=4), "kl"))
    with pytest.raises(ConfigError, match="is a KL first stage.*VQ was asked"):
        first_stage.from_compvis_state_dict(kl, kind="vq")
    with pytest.raises(ConfigError, match="KL first stage needs its scale factor"):
        first_stage.from_compvis_state_dict(kl)
    with pytest.raises(ConfigError, match="attention inside its resolution levels"):
        first_stage.from_compvis_state_dict({**sd, "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ConfigError, match="not a CompVis first stage.*found prefixes"):
        first_stage.infer_spec({"foo.weight": torch.zeros(1)})


def _tiny_ldm(tmp_path, ema=True, betas=True, extra=None, name="model.ckpt"):
    sd = L.ldm_state_dict(
        L.unet_shapes(TINY_UNET), L.first_stage_shapes(TINY_FS), ema=ema, betas=ldm_betas() if betas else None
    )
    sd.update(extra or {})
    path = tmp_path / name
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000}, path)
    return str(path), sd


def test_ldm_teacher_resolves_and_loads_strictly_with_and_without_ema(tmp_path):
    path, sd = _tiny_ldm(tmp_path)
    r = resolve(dict(TINY_OVER), checkpoint=path)
    assert r.diffusion.noise_schedule == "scaled_linear:0.0015,0.0195" and r.diffusion.steps == 1000
    assert r.diffusion.sigma_small and not r.diffusion.learn_sigma
    assert r.model.first_stage == path and r.space.latent and r.space.shape == (3, 8, 8)
    net = r.build()
    w = "input_blocks.1.0.in_layers.2.weight"
    torch.testing.assert_close(net.state_dict()[w], sd[f"model.diffusion_model.{w}"])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    assert net(x, t).shape == (2, 3, 8, 8) and net(x, t).abs().sum() > 0
    ema = resolve({**TINY_OVER, "use_ema": True}, checkpoint=path).build()
    torch.testing.assert_close(ema.state_dict()[w], sd["model_ema.diffusion_modelinput_blocks10in_layers2weight"])
    assert not torch.equal(ema.state_dict()[w], net.state_dict()[w])
    fs = r.space.load_first_stage()
    assert fs.kind == "vq" and fs.latent_shape(16) == (3, 8, 8)
    img = fs.decode(fs.encode(torch.rand(2, 3, 16, 16) * 2 - 1))
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()


def test_ldm_checkpoint_refusals(tmp_path):
    path, sd = _tiny_ldm(tmp_path, ema=False)
    with pytest.raises(ConfigError, match="no model_ema.*drop --use_ema"):
        resolve({**TINY_OVER, "use_ema": True}, checkpoint=path).build()
    path, sd = _tiny_ldm(tmp_path, name="short.ckpt")
    del sd["model_ema.diffusion_modelout2bias"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ConfigError, match=r"(?s)1 parameters have no EMA.*model_ema.diffusion_modelout2bias"):
        resolve({**TINY_OVER, "use_ema": True}, checkpoint=path).build()
    path, sd = _tiny_ldm(tmp_path, name="drop.ckpt")
    del sd["model.diffusion_model.out.2.bias"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(Exception, match=r"(?s)1 missing.*out.2.bias"):
        resolve(dict(TINY_OVER), checkpoint=path).build()
    path, _ = _tiny_ldm(tmp_path, extra={"cond_stage_model.embedding.weight": torch.zeros(2, 2)}, name="cond.ckpt")
    with pytest.raises(ConfigError, match="cond_stage_model.embedding.weight.*only unconditional"):
        resolve(dict(TINY_OVER), checkpoint=path).build()
    path, _ = _tiny_ldm(tmp_path, extra={"model.diffusion_model.extra.weight": torch.zeros(2)}, name="extra.ckpt")
    with pytest.raises(Exception, match=r"(?s)1 unexpected.*extra.weight"):
        resolve(dict(TINY_OVER), checkpoint=path).build()
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.a.weight": torch.zeros(2), "head.b": torch.zeros(1)}}, other)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(other))} has prefixes head\., net\..*model.diffusion_model"
    ):
        resolve(dict(TINY_OVER), checkpoint=str(other), diffusion_over={"steps": 10}).build()
    with pytest.raises(ConfigError, match="pass --arch .*ldm-vq4-274M"):
        resolve({}, checkpoint=path)
    path, _ = _tiny_ldm(tmp_path, betas=False, name="nobetas.ckpt")
    with pytest.raises(ConfigError, match="records the diffusion"):
        resolve(dict(TINY_OVER), checkpoint=path)
    odd = ldm_betas().clone()
    odd[500] *= 1.01
    with pytest.raises(ConfigError, match="follow none of"):
        ldm_schedule({"betas": odd.float()})


def test_first_stage_latent_channels_must_match_the_network(tmp_path):
    path, _ = _tiny_ldm(tmp_path)
    r = resolve({**TINY_OVER, "in_channels": 4}, checkpoint=path, diffusion_over={"steps": 1000})
    with pytest.raises(ConfigError, match="3-channel latents but the network takes 4"):
        r.space.load_first_stage()


def test_ldm_linear_schedule_is_scaled_linear_to_float64_rounding():
    from dkdm.diffusion.schedules import get_named_beta_schedule

    ref = ldm_betas().numpy()
    # np.linspace and torch.linspace round differently in the last place: equal to 1e-15 relative, not bitwise.
    np.testing.assert_allclose(get_named_beta_schedule("scaled_linear:0.0015,0.0195", 1000), ref, rtol=1e-15, atol=0)
    # The (spaced) diffusion rebuilds its betas from alphas_cumprod, as guided-diffusion does: 1e-13 relative.
    ours = resolve({}, {"noise_schedule": "scaled_linear:0.0015,0.0195", "steps": 1000}).create_diffusion().betas
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)
    assert ldm_schedule({"betas": ldm_betas().float()}) == {
        "steps": 1000,
        "noise_schedule": "scaled_linear:0.0015,0.0195",
        "sigma_small": True,
    }


def test_compvis_config_yaml_beside_the_checkpoint(tmp_path):
    import yaml

    cfg = {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.0015,
                "linear_end": 0.0195,
                "timesteps": 1000,
                "image_size": 8,
                "channels": 3,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": TINY_UNET},
                "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {}},
                "cond_stage_config": "__is_unconditional__",
            },
        }
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    path, _ = _tiny_ldm(tmp_path)
    r = resolve({}, checkpoint=path)
    assert r.diffusion.noise_schedule == "scaled_linear:0.0015,0.0195"
    assert r.model.num_channels == 32 and r.model.attention_resolutions == "4" and not r.model.use_scale_shift_norm
    r.build()
    cfg["model"]["params"]["unet_config"]["params"] = dict(TINY_UNET, context_dim=16)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.yaml'))}: unet_config has context_dim"):
        resolve({}, checkpoint=path)


def test_ldm_schedules_are_matched_by_name_within_tolerance_and_refused_by_source(tmp_path):
    from dkdm.diffusion.schedules import get_named_beta_schedule

    cosine = torch.tensor(get_named_beta_schedule("cosine", 100))
    assert ldm_schedule({"betas": cosine}) == {"steps": 100, "noise_schedule": "cosine", "sigma_small": True}
    near = ldm_betas().clone()
    near[1] += 2e-8  # beyond rtol 1e-5 * 0.0015 + atol 1e-9: not LDM's schedule any more
    with pytest.raises(ConfigError, match=r"^the checkpoint: its 1000 betas \(0\.0015 \.\. 0\.0195\) follow none of"):
        ldm_schedule({"betas": near})
    near[1] -= 1e-8  # within it: float32 buffers round this much
    assert ldm_schedule({"betas": near})["noise_schedule"] == "scaled_linear:0.0015,0.0195"
    path, sd = _tiny_ldm(tmp_path, name="odd.ckpt")
    assert configs_beside(path) == (None, ldm_schedule(sd), path)
    sd["betas"] = sd["betas"].clone()
    sd["betas"][500] *= 1.01
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: its 1000 betas"):
        configs_beside(path)
    bare, _ = _tiny_ldm(tmp_path, betas=False, name="bare.ckpt")
    assert configs_beside(bare) == (None, None, "")
