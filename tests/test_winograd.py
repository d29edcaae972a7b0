"""``dkdm.models.winograd``: Winograd F(4x4,3x3) for CPU fp32 sampling (``sample.py --winograd``),
a distillation's teacher (``--teacher_winograd``) and training (the training scripts' ``--winograd``).

The switch changes how a 3x3 convolution's products are formed, never what it computes: exact in
float64 (forward and backward), within fp32 rounding in fp32, used only where it applies (fp32 on a
CPU, sides divisible by 4; under autograd only when asked for training, on calls with enough
tiles) and otherwise the layer's own forward, bit for bit.
"""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkdm import dist, logger
from dkdm.config import ConfigError, DistillConfig, SampleConfig, TrainConfig
from dkdm.distill.loop import teacher_numerics
from dkdm.models import create_model, winograd
from dkdm.models.winograd import F4P, Winograd3x3, _WinogradGrad, cook_toom, use_winograd, winograd_eligible
from tests.test_distill_loop import make_loop, tiny_teacher
from tests.test_sample import MAIN, TINY, _load, _run_dir
from tests.test_training import make, noisy_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cook_toom_builds_exact_transforms_and_refuses_repeated_points():
    mats = cook_toom([0.0, 1.0, -1.0, 0.5, -2.0], 4)
    assert [tuple(mats[k].shape) for k in ("BT", "G", "AT")] == [(6, 6), (6, 3), (4, 6)]
    d, g = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    direct = torch.stack([(d[i : i + 3] * g).sum() for i in range(4)])  # the 1-D correlation F(4,3) computes
    assert (mats["AT"] @ ((mats["G"] @ g) * (mats["BT"] @ d)) - direct).abs().max() < 1e-12
    assert all((mats[k] - F4P[k]).abs().max() < 1e-12 for k in mats)  # the library's matrices are these
    with pytest.raises(ValueError, match="distinct"):
        cook_toom([0.0, 1.0, 1.0, 0.5, -2.0], 4)


def test_the_f4p_convolution_is_exact_in_float64_and_writes_channels_last():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 12, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, w, b, padding=1)
    out = Winograd3x3(w, b)(x)
    assert (out - ref).abs().max() < 1e-12
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (Winograd3x3(w, b)(x.contiguous(memory_format=torch.channels_last)) - ref).abs().max() < 1e-12
    with pytest.raises(ValueError, match="divisible by 4"):
        Winograd3x3(w, b)(x[:, :, :6])


def _net(seed=0):
    torch.manual_seed(seed)
    model = create_model(TINY).eval()
    with torch.no_grad():  # zero-initialised output layers would hide the last convolution
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _calls(monkeypatch):
    calls = []
    real = Winograd3x3.__call__

    def counted(self, x):
        calls.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(Winograd3x3, "__call__", counted)
    return calls


def test_a_routed_network_matches_the_direct_one_and_falls_back_where_it_must(monkeypatch):
    model, wino = _net(), _net()
    n3x3 = sum(winograd_eligible(m) and min(m.in_channels, m.out_channels) >= 16 for m in model.modules())
    assert 0 < n3x3 == sum(winograd_eligible(m) for m in model.modules()) - 2  # the 1-in and 2-out ends stay direct
    assert use_winograd(wino) == n3x3 and use_winograd(wino) == n3x3  # idempotent
    assert type(wino.input_blocks[0][0]) is type(model.input_blocks[0][0])
    assert list(wino.state_dict()) == list(model.state_dict())
    calls = _calls(monkeypatch)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 3, 2])
    with torch.inference_mode():
        want, got = model(x, t), wino(x, t)
    assert len(calls) == n3x3  # every 3x3 layer took the Winograd path: 4 images of 8x8, 16 tiles
    assert 0 < (got - want).abs().max() < 1e-5  # other products, same convolution
    with torch.no_grad():
        assert (wino(x, t) - want).abs().max() < 1e-5 and len(calls) == 2 * n3x3
    calls.clear()
    with torch.inference_mode():  # 3 images: 12 tiles, under MIN_TILES, so the direct convolution, bit for bit
        assert torch.equal(wino(x[:3], t[:3]), model(x[:3], t[:3])) and not calls
        monkeypatch.setattr(winograd, "MIN_TILES", 12)  # the threshold is the one rule
        assert (wino(x[:3], t[:3]) - model(x[:3], t[:3])).abs().max() < 1e-5 and len(calls) == n3x3
    calls.clear()
    x, t = x[:3], t[:3]
    # Autograd on (training, a gradient through a sampler): the layers' own forward, bit for bit.
    out = wino(x, t)
    assert not calls and torch.equal(out, model(x, t))
    out.square().mean().backward()
    assert all(p.grad is not None for p in wino.parameters() if p.requires_grad)
    with torch.no_grad():  # sides not divisible by 4, and another dtype: also the layers' own forward
        assert torch.equal(wino(x[..., :6, :6], t), model(x[..., :6, :6], t)) and not calls
        conv = torch.nn.Conv2d(1, 4, 3, padding=1).double()
        use_winograd(conv, min_channels=1)
        assert torch.equal(conv(x.double()), F.conv2d(x.double(), conv.weight, conv.bias, padding=1)) and not calls


