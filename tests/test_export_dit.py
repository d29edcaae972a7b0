"""Export of a ViT to diffusers: a DiTTransformer2DModel folder that computes what ours computes once
its timestep frequencies are set as the folder records (diffusers' own are not DiT's), whose
scheduler takes our reverse step, which dkdm loads back as a teacher; what it cannot hold is refused."""

import dataclasses
import json
import os
import subprocess
import sys

import diffusers
import pytest
import torch
import yaml

from dkdm.config import DiffusionConfig, ModelConfig, to_dict
from dkdm.diffusion import create_diffusion
from dkdm.models import create_model, export
from dkdm.models.guidance import Guided
from dkdm.models.layers import timestep_embedding
from dkdm.resolve import resolve
from tests.subproc import script_env

ROOT = os.path.join(os.path.dirname(__file__), "..")
DIFFUSION = DiffusionConfig(steps=40, noise_schedule="cosine", learn_sigma=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(**kw):
    """A small ViT with every weight random: adaLN-Zero and the final layer start at zero, which
    would hide a wrong map (a swapped shift and scale of zeros is still zeros)."""
    fields = {
        "arch": "vit",
        "image_size": 8,
        "in_channels": 1,
        "patch_size": 2,
        "hidden_size": 64,
        "depth": 2,
        "num_heads": 4,
        "learn_sigma": True,
    }
    fields.update(kw)
    torch.manual_seed(0)
    net = create_model(ModelConfig(**fields))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos table
                p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def _inputs(net, n=5):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, net.in_channels, net.image_size, net.image_size, generator=g)
    t = torch.tensor([0, 7, 19, 33, 39][:n])
    y = torch.randint(0, net.y_embedder.embedding_table.num_embeddings, (n,), generator=g) if net.num_classes else None
    return x, t, y


def _load(folder):
    """The exported transformer as a diffusers user gets it, with the documented fix applied by hand."""
    with open(os.path.join(folder, "transformer", "config.json")) as f:
        assert json.load(f)[export.TIMESTEP_SHIFT_KEY] == 0
    model = diffusers.DiTTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"), local_files_only=True)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model.eval()


CASES = {
    "class-cond with a null class, learned sigma": {"class_cond": True, "num_classes": 5, "class_dropout_prob": 0.1},
    "class-cond without a null class, fixed variance": {"class_cond": True, "num_classes": 5, "learn_sigma": False},
    "unconditional, learned sigma": {},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_dit_export_computes_what_ours_computes(tmp_path, case):
    net = _vit(**CASES[case])
    dcfg = dataclasses.replace(DIFFUSION, learn_sigma=net.learn_sigma)
    note = export.export_diffusers(net, net.config, dcfg, str(tmp_path), dit_frequency_fix=True)
    assert sorted(os.listdir(tmp_path)) == ["scheduler", "transformer"]
    theirs = _load(str(tmp_path))
    assert theirs.config.out_channels == (2 if net.learn_sigma else 1)
    x, t, y = _inputs(net)
    with torch.no_grad():
        ours = net(x, t, y)
        assert ours.abs().mean() > 0.1  # the randomised network's output is not trivially small
        if y is None:  # one class whose embedding, like diffusers' null row, is zero: any label < 2 is t alone
            assert note["unconditional_label"] == 0 and theirs.config.num_embeds_ada_norm == 1
            for label in (0, 1):
                out = theirs(x, t, class_labels=torch.full_like(t, label)).sample
                torch.testing.assert_close(out, ours, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(theirs(x, t, class_labels=y).sample, ours, rtol=1e-5, atol=1e-5)


def test_diffusers_own_timestep_frequencies_are_not_dits(tmp_path):
    """Why the export needs --dit_frequency_fix: diffusers' DiT divides by half - 1 where DiT (and we)
    divide by half. If this test fails, diffusers changed and the fix may be unnecessary."""
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    theirs = diffusers.models.embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
    ours = timestep_embedding(t, 256)
    assert (theirs(t) - ours).abs().max() > 1.0
    theirs.downscale_freq_shift = 0  # what the folder records and the loader sets
    torch.testing.assert_close(theirs(t), ours, rtol=0, atol=1e-6)
    # and the whole network loaded without the fix is another network
    net = _vit(class_cond=True, num_classes=5)
    export.export_diffusers(net, net.config, DIFFUSION, str(tmp_path), dit_frequency_fix=True)
    stock = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "transformer"), local_files_only=True)
    x, t, y = _inputs(net)
    with torch.no_grad():
        assert (stock.eval()(x, t, class_labels=y).sample - net(x, t, y)).abs().max() > 0.1


def test_without_the_frequency_fix_a_vit_is_refused_before_writing(tmp_path):
    net = _vit(class_cond=True, num_classes=5)
    with pytest.raises(export.ExportError, match=r"10000\^\(-i/127\).*--dit_frequency_fix") as e:
        export.export_diffusers(net, net.config, DIFFUSION, str(tmp_path / "out"))
    assert "phases differ by up to 0.11 rad" in str(e.value)  # t = 39: 39 * max_i (f_i - g_i)
    assert not os.path.exists(tmp_path / "out")


