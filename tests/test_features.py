"""Feature distillation (dkdm.distill.features) inside the DKDM step: one teacher call, exact terms."""

import pytest
import torch

from dkdm import logger
from dkdm.config import ConfigError, DistillConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.features import FeatureKD, stages
from dkdm.distill.loop import DistillLoop
from dkdm.models import create_model
from dkdm.models.compress import build_student, remove_blocks

T = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher():
    torch.manual_seed(0)
    m = create_model("digits-teacher", dropout=0.0)
    with torch.no_grad():  # zero-initialised branches would make every feature trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _student(teacher, remove=("middle_block.1",)):
    student = build_student(*remove_blocks(teacher, list(remove)))
    with torch.no_grad():  # a student that differs from its teacher everywhere
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return student


def _loop(run_dir, teacher, student, **distill):
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    logger.configure(str(run_dir), format_strs=["log"])
    train = TrainConfig(batch_size=8, lr=1e-3, max_steps=3, log_interval=0, save_interval=0, log_dir=str(run_dir))
    cfg = DistillConfig(rho=0.2, teacher_batch=32, pool_cache_dir=str(run_dir / "cache"), **distill)
    return DistillLoop(teacher, student, d, d, train=train, distill=cfg, run_dir=str(run_dir))


def test_stage_names():
    assert list(stages(create_model("digits-teacher"))) == ["down0", "down1", "down2", "mid", "up2", "up1", "up0"]
    t = create_model("digits-teacher")
    cut = build_student(*remove_blocks(t, ["middle_block"]))
    assert "mid" not in stages(cut)
    assert list(stages(create_model("digits-vit"))) == ["block0", "block1", "block2", "block3"]
    # down{L} is the last residual block before the downsampler, up{L} the block holding the upsampler
    assert stages(t)["down1"] is t.input_blocks[3] and stages(t)["up1"] is t.output_blocks[3]


def test_unknown_layer_lists_the_available_ones():
    t = create_model("digits-teacher")
    with pytest.raises(
        ValueError, match=r"down7 not in the teacher; available: down0, down1, down2, mid, up2, up1, up0"
    ):
        FeatureKD(t, t, "down0,down7", 1.0)
    with pytest.raises(ValueError, match=r"mid not in the student; available: down0, .*up0"):
        FeatureKD(t, build_student(*remove_blocks(t, ["middle_block"])), ["mid"], 1.0)
    with pytest.raises(ConfigError, match="feature_kd_weight"):
        DistillConfig(feature_kd_weight=-1.0)


def test_mismatched_shapes_are_refused(tmp_path):
    teacher = _teacher()
    loop = _loop(tmp_path, teacher, create_model("digits-student"), feature_kd_weight=1.0, feature_kd_layers="mid")
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    with pytest.raises(ValueError) as e:
        loop.loss_fn(loop.trainer.model, batch)
    teacher_shape = tuple(batch["teacher_feat.mid"].shape[1:])
    assert f"stage mid: the student's output (32, 4, 4) differs from the teacher's {teacher_shape};" in str(e.value)


def test_teacher_runs_once_per_step_with_feature_kd(tmp_path):
    teacher = _teacher()
    loop = _loop(tmp_path, teacher, _student(teacher), feature_kd_weight=0.5)
    loop.prepare_pool(progress=False)
    calls = []
    handle = teacher.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    for _ in range(3):
        loop.trainer.run_step(loop.next_batch, loop.loss_fn)
    handle.remove()
    assert calls == [8, 8, 8]
    assert loop.trainer.step == 3