def test_a_weight_changed_in_place_is_transformed_again():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    assert use_winograd(conv) == 0 and use_winograd(conv, min_channels=4) == 1  # 4 and 6 channels: only when asked
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(2.0)  # what an optimizer step or load_state_dict does
        conv.bias.add_(1.0)
        again = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert (again - want).abs().max() < 1e-5 and (again - first).abs().max() > 0.1


def test_weights_made_under_inference_mode_keep_the_layers_own_forward(monkeypatch):
    """Inference tensors keep no version counter: a change in place would go unseen, so no cache."""
    calls = _calls(monkeypatch)
    with torch.inference_mode():
        conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        assert use_winograd(conv) == 1
        x = torch.randn(1, 16, 8, 8)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) and not calls


def test_channels_last_weights_and_inputs_give_the_same_convolution():
    """``--channels_last`` with ``--winograd``: the weights' memory order must not change the filter."""
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    want = F.conv2d(x, conv.weight, conv.bias, padding=1)
    use_winograd(conv.to(memory_format=torch.channels_last), min_channels=1)
    with torch.no_grad():
        got = conv(x.contiguous(memory_format=torch.channels_last))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and (got - want).abs().max() < 1e-5


def test_only_stride_1_padding_1_3x3_convolutions_are_eligible():
    assert winograd_eligible(torch.nn.Conv2d(4, 4, 3, padding=1))
    for conv in (
        torch.nn.Conv2d(4, 4, 3, padding=1, stride=2),  # the UNet's strided downsampling
        torch.nn.Conv2d(4, 4, 1),
        torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
        torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        torch.nn.Linear(4, 4),
    ):
        assert not winograd_eligible(conv)
    strided = torch.nn.Conv2d(4, 4, 3, padding=1, stride=2)
    assert use_winograd(strided) == 0 and type(strided) is torch.nn.Conv2d


def test_winograd_sampling_gives_the_standard_images_and_binds_its_shards(tmp_path, monkeypatch, capsys):
    ckpt = _run_dir(str(tmp_path / "run"))
    plain, wino = tmp_path / "plain.npz", tmp_path / "wino.npz"
    base = ["--model_path", ckpt, "--num_samples", "12", "--batch_size", "6", "--keep_shards", "true"]
    MAIN([*base, "--output", str(plain)])
    capsys.readouterr()
    calls = _calls(monkeypatch)
    MAIN([*base, "--output", str(wino), "--winograd", "true"])
    assert calls  # the sampler's forwards went through it
    # TINY's 3x3 layers: 1 -> 32 and 32 -> 2 left direct; the five ResBlocks' ten routed
    assert "winograd: 10 3x3 convolution(s) by F(4x4,3x3), the others direct" in capsys.readouterr().out
    diff = np.abs(_load(plain)["arr_0"].astype(int) - _load(wino)["arr_0"].astype(int))
    assert diff.max() <= 1  # rounding may move a pixel across a quantisation level, no further
    with open(str(wino)[:-4] + ".shards/manifest.json") as f:
        assert json.load(f)["sample"]["winograd"] == "F4p"
    with open(str(plain)[:-4] + ".shards/manifest.json") as f:
        assert "winograd" not in json.load(f)["sample"]  # manifests without the switch are what they were
    with pytest.raises(ValueError, match="sample.winograd: None there, 'F4p' now"):  # one output, one numerics
        MAIN([*base, "--output", str(plain), "--winograd", "true"])


def test_winograd_is_refused_where_it_would_not_run():
    for bad in ({"precision": "bf16"}, {"compile": True}):
        with pytest.raises(ConfigError, match="--winograd .* needs --precision fp32 and --compile false"):
            SampleConfig(winograd=True, **bad)
    SampleConfig(winograd=True)


def test_winograd_sampling_on_another_device_is_refused(tmp_path, monkeypatch):
    ckpt = _run_dir(str(tmp_path / "run"))
    monkeypatch.setattr(dist, "dev", lambda: torch.device("meta"))
    with pytest.raises(ConfigError, match="this run's network runs on meta: drop --winograd, or run on the CPU"):
        MAIN(["--model_path", ckpt, "--num_samples", "2", "--output", str(tmp_path / "x.npz"), "--winograd", "true"])
    assert not (tmp_path / "x.npz").exists()


