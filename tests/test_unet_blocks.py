"""The ADM UNet's and the ViT's parts against their definitions: signatures and attributes code written
for guided-diffusion reads, 1-D and 3-D networks, the BigGAN resampling residual block in float64,
gradient checkpointing reaching every block, the attention kernel switch, the hyperparameter
refusals, and the guidance-scale embedding."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkdm.models import UNetModel, ViT
from dkdm.models import layers as layers_module
from dkdm.models import unet as unet_module
from dkdm.models.layers import (
    avg_pool_nd,
    check_guidance,
    check_labels,
    conv_nd,
    get_2d_sincos_pos_embed,
    timestep_embedding,
    upsample_nearest2x,
)
from dkdm.models.unet import AttentionBlock, Downsample, ResBlock, Upsample, check_unet_args
from dkdm.models.vit import DiTBlock


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _randomise(model, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def _unet(**kw):
    args = {
        "image_size": 8,
        "in_channels": 2,
        "model_channels": 32,
        "out_channels": 2,
        "num_res_blocks": 1,
        "attention_resolutions": (2,),
        "channel_mult": (1, 2),
        "num_head_channels": 16,
    }
    return UNetModel(**{**args, **kw})


# --------------------------------------------------------------------------- what outside code reads


# Guided-diffusion's defaults for its blocks (ours beyond them are each off, so the layout stays its
# layout); DiT's block's; and our ViT's, DiT-S/2's transformer on 32x32 RGB pixels (its docstring).
DEFAULTS = {
    UNetModel: {
        "dropout": 0.0,
        "channel_mult": (1, 2, 4, 8),
        "conv_resample": True,
        "dims": 2,
        "num_classes": None,
        "use_checkpoint": False,
        "use_fp16": False,
        "num_heads": 1,
        "num_head_channels": -1,
        "num_heads_upsample": -1,
        "use_scale_shift_norm": False,
        "resblock_updown": False,
        "use_new_attention_order": False,
        "class_dropout_prob": 0.0,
        "guidance_cond": False,
        "level_res_blocks": None,
        "mid_block": "full",
    },
    ResBlock: {
        "out_channels": None,
        "use_conv": False,
        "use_scale_shift_norm": False,
        "dims": 2,
        "use_checkpoint": False,
        "up": False,
        "down": False,
    },
    AttentionBlock: {
        "num_heads": 1,
        "num_head_channels": -1,
        "use_checkpoint": False,
        "use_new_attention_order": False,
    },
    Upsample: {"dims": 2, "out_channels": None},
    Downsample: {"dims": 2, "out_channels": None},
    DiTBlock: {"mlp_ratio": 4.0},
    ViT: {
        "image_size": 32,
        "patch_size": 2,
        "in_channels": 3,
        "hidden_size": 384,
        "depth": 12,
        "num_heads": 6,
        "mlp_ratio": 4.0,
        "class_dropout_prob": 0.0,
        "num_classes": None,
        "learn_sigma": True,
        "use_checkpoint": False,
        "guidance_cond": False,
    },
}

# Each class's required arguments, and values given on both sides (a width change, so the skip
# convolution that use_conv shapes exists; convolutions, so dims shows in their type).
BUILD = {
    UNetModel: ((8, 2, 32, 2, 1, (2,)), {}),
    ResBlock: ((32, 48, 0.1), {"out_channels": 64}),
    AttentionBlock: ((64,), {}),
    Upsample: ((32, True), {}),
    Downsample: ((32, True), {}),
    DiTBlock: ((32, 2), {}),
    ViT: ((), {}),
}


def test_constructors_keep_guided_diffusions_defaults():
    """Code written against guided-diffusion's unet.py builds the same network here."""
    for cls, defaults in DEFAULTS.items():
        assert _defaults(cls) == defaults, cls.__name__
    assert _defaults(check_unet_args) == {"dims": 2, "mid_block": "full"}


def _plain_state(model):
    """Every module's type, plain attributes and parameter shapes: what its constructor decided."""
    state = {}
    for name, m in model.named_modules():
        plain = {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, tuple, type(None)))}
        state[name] = (type(m).__name__, plain, {k: tuple(p.shape) for k, p in m.named_parameters(recurse=False)})
    return state


def test_building_with_the_defaults_is_building_with_guided_diffusions_values():
    """The signatures above, as behaviour (a signature does not show a default changed inside a
    wrapper): leaving an argument out builds what giving its value builds."""
    with torch.device("meta"):
        for cls, (args, given) in BUILD.items():
            implicit, explicit = cls(*args, **given), cls(*args, **{**DEFAULTS[cls], **given})
            assert _plain_state(implicit) == _plain_state(explicit), cls.__name__