def test_feature_term_matches_an_independent_computation_and_trains_the_student(tmp_path):
    teacher = _teacher()
    student = _student(teacher)
    layers = ["down1", "mid", "up0"]
    plain = _loop(tmp_path / "plain", teacher, student)
    plain.prepare_pool(progress=False)
    batch = plain.next_batch()
    base_terms = plain.loss_fn(student, batch)[1]

    kd = _loop(tmp_path / "kd", teacher, student, feature_kd_weight=0.25, feature_kd_layers=",".join(layers))
    with kd.features.teacher_call():
        kd.teacher_forward(batch["x_t"], batch["t"])
    batch.update(kd.features.teacher_targets())
    loss, terms = kd.loss_fn(student, batch)
    assert torch.equal(loss, terms["loss"].mean())

    # independent: float64 MSE between the two networks' stage outputs, read with our own hooks
    seen = {"t": {}, "s": {}}
    handles = [
        net.get_submodule(mod).register_forward_hook(lambda m, a, o, k=k, n=n: seen[k].__setitem__(n, o.double()))
        for k, net, names in (("t", teacher, layers), ("s", student, layers))
        for n, mod in zip(names, ["input_blocks.3", "middle_block", "output_blocks.5"])
    ]
    with torch.no_grad():
        teacher(batch["x_t"], batch["t"])
        student(batch["x_t"], batch["t"])
    for h in handles:
        h.remove()
    expected = sum(((seen["s"][n] - seen["t"][n]) ** 2).mean(dim=(1, 2, 3)) for n in layers) / 3
    assert torch.allclose(terms["feat"].double(), expected, rtol=1e-5, atol=0)
    assert expected.min() > 0
    # lambda = 0 is the old loss exactly; lambda > 0 adds lambda * feat and nothing else
    assert torch.equal(base_terms["mse"], terms["mse"]) and torch.equal(base_terms["vb"], terms["vb"])
    assert torch.equal(terms["loss"], base_terms["loss"] + 0.25 * terms["feat"])
    assert torch.equal(plain.loss_fn(student, batch)[0], base_terms["loss"].mean())

    # the feature term's gradient reaches the student (and only it)
    student.zero_grad()
    terms["feat"].mean().backward()
    first = student.input_blocks[1][0].in_layers[2].weight.grad
    assert first is not None and first.abs().max() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_kd_is_refused_where_the_teacher_call_is_not_one_plain_batch(tmp_path):
    teacher = _teacher()
    with pytest.raises(ValueError, match="feature KD to --objective dkdm with an unguided teacher"):
        _loop(tmp_path / "step", teacher, _student(teacher), feature_kd_weight=1.0, objective="consistency")
    cond = create_model("digits-teacher", class_cond=True, num_classes=10, class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="feature KD to --objective dkdm with an unguided teacher"):
        student = create_model("digits-teacher", class_cond=True, num_classes=10)
        _loop(tmp_path / "guided", cond, student, feature_kd_weight=1.0, guidance_scale=2.0)


def test_student_init_names_a_checkpoint_only_when_it_is_a_path():
    assert [DistillConfig(student_init=s).student_checkpoint for s in ("", "random", "teacher")] == ["", "", ""]
    assert DistillConfig(student_init="runs/cut/student.pt").student_checkpoint == "runs/cut/student.pt"


def test_hooks_record_the_teacher_only_in_its_call_in_float32_and_say_what_is_missing():
    teacher = _teacher()
    student = _student(teacher)
    kd = FeatureKD(teacher, student, "down0,mid", 1.0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    with torch.no_grad():
        teacher(x, t)  # outside the step's teacher call (pool preparation, sampling): nothing recorded
    assert kd._teacher == {}
    with pytest.raises(RuntimeError, match="the teacher forward did not reach stage\\(s\\) down0, mid"):
        kd.teacher_targets()
    with kd.teacher_call(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        teacher(x, t)
    targets = kd.teacher_targets()
    assert set(targets) == {"teacher_feat.down0", "teacher_feat.mid"}
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in targets.values())
    with pytest.raises(RuntimeError, match="the student forward did not reach stage down0"):
        kd.terms(targets)
    with pytest.raises(ValueError, match="feature KD weight must be positive, got 0"):
        FeatureKD(teacher, student, "mid", 0.0)
    with pytest.raises(ValueError, match=r"available: none \(only the zoo UNet and ViT have named stages\)$"):
        FeatureKD(torch.nn.Linear(2, 2), student, "mid", 1.0)


def test_stages_of_a_ddp_wrapped_network_are_its_modules():
    net = create_model("digits-teacher")

    class Wrapped(torch.nn.Module):  # what DistributedDataParallel exposes: the network as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert stages(Wrapped(net)) == stages(net) and len(stages(net)) == 7
