"""``dkdm.models.winograd``, ``sample.py --winograd`` and ``--teacher_winograd``: Winograd F(4x4,3x3)
for CPU fp32 inference.

The switch changes how a 3x3 convolution's products are formed, never what it computes: exact in
float64, within fp32 rounding in fp32, used only where it applies (autograd off, fp32 on a CPU,
sides divisible by 4) and otherwise the layer's own forward, bit for bit.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkdm import dist, logger
from dkdm.config import ConfigError, DistillConfig, SampleConfig, TrainConfig
from dkdm.distill.loop import teacher_numerics
from dkdm.models import create_model
from dkdm.models.winograd import F4P, Winograd3x3, cook_toom, use_winograd, winograd_eligible
from tests.test_distill_loop import make_loop, tiny_teacher
from tests.test_sample import MAIN, TINY, _load, _run_dir

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
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3])
    with torch.inference_mode():
        want, got = model(x, t), wino(x, t)
    assert len(calls) == n3x3  # every 3x3 layer took the Winograd path
    assert 0 < (got - want).abs().max() < 1e-5  # other products, same convolution
    with torch.no_grad():
        assert (wino(x, t) - want).abs().max() < 1e-5 and len(calls) == 2 * n3x3
    calls.clear()
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