def test_blocks_keep_guided_diffusions_attributes():
    model = _unet(use_checkpoint=True, num_heads=2, num_head_channels=-1, resblock_updown=True)
    assert model.dtype == torch.float32 and model.use_fp16 is False and model.use_checkpoint is True
    assert (model.num_heads, model.num_heads_upsample, model.num_head_channels) == (2, 2, -1)  # -1: num_heads
    assert _unet(num_heads_upsample=4).num_heads_upsample == 4
    down = model.input_blocks[2][0]  # the resampling residual block between the levels
    assert (down.channels, down.out_channels, down.use_checkpoint, down.updown) == (32, 32, True, True)
    for pool in (down.h_upd, down.x_upd):
        assert isinstance(pool, Downsample) and (pool.channels, pool.out_channels) == (32, 32)
        assert isinstance(pool.op, torch.nn.AvgPool2d)
    up = model.output_blocks[1][-1]
    assert up.updown
    for nearest in (up.h_upd, up.x_upd):
        assert isinstance(nearest, Upsample) and (nearest.channels, nearest.out_channels, nearest.dims) == (64, 64, 2)
        assert nearest.conv is None
    plain = model.input_blocks[1][0]
    assert plain.updown is False and isinstance(plain.h_upd, torch.nn.Identity)
    attn = model.middle_block[1]
    assert (attn.channels, attn.num_heads, attn.use_checkpoint) == (64, 2, True)
    resampled = _unet(resblock_updown=False, conv_resample=False)
    pool, nearest = resampled.input_blocks[2][0], resampled.output_blocks[1][-1]
    assert (pool.channels, pool.out_channels) == (32, 32) and (nearest.channels, nearest.dims) == (64, 2)
    vit = ViT(image_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, use_checkpoint=True)
    assert (vit.image_size, vit.in_channels, vit.learn_sigma, vit.num_heads, vit.use_checkpoint) == (
        8,
        2,
        True,
        2,
        True,
    )


# --------------------------------------------------------------------------- 1-D and 3-D networks


