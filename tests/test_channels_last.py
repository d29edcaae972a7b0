"""``--channels_last`` / ``--teacher_channels_last``: NHWC weights for training, distillation and sampling.

The switch changes the order in which oneDNN sums the products, never the maths: every test
compares against the standard order to fp32 rounding, and checks what must not change at all
(the files a run writes, the parameters an optimiser holds, a resumed run's bits).
"""

import io
import os

import numpy as np
import pytest
import torch
from torch import nn

from dkdm import logger
from dkdm.config import ConfigError, DistillConfig, TrainConfig
from dkdm.distill.loop import teacher_numerics
from dkdm.models import create_model
from dkdm.training.compile import to_channels_last
from dkdm.training.trainer import _cpu
from tests.test_distill_loop import make_loop, tiny_teacher
from tests.test_sample import MAIN, _load, _run_dir
from tests.test_training import make, noisy_loss

pytestmark = pytest.mark.usefixtures("one_thread")

NHWC = torch.channels_last


@pytest.fixture(autouse=True)
def _reset():
    yield
    logger.reset()


class Convs(nn.Module):
    """Two 3x3 convolutions and a GroupNorm: the layers whose weights the switch reorders."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def convs() -> Convs:
    torch.manual_seed(7)  # the same initial weights for every run of a test
    return Convs()


def stream():
    return {"x": torch.randn(8, 4, 6, 6)}


def test_to_channels_last_reorders_4d_and_5d_tensors_in_place():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv3d(8, 4, 3), nn.Linear(4, 2), nn.BatchNorm2d(4))
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    assert to_channels_last(net) is net
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]  # optimisers built on them still hold
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b)  # values untouched
    assert net[0].weight.is_contiguous(memory_format=NHWC) and not net[0].weight.is_contiguous()
    assert net[1].weight.is_contiguous(memory_format=torch.channels_last_3d) and not net[1].weight.is_contiguous()
    assert net[2].weight.is_contiguous() and net[3].running_mean.is_contiguous()  # 2-D and 1-D: as they were


@pytest.mark.parametrize("name", ["digits-teacher", "digits-vit"])
def test_networks_give_the_standard_order_outputs_and_gradients(name):
    """The zoo's UNet (every block: resampling ResBlocks, attention, skip concatenation) and the
    ViT's patch embedding, forward and backward, to the library's fp32 tolerance."""
    torch.manual_seed(0)
    ref = create_model(name, dropout=0.0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    nhwc = create_model(name, dropout=0.0)
    nhwc.load_state_dict(ref.state_dict())
    to_channels_last(nhwc)
    x = torch.randn(3, ref.in_channels, 8, 8)
    t = torch.tensor([0, 4, 9])
    a, b = ref(x, t), nhwc(x, t)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    (a**2).sum().backward()
    (b**2).sum().backward()
    # To 1e-5 of the gradient's scale: a weight's gradient sums thousands of products, and some
    # (a bias just before a GroupNorm) are zero up to rounding, so no per-element bound holds.
    assert [p.grad is None for p in ref.parameters()] == [p.grad is None for p in nhwc.parameters()]
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
    g_nhwc = torch.cat([p.grad.flatten() for p in nhwc.parameters() if p.grad is not None])
    assert (g_ref - g_nhwc).abs().max() <= 1e-5 * g_ref.abs().max()
    if name == "digits-teacher":
        assert nhwc.input_blocks[0][0].weight.is_contiguous(memory_format=NHWC)


def test_training_matches_the_standard_order_and_writes_standard_files(tmp_path):
    plain = make(tmp_path, "plain", model=convs(), max_steps=4)
    plain.run(stream, noisy_loss)
    logger.reset()
    nhwc = make(tmp_path, "nhwc", model=convs(), max_steps=4, channels_last=True)
    assert nhwc.model.a.weight.is_contiguous(memory_format=NHWC)
    nhwc.run(stream, noisy_loss)
    assert nhwc.opt.state[nhwc.model.a.weight]["exp_avg"].is_contiguous(memory_format=NHWC)
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(nhwc.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        saved = torch.load(os.path.join(nhwc.run_dir, name), weights_only=True)
        assert all(v.is_contiguous() for v in saved.values()), name
    # Same weights, either order in memory: the same bytes on disk.
    as_saved = {}
    for order in (torch.contiguous_format, NHWC):
        net = Convs()
        net.load_state_dict(plain.model.state_dict())
        if order is NHWC:
            to_channels_last(net)
        buf = io.BytesIO()
        torch.save(_cpu(net.state_dict()), buf)
        as_saved[order] = buf.getvalue()
    assert as_saved[torch.contiguous_format] == as_saved[NHWC]


def test_a_resumed_channels_last_run_is_the_straight_run_bitwise(tmp_path):
    straight = make(tmp_path, "straight", model=convs(), max_steps=4, channels_last=True)
    straight.run(stream, noisy_loss)
    logger.reset()
    make(tmp_path, "resumed", model=convs(), max_steps=2, channels_last=True).run(stream, noisy_loss)
    logger.reset()
    resumed = make(tmp_path, "resumed", model=convs(), max_steps=4, channels_last=True)
    assert resumed.step == 2 and resumed.model.a.weight.is_contiguous(memory_format=NHWC)
    resumed.run(stream, noisy_loss)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for p, q in zip(straight.params, resumed.params):
        assert torch.equal(straight.opt.state[p]["exp_avg_sq"], resumed.opt.state[q]["exp_avg_sq"])


def test_resuming_with_the_switch_flipped_is_refused(tmp_path):
    make(tmp_path, "run", model=convs(), max_steps=2).run(stream, noisy_loss)
    logger.reset()
    with pytest.raises(ConfigError, match=r"train\.channels_last: False there, True now"):
        make(tmp_path, "run", model=convs(), max_steps=4, channels_last=True)


def test_teacher_numerics_name_what_changes_a_pools_bits():
    plain = teacher_numerics(DistillConfig(), TrainConfig())
    assert plain == ""  # a default teacher keeps the cache keys written before these switches
    assert teacher_numerics(DistillConfig(teacher_channels_last=True), TrainConfig()) == "|teacher_channels_last"
    assert teacher_numerics(DistillConfig(teacher_precision="bf16"), TrainConfig()) == "|teacher_precision=bf16"
    both = teacher_numerics(
        DistillConfig(teacher_precision="fp16", teacher_channels_last=True),
        TrainConfig(compile=True, compile_backend="aot_eager"),
    )
    assert both == "|teacher_precision=fp16|teacher_channels_last|compile=aot_eager"


def test_a_channels_last_teacher_prepares_the_same_pool_but_not_from_the_same_cache(tmp_path):
    cache = str(tmp_path / "cache")
    plain = make_loop(tmp_path / "plain", teacher=tiny_teacher(arch="unet"), pool_cache_dir=cache)
    plain.prepare_pool(progress=False)
    logger.reset()
    nhwc = make_loop(
        tmp_path / "nhwc", teacher=tiny_teacher(arch="unet"), pool_cache_dir=cache, teacher_channels_last=True
    )
    assert nhwc.teacher.input_blocks[0][0].weight.is_contiguous(memory_format=NHWC)
    nhwc.prepare_pool(progress=False)
    assert nhwc.pool.prep_stats != {"cached": 1.0}  # prepared, not read from the standard-order pool
    assert len([f for f in os.listdir(cache) if f.endswith(".pt") and ".partial" not in f]) == 2
    torch.testing.assert_close(nhwc.pool.x, plain.pool.x, rtol=0, atol=1e-4)
    assert torch.equal(nhwc.pool.t, plain.pool.t)
    batch = nhwc.next_batch()
    loss, _ = nhwc.loss_fn(nhwc.trainer.ddp_model, batch)
    assert torch.isfinite(loss)


def test_channels_last_sampling_gives_the_standard_images_and_binds_its_shards(tmp_path):
    ckpt = _run_dir(str(tmp_path / "run"))
    plain, nhwc = tmp_path / "plain.npz", tmp_path / "nhwc.npz"
    base = ["--model_path", ckpt, "--num_samples", "12", "--batch_size", "6", "--keep_shards", "true"]
    MAIN([*base, "--output", str(plain)])
    MAIN([*base, "--output", str(nhwc), "--channels_last", "true"])
    diff = np.abs(_load(plain)["arr_0"].astype(int) - _load(nhwc)["arr_0"].astype(int))
    assert diff.max() <= 1  # rounding may move a pixel across a quantisation level, no further
    with open(str(nhwc)[:-4] + ".shards/manifest.json") as f:
        assert '"channels_last": true' in f.read()
    with open(str(plain)[:-4] + ".shards/manifest.json") as f:
        assert "channels_last" not in f.read()  # standard-order manifests are what they were


def test_a_pool_cached_under_the_old_key_is_named_not_reused(tmp_path):
    """Caches written before the teacher's numerics joined the key (an fp16 teacher's, say) could
    come from either precision: the run prepares anew and says how to reuse the old file."""
    cache = str(tmp_path / "cache")

    def pools():
        return {f for f in os.listdir(cache) if f.endswith(".pt") and ".partial" not in f}

    make_loop(tmp_path / "old", teacher=tiny_teacher(arch="unet"), pool_cache_dir=cache).prepare_pool(progress=False)
    (old_file,) = pools()
    for run in ("new", "again"):
        logger.reset()
        loop = make_loop(
            tmp_path / run, teacher=tiny_teacher(arch="unet"), pool_cache_dir=cache, teacher_precision="bf16"
        )
        loop.prepare_pool(progress=False)
        with open(tmp_path / run / "log.txt") as f:
            log = f.read()
        if run == "new":
            assert loop.pool.prep_stats != {"cached": 1.0}
            (new_file,) = pools() - {old_file}
            assert f"pool: {os.path.join(cache, old_file)} is a prepared pool of this teacher" in log
            assert "numerics (teacher_precision=bf16) were part of the cache key" in log
            assert f"rename it to {new_file}" in log
        else:  # its own cache now exists: found, and nothing said of the old one
            assert loop.pool.prep_stats == {"cached": 1.0} and old_file not in log
