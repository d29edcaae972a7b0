"""Students cut from a teacher (dkdm.models.compress): exact copies, strict reloads, refusals."""

import dataclasses

import pytest
import torch

from dkdm.config import ModelConfig, dump_yaml
from dkdm.models import create_model, get_config, load_checkpoint
from dkdm.models.compress import build_student, narrow_vit, recipe, remove_blocks

# A small UNet with two residual blocks per level, resblock resampling and attention at 8 and 4.
SMALL = ModelConfig(
    name="small",
    arch="unet",
    image_size=16,
    in_channels=3,
    learn_sigma=True,
    num_channels=32,
    num_res_blocks=2,
    channel_mult="1,2,2",
    attention_resolutions="8,4",
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=True,
)


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (the zoo zero-initialises residual branches, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs(cfg: ModelConfig, n: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return x, torch.tensor([0, 17, 99][:n])


def _hooked(model: torch.nn.Module, x, t) -> dict:
    """Outputs of every input block and of the middle block (in eval mode: no dropout)."""
    model.eval()
    seen, handles = {}, []
    for name in [f"input_blocks.{k}" for k in range(len(model.input_blocks))] + ["middle_block"]:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.clone())))
    with torch.no_grad():
        seen["out"] = model(x, t)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["digits-teacher", "small", "digits-vit"])
def test_nothing_removed_is_the_teacher(arch):
    teacher = _random(create_model(SMALL if arch == "small" else arch))
    cfg, sd = remove_blocks(teacher, [])
    assert cfg == teacher.config
    student = build_student(cfg, sd).eval()
    x, t = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(student(x, t), teacher(x, t))


@pytest.mark.parametrize("name", ["bk-base", "bk-small", "bk-tiny"])
def test_recipes_reload_strictly_from_their_yaml(tmp_path, name):
    teacher = _random(create_model(SMALL))
    cfg, sd = remove_blocks(teacher, recipe(name, teacher))
    n_teacher = sum(p.numel() for p in teacher.parameters())
    student = build_student(cfg, sd).eval()
    assert sum(p.numel() for p in student.parameters()) < n_teacher
    dump_yaml({"model": cfg}, str(tmp_path / "student.yaml"))
    torch.save(sd, tmp_path / "student.pt")
    rebuilt = load_checkpoint(create_model(get_config(str(tmp_path / "student.yaml"))), str(tmp_path / "student.pt"))
    x, t = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, t), student(x, t))
    # every tensor the student has is one of the teacher's, unchanged
    teacher_tensors = {tuple(v.flatten()[:8].tolist()) for v in teacher.state_dict().values()}
    assert all(tuple(v.flatten()[:8].tolist()) in teacher_tensors for v in sd.values())


def test_recipe_shapes():
    teacher = create_model(SMALL)
    small = remove_blocks(teacher, recipe("bk-small", teacher))[0]
    assert (small.num_res_blocks, small.level_res_blocks, small.mid_block) == (1, "", "none")
    tiny = remove_blocks(teacher, recipe("bk-tiny", teacher))[0]
    assert (tiny.channel_mult, tiny.attention_resolutions) == ("1,2", "8")


def test_removing_a_pair_changes_only_what_follows_it():
    teacher = _random(create_model(SMALL))
    # level 1: input_blocks.5 (second res block down) with output_blocks.4 (a res block up, no upsampler)
    cfg, sd = remove_blocks(teacher, ["input_blocks.5", "output_blocks.4"])
    assert cfg.level_res_blocks == "2,1,2"
    student = build_student(cfg, sd)
    x, t = _inputs(cfg)
    a, b = _hooked(teacher, x, t), _hooked(student, x, t)
    for k in range(5):  # the conv, level 0 and level 1's first block: unchanged bitwise
        assert torch.equal(a[f"input_blocks.{k}"], b[f"input_blocks.{k}"]), k
    # student's input_blocks.5 is the teacher's downsampler input_blocks.6, now fed by input_blocks.4
    assert not torch.allclose(a["input_blocks.6"], b["input_blocks.5"])
    assert not torch.allclose(a["out"], b["out"])


def test_removing_attention_keeps_the_levels_before_it():
    teacher = _random(create_model(SMALL))
    cfg, sd = remove_blocks(teacher, ["attention@4"])  # level 2 (4x4) only
    student = build_student(cfg, sd)
    x, t = _inputs(cfg)
    a, b = _hooked(teacher, x, t), _hooked(student, x, t)
    first_at_4 = 7  # conv, 2 res + down (level 0), 2 res + down (level 1)
    for k in range(first_at_4):
        assert torch.equal(a[f"input_blocks.{k}"], b[f"input_blocks.{k}"]), k
    assert not torch.allclose(a[f"input_blocks.{first_at_4}"], b[f"input_blocks.{first_at_4}"])


def test_middle_attention_removal_keeps_the_whole_way_down():
    teacher = _random(create_model("digits-teacher"))
    cfg, sd = remove_blocks(teacher, ["middle_block.1"])
    assert cfg.mid_block == "res"
    student = build_student(cfg, sd)
    x, t = _inputs(cfg)
    a, b = _hooked(teacher, x, t), _hooked(student, x, t)
    for k in range(len(teacher.input_blocks)):
        assert torch.equal(a[f"input_blocks.{k}"], b[f"input_blocks.{k}"]), k
    assert not torch.allclose(a["middle_block"], b["middle_block"])