@pytest.mark.parametrize("updown", [False, True])
@pytest.mark.parametrize("conv_resample", [False, True])
@pytest.mark.parametrize("dims", [1, 3])
def test_one_and_three_dimensional_unets_resample_as_guided_diffusions(dims, conv_resample, updown):
    """1-D halves and doubles its one axis; 3-D only height and width (depth 3 would not survive a halving)."""
    model = _randomise(_unet(dims=dims, conv_resample=conv_resample, resblock_updown=updown)).eval()
    shape = (2, 2, 8) if dims == 1 else (2, 2, 3, 8, 8)
    x = torch.randn(*shape)
    seen = []
    model.input_blocks[2].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        out = model(x, torch.tensor([3, 90]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert seen == [(2, 32, 4) if dims == 1 else (2, 32, 3, 4, 4)]
    down = model.input_blocks[2][0]
    op = (down.x_upd if updown else down).op
    stride = op.stride if isinstance(op.stride, tuple) else (op.stride,) * dims
    assert stride == ((1, 2, 2) if dims == 3 else (2,))
    if dims == 3:  # a channels_last_3d input takes interpolate's path, with the same rule
        y = torch.randn(2, 4, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d)
        assert upsample_nearest2x(y, 3).shape == (2, 4, 3, 10, 12)
        assert torch.equal(upsample_nearest2x(y, 3), upsample_nearest2x(y.contiguous(), 3))


def test_layer_factories_take_one_two_or_three_dimensions_only():
    for dims, (conv, pool) in enumerate(
        [
            (torch.nn.Conv1d, torch.nn.AvgPool1d),
            (torch.nn.Conv2d, torch.nn.AvgPool2d),
            (torch.nn.Conv3d, torch.nn.AvgPool3d),
        ],
        start=1,
    ):
        assert isinstance(conv_nd(dims, 2, 3, 1), conv) and isinstance(avg_pool_nd(dims, 2), pool)
        assert avg_pool_nd(dims, 2).kernel_size in (2, (2,))  # positional arguments reach the pool
    for dims in (0, 4):
        with pytest.raises(ValueError, match=f"unsupported number of spatial dimensions: {dims} \\(use 1, 2 or 3\\)"):
            conv_nd(dims, 2, 3, 1)
        with pytest.raises(ValueError, match=f"unsupported number of spatial dimensions: {dims}"):
            avg_pool_nd(dims, 2)


def test_a_valid_padded_pointwise_convolution_also_runs_through_onednn():
    conv = conv_nd(2, 8, 16, 1, padding="valid")
    out = conv(torch.randn(2, 8, 5, 5, requires_grad=True))
    assert type(out.grad_fn).__name__ == "MkldnnConvolutionBackward0"


# --------------------------------------------------------------------------- the residual block, in float64


def _reference_resblock(block, x, emb, *, up, down, scale_shift):
    """guided-diffusion's ResBlock from its definition, on the block's tensors (no dropout)."""
    p = dict(block.named_parameters())

    def norm(h, name):  # in float32 whatever the input, as guided-diffusion's GroupNorm32
        return F.group_norm(h.float(), 32, p[f"{name}.weight"].float(), p[f"{name}.bias"].float()).to(h.dtype)

    def resample(h):
        return F.interpolate(h, scale_factor=2, mode="nearest") if up else F.avg_pool2d(h, 2) if down else h

    h = resample(F.silu(norm(x, "in_layers.0")))  # the resampling sits between the first norm and conv
    x = resample(x)
    h = F.conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = norm(h, "out_layers.0") * (1 + scale) + shift
    else:
        h = norm(h + e, "out_layers.0")
    h = F.conv2d(F.silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    if "skip_connection.weight" in p:
        k = p["skip_connection.weight"].shape[-1]
        x = F.conv2d(x, p["skip_connection.weight"], p["skip_connection.bias"], padding=k // 2)
    return x + h


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize(
    "resample,out_channels,use_conv",
    [("up", None, False), ("down", None, False), (None, 64, False), (None, 64, True), (None, None, False)],
)
def test_the_residual_block_is_guided_diffusions_in_float64(resample, out_channels, use_conv, scale_shift):
    up, down = resample == "up", resample == "down"
    block = ResBlock(
        32, 48, 0.0, out_channels=out_channels, use_conv=use_conv, use_scale_shift_norm=scale_shift, up=up, down=down
    )
    block = _randomise(block).double().eval()
    if use_conv:  # a changed width with use_conv: a 3x3 skip convolution
        assert block.skip_connection.kernel_size == (3, 3) and block.skip_connection.padding == (1, 1)
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    emb = torch.randn(2, 48, dtype=torch.float64)
    with torch.no_grad():
        ours = block(x, emb)
        ref = _reference_resblock(block, x, emb, up=up, down=down, scale_shift=scale_shift)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- checkpointing reaches every block


@pytest.mark.parametrize("arch", ["unet", "vit"])
def test_gradient_checkpointing_wraps_every_block_and_only_while_training(arch, monkeypatch):
    calls = []
    real = layers_module._torch_checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(layers_module, "_torch_checkpoint", counting)

    def build(flag):
        if arch == "unet":
            return _unet(use_checkpoint=flag, resblock_updown=True)
        return ViT(image_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=3, num_heads=2, use_checkpoint=flag)

    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 60])
    model = build(True)
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock, DiTBlock))]
    model(x, t).sum().backward()
    assert len(calls) == len(blocks) > 0
    assert all(kw == {"use_reentrant": False} for kw in calls)  # the non-reentrant form torch recommends
    calls.clear()
    with torch.no_grad():
        model(x, t)  # sampling: nothing to recompute
    build(False)(x, t).sum().backward()
    assert calls == []


# --------------------------------------------------------------------------- attention kernels


def test_the_attention_blocks_switch_picks_the_kernel(monkeypatch):
    block = _randomise(AttentionBlock(64, num_head_channels=16, use_new_attention_order=True)).eval()
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        ref = block(x)

    def refuse(*args, **kwargs):
        raise AssertionError("the other kernel ran")

    block.attention_impl = "bmm"
    monkeypatch.setattr(layers_module.F, "scaled_dot_product_attention", refuse)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    block.attention_impl = "sdpa"
    monkeypatch.setattr(torch, "baddbmm", refuse)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    block.attention_impl = "flash"
    with pytest.raises(ValueError, match="auto, bmm or sdpa, got 'flash'"):
        block(x)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads", [(4, -1), (1, 16)])
