"""Networks and zoo: counts, guided-diffusion / DiT layouts, precision, checkpointing, bad input."""

import glob
import hashlib
import os

import pytest
import torch
import torch.nn.functional as F

from dkdm.config import ConfigError, ModelConfig
from dkdm.models import (
    ZOO,
    UNetModel,
    ViT,
    count_parameters,
    create_model,
    get_config,
    list_models,
)
from dkdm.models.layers import GroupNorm32, conv_nd, qkv_attention, upsample_nearest2x
from dkdm.models.unet import AttentionBlock
from dkdm.models.zoo import default_channel_mult

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counted as guided-diffusion / DiT build these architectures (learned sigma, unconditional).
EXPECTED_COUNTS = {
    "cifar10-57M": 57_094_662,
    "cifar10-44M": 44_177_286,
    "cifar10-32M": 32_136_582,
    "cifar10-24M": 24_866_214,
    "cifar10-14M": 14_301_446,
    "celeba64-295M": 295_136_454,
    "celeba64-57M": 57_213_606,
    "imagenet32-57M": 57_094_662,
    "imagenet32-14M": 14_301_446,
    # 19,176,216 trainable + the frozen 256x384 sin-cos pos_embed DiT stores as a parameter.
    "cifar10-vit-19M": 19_274_520,
    "digits-teacher": 890_018,
    "digits-student": 317_826,
    "digits-vit": 1_273_480,
    # DiT's published models (tests/test_dit.py derives these from DiT's layout; XL/2 is its 675M).
    "dit-xl2-256": 675_129_632,
    "dit-xl2-512": 676_014_368,
    "dit-l2-256": 458_102_816,
    "dit-b2-256": 130_512_416,
    "dit-s2-256": 32_963_360,
    "ldm-vq4-274M": 274_056_163,  # CompVis's UNet for CelebA-HQ / FFHQ 256 (FACTS.md)
    "ldm-vq4-89M": 89_535_619,  # the official DKDM latent student (supplement Tab. 7 prints "86M")
}

# sha256 of "\n".join(f"{key} {shape}") over the sorted state dict, computed from
# openai/guided-diffusion's own UNetModel for the same hyperparameters.
GUIDED_DIFFUSION_KEY_HASHES = {
    "cifar10-57M": "7a6a0bb16bfc35b36a32513ca6d8d548e4737522ff264bcde69681df26795c9e",
    "celeba64-295M": "b0272ccd2ce2a3b7a69d8d0fcaa46392156ba9d0f784ed26d1625ed622bcc9fe",
}


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def _key_hash(sd):
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(sd.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _small_unet(**kw):
    args = {
        "image_size": 8,
        "in_channels": 1,
        "model_channels": 32,
        "out_channels": 2,
        "num_res_blocks": 1,
        "attention_resolutions": (2,),
        "channel_mult": (1, 2),
        "num_head_channels": 16,
        "use_scale_shift_norm": True,
        "dropout": 0.0,
    }
    args.update(kw)
    return UNetModel(**args)


def _randomise(model, scale=0.1):
    # Zero-initialised output layers would make many comparisons vacuous.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * scale)
    return model


# --------------------------------------------------------------------------- zoo


def test_zoo_lists_every_paper_architecture():
    assert set(EXPECTED_COUNTS) == set(list_models())


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_parameter_count(name):
    assert count_parameters(name) == EXPECTED_COUNTS[name]


def test_vit_trainable_count_excludes_frozen_positions():
    model = _meta("cifar10-vit-19M")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 19_176_216
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name", list(GUIDED_DIFFUSION_KEY_HASHES))
def test_state_dict_keys_match_guided_diffusion(name):
    assert _key_hash(_meta(name).state_dict()) == GUIDED_DIFFUSION_KEY_HASHES[name]


def test_key_hash_is_sensitive_to_architecture():
    # The pin would be worthless if nearby configs hashed the same.
    assert (
        _key_hash(_meta("cifar10-57M", use_scale_shift_norm=False).state_dict())
        != GUIDED_DIFFUSION_KEY_HASHES["cifar10-57M"]
    )
    assert _key_hash(_meta("cifar10-44M").state_dict()) != GUIDED_DIFFUSION_KEY_HASHES["cifar10-57M"]


def test_arch_yaml_files_are_in_sync_with_zoo():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "arch", "*.yaml")))
    names = [os.path.basename(f)[: -len(".yaml")] for f in files]
    assert sorted(names) == sorted(ZOO), "run: python scripts/model_zoo.py --export configs/arch"
    for name, path in zip(names, files):
        assert get_config(path) == ZOO[name], f"{path} is stale; re-export it"