def test_a_winograd_teacher_prepares_the_same_pool_but_not_from_the_same_cache(tmp_path, monkeypatch):
    """``--teacher_winograd``: the teacher's calls (pool preparation, every step's target) take the
    Winograd path; the pool it prepares is the plain one to fp32 rounding, under its own cache key."""
    assert teacher_numerics(DistillConfig(teacher_winograd=True), TrainConfig()) == "|teacher_winograd=F4p"
    cache = str(tmp_path / "cache")
    plain = make_loop(tmp_path / "plain", teacher=tiny_teacher(arch="unet"), pool_cache_dir=cache)
    plain.prepare_pool(progress=False)
    logger.reset()
    calls = _calls(monkeypatch)
    wino = make_loop(tmp_path / "wino", teacher=tiny_teacher(arch="unet"), pool_cache_dir=cache, teacher_winograd=True)
    with open(tmp_path / "wino" / "log.txt") as f:
        assert "teacher: 10 3x3 convolution(s) by Winograd F(4x4,3x3)" in f.read()
    wino.prepare_pool(progress=False)
    assert calls and wino.pool.prep_stats != {"cached": 1.0}  # prepared through it, not read from the plain pool
    torch.testing.assert_close(wino.pool.x, plain.pool.x, rtol=0, atol=1e-4)
    assert torch.equal(wino.pool.t, plain.pool.t)
    calls.clear()
    batch = wino.next_batch()
    assert calls  # the step's teacher call too
    loss, _ = wino.loss_fn(wino.trainer.ddp_model, batch)
    assert torch.isfinite(loss)
    assert not any(type(m).__name__.startswith("Winograd") for m in wino.student.modules())  # the teacher only


def test_a_winograd_teacher_is_refused_where_it_would_not_run(tmp_path):
    with pytest.raises(ConfigError, match="--teacher_winograd .* needs --teacher_precision fp32"):
        DistillConfig(teacher_winograd=True, teacher_precision="bf16")
    with pytest.raises(ConfigError, match="this run's network runs on cpu compiled: drop --teacher_winograd"):
        make_loop(tmp_path / "c", teacher=tiny_teacher(arch="unet"), teacher_winograd=True, compile=True)
    logger.reset()  # the refused loop's log.txt


# --------------------------------------------------------------------------- training (--winograd)


def test_the_training_path_is_the_exact_adjoint_in_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _WinogradGrad.apply(x, w, b, Winograd3x3(w, b)), (x, w, b))
    dy = torch.randn(2, 7, 8, 12, generator=g, dtype=torch.float64)
    out = _WinogradGrad.apply(x, w, b, Winograd3x3(w, b))
    got = torch.autograd.grad(out, (x, w, b), dy)
    want = torch.autograd.grad(F.conv2d(x, w, b, padding=1), (x, w, b), dy)
    assert all((p - q).abs().max() < 1e-11 for p, q in zip(got, want))
    # without a bias, and with only the weight asking for a gradient (a network's first layer)
    out = _WinogradGrad.apply(x.detach(), w, None, Winograd3x3(w, None))
    (gw,) = torch.autograd.grad(out, (w,), dy)
    assert (gw - torch.autograd.grad(F.conv2d(x.detach(), w, padding=1), (w,), dy)[0]).abs().max() < 1e-11


def _grads(model, x, t, dy):
    model.zero_grad(set_to_none=True)
    out = model(x, t)
    (out * dy).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_a_training_network_routes_the_calls_with_enough_tiles_and_keeps_the_direct_gradients(monkeypatch):
    model, wino = _net(), _net()
    assert use_winograd(wino, train=True) == 10
    applied = []
    real = _WinogradGrad.apply
    monkeypatch.setattr(_WinogradGrad, "apply", lambda x, *a: applied.append(tuple(x.shape)) or real(x, *a))
    t = torch.arange(16) % 4
    x, dy = torch.randn(16, 1, 8, 8), torch.randn(16, 2, 8, 8)
    want, want_g = _grads(model, x, t, dy)
    got, got_g = _grads(wino, x, t, dy)
    assert len(applied) == 10 and {s[0] * s[2] * s[3] for s in applied} == {16 * 64}  # 64 tiles: all routed
    assert 0 < (got - want).abs().max() < 1e-5
    for name, g in want_g.items():  # every parameter's gradient to fp32 rounding of its largest entry
        assert (got_g[name] - g).abs().max() <= 1e-5 * max(g.abs().max(), 1.0), name
    applied.clear()  # 3 images: 12 tiles, under MIN_TRAIN_TILES, so the direct convolution, bit for bit
    out, grads = _grads(wino, x[:3], t[:3], dy[:3])
    ref, ref_g = _grads(model, x[:3], t[:3], dy[:3])
    assert not applied and torch.equal(out, ref) and all(torch.equal(grads[n], g) for n, g in ref_g.items())
    monkeypatch.setattr(winograd, "MIN_TRAIN_TILES", 12)  # the threshold is the one rule
    _grads(wino, x[:3], t[:3], dy[:3])
    assert len(applied) == 10