def test_a_channels_last_input_takes_the_token_major_attention_with_the_same_maths(monkeypatch, new_order, heads):
    block = AttentionBlock(64, num_heads=heads[0], num_head_channels=heads[1], use_new_attention_order=new_order)
    block = _randomise(block).double()
    block.norm = torch.nn.GroupNorm(32, 64).double()  # GroupNorm32 rounds to fp32, in each layout differently
    x = torch.randn(2, 64, 4, 6, dtype=torch.float64, requires_grad=True)
    nhwc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = block(x)

    def refuse(*args, **kwargs):
        raise AssertionError("a 1x1 Conv1d ran on the channels_last input")

    monkeypatch.setattr(type(block.qkv), "forward", refuse)
    out = block(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [nhwc, *block.parameters()], g)
    monkeypatch.undo()
    want = torch.autograd.grad(ref, [x, *block.parameters()], g)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    block.attention_impl = "bmm"  # guided-diffusion's two products keep their channel-major layout
    monkeypatch.setattr(unet_module, "qkv_attention_tokens", refuse)
    torch.testing.assert_close(block(nhwc), ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- refusals


_OK = {
    "image_size": 8,
    "model_channels": 32,
    "channel_mult": (1, 2),
    "attention_resolutions": (2,),
    "num_heads": 4,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"dims": 4}, "dims must be 1, 2 or 3, not 4"),
        ({"dims": 0}, "dims must be 1, 2 or 3, not 0"),
        ({"image_size": 0}, "image size 0 cannot be halved 1 times"),
        ({"image_size": 6, "channel_mult": (1, 1, 2)}, "image size 6 cannot be halved 2 times .*multiple of 4"),
        ({"num_heads": 0}, "num_heads must be positive when num_head_channels is -1, not 0"),
        ({"num_head_channels": 0}, "num_head_channels must be positive or -1, not 0"),
        ({"num_head_channels": -2, "num_heads": 0}, "num_head_channels must be positive or -1, not -2"),
        ({"model_channels": 96, "channel_mult": (1,), "attention_resolutions": (1,), "num_heads": 5},
         "attention at 1x downsampling has 96 channels, not divisible by num_heads 5"),
        ({"channel_mult": (1, 2), "num_heads_upsample": 3},
         "attention at 2x downsampling has 64 channels, not divisible by num_heads_upsample 3"),
        ({"image_size": 16, "channel_mult": (1, 1, 1, 3), "attention_resolutions": (), "num_heads": 5},
         "attention at 8x downsampling has 96 channels, not divisible by num_heads 5"),
        ({"channel_mult": (1, 2), "attention_resolutions": (), "num_head_channels": 48},
         "attention at 2x downsampling has 64 channels, not divisible by num_head_channels 48"),
    ],
)  # fmt: skip
def test_hyperparameters_the_unet_cannot_be_built_from_are_refused_with_their_numbers(changes, message):
    with pytest.raises(ValueError, match=message):
        check_unet_args(**{**_OK, **changes})


def test_what_the_checks_let_through_builds():
    check_unet_args(**{**_OK, "image_size": 1, "channel_mult": (1,), "attention_resolutions": ()})
    # num_head_channels overrides num_heads, so a non-positive num_heads is irrelevant then
    check_unet_args(**{**_OK, "num_heads": 0, "num_head_channels": 1})
    assert _unet(num_heads=0, num_head_channels=1).middle_block[1].num_heads == 64
    # only the full middle block attends at the last level; without it the last width is free
    last = {**_OK, "channel_mult": (1, 1, 3), "attention_resolutions": (), "num_heads": 5}
    with pytest.raises(ValueError, match="attention at 4x downsampling has 96 channels"):
        check_unet_args(**last)
    check_unet_args(**last, mid_block="res")
    # num_heads_upsample only matters where the way up attends
    check_unet_args(**{**_OK, "attention_resolutions": (), "channel_mult": (1, 2), "num_heads_upsample": 3})


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_is_guided_diffusions_formula(dim):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    half = dim // 2
    ref = torch.zeros(4, dim, dtype=torch.float64)
    for i in range(half):
        f = math.exp(-math.log(10000) * i / half)
        ref[:, i] = torch.cos(t.double() * f)
        ref[:, half + i] = torch.sin(t.double() * f)
    ours = timestep_embedding(t, dim)
    assert ours.shape == (4, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-4)  # float32 arguments up to 999
    if dim % 2:
        assert torch.equal(ours[:, -1], torch.zeros(4))


def test_2d_sincos_positions_are_dits_formula():
    d, g = 16, 3
    ours = get_2d_sincos_pos_embed(d, g)
    q = d // 4  # frequencies per (axis, sin/cos)
    ref = np.zeros((g * g, d))
    for row in range(g):
        for col in range(g):
            for i in range(q):
                omega = 1.0 / 10000 ** (i / q)
                token = row * g + col
                ref[token, i], ref[token, q + i] = math.sin(col * omega), math.cos(col * omega)
                ref[token, 2 * q + i], ref[token, 3 * q + i] = math.sin(row * omega), math.cos(row * omega)
    assert ours.shape == (g * g, d)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="hidden size 18 must be divisible by 4"):
        get_2d_sincos_pos_embed(18, g)