def test_get_config_overrides_and_yaml_forms(tmp_path):
    cfg = get_config("cifar10-57M", num_channels=64, class_cond=True)
    assert cfg.num_channels == 64 and cfg.class_cond and cfg.name == "cifar10-57M"
    assert ZOO["cifar10-57M"].num_channels == 128  # the zoo itself is untouched
    flat = tmp_path / "flat.yaml"
    flat.write_text("image_size: 8\nin_channels: 1\nchannel_mult: 1,2\nnum_channels: 32\nattention_resolutions: '4'\n")
    model = create_model(str(flat))
    assert isinstance(model, UNetModel) and model.config.image_size == 8 and model.channel_mult == (1, 2)
    with pytest.raises(ConfigError, match="num_channel"):
        get_config("cifar10-57M", num_channel=3)


def test_create_model_sets_config_and_translates_like_guided_diffusion():
    model = _meta("celeba64-295M")
    assert model.config == ZOO["celeba64-295M"]
    assert model.attention_resolutions == (
        2,
        4,
        8,
    )  # 32,16,8 at 64 px -> downsampling rates
    assert model.out_channels == 6 and model.num_classes is None
    default_mult = _meta("celeba64-295M", channel_mult="")
    assert default_mult.channel_mult == (1, 2, 3, 4)
    cond = _meta("digits-teacher", class_cond=True, num_classes=10, learn_sigma=False)
    assert cond.label_emb.weight.shape == (10, 128) and cond.out_channels == 1
    assert create_model(ModelConfig(**vars(ZOO["digits-student"]))).config.name == "digits-student"


# --------------------------------------------------------------------------- bad input


def test_unknown_architecture_lists_valid_names_closest_first():
    with pytest.raises(ConfigError) as e:
        create_model("cifar10-75M")
    msg = str(e.value)
    assert "cifar10-75M" in msg and all(n in msg for n in ZOO)
    listed = msg.split("closest first): ")[1]
    assert listed.startswith("cifar10-57M")


def test_zoo_sizes_are_whole_numbers():
    for name, cfg in ZOO.items():
        for field in (
            "image_size",
            "in_channels",
            "num_channels",
            "num_res_blocks",
            "hidden_size",
            "depth",
            "patch_size",
        ):
            assert type(getattr(cfg, field)) is int, (name, field)


def test_closest_names_are_ranked_by_similarity_whatever_the_case():
    for asked, first in [("dit-s2", "dit-s2-256"), ("DIGITS-VIT", "digits-vit"), ("LDM-VQ4-89m", "ldm-vq4-89M")]:
        with pytest.raises(ConfigError) as e:
            get_config(asked)
        assert str(e.value).startswith(f"unknown architecture '{asked}'; valid names (closest first): {first}, ")
        assert str(e.value).endswith("; or give a path to a YAML file with the model's fields")


def test_default_channel_mult_is_guided_diffusions_table():
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    for size, mult in table.items():
        assert default_channel_mult(size) == mult
        assert _meta("cifar10-14M", image_size=size, channel_mult="", attention_resolutions="").channel_mult == mult
    with pytest.raises(
        ConfigError, match=r"no default channel_mult for image size 48 \(known: 512, 256, 128, 64, 32\)"
    ):
        default_channel_mult(48)