def test_identity_blocks_removed_give_the_same_function():
    # Freshly built, the residual branches of the middle block (zero output convs) and the
    # attention (zero proj_out) add exactly zero: removing them must not change the output.
    teacher = create_model("digits-teacher").eval()
    with torch.no_grad():
        for p in [*teacher.out.parameters(), *teacher.time_embed.parameters()]:
            p.normal_(0, 0.3)
        for blk in teacher.output_blocks:  # give the way up a non-trivial function
            blk[0].out_layers[-1].weight.normal_(0, 0.1)
    cfg, sd = remove_blocks(teacher, ["middle_block", "attention@2"])
    student = build_student(cfg, sd).eval()
    x, t = _inputs(cfg)
    with torch.no_grad():
        out = teacher(x, t)
        assert out.abs().max() > 0
        assert torch.equal(student(x, t), out)
    vit = create_model("digits-vit").eval()  # adaLN-Zero: every block starts as the identity
    with torch.no_grad():
        for p in vit.final_layer.parameters():
            p.normal_(0, 0.3)
    cfg, sd = remove_blocks(vit, ["blocks.0", "blocks.2"])
    assert cfg.depth == 2
    with torch.no_grad():
        assert torch.equal(build_student(cfg, sd).eval()(x[:, :1, :8, :8], t), vit(x[:, :1, :8, :8], t))


def test_vit_blocks_are_renumbered():
    vit = _random(create_model("digits-vit"))
    _, sd = remove_blocks(vit, ["blocks.1"])
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], vit.state_dict()["blocks.2.attn.qkv.weight"])
    assert torch.equal(sd["blocks.0.mlp.fc1.weight"], vit.state_dict()["blocks.0.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="without a block"):
        remove_blocks(vit, [f"blocks.{k}" for k in range(4)])


def test_a_narrowed_vit_keeps_the_first_heads_of_every_weight(tmp_path):
    vit = _random(create_model("digits-vit", class_cond=True, num_classes=10, class_dropout_prob=0.1))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 40, 90]), torch.tensor([0, 3, 10])
    cfg, sd = narrow_vit(vit, vit.num_heads)  # all heads kept: the teacher itself
    with torch.no_grad():
        assert torch.equal(build_student(cfg, sd).eval()(x, t, y=y), vit.eval()(x, t, y=y))
    big, heads = vit.config.hidden_size, 2
    hd = big // vit.num_heads
    cfg, sd = narrow_vit(vit, heads)
    h = heads * hd
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth) == (h, heads, vit.config.depth)
    student = build_student(cfg, sd)  # strict
    tsd = vit.state_dict()
    for part in range(3):  # q, k, v: the kept heads' rows of each part, the kept input channels
        want = tsd["blocks.1.attn.qkv.weight"][part * big : part * big + h, :h]
        assert torch.equal(sd["blocks.1.attn.qkv.weight"][part * h : (part + 1) * h], want)
    for part in range(6):  # the six adaLN modulations (shift, scale, gate twice)
        want = tsd["blocks.0.adaLN_modulation.1.bias"][part * big : part * big + h]
        assert torch.equal(sd["blocks.0.adaLN_modulation.1.bias"][part * h : (part + 1) * h], want)
    assert torch.equal(sd["blocks.0.mlp.fc2.weight"], tsd["blocks.0.mlp.fc2.weight"][:h, : 4 * h])
    assert torch.equal(sd["y_embedder.embedding_table.weight"], tsd["y_embedder.embedding_table.weight"][:, :h])
    assert torch.equal(sd["final_layer.linear.weight"], tsd["final_layer.linear.weight"][:, :h])
    assert student(x, t, y=y).shape == (3, 2, 8, 8)
    for bad, words in ((0, r"in 1\.\.4"), (5, r"in 1\.\.4")):
        with pytest.raises(ValueError, match=words):
            narrow_vit(vit, bad)
    with pytest.raises(TypeError, match="ViT"):
        narrow_vit(create_model("digits-teacher"), 1)


@pytest.mark.parametrize(
    "arch, remove, message",
    [
        (
            "digits-teacher",
            ["input_blocks.1", "output_blocks.0"],
            r"removing input_blocks\.1 leaves level 0 with no residual block",
        ),
        ("small", ["input_blocks.4"], r"input_blocks\.4 breaks a skip connection at level 1"),
        ("small", ["output_blocks.4"], r"output_blocks\.4 breaks a skip connection"),
        ("small", ["input_blocks.4", "output_blocks.1"], "breaks a skip connection"),
        ("digits-teacher", ["innermost_stage"], r"student's middle_block"),
        (
            "small",
            ["input_blocks.4", "output_blocks.4"],
            r"student's input_blocks\.4 \(from the teacher's input_blocks\.5\)",
        ),
        ("digits-teacher", ["output_blocks.1"], r"removable are input_blocks\.1, .*innermost_stage"),
        ("digits-teacher", ["attention@8"], "cannot remove attention@8"),
    ],
)
def test_bad_recipes_name_the_block(arch, remove, message):
    teacher = create_model(SMALL if arch == "small" else arch)
    with pytest.raises(ValueError, match=message):
        remove_blocks(teacher, remove)


def test_named_recipe_refusals():
    with pytest.raises(ValueError, match=r"level 0 has only input_blocks\.1.*empty"):
        recipe("bk-base", create_model("digits-teacher"))
    with pytest.raises(ValueError, match="unknown recipe 'bk-huge'"):
        recipe("bk-huge", create_model(SMALL))
    with pytest.raises(ValueError, match=r"level_res_blocks \[2, 0\]"):
        create_model(dataclasses.replace(SMALL, channel_mult="1,2", attention_resolutions="8", level_res_blocks="2,0"))
