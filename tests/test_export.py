"""Export: our UNet as a diffusers folder (same outputs, same reverse step, resolvable back as a
teacher) and as guided-diffusion's .pt with its flags; what a format cannot hold is refused."""

import json
import os
import subprocess
import sys

import diffusers
import pytest
import torch

from dkdm.config import DiffusionConfig, ModelConfig
from dkdm.diffusion import create_diffusion
from dkdm.models import create_model, export
from dkdm.models.guidance import GuidanceError, Guided
from dkdm.resolve import resolve
from tests.subproc import script_env

ROOT = os.path.join(os.path.dirname(__file__), "..")
COND_TEACHER = os.path.join(ROOT, "dkdm", "assets", "digits_teacher_cond.pt")


def _net(**kw):
    """A small random UNet whose every weight is perturbed (zero-initialised layers would hide a bad map)."""
    fields = {
        "arch": "unet",
        "image_size": 8,
        "in_channels": 1,
        "num_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": "1,2",
        "attention_resolutions": "4",
        "num_head_channels": 16,
        "learn_sigma": True,
    }
    fields.update(kw)
    torch.manual_seed(0)
    net = create_model(ModelConfig(**fields))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def _inputs(net, n=5):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, net.in_channels, net.image_size, net.image_size, generator=g)
    t = torch.tensor([0, 7, 19, 33, 39][:n])
    y = torch.randint(0, net.label_emb.num_embeddings, (n,), generator=g) if net.num_classes is not None else None
    return x, t, y


CASES = {
    "new-order, scale-shift, class-cond with a null class": {
        "use_new_attention_order": True,
        "class_cond": True,
        "num_classes": 5,
        "class_dropout_prob": 0.1,
    },
    "legacy order, additive time embedding, fixed variance": {
        "use_new_attention_order": False,
        "use_scale_shift_norm": False,
        "learn_sigma": False,
    },
    "legacy order, attention on both levels, one head each, 2 blocks": {
        "attention_resolutions": "8,4",
        "num_head_channels": -1,
        "num_heads": 1,
        "num_res_blocks": 2,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_diffusers_export_computes_what_ours_computes(tmp_path, case):
    net = _net(**CASES[case])
    export.export_diffusers(net, net.config, DiffusionConfig(steps=40, learn_sigma=net.config.learn_sigma), tmp_path)
    theirs = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "unet"), local_files_only=True).eval()
    x, t, y = _inputs(net)
    with torch.no_grad():
        ours, out = net(x, t, y), theirs(x, t, class_labels=y).sample
    assert ours.abs().mean() > 0.1  # the perturbed network's output is not trivially small
    torch.testing.assert_close(out, ours, rtol=1e-5, atol=1e-5)


def test_the_qkv_split_follows_the_attention_order():
    # Four heads of 16 channels: the legacy and new layouts put different channels into q, k and v.
    legacy, new = _net(use_new_attention_order=False), _net(use_new_attention_order=True)
    a, b = export.diffusers_state_dict(legacy), export.diffusers_state_dict(new)
    key = "down_blocks.1.attentions.0.to_k.weight"
    w = legacy.input_blocks[3][1].qkv.weight.reshape(192, 64)  # 4 heads x (q, k, v) x 16 channels
    torch.testing.assert_close(a[key], torch.cat([w[48 * h + 16 : 48 * h + 32] for h in range(4)]))
    torch.testing.assert_close(b[key], new.input_blocks[3][1].qkv.weight.reshape(192, 64)[64:128])


@pytest.mark.parametrize(
    "diffusion",
    [
        {"noise_schedule": "cosine", "learn_sigma": True},
        {"noise_schedule": "linear", "predict_xstart": True},
        {"noise_schedule": "linear:0.001,0.05", "predict_v": True, "sigma_small": True},
    ],
)
def test_one_denoising_step_of_the_export_equals_ours(tmp_path, diffusion):
    dcfg = DiffusionConfig(steps=40, **diffusion)
    net = _net(learn_sigma=dcfg.learn_sigma)
    export.export_diffusers(net, net.config, dcfg, tmp_path)
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "scheduler"), local_files_only=True)
    scheduler.set_timesteps(40)  # the full chain: step t goes to t - 1
    ours_diffusion = create_diffusion(dcfg)
    x, _, _ = _inputs(net, 4)
    for step in (39, 20, 1):
        t = torch.full((4,), step)
        with torch.no_grad():
            out = net(x, t)
        theirs = scheduler.step(out, step, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        ours = ours_diffusion.p_sample_from_output(out, x, t, clip_denoised=True, noise=noise)["sample"]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


def test_the_embedded_conditional_teacher_round_trips_as_a_diffusers_teacher(tmp_path):
    r = resolve({}, {}, checkpoint=COND_TEACHER)
    net = r.build().eval()
    folder = str(tmp_path / "pipe")
    export.export_diffusers(net, r.model, r.diffusion, folder, source=COND_TEACHER)
    back = resolve({}, {}, checkpoint=folder)
    assert (back.model.arch, back.model.num_classes, back.model.class_cond) == ("diffusers", 10, True)
    d, want = back.diffusion, r.diffusion
    assert (d.steps, d.noise_schedule, d.learn_sigma, d.predict_v, d.predict_xstart) == (
        want.steps,
        want.noise_schedule,
        want.learn_sigma,
        False,
        False,
    )
    teacher = back.build().eval()
    assert (teacher.num_classes, teacher.null_class) == (net.num_classes, net.null_class) == (10, 10)
    x, t, y = _inputs(net)
    y = y % 10
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t, y), net(x, t, y), rtol=1e-5, atol=1e-5)
        # guided through the null class, as the distillation loop calls a guided teacher
        torch.testing.assert_close(Guided(teacher, 3.0)(x, t, y), Guided(net, 3.0)(x, t, y), rtol=1e-5, atol=2e-5)


