"""diffusers teachers: a pipeline folder resolves, its network is called as ours, its scheduler
becomes our diffusion (one reverse step equals diffusers' own), and DKDM distils from it."""

import json
import os
import subprocess
import sys

import diffusers  # the dev extra installs it, so CI runs these tests
import pytest
import torch

from dkdm.config import ConfigError
from dkdm.diffusion import create_diffusion
from dkdm.models import foreign
from dkdm.resolve import resolve, resolve_distillation
from tests.subproc import script_env

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _unet(out_channels=2, classes=None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=classes,
    )


def _pipeline(tmp_path, name="pipe", out_channels=2, **sched):
    args = {
        "num_train_timesteps": 40,
        "beta_schedule": "squaredcos_cap_v2",
        "variance_type": "learned_range",
        "prediction_type": "v_prediction",
    }
    args.update(sched)
    scheduler = diffusers.DDPMScheduler(**args)
    folder = tmp_path / name
    diffusers.DDPMPipeline(unet=_unet(out_channels), scheduler=scheduler).save_pretrained(str(folder))
    return str(folder), scheduler


def test_a_pipeline_folder_resolves_to_its_network_and_diffusion(tmp_path):
    folder, _ = _pipeline(tmp_path)
    r = resolve({}, {}, checkpoint=folder)
    assert (r.model.arch, r.model.image_size, r.model.in_channels, r.model.learn_sigma) == ("diffusers", 8, 1, True)
    d = r.diffusion
    assert (d.steps, d.noise_schedule, d.predict_v, d.learn_sigma) == (40, "cosine", True, True)
    net = r.build()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 17, 39])
    ref = diffusers.UNet2DModel.from_pretrained(os.path.join(folder, "unet"))
    with torch.no_grad():
        assert torch.equal(net(x, t), ref(x, t).sample)


@pytest.mark.parametrize(
    "sched",
    [
        {"variance_type": "learned_range", "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"},
        {"variance_type": "fixed_small", "prediction_type": "epsilon", "beta_schedule": "linear"},
        {"variance_type": "fixed_large", "prediction_type": "sample", "beta_schedule": "scaled_linear"},
    ],
)
def test_one_reverse_step_equals_diffusers_own(tmp_path, sched):
    learned = sched["variance_type"] == "learned_range"
    args = {"num_train_timesteps": 40, "beta_start": 0.001, "beta_end": 0.05, **sched}
    folder, scheduler = _pipeline(tmp_path, out_channels=2 if learned else 1, **args)
    r = resolve({}, {}, checkpoint=folder)
    diffusion = create_diffusion(r.diffusion)
    net = r.build()
    scheduler.set_timesteps(40)  # the full chain: step t goes to t - 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    for step in (39, 20, 1):
        t = torch.full((4,), step)
        with torch.no_grad():
            out = net(x, t)
        theirs = scheduler.step(out, step, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        ours = diffusion.p_sample_from_output(out, x, t, clip_denoised=True, noise=noise)["sample"]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "flow"),
        ("variance_type", "learned"),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("clip_sample_range", 2.0),
    ],
)
def test_an_unrepresentable_scheduler_is_refused_naming_the_field(tmp_path, field, value):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDPMScheduler", field: value}))
    with pytest.raises(ConfigError, match=f"{field} = "):
        foreign.scheduler_to_diffusion(str(path))


def test_model_and_scheduler_that_disagree_on_the_variance_are_refused(tmp_path):
    folder, _ = _pipeline(tmp_path, out_channels=1)  # learned_range scheduler, 1x outputs
    with pytest.raises(ConfigError) as e:
        resolve({}, {}, checkpoint=folder)
    assert str(e.value) == (
        f"{folder}: the model has 1x in_channels outputs but the scheduler's variance_type is learned_range; "
        "they disagree"
    )
    folder, _ = _pipeline(tmp_path, name="other", out_channels=2, variance_type="fixed_small")
    with pytest.raises(ConfigError) as e:
        resolve({}, {}, checkpoint=folder)
    assert str(e.value) == (
        f"{folder}: the model has 2x in_channels outputs but the scheduler's variance_type is not learned_range; "
        "they disagree"
    )


def test_a_bare_model_folder_needs_the_diffusion_flags(tmp_path):
    _unet().save_pretrained(str(tmp_path / "unet_only"))
    r = resolve({}, {"steps": 40, "noise_schedule": "cosine"}, checkpoint=str(tmp_path / "unet_only"))
    assert r.model.learn_sigma and r.diffusion.learn_sigma and r.diffusion.steps == 40
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        resolve({}, {}, checkpoint=str(tmp_path / "other"))


def test_the_distillation_pair_takes_the_teachers_scheduler(tmp_path):
    folder, _ = _pipeline(tmp_path)
    teacher, student = resolve_distillation(
        {"student": {"arch": "digits-student"}, "diffusion": {"predict_v": False}}, folder
    )
    assert teacher.model.arch == "diffusers" and teacher.diffusion.predict_v
    assert student.diffusion.steps == 40 and student.diffusion.noise_schedule == "cosine"
    assert not student.diffusion.predict_v  # the student predicts epsilon; the objective converts


def test_dkdm_distils_a_student_from_a_diffusers_teacher(tmp_path):
    folder, _ = _pipeline(tmp_path)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "dkdm_train.py"),
        "--teacher_path",
        folder,
        "--student.arch",
        "digits-student",
        "--diffusion.predict_v",
        "false",
        "--batch_size",
        "4",
        "--rho",
        "0.1",
        "--teacher_batch",
        "16",
        "--max_steps",
        "2",
        "--lr_anneal_steps",
        "2",
        "--log_dir",
        str(run),
    ]
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=script_env(OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    saved = (run / "config.yaml").read_text()
    assert "arch: diffusers" in saved and "predict_v: true" in saved
    assert (run / "ema_0.995_000002.pt").is_file()


def test_a_bare_dit_folder_is_a_teacher_with_diffusers_own_null_row(tmp_path):
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=3,
    )
    dit.save_pretrained(str(tmp_path / "dit"))
    r = resolve({}, {"steps": 40}, checkpoint=str(tmp_path / "dit"))
    assert (r.model.num_classes, r.model.class_cond, r.model.learn_sigma) == (3, True, True)
    teacher = r.build().eval()
    assert (teacher.num_classes, teacher.null_class) == (3, 3)  # no note of ours: the class's null row
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 39]), torch.tensor([2, 3])
    with torch.no_grad():  # diffusers' own frequencies: no dkdm key in its config.json
        assert torch.equal(teacher(x, t, y), dit.eval()(x, t, class_labels=y).sample)
    with pytest.raises(ValueError, match="class-conditional: give labels"):
        teacher(x, t)