def test_label_and_guidance_refusals_say_what_was_given():
    with pytest.raises(ValueError, match=r"\(num_classes=None, y given\)"):
        check_labels(torch.tensor([1]), None)
    with pytest.raises(ValueError, match=r"\(num_classes=10, y missing\)"):
        check_labels(None, 10)
    with pytest.raises(ValueError, match=r"\(guidance_cond=False, w given\)"):
        check_guidance(torch.tensor([1.0]), False)
    with pytest.raises(ValueError, match=r"\(guidance_cond=True, w missing\)"):
        check_guidance(None, True)


@pytest.mark.parametrize("arch", ["unet", "vit"])
def test_the_guidance_scale_enters_as_a_sinusoid_of_100_w_added_to_the_timestep_embedding(arch):
    """Meng et al.'s w-conditioning: the same network without it, its timestep embedding shifted by
    the guidance branch's output at 100 w, computes the same function."""
    if arch == "unet":
        build = lambda g: _unet(guidance_cond=g, use_scale_shift_norm=True)
    else:
        build = lambda g: ViT(
            image_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, guidance_cond=g
        )
    guided = _randomise(build(True)).eval()
    plain = build(False).eval()
    plain.load_state_dict({k: v for k, v in guided.state_dict().items() if k in plain.state_dict()}, strict=True)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([4, 250, 900])
    w = torch.tensor([0.0, 1.5, 4.0])
    if arch == "unet":
        shift = guided.guidance_embed(timestep_embedding(w * 100.0, 32))
        embedder = plain.time_embed
    else:
        shift = guided.w_embedder(w * 100.0)
        embedder = plain.t_embedder
    embedder.register_forward_hook(lambda m, i, o: o + shift)
    with torch.no_grad():
        torch.testing.assert_close(guided(x, t, w=w), plain(x, t), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(guided(x, t, w=w), guided(x, t, w=w + 1))


def test_a_vit_with_label_dropout_has_the_null_class_guidance_needs():
    kw = {"image_size": 8, "patch_size": 2, "in_channels": 2, "hidden_size": 32, "depth": 1, "num_heads": 2}
    assert ViT(**kw, num_classes=10, class_dropout_prob=0.1).null_class == 10
    assert ViT(**kw, num_classes=10).null_class is None
    assert ViT(**kw).null_class is None
    assert ViT(**kw, mlp_ratio=2.0).blocks[0].mlp.fc1.weight.shape == (64, 32)


def test_per_level_residual_blocks_and_the_middle_blocks_of_cut_students():
    """level_res_blocks and mid_block (dkdm.models.compress's students): the way up has one more block per level."""
    model = _unet(level_res_blocks=(2, 1))
    assert model.level_res_blocks == (2, 1)
    assert len(model.input_blocks) == 1 + 2 + 1 + 1 and len(model.output_blocks) == 3 + 2
    assert _unet(level_res_blocks=None).level_res_blocks == (1, 1)  # num_res_blocks on every level
    kinds = lambda m: [type(b).__name__ for b in m.middle_block]
    assert kinds(_unet()) == ["ResBlock", "AttentionBlock", "ResBlock"]
    assert kinds(_unet(mid_block="res")) == ["ResBlock", "ResBlock"]
    assert kinds(_unet(mid_block="none")) == []
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 2])
    for mid in ("res", "none"):
        assert _unet(mid_block=mid, level_res_blocks=(1, 2))(x, t).shape == x.shape
    # without the full middle block the last level's width need not split into num_heads
    loose = {"channel_mult": (3, 1), "attention_resolutions": (1,), "num_heads": 3, "num_head_channels": -1}
    with pytest.raises(ValueError, match="attention at 2x downsampling has 32 channels, not divisible by num_heads 3"):
        _unet(**loose)
    assert _unet(**loose, mid_block="res").mid_block == "res"
    with pytest.raises(ValueError, match=r"mid_block must be full, res or none, not 'half'"):
        _unet(mid_block="half")
    for bad in ((1,), (1, 0), (2, 2, 2)):
        with pytest.raises(
            ValueError, match=rf"level_res_blocks \[{', '.join(map(str, bad))}\] must give at least one"
        ):
            _unet(level_res_blocks=bad)
    with pytest.raises(ValueError, match="channel_mult is empty"):
        _unet(channel_mult=(), attention_resolutions=())