def test_a_guided_diffusion_export_is_the_state_dict_with_its_flags(tmp_path):
    net = _net(use_new_attention_order=False, class_cond=True, num_classes=5, class_dropout_prob=0.1)
    path = str(tmp_path / "model.pt")
    info = export.export_guided_diffusion(net, net.config, DiffusionConfig(steps=40, learn_sigma=True), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == list(net.state_dict())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with open(str(tmp_path / "model.flags.json")) as f:
        assert json.load(f) == info
    flags = info["flags"]
    assert (flags["num_channels"], flags["attention_resolutions"], flags["learn_sigma"]) == (32, "4", True)
    assert (flags["diffusion_steps"], flags["use_new_attention_order"], flags["class_cond"]) == (40, False, True)
    assert "--num_head_channels 16" in info["command_line"]
    assert any("NUM_CLASSES = 6" in n for n in info["notes"])  # 5 classes and the null class
    assert any("in_channels is 1" in n for n in info["notes"])
    # The flags (guided-diffusion's names are ours) rebuild the network the weights load into strictly.
    model_flags = {k: v for k, v in flags.items() if k in ModelConfig.__dataclass_fields__}
    rebuilt = create_model(ModelConfig(in_channels=1, num_classes=5, class_dropout_prob=0.1, **model_flags))
    rebuilt.load_state_dict(state, strict=True)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"resblock_updown": True}, "resblock_updown"),
        ({"channel_mult": "2,2", "attention_resolutions": ""}, "channel_mult starts at 2"),
        ({"guidance_cond": True}, "guidance scale w"),
        ({"num_head_channels": -1, "num_heads": 2, "attention_resolutions": "8,4"}, "head sizes [16, 32]"),
        ({"conv_resample": False, "attention_resolutions": ""}, "conv_resample"),
        ({"level_res_blocks": "2,1"}, "residual blocks removed from some levels"),
        ({"mid_block": "res"}, "a cut middle block"),
    ],
)
def test_what_diffusers_cannot_hold_is_refused(tmp_path, kw, words):
    net = _net(**kw)
    with pytest.raises(export.ExportError, match=words.replace("[", r"\[").replace("]", r"\]")):
        export.export_diffusers(net, net.config, DiffusionConfig(steps=40, learn_sigma=True), tmp_path)
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_what_the_other_targets_cannot_hold_is_refused(tmp_path):
    net = _net()
    with pytest.raises(export.ExportError, match="v-prediction"):
        export.export_guided_diffusion(net, net.config, DiffusionConfig(predict_v=True), str(tmp_path / "a.pt"))
    cut = _net(mid_block="none")
    with pytest.raises(export.ExportError, match=r"compressed \(a cut middle block"):
        export.export_guided_diffusion(cut, cut.config, DiffusionConfig(), str(tmp_path / "b.pt"))
    with pytest.raises(export.ExportError, match="without its decoder"):
        export.guided_diffusion_flags(ModelConfig(first_stage="dkdm/assets/digits_autoencoder"), DiffusionConfig())
    with pytest.raises(export.ExportError, match="pruned layer widths"):
        export.guided_diffusion_flags(ModelConfig(channel_widths="input_blocks.1.0:8,8"), DiffusionConfig())
    with pytest.raises(export.ExportError, match="rescale_timesteps"):
        export.diffusers_scheduler_config(DiffusionConfig(steps=40, rescale_timesteps=True))
    vit = create_model(ModelConfig(arch="vit", image_size=8, in_channels=1, hidden_size=64, depth=1, num_heads=2))
    with pytest.raises(export.ExportError, match="ViT"):
        export.diffusers_state_dict(vit)
    assert not os.listdir(tmp_path)


def test_the_export_script_writes_a_pipeline_diffusers_loads(tmp_path):
    env = script_env()
    out = str(tmp_path / "pipe")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "export.py"), "--model_path", COND_TEACHER]
    done = subprocess.run(
        [*cmd, "--format", "diffusers", "--output", out], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    pipe = diffusers.DDPMPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.num_class_embeds == 11 and pipe.scheduler.config.variance_type == "learned_range"
    again = subprocess.run(
        [*cmd, "--format", "diffusers", "--output", out], env=env, capture_output=True, text=True, check=False
    )
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "not empty" in again.stderr
    for fmt, out2 in (("diffusers", str(tmp_path / "p2")), ("guided-diffusion", str(tmp_path / "m.pt"))):
        flag = subprocess.run(
            [*cmd, "--format", fmt, "--output", out2, "--dit_frequency_fix"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert flag.returncode == 1 and "applies to a ViT exported to diffusers only" in flag.stderr
        assert not os.path.exists(out2)


def test_a_class_conditional_diffusers_model_without_our_note_has_no_null_class(tmp_path):
    net = _net(class_cond=True, num_classes=5, class_dropout_prob=0.1)
    folder = str(tmp_path / "pipe")
    export.export_diffusers(net, net.config, DiffusionConfig(steps=40, learn_sigma=True), folder)
    os.remove(os.path.join(folder, "unet", export.EXPORT_NOTE))
    teacher = resolve({}, {}, checkpoint=folder).build()
    assert (teacher.num_classes, teacher.null_class) == (6, None)  # all 6 rows are classes to it
    with pytest.raises(GuidanceError, match="null class"):
        Guided(teacher, 3.0)