class Convs16(torch.nn.Module):
    """A 16 -> 16 3x3 convolution between two thin ones: the layer a --winograd run routes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.b = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.norm(self.a(x))))))


def stream16():
    return {"x": torch.randn(16, 4, 8, 8)}  # 16 images of 8x8: 64 output tiles per call


def _logged(run_dir, key):
    with open(run_dir / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    return [float(r[key]) for r in rows]


def test_a_winograd_training_run_learns_like_the_direct_one_and_resumes_bitwise(tmp_path, monkeypatch):
    applied = []
    real = _WinogradGrad.apply
    monkeypatch.setattr(_WinogradGrad, "apply", lambda x, *a: applied.append(1) or real(x, *a))
    direct = make(tmp_path, "direct", model=Convs16(), max_steps=4, lr=1e-3, batch_size=16)
    direct.run(stream16, noisy_loss)
    logger.reset()
    straight = make(tmp_path, "straight", model=Convs16(), max_steps=4, lr=1e-3, batch_size=16, winograd=True)
    straight.run(stream16, noisy_loss)
    assert len(applied) == 4  # one routed layer, four steps
    with open(tmp_path / "straight" / "log.txt") as f:
        assert "winograd: 1 3x3 convolution(s) by F(4x4,3x3), forward and backward" in f.read()
    # Adam's steps move a weight by about lr whatever its gradient's size, so a tiny gradient's
    # rounding can flip a step: the logged losses are what must agree, and the weights to 2 lr a step.
    losses = [_logged(tmp_path / name, "loss") for name in ("direct", "straight")]
    assert len(losses[0]) == 2 and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0)
    for k, v in direct.model.state_dict().items():
        assert (straight.model.state_dict()[k] - v).abs().max() < 2 * 4 * 1e-3, k
    logger.reset()
    make(tmp_path, "resumed", model=Convs16(), max_steps=2, lr=1e-3, batch_size=16, winograd=True).run(
        stream16, noisy_loss
    )
    logger.reset()
    resumed = make(tmp_path, "resumed", model=Convs16(), max_steps=4, lr=1e-3, batch_size=16, winograd=True)
    assert resumed.step == 2
    resumed.run(stream16, noisy_loss)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    logger.reset()
    with pytest.raises(ConfigError, match=r"train\.winograd: True there, False now"):
        make(tmp_path, "resumed", model=Convs16(), max_steps=6, lr=1e-3, batch_size=16)


def test_winograd_training_is_refused_where_it_would_not_run(tmp_path, monkeypatch):
    for bad in ({"precision": "bf16"}, {"precision": "fp16"}, {"compile": True}):
        with pytest.raises(ConfigError, match="--winograd .* needs --precision fp32 and --compile false"):
            TrainConfig(winograd=True, **bad)
    monkeypatch.setattr(dist, "dev", lambda: torch.device("meta"))
    with pytest.raises(ConfigError, match="this run's network runs on meta: drop --winograd, or run on the CPU"):
        make(tmp_path, "meta", model=Convs16(), winograd=True)
    assert not (tmp_path / "meta" / "config.yaml").exists()  # refused before the run wrote anything


def test_a_distillation_with_winograd_routes_the_student_not_the_teacher(tmp_path, monkeypatch):
    applied = []
    real = _WinogradGrad.apply
    monkeypatch.setattr(_WinogradGrad, "apply", lambda x, *a: applied.append(tuple(x.shape)) or real(x, *a))
    teacher, student = tiny_teacher(arch="unet"), tiny_teacher(seed=4, arch="unet")
    loop = make_loop(tmp_path / "run", teacher=teacher, student=student, winograd=True)
    assert any(type(m).__name__.startswith("Winograd") for m in loop.student.modules())
    assert not any(type(m).__name__.startswith("Winograd") for m in loop.teacher.modules())
    loss, _ = loop.loss_fn(loop.trainer.ddp_model, loop.next_batch())
    loss.backward()
    assert applied and all(s[0] == 16 for s in applied)  # the student's batch of 16, forward and backward
    logger.reset()  # the loop's log.txt