def test_yaml_paths_are_recognised_by_suffix_or_folder_and_named_in_errors(tmp_path, monkeypatch):
    body = "image_size: 8\nin_channels: 1\nchannel_mult: 1,2\nnum_channels: 32\nattention_resolutions: '4'\n"
    monkeypatch.chdir(tmp_path)
    for name in ("arch.YAML", "arch.yml", "arch.yaml"):
        (tmp_path / name).write_text(body)
        assert get_config(name).num_channels == 32, name
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "arch").write_text(body)  # no suffix, but a path
    assert get_config(os.path.join("sub", "arch")).image_size == 8
    (tmp_path / "bad.yaml").write_text(body + "num_chanels: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        get_config("bad.yaml")
    with pytest.raises(ConfigError, match="model overrides"):
        get_config("arch.yaml", num_chanels=3)
    assert count_parameters("arch.yaml", num_channels=64) > count_parameters("arch.yaml")


def test_unet_flags_are_parsed_into_guided_diffusions_types_and_bad_numbers_named():
    model = _meta("cifar10-14M", channel_mult="0.5, 1,2", attention_resolutions="16,8", level_res_blocks="2,1,3")
    assert model.channel_mult == (0.5, 1, 2) and [type(m) for m in model.channel_mult] == [float, int, int]
    assert model.attention_resolutions == (2, 4) and all(type(r) is int for r in model.attention_resolutions)
    assert model.level_res_blocks == (2, 1, 3)
    assert _meta("cifar10-14M", class_dropout_prob=0.1).class_dropout_prob == 0.0  # unconditional: no null class
    assert _meta("cifar10-14M", class_dropout_prob=0.1, class_cond=True, num_classes=10).class_dropout_prob == 0.1
    for field, value in [("channel_mult", "1,x"), ("attention_resolutions", "16,a"), ("level_res_blocks", "2,b,1,1")]:
        with pytest.raises(ConfigError, match=rf"^{field} must be comma-separated numbers, not '{value}'$"):
            _meta("cifar10-14M", **{field: value})
    with pytest.raises(ConfigError, match=r"attention resolution\(s\) 12,6 are not feature-map sizes of this UNet"):
        _meta("cifar10-14M", attention_resolutions="16,12,6")


def test_an_unbuildable_config_is_named_in_the_refusal():
    with pytest.raises(ConfigError, match=r"^cannot build 'cifar10-14M': "):
        create_model("cifar10-14M", num_heads=0, num_head_channels=-1)
    with pytest.raises(ConfigError, match=r"^cannot build the model config: "):
        create_model(
            ModelConfig(
                image_size=8,
                in_channels=1,
                channel_mult="1",
                num_channels=32,
                num_heads=0,
                num_head_channels=-1,
                attention_resolutions="8",
            )
        )


def test_indivisible_image_size_is_refused_with_numbers():
    with pytest.raises(ConfigError, match=r"image size 20 .*3 times.*multiple of 8"):
        create_model("cifar10-14M", image_size=20, attention_resolutions="10,5")


def test_inconsistent_heads_are_refused_with_numbers():
    with pytest.raises(ConfigError, match=r"256 channels, not divisible by num_head_channels 48"):
        _meta("cifar10-57M", num_head_channels=48)
    with pytest.raises(ConfigError, match=r"256 channels, not divisible by num_heads 3"):
        _meta("cifar10-57M", num_head_channels=-1, num_heads=3)


def test_attention_resolution_must_be_a_feature_map_size():
    with pytest.raises(ConfigError, match=r"12 .*32,16,8,4"):
        _meta("cifar10-57M", attention_resolutions="16,12")


def test_group_norm_width_is_checked():
    with pytest.raises(ConfigError, match=r"48 channels .*multiple of 32"):
        _meta("cifar10-57M", num_channels=48)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", ["digits-teacher", "digits-student", "digits-vit"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_digits_forward_shapes(name, learn_sigma):
    model = create_model(name, learn_sigma=learn_sigma).eval()
    x, t = torch.randn(5, 1, 8, 8), torch.randint(0, 100, (5,))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (5, 2 if learn_sigma else 1, 8, 8) and out.dtype == torch.float32


def test_unet_class_conditioning_uses_labels():
    model = _randomise(create_model("digits-student", class_cond=True, num_classes=10)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([1, 2]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


@pytest.mark.parametrize("num_classes,dropout", [(None, 0.0), (10, 0.0), (10, 0.1)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_vit_forward_shapes(num_classes, dropout, learn_sigma):
    model = ViT(
        image_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=num_classes,
        class_dropout_prob=dropout,
        learn_sigma=learn_sigma,
    )
    _randomise(model)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 50, 99])
    y = None if num_classes is None else torch.tensor([0, 4, 9])
    out = model(x, t, y)
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    if num_classes is not None:
        # DiT keeps one extra "null class" row for classifier-free guidance when dropping labels.
        assert model.y_embedder.embedding_table.num_embeddings == num_classes + (dropout > 0)
    else:
        assert not hasattr(model, "y_embedder")
    out.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_vit_unpatchify_inverts_patch_layout():
    # With identity-like token maps, every output pixel must come from its own patch position.
    model = ViT(
        image_size=4,
        patch_size=2,
        in_channels=1,
        hidden_size=8,
        depth=0,
        num_heads=2,
        learn_sigma=False,
    )
    tokens = torch.arange(4 * 4, dtype=torch.float32).reshape(1, 4, 4)  # [N, T, p*p*C]
    img = model.unpatchify(tokens)
    # token 1 is the top-right patch; its 4 values fill rows 0-1, cols 2-3 in row-major order.
    assert img[0, 0, :2, 2:].flatten().tolist() == [4.0, 5.0, 6.0, 7.0]


def test_vit_pos_embed_is_fixed_sincos():
    model = ViT(image_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2)
    pos = model.pos_embed[0]  # [16 tokens, 16]
    assert pos.shape == (16, 16) and "pos_embed" in model.state_dict()
    # first quarter: sin of the column index at frequency 1; token 5 is row 1, column 1.
    assert torch.allclose(pos[:, 0], torch.sin(torch.arange(16.0) % 4), atol=1e-6)
    assert torch.allclose(pos[:, 8], torch.sin(torch.arange(16.0) // 4), atol=1e-6)


# --------------------------------------------------------------------------- attention


def _reference_attention(qkv, heads, legacy):
    """softmax(q k^T / sqrt(ch)) v written out with einsum, per guided-diffusion's layouts."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / ch**0.5, dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, heads * ch, t)


@pytest.mark.parametrize("impl", ["auto", "bmm", "sdpa"])
@pytest.mark.parametrize("legacy", [True, False])
def test_attention_matches_reference_layout(legacy, impl):
    """Both kernels (SDPA, the default, and guided-diffusion's batched matmuls) are the
    reference maths in float64, in either channel order; T != ch so a transposed product fails."""
    qkv = torch.randn(2, 3 * 4 * 8, 10, dtype=torch.float64)
    ours = qkv_attention(qkv, 4, legacy, impl)
    torch.testing.assert_close(ours, _reference_attention(qkv, 4, legacy), rtol=1e-12, atol=1e-12)
    other = _reference_attention(qkv, 4, not legacy)
    assert not torch.allclose(ours, other, atol=1e-3)
    with pytest.raises(ValueError, match="auto, bmm or sdpa"):
        qkv_attention(qkv, 4, legacy, "flash")


def test_bmm_attention_under_bf16_autocast_stays_close():
    qkv = torch.randn(2, 3 * 4 * 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = qkv_attention(qkv, 4, False, "bmm")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), _reference_attention(qkv, 4, False), rtol=0.05, atol=0.05)


def test_sdpa_attention_under_bf16_autocast_stays_close():
    qkv = torch.randn(2, 3 * 4 * 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = qkv_attention(qkv, 4, False)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), _reference_attention(qkv, 4, False), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 5)), (2, (2, 3, 4, 5)), (3, (2, 3, 2, 4, 5))])
def test_nearest_upsampling_is_interpolate_bitwise(dims, shape):
    """2-D and 1-D double every spatial axis, 3-D only height and width, as guided-diffusion's Upsample."""
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    size = (shape[2], 2 * shape[3], 2 * shape[4]) if dims == 3 else None
    ref = F.interpolate(x, size=size, scale_factor=None if size else 2, mode="nearest")
    ours = upsample_nearest2x(x, dims)
    assert torch.equal(ours, ref)
    g = torch.randn_like(ref)
    # the gradient sums each 2x2 block (2 for 1-D) in another order: equal to rounding
    torch.testing.assert_close(
        torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-12, atol=1e-12
    )
    if dims == 2:  # a channels_last input keeps its layout
        y = upsample_nearest2x(x.detach().contiguous(memory_format=torch.channels_last), 2)
        assert torch.equal(y, ref) and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dims", [1, 2])
def test_pointwise_convolutions_run_through_onednn_on_the_cpu_with_torchs_results(dims):
    conv = conv_nd(dims, 24, 40, 1)
    x = torch.randn(3, 24, *(7,) * dims, requires_grad=True)
    out = conv(x)
    assert type(out.grad_fn).__name__ == "MkldnnConvolutionBackward0"  # the fast path was taken
    ref = conv._conv_forward(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (x, conv.weight, conv.bias), g),
        torch.autograd.grad(ref, (x, conv.weight, conv.bias), g),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    conv.onednn_pointwise = False  # the measurement switch: torch's own choice
    assert type(conv(x).grad_fn).__name__ != "MkldnnConvolutionBackward0"
    conv.onednn_pointwise = True
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts still apply
        assert conv(x).dtype == torch.bfloat16
    wide = conv_nd(dims, 24, 40, 1).double()  # other dtypes: torch's path
    assert type(wide(x.double()).grad_fn).__name__ != "MkldnnConvolutionBackward0"
    assert set(conv.state_dict()) == {"weight", "bias"}  # the checkpoints' keys


def test_legacy_and_new_attention_order_both_run_and_differ():
    legacy = _randomise(_small_unet(use_new_attention_order=False)).eval()
    new = _small_unet(use_new_attention_order=True).eval()
    new.load_state_dict(legacy.state_dict(), strict=True)  # same keys, different qkv meaning
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 7])
    with torch.no_grad():
        a, b = legacy(x, t), new(x, t)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-4)


def test_attention_block_heads_follow_guided_diffusion_rule():
    assert AttentionBlock(128, num_heads=4, num_head_channels=32).num_heads == 4
    assert AttentionBlock(256, num_heads=4, num_head_channels=32).num_heads == 8
    assert AttentionBlock(256, num_heads=2, num_head_channels=-1).num_heads == 2


# --------------------------------------------------------------------------- precision


def test_convert_to_fp16_keeps_norms_in_fp32():
    model = _randomise(_small_unet()).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([2, 40])
    with torch.no_grad():
        ref = model(x, t)
    model.convert_to_fp16()
    torso_convs = [
        m
        for p in (model.input_blocks, model.middle_block, model.output_blocks)
        for m in p.modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))
    ]
    assert torso_convs and all(m.weight.dtype == torch.float16 for m in torso_convs)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm32)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.time_embed[0].weight.dtype == torch.float32 and model.out[2].weight.dtype == torch.float32
    # GroupNorm computes in float32 but hands back the input's dtype.
    h = torch.randn(2, 32, 4, 4, dtype=torch.float16) * 300
    assert norms[0](h).dtype == torch.float16 and torch.isfinite(norms[0](h)).all()
    with torch.no_grad():  # torch's CPU build has fp16 kernels; a failure here is a failure
        half = model(x, t)
    assert half.dtype == torch.float32
    assert torch.allclose(half, ref, atol=0.05 * ref.abs().max().item() + 1e-3)
    model.convert_to_fp32()
    assert all(m.weight.dtype == torch.float32 for m in torso_convs)
    with torch.no_grad():
        assert torch.allclose(model(x, t), ref, atol=0.05 * ref.abs().max().item() + 1e-3)


@pytest.mark.parametrize("name", ["digits-teacher", "digits-vit"])
def test_bf16_autocast_on_cpu(name):
    model = _randomise(create_model(name, dropout=0.0), scale=0.05).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-2


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("arch", ["unet", "vit"])
def test_gradient_checkpointing_gives_same_grads(arch):
    def build(flag):
        if arch == "unet":
            return _small_unet(use_checkpoint=flag, resblock_updown=True)
        return ViT(
            image_size=8,
            patch_size=2,
            in_channels=1,
            hidden_size=32,
            depth=2,
            num_heads=2,
            use_checkpoint=flag,
        )

    plain = _randomise(build(False))
    ckpt = build(True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 20, 80])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