def test_one_denoising_step_of_the_dit_export_equals_ours(tmp_path):
    net = _vit(class_cond=True, num_classes=5, class_dropout_prob=0.1)
    export.export_diffusers(net, net.config, DIFFUSION, str(tmp_path), dit_frequency_fix=True)
    theirs = _load(str(tmp_path))
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "scheduler"), local_files_only=True)
    assert scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(40)  # the full chain: step t goes to t - 1
    diffusion = create_diffusion(DIFFUSION)
    x, _, y = _inputs(net, 4)
    for step in (39, 20, 1):
        t = torch.full((4,), step)
        with torch.no_grad():
            out_theirs, out_ours = theirs(x, t, class_labels=y).sample, net(x, t, y)
        prev = scheduler.step(out_theirs, step, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        ours = diffusion.p_sample_from_output(out_ours, x, t, clip_denoised=True, noise=noise)["sample"]
        torch.testing.assert_close(ours, prev, rtol=1e-4, atol=2e-5)


def test_every_block_gets_the_shared_embedder_and_the_label_rows_are_ours_or_zero():
    net = _vit(class_cond=True, num_classes=5)  # no null class: diffusers' null row is zeros
    sd = export.diffusers_dit_state_dict(net)
    for i in range(2):
        emb = f"transformer_blocks.{i}.norm1.emb"
        assert torch.equal(sd[f"{emb}.timestep_embedder.linear_1.weight"], net.t_embedder.mlp[0].weight)
        assert torch.equal(sd[f"{emb}.timestep_embedder.linear_2.bias"], net.t_embedder.mlp[2].bias)
        table = sd[f"{emb}.class_embedder.embedding_table.weight"]
        assert torch.equal(table[:5], net.y_embedder.embedding_table.weight) and not table[5].any()
    k = sd["transformer_blocks.1.attn1.to_k.weight"]
    assert torch.equal(k, net.blocks[1].attn.qkv.weight[64:128])  # timm's fused order: q, k, v of all heads
    uncond = export.diffusers_dit_state_dict(_vit())
    assert uncond["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape == (2, 64)
    assert not uncond["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].any()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"guidance_cond": True}, "guidance scale w"),
        ({"mlp_ratio": 2.0}, "mlp_ratio 2"),
        ({"first_stage": "dkdm/assets/digits_autoencoder"}, "without its decoder"),
    ],
)
def test_what_a_dit_cannot_hold_is_refused(tmp_path, kw, words):
    net = _vit(**kw)
    with pytest.raises(export.ExportError, match=words):
        export.export_diffusers(net, net.config, DIFFUSION, str(tmp_path / "out"), dit_frequency_fix=True)
    assert not os.path.exists(tmp_path / "out")


def test_positions_other_than_the_sin_cos_table_are_refused(tmp_path):
    net = _vit()
    with torch.no_grad():
        net.pos_embed.mul_(1.5)
    with pytest.raises(export.ExportError, match="pos_embed differs by up to"):
        export.export_diffusers(net, net.config, DIFFUSION, str(tmp_path / "out"), dit_frequency_fix=True)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("cond", [True, False])
def test_the_dit_export_round_trips_as_a_teacher(tmp_path, cond):
    net = _vit(**({"class_cond": True, "num_classes": 5, "class_dropout_prob": 0.1} if cond else {}))
    folder = str(tmp_path / "dit")
    export.export_diffusers(net, net.config, DIFFUSION, folder, dit_frequency_fix=True)
    x, t, y = _inputs(net)
    for path in (folder, os.path.join(folder, "transformer")):  # the folder, or its model beside scheduler/
        back = resolve({}, {}, checkpoint=path)
        assert (back.model.arch, back.model.class_cond, back.model.learn_sigma) == ("diffusers", cond, True)
        d = back.diffusion
        assert (d.steps, d.noise_schedule, d.learn_sigma) == (40, "cosine", True)
        teacher = back.build().eval()
        assert (teacher.num_classes, teacher.null_class) == (net.num_classes, net.null_class)
        with torch.no_grad():
            torch.testing.assert_close(teacher(x, t, y), net(x, t, y), rtol=1e-5, atol=1e-5)
            if cond:  # guided through the null class, as the distillation loop calls a guided teacher
                torch.testing.assert_close(
                    Guided(teacher, 3.0)(x, t, y), Guided(net, 3.0)(x, t, y), atol=2e-5, rtol=1e-5
                )
    if not cond:
        with pytest.raises(ValueError, match="unconditional"):
            teacher(x, t, torch.zeros_like(t))


def test_the_export_script_routes_a_vit_to_a_dit_folder(tmp_path):
    net = _vit(class_cond=True, num_classes=5, class_dropout_prob=0.1)
    run = tmp_path / "run"
    run.mkdir()
    ckpt = str(run / "ema_0.9999_000010.pt")
    torch.save(net.state_dict(), ckpt)
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump({"model": to_dict(net.config), "diffusion": to_dict(DIFFUSION), "train": {}}, f)
    env = script_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "export.py"), "--model_path", ckpt, "--format", "diffusers"]
    out = str(tmp_path / "dit")
    refused = subprocess.run([*cmd, "--output", out], env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "--dit_frequency_fix" in refused.stderr
    assert not os.path.exists(out)
    done = subprocess.run(
        [*cmd, "--dit_frequency_fix", "--output", out], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "DiTTransformer2DModel" in done.stdout and "downscale_freq_shift = 0" in done.stdout
    theirs = _load(out)
    x, t, y = _inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, net(x, t, y), rtol=1e-5, atol=1e-5)
