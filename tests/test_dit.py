"""DiT checkpoints: the official layout (key names and shapes from DiT's public model definition),
strict loading into our ViT, a forward pass against an independent float64 reference, zoo counts."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dkdm.config import ModelConfig
from dkdm.models import CheckpointError, count_parameters, create_model, load_checkpoint

MANIFEST = os.path.join(os.path.dirname(__file__), "data", "dit_xl2_256_keys.json")


def dit_layout(hidden, depth, in_channels=4, patch=2, latent=32, classes=1000, learn_sigma=True, dropout=True):
    """{key: shape} of DiT(...).state_dict(), written from the architecture of DiT's models.py:
    a timm PatchEmbed conv, a 256-frequency timestep MLP, a label table with one extra (null) row
    when labels are dropped, a fixed sin-cos pos_embed parameter, blocks of timm Attention (qkv,
    proj) and Mlp (fc1, fc2, ratio 4) with a 6-way adaLN, and a final layer with a 2-way adaLN."""
    h, out = hidden, in_channels * (2 if learn_sigma else 1)
    keys = {
        "pos_embed": (1, (latent // patch) ** 2, h),
        "x_embedder.proj.weight": (h, in_channels, patch, patch),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256),
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (classes + int(dropout), h),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update(
            {
                b + "attn.qkv.weight": (3 * h, h),
                b + "attn.qkv.bias": (3 * h,),
                b + "attn.proj.weight": (h, h),
                b + "attn.proj.bias": (h,),
                b + "mlp.fc1.weight": (4 * h, h),
                b + "mlp.fc1.bias": (4 * h,),
                b + "mlp.fc2.weight": (h, 4 * h),
                b + "mlp.fc2.bias": (h,),
                b + "adaLN_modulation.1.weight": (6 * h, h),
                b + "adaLN_modulation.1.bias": (6 * h,),
            }
        )
    keys.update(
        {
            "final_layer.linear.weight": (patch * patch * out, h),
            "final_layer.linear.bias": (patch * patch * out,),
            "final_layer.adaLN_modulation.1.weight": (2 * h, h),
            "final_layer.adaLN_modulation.1.bias": (2 * h,),
        }
    )
    return keys


def _meta_shapes(name, **kw):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in create_model(name, **kw).state_dict().items()}


def test_the_committed_manifest_is_dits_layout_and_our_xl2_has_exactly_it():
    with open(MANIFEST) as f:
        manifest = {k: tuple(v) for k, v in json.load(f).items()}
    assert manifest == dit_layout(1152, 28)
    assert _meta_shapes("dit-xl2-256") == manifest


@pytest.mark.parametrize(
    "name, hidden, depth, latent, params",
    [
        ("dit-xl2-256", 1152, 28, 32, 675_129_632),  # DiT paper Table 1: 675M
        ("dit-xl2-512", 1152, 28, 64, None),
        ("dit-l2-256", 1024, 24, 32, None),
        ("dit-b2-256", 768, 12, 32, None),
        ("dit-s2-256", 384, 12, 32, None),
    ],
)
def test_zoo_dits_have_dits_layout_and_parameter_count(name, hidden, depth, latent, params):
    layout = dit_layout(hidden, depth, latent=latent)
    assert _meta_shapes(name) == layout
    counted = sum(math.prod(s) for s in layout.values())
    assert count_parameters(name) == counted
    if params is not None:
        assert counted == params


# ------------------------------------------------------------------ a tiny DiT, strictly loaded


TINY = {"hidden": 64, "depth": 2, "in_channels": 4, "patch": 2, "latent": 8, "classes": 10}


def _tiny_checkpoint(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(s, generator=g) for k, s in dit_layout(**TINY).items()}


def _tiny_model():
    return create_model(
        ModelConfig(
            arch="vit",
            image_size=8,
            in_channels=4,
            learn_sigma=True,
            class_cond=True,
            num_classes=10,
            class_dropout_prob=0.1,
            hidden_size=64,
            depth=2,
            num_heads=4,
            patch_size=2,
        )
    ).eval()


def _reference_forward(sd, x, t, y, heads=4, patch=2):
    """DiT's forward written from its definition, on a state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    n, _, size, _ = x.shape
    z = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    z = z.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128  # DiT computes the 256 frequencies in float32
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=1).double()
    temb = F.silu(temb @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"])
    c = temb @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]
    c = c + sd["y_embedder.embedding_table.weight"][y]
    hidden = z.shape[-1]

    def ln(u):
        return F.layer_norm(u, (hidden,), eps=1e-6)

    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        mod = F.silu(c) @ sd[b + "adaLN_modulation.1.weight"].T + sd[b + "adaLN_modulation.1.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=1))
        u = ln(z) * (1 + sc1) + sh1
        qkv = (u @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(n, -1, 3, heads, hidden // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden // heads), dim=-1) @ v
        att = att.transpose(1, 2).reshape(n, -1, hidden) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        z = z + g1 * att
        u = ln(z) * (1 + sc2) + sh2
        m = F.gelu(u @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"], approximate="tanh")
        z = z + g2 * (m @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"])
        i += 1
    mod = F.silu(c) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    shift, scale = (m[:, None] for m in mod.chunk(2, dim=1))
    out = (ln(z) * (1 + scale) + shift) @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]
    grid, c_out = size // patch, out.shape[-1] // (patch * patch)
    out = out.reshape(n, grid, grid, patch, patch, c_out)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, c_out, size, size)


def test_a_dit_checkpoint_loads_strictly_and_computes_dits_function():
    sd = _tiny_checkpoint()
    model = load_checkpoint(_tiny_model(), {"ema": sd})  # train.py checkpoints keep the EMA under "ema"
    model = model.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([3, 10, 7])  # 10 is the null class of classifier-free guidance
    with torch.no_grad():
        ours = model(x, t, y)
    torch.testing.assert_close(ours, _reference_forward(sd, x, t, y), rtol=1e-10, atol=1e-10)


def test_a_missing_or_extra_key_fails_and_a_wrong_size_names_the_fitting_config():
    sd = _tiny_checkpoint()
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc2.bias"):
        load_checkpoint(_tiny_model(), {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"})
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_checkpoint(_tiny_model(), {**sd, "extra.weight": torch.zeros(1)})
    with torch.device("meta"):
        official = create_model("dit-s2-256").state_dict()  # shapes of the official S/2 at 256 px
        wrong = create_model("dit-s2-256", image_size=64)  # as if --image_size 512 had been given
    with pytest.raises(CheckpointError, match="dit-s2-256"):
        load_checkpoint(wrong, official)
