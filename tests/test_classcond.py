"""Class-conditional and classifier-free-guided DKDM: label distribution, null class, guided
teacher calls, w-conditioned students, refusals, guided sampling."""

import os
import runpy

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from dkdm import logger
from dkdm.config import ConfigError, DiffusionConfig, DistillConfig, ModelConfig, TrainConfig, to_dict
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop, check_conditioning
from dkdm.distill.pool import DynamicPool, classes_of_uniforms, read_class_weights
from dkdm.models import create_model
from dkdm.models.guidance import GuidanceError, Guided, WithScale, check_guidable, for_sampling, guide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusion(steps=T):
    return create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=True)


def _unet(seed=0, **kw):
    """A tiny digits UNet with non-zero output layers (ADM zero-initialises them)."""
    torch.manual_seed(seed)
    args = {"num_res_blocks": 1, "attention_resolutions": "", "dropout": 0.0, "channel_mult": "1"}
    m = create_model("digits-student", **{**args, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _vit(seed=1, **kw):
    torch.manual_seed(seed)
    m = create_model("digits-vit", hidden_size=32, depth=1, num_heads=2, **kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m


COND = {"class_cond": True, "num_classes": 5}
NULL = {**COND, "class_dropout_prob": 0.2}


# --------------------------------------------------------------------------- the class distribution


def _counts(labels, k):
    return np.bincount(np.asarray(labels), minlength=k)


def _within_standard_errors(counts, p, n, z=4.5):
    se = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= z * se + 1e-9), (counts, n * p, se)


def test_weighted_labels_at_start_and_on_restart():
    weights = np.array([1.0, 0.0, 2.0, 3.0, 4.0])
    p = weights / weights.sum()
    pool = DynamicPool(_diffusion(), (1, 2, 2), 400, rho=1.0, seed=1, num_classes=5, class_weights=weights)
    n = pool.size  # 4000 labels at the fresh start
    counts = _counts(pool.y.numpy(), 5)
    assert counts[1] == 0  # a class of weight 0 is never drawn
    _within_standard_errors(counts, p, n)
    # Every sample at t = 0 restarts with a fresh label from the same distribution.
    pool.t.zero_()
    restarted = []
    for _ in range(10):
        idx = pool.draw()
        pool.gather(idx)
        pool.update(idx, torch.zeros(400, 2, 2, 2))
        restarted.append(pool.y[idx].clone())
        pool.t.zero_()
    counts = _counts(torch.cat(restarted).numpy(), 5)
    assert counts[1] == 0
    _within_standard_errors(counts, p, 4000)


def test_uniform_labels_by_default():
    pool = DynamicPool(_diffusion(), (1, 2, 2), 500, rho=1.0, seed=2, num_classes=10)
    counts = _counts(pool.y.numpy(), 10)
    assert stats.chisquare(counts).pvalue > 1e-3
    _within_standard_errors(counts, np.full(10, 0.1), pool.size)


def test_weighted_labels_are_drawn_on_the_device_without_a_host_read():
    pool = DynamicPool(_diffusion(), (1, 2, 2), 8, rho=1.0, seed=2, num_classes=3, class_weights=[1, 1, 1])
    reads = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "tolist", "numpy", "__bool__", "__int__", "cpu"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Spy():
        y = pool._randy(64)
        idx = pool.draw()
        pool.update(idx, torch.zeros(8, 2, 2, 2))
    assert y.shape == (64,) and not reads


def test_class_weights_file_forms_and_refusals(tmp_path):
    np.save(tmp_path / "w.npy", np.array([1.0, 2.0, 0.0]))
    (tmp_path / "w.txt").write_text("1, 2\n0\n")
    for name in ("w.npy", "w.txt"):
        np.testing.assert_array_equal(read_class_weights(str(tmp_path / name), 3), [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="holds 3 weights but the teacher has 4 classes"):
        read_class_weights(str(tmp_path / "w.txt"), 4)
    (tmp_path / "neg.txt").write_text("1 -1 2")
    with pytest.raises(ValueError, match="non-negative"):
        read_class_weights(str(tmp_path / "neg.txt"), 3)
    (tmp_path / "zero.txt").write_text("0 0 0")
    with pytest.raises(ValueError, match="not all zero"):
        read_class_weights(str(tmp_path / "zero.txt"), 3)
    (tmp_path / "bad.txt").write_text("1 two 3")
    with pytest.raises(ValueError, match="cannot read 3 numbers"):
        read_class_weights(str(tmp_path / "bad.txt"), 3)


def test_class_weights_file_shapes_small_totals_and_no_pickles(tmp_path):
    np.save(tmp_path / "col.npy", np.array([[0.1], [0.2], [0.0]]))  # a column: flattened
    np.testing.assert_array_equal(read_class_weights(str(tmp_path / "col.npy"), 3), [0.1, 0.2, 0.0])
    (tmp_path / "small.txt").write_text("0.1 0.2 0")  # weights need not sum to 1 (or more)
    np.testing.assert_array_equal(read_class_weights(str(tmp_path / "small.txt"), 3), [0.1, 0.2, 0.0])
    # An object array needs pickle to load, and a pickle runs code: refused, not loaded.
    np.save(tmp_path / "obj.npy", np.array([1.0, 2.0, 3.0], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy: cannot read 3 numbers"):
        read_class_weights(str(tmp_path / "obj.npy"), 3)


def test_pool_class_weights_refused_one_fault_at_a_time():
    d = _diffusion()
    msg = "class_weights must be 3 finite non-negative numbers, not all zero"
    for bad in ([1.0, 2.0], [1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0], [1.0, -1.0, 2.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match=msg):
            DynamicPool(d, (1, 2, 2), 4, rho=1.0, num_classes=3, class_weights=bad)
    with pytest.raises(ValueError, match=r"without labels \(num_classes is None\)"):
        DynamicPool(d, (1, 2, 2), 4, rho=1.0, class_weights=[1.0, 1.0])
    # A column of small weights: flattened and normalised.
    pool = DynamicPool(d, (1, 2, 2), 4, rho=1.0, num_classes=3, class_weights=[[0.1], [0.2], [0.3]])
    np.testing.assert_allclose(pool.class_weights, [1 / 6, 2 / 6, 3 / 6])


def test_inverse_cdf_never_draws_a_class_of_weight_zero_at_the_boundaries():
    cdf = torch.tensor(np.cumsum([0.0, 0.5, 0.0, 0.5, 0.0]), dtype=torch.float32)  # [0, .5, .5, 1, 1]
    u = torch.tensor([0.0, 0.25, 0.4999999, 0.5, 0.75, 0.99999994, 1.0])
    # u = 0 lies on class 0's empty interval [0, 0) and u = 0.5 on class 2's: neither is drawn;
    # u = 1 (a float32 total that rounded below a draw) goes to the last class of weight > 0.
    assert classes_of_uniforms(cdf, u, last=3).tolist() == [1, 1, 1, 3, 3, 3, 3]


def test_class_draws_come_from_the_pools_own_seeded_stream():
    d = _diffusion()
    pools = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the global generator must not matter
        pools.append(DynamicPool(d, (1, 2, 2), 50, rho=1.0, seed=3, num_classes=4, class_weights=[1, 2, 3, 4]))
    assert torch.equal(pools[0].y, pools[1].y)
    torch.manual_seed(0)
    other = DynamicPool(d, (1, 2, 2), 50, rho=1.0, seed=4, num_classes=4, class_weights=[1, 2, 3, 4])
    assert not torch.equal(pools[0].y, other.y)


def test_restarted_samples_draw_fresh_guidance_scales_each():
    pool = DynamicPool(_diffusion(), (1, 2, 2), 400, rho=1.0, seed=1, num_classes=3, w_range=(1.0, 5.0))
    pool.t.zero_()  # every updated sample restarts from noise
    before = pool.w.clone()
    idx, rest = pool._all[:400], pool._all[400:]
    pool.gather(idx)
    pool.update(idx, torch.zeros(400, 2, 2, 2))
    fresh = pool.w[idx]
    assert fresh.unique().numel() == 400 and not torch.equal(fresh, before[idx])
    assert stats.kstest(((fresh - 1.0) / 4.0).numpy(), "uniform").pvalue > 1e-3
    assert torch.equal(pool.w[rest], before[rest])  # samples not drawn keep theirs


def test_pool_cache_key_and_state_carry_weights_and_scales():
    d = _diffusion()
    plain = DynamicPool(d, (1, 2, 2), 4, rho=1.0, num_classes=3)
    weighted = DynamicPool(d, (1, 2, 2), 4, rho=1.0, num_classes=3, class_weights=[1, 2, 3])
    ranged = DynamicPool(d, (1, 2, 2), 4, rho=1.0, num_classes=3, w_range=(0.0, 4.0))
    keys = {p.cache_key("t") for p in (plain, weighted, ranged)}
    assert len(keys) == 3
    state = ranged.state_dict()
    assert state["w"].shape == (ranged.size,) and 0 <= state["w"].min() and state["w"].max() <= 4
    other = DynamicPool(d, (1, 2, 2), 4, rho=1.0, num_classes=3, w_range=(0.0, 4.0), seed=9)
    other.load_state_dict(state)
    assert torch.equal(other.w, ranged.w) and torch.equal(other.y, ranged.y)


# --------------------------------------------------------------------------- the null class


def test_unet_null_class_keeps_guided_diffusion_layout_without_dropout():
    plain = create_model("digits-student", **COND)
    assert plain.label_emb.weight.shape[0] == 5 and plain.null_class is None
    withnull = create_model("digits-student", **NULL)
    assert withnull.label_emb.weight.shape[0] == 6 and withnull.null_class == 5
    assert set(plain.state_dict()) == set(withnull.state_dict())
    wcond = create_model("digits-student", guidance_cond=True)
    assert {k for k in wcond.state_dict() if k not in plain.state_dict()} == {
        "guidance_embed.0.weight",
        "guidance_embed.0.bias",
        "guidance_embed.2.weight",
        "guidance_embed.2.bias",
    }


@pytest.mark.parametrize("build", [_unet, _vit])
def test_label_dropout_in_training_only(build):
    m = build(**NULL)
    x, t = torch.randn(400, 1, 8, 8), torch.full((400,), 3)
    y = torch.full((400,), 2)
    null = torch.full((400,), 5)
    m.eval()
    with torch.no_grad():
        out_y, out_null = m(x, t, y), m(x, t, null)
        torch.manual_seed(0)
        m.train()
        got = m(x, t, y)
    dropped = torch.isclose(got, out_null, atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(got, out_y, atol=1e-5).flatten(1).all(1)
    assert bool((dropped ^ kept).all())
    # 400 draws at p = 0.2: 80 +- 8 expected; 4.5 standard errors either side.
    assert abs(int(dropped.sum()) - 80) <= 4.5 * (400 * 0.2 * 0.8) ** 0.5


@pytest.mark.parametrize("build", [_unet, _vit])
def test_w_conditioning_starts_neutral_and_is_required(build):
    base, wc = build(seed=3, **COND), build(seed=3, **COND, guidance_cond=True)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="guidance scale w must be given"):
        wc(x, t, y)
    with pytest.raises(ValueError, match="guidance scale w must be given"):
        base(x, t, y, w=torch.ones(4))
    fresh = create_model(wc.config)  # zero-initialised w branch: w changes nothing yet
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y, w=torch.zeros(4)), fresh(x, t, y, w=torch.full((4,), 7.0)))
        assert not torch.equal(wc(x, t, y, w=torch.zeros(4)), wc(x, t, y, w=torch.full((4,), 7.0)))


# --------------------------------------------------------------------------- guidance


class LabelNet(torch.nn.Module):
    """A float64 network whose output depends on x, t and y: out = x * a[y] + b[y] t (per channel)."""

    def __init__(self, learn_sigma):
        super().__init__()
        self.num_classes, self.null_class = 5, 5
        g = torch.Generator().manual_seed(0)
        self.k = 2 if learn_sigma else 1
        self.a = torch.randn(6, self.k, dtype=torch.float64, generator=g)
        self.b = torch.randn(6, self.k, dtype=torch.float64, generator=g)

    def forward(self, x, t, y):
        a, b = self.a[y][:, :, None, None], self.b[y][:, :, None, None]
        return x.repeat(1, self.k, 1, 1) * a + b * t.double().view(-1, 1, 1, 1)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_guided_output_matches_a_float64_reference(learn_sigma):
    m = LabelNet(learn_sigma)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 3, 5, 7, 9])
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.tensor([0.0, 1.0, 1.5, 3.0, -0.5, 7.0], dtype=torch.float64)
    with torch.no_grad():
        cond = m(x, t, y).numpy()
        uncond = m(x, t, torch.full_like(y, 5)).numpy()
        got = Guided(m)(x, t, y, w).numpy()
    wv = w.numpy()[:, None, None, None]
    want_pred = uncond[:, :1] + wv * (cond[:, :1] - uncond[:, :1])  # (1 - w) eps_u + w eps_c
    np.testing.assert_allclose(got[:, :1], want_pred, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1, :1], cond[1, :1], rtol=1e-12, atol=1e-12)  # w = 1: the conditional model
    np.testing.assert_allclose(got[0, :1], uncond[0, :1], rtol=1e-12, atol=1e-12)  # w = 0: the unconditional one
    if learn_sigma:  # variance channels: the conditional pass's
        np.testing.assert_array_equal(got[:, 1:], cond[:, 1:])
    else:
        assert got.shape == (6, 1, 8, 8)
    # A scalar w is the same as that w for every sample.
    with torch.no_grad():
        np.testing.assert_allclose(
            Guided(m, 2.5)(x, t, y).numpy(), Guided(m)(x, t, y, torch.full((6,), 2.5, dtype=torch.float64)).numpy()
        )


def test_half_precision_outputs_are_combined_in_float32():
    class Half(LabelNet):
        def forward(self, x, t, y):
            return super().forward(x, t, y).to(torch.bfloat16)

    m = Half(True)
    x, t, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    got = Guided(m, 4.0)(x, t, y)
    both = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 5)])).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, guide(both, 4.0, 1), rtol=0, atol=0)


def test_guide_commutes_with_the_x0_conversion():
    d = _diffusion()
    x, t = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 3, 5, 8])
    eps = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    x0 = d.predict_xstart_from_eps(torch.cat([x, x]), torch.cat([t, t]), eps)
    w = torch.tensor([0.0, 1.0, 2.0, 4.5], dtype=torch.float64)
    a = d.predict_xstart_from_eps(x, t, guide(eps, w, 1))
    torch.testing.assert_close(a, guide(x0, w, 1), rtol=1e-10, atol=1e-10)


def test_guidance_refusals():
    with pytest.raises(GuidanceError, match="unconditional"):
        Guided(_unet())
    with pytest.raises(GuidanceError, match="null class"):
        Guided(_unet(**COND))
    with pytest.raises(GuidanceError, match="null class"):
        for_sampling(_unet(**COND), 3.0)
    plain = _unet(**COND)
    assert for_sampling(plain, 1.0) is plain
    assert isinstance(for_sampling(_unet(**NULL), 3.0), Guided)
    wrapped = for_sampling(_unet(**COND, guidance_cond=True), 2.0)
    assert isinstance(wrapped, WithScale)
    seen = {}
    wrapped.model.register_forward_hook(lambda mod, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        wrapped(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), y=torch.tensor([0, 1, 2]))
    assert torch.equal(seen["w"], torch.full((3,), 2.0))


def test_guidance_defaults_and_refusals_word_for_word():
    m = LabelNet(True)
    x, t, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 2, 3]), torch.tensor([0, 4, 2])
    with torch.no_grad():  # the default scale 1 is the conditional model
        torch.testing.assert_close(Guided(m)(x, t, y), m(x, t, y), rtol=1e-12, atol=1e-12)
    assert for_sampling(m) is m
    plain = torch.nn.Linear(2, 2)  # says nothing about guidance_cond: not w-conditioned
    assert for_sampling(plain) is plain
    with pytest.raises(GuidanceError) as e:
        check_guidable(plain)
    assert str(e.value) == (
        "--guidance_scale needs a class-conditional teacher, but this teacher is unconditional (class_cond false); "
        "drop --guidance_scale"
    )
    with pytest.raises(GuidanceError, match=r"^--guidance_scale needs a class-conditional model, but this model is"):
        for_sampling(_unet(), 3.0)
    with pytest.raises(GuidanceError, match=r"needs a student trained with label dropout .* this student has none"):
        Guided(_unet(**COND), who="student")
    with pytest.raises(
        GuidanceError, match=r"^--guidance_scale needs a class-conditional teacher, but this teacher is"
    ):
        Guided(_unet())
    # the variance channels come from the conditional half whatever the image's size
    out = torch.randn(4, 6, 2, 2)
    assert torch.equal(guide(out, 2.0, 3)[:, 3:], out[:2, 3:])


# --------------------------------------------------------------------------- the loop


def _loop(run_dir, teacher, student, **distill):
    d = _diffusion()
    logger.configure(str(run_dir), format_strs=["log"])
    train = TrainConfig(batch_size=8, lr=1e-3, max_steps=3, log_interval=0, save_interval=0, ema_rate="0.9")
    cfg = DistillConfig(rho=0.5, teacher_batch=32, pool_cache_dir=str(run_dir / "cache"), **distill)
    return DistillLoop(teacher, student, d, d, train=train, distill=cfg, run_dir=str(run_dir))


def test_conditioning_refusals_name_the_flags():
    cfg = DistillConfig()
    with pytest.raises(ValueError, match="--student.class_cond true --student.num_classes 5"):
        check_conditioning(_unet(**COND), _unet(), cfg)
    with pytest.raises(ValueError, match="--student.class_cond false"):
        check_conditioning(_unet(), _unet(**COND), cfg)
    with pytest.raises(ValueError, match="teacher has 5 classes but the student 7; set --student.num_classes 5"):
        check_conditioning(_unet(**COND), _unet(class_cond=True, num_classes=7), cfg)
    with pytest.raises(ValueError, match="--student.class_dropout_prob 0"):
        check_conditioning(_unet(**NULL), _unet(**NULL), cfg)
    with pytest.raises(ValueError, match="--class_weights w.txt needs a class-conditional teacher"):
        check_conditioning(_unet(), _unet(), DistillConfig(class_weights="w.txt"))
    with pytest.raises(GuidanceError, match="--guidance_scale needs a class-conditional teacher"):
        check_conditioning(_unet(), _unet(), DistillConfig(guidance_scale=3.0))
    with pytest.raises(GuidanceError, match="without|null class"):
        check_conditioning(_unet(**COND), _unet(**COND), DistillConfig(guidance_scale=3.0))
    wstudent = _unet(**COND, guidance_cond=True)
    with pytest.raises(ValueError, match="set --w_min < --w_max"):
        check_conditioning(_unet(**NULL), wstudent, cfg)
    with pytest.raises(ValueError, match="drop --guidance_scale"):
        check_conditioning(_unet(**NULL), wstudent, DistillConfig(guidance_scale=2.0, w_min=0, w_max=4))
    with pytest.raises(ValueError, match="--student.guidance_cond true"):
        check_conditioning(_unet(**NULL), _unet(**COND), DistillConfig(w_min=0, w_max=4))
    with pytest.raises(ConfigError, match="--w_min 3 lies above --w_max 1"):
        DistillConfig(w_min=3, w_max=1)
    assert check_conditioning(_unet(**NULL), wstudent, DistillConfig(w_min=1, w_max=4)) == (5, (1.0, 4.0))
    assert check_conditioning(_unet(**NULL), _unet(**COND), DistillConfig(guidance_scale=3)) == (5, None)


def test_conditioning_refusals_say_which_side_is_which_word_for_word():
    cfg = DistillConfig()

    def message(teacher, student, distill=cfg):
        with pytest.raises(ValueError) as e:
            check_conditioning(teacher, student, distill)
        return str(e.value)

    assert message(_unet(**COND), _unet()) == (
        "the teacher is class-conditional but the student is not; set --student.class_cond true --student.num_classes 5"
    )
    assert message(_unet(), _unet(**COND)) == (
        "the teacher is unconditional but the student is; set --student.class_cond false"
    )
    assert message(_unet(**NULL), _unet(**NULL)) == (
        "the student drops labels to a null class (class_dropout_prob > 0), but DKDM gives it the teacher's "
        "output for the pool's label; set --student.class_dropout_prob 0"
    )
    wstudent = _unet(**COND, guidance_cond=True)
    assert message(_unet(**NULL), wstudent, DistillConfig(guidance_scale=2.0, w_min=0, w_max=4)) == (
        "--guidance_scale is one w for a plain student; a w-conditioned student learns --w_min..--w_max: "
        "drop --guidance_scale"
    )
    # The guidance check names the flag that asked for guidance.
    assert message(_unet(**COND), wstudent, DistillConfig(w_min=0, w_max=4)).startswith(
        "--w_min/--w_max needs a teacher trained with label dropout"
    )
    assert message(_unet(**COND), _unet(**COND), DistillConfig(guidance_scale=3.0)).startswith(
        "--guidance_scale needs a teacher trained with label dropout"
    )


def test_guidance_is_checked_on_a_teacher_that_does_not_say_whether_it_takes_w():
    """A foreign teacher (a wrapper without ``guidance_cond``) is not assumed to take w: it needs a null class."""

    class Wrapper(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.num_classes = net, net.num_classes

        def forward(self, x, t, y=None):
            return self.net(x, t, y)

    bare = Wrapper(_unet(**COND))
    assert not hasattr(bare, "guidance_cond") and not hasattr(bare, "null_class")
    with pytest.raises(GuidanceError, match="--guidance_scale needs a teacher trained with label dropout"):
        check_conditioning(bare, _unet(**COND), DistillConfig(guidance_scale=3.0))


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda mod, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    return calls


def test_guided_teacher_one_doubled_call_per_step_feeds_target_and_pool(tmp_path):
    teacher, student = _unet(**NULL), _vit(**COND)
    loop = _loop(tmp_path, teacher, student, guidance_scale=3.0)
    loop.prepare_pool(progress=False)
    calls = _count_calls(loop.teacher)
    y0 = loop.pool.y.clone()
    stepped = {}
    real_update = loop.pool.update

    def update(idx, out):
        stepped["out"] = out
        return real_update(idx, out)

    loop.pool.update = update
    batch = loop.next_batch()
    assert len(calls) == 1  # one teacher call ...
    (x2, t2), kw, _ = calls[0]
    assert torch.equal(t2[:8], t2[8:])
    assert x2.shape[0] == 16 and torch.equal(kw["y"][:8], batch["y"]) and bool((kw["y"][8:] == 5).all())
    with torch.no_grad():  # ... whose guided output is the target and what the pool advanced with
        ts = loop.teacher_diffusion.model_timesteps(batch["t"])
        c = teacher(batch["x_t"], ts, batch["y"])
        u = teacher(batch["x_t"], ts, torch.full_like(batch["y"], 5))
    want = torch.cat([u[:, :1] + 3.0 * (c[:, :1] - u[:, :1]), c[:, 1:]], 1)
    torch.testing.assert_close(batch["teacher_out"], want, rtol=1e-4, atol=1e-5)
    assert stepped["out"] is batch["teacher_out"]
    assert torch.equal(loop.pool.y[loop.pool.t != loop.pool.T - 1], y0[loop.pool.t != loop.pool.T - 1])
    # The student gets the labels, and learns.
    assert loop.run(progress=False) == 3


def test_w_conditioned_student_gets_each_samples_w_and_its_guided_target(tmp_path):
    teacher, student = _unet(**NULL), _unet(seed=4, **COND, guidance_cond=True)
    loop = _loop(tmp_path, teacher, student, w_min=1.0, w_max=5.0)
    prep_calls = _count_calls(loop.teacher)
    loop.prepare_pool(progress=False)
    for args, kw, _ in prep_calls:  # the preparation's calls are doubled too, with each lane's w
        n = kw["y"].shape[0] // 2
        assert args[0].shape[0] == 2 * n and bool((kw["y"][n:] == 5).all())
    assert prep_calls
    w = loop.pool.w
    assert float(w.min()) >= 1.0 and float(w.max()) <= 5.0
    assert stats.kstest(((w - 1) / 4).numpy(), "uniform").pvalue > 1e-3
    calls = _count_calls(loop.teacher)
    batch = loop.next_batch()
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 16
    with torch.no_grad():
        ts = loop.teacher_diffusion.model_timesteps(batch["t"])
        c = teacher(batch["x_t"], ts, batch["y"])
        u = teacher(batch["x_t"], ts, torch.full_like(batch["y"], 5))
    wv = batch["w"].view(-1, 1, 1, 1)
    want = torch.cat([u[:, :1] + wv * (c[:, :1] - u[:, :1]), c[:, 1:]], 1)
    torch.testing.assert_close(batch["teacher_out"], want, rtol=1e-4, atol=1e-5)
    seen = _count_calls(student)
    loop.loss_fn(student, batch)
    assert seen and torch.equal(seen[-1][1]["w"], batch["w"]) and torch.equal(seen[-1][1]["y"], batch["y"])
    # Restarted samples draw a fresh w inside the range.
    loop.pool.t.zero_()
    idx = loop.pool.draw()
    before = loop.pool.w[idx].clone()
    loop.pool.gather(idx)
    loop.pool.update(idx, torch.zeros(8, 2, 8, 8))
    after = loop.pool.w[idx]
    assert not torch.equal(before, after) and float(after.min()) >= 1.0 and float(after.max()) <= 5.0


def test_guided_pool_cache_is_not_the_plain_one(tmp_path):
    teacher = _unet(**NULL)
    a = _loop(tmp_path / "a", teacher, _vit(**COND))
    a.prepare_pool(progress=False)
    b = _loop(tmp_path / "a2", teacher, _vit(**COND), guidance_scale=2.0)
    b.cfg.pool_cache_dir = a.cfg.pool_cache_dir
    b.prepare_pool(progress=False)
    assert b.pool.prep_stats.get("cached") != 1.0
    assert len([f for f in os.listdir(a.cfg.pool_cache_dir) if f.endswith(".pt")]) == 2


# --------------------------------------------------------------------------- sampling


def _ckpt(root, model_cfg):
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(model_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = os.path.join(root, "ema_0.9_000001.pt")
    torch.save(model.state_dict(), path)
    diff = DiffusionConfig(steps=4, noise_schedule="cosine", learn_sigma=True)
    with open(os.path.join(root, "config.yaml"), "w") as f:
        yaml.safe_dump({"model": to_dict(model_cfg), "diffusion": to_dict(diff), "train": {}}, f)
    return path


TINY = ModelConfig(
    arch="unet",
    image_size=8,
    in_channels=1,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1",
    attention_resolutions="",
    learn_sigma=True,
    num_heads=1,
    class_cond=True,
    num_classes=4,
)


def test_sample_script_guidance_scale(tmp_path, capsys):
    main = runpy.run_path(os.path.join(ROOT, "scripts", "sample.py"))["main"]
    guided = _ckpt(str(tmp_path / "g"), ModelConfig(**{**to_dict(TINY), "class_dropout_prob": 0.1}))
    wcond = _ckpt(str(tmp_path / "w"), ModelConfig(**{**to_dict(TINY), "guidance_cond": True}))
    plain = _ckpt(str(tmp_path / "p"), TINY)
    out = {}
    for name, ckpt, w in [("g1", guided, 1.0), ("g3", guided, 3.0), ("w1", wcond, 1.0), ("w3", wcond, 3.0)]:
        path = tmp_path / f"{name}.npz"
        main(
            ["--model_path", ckpt, "--num_samples", "6", "--batch_size", "6", "--output", str(path)]
            + ["--guidance_scale", str(w)]
        )
        with np.load(path) as z:
            out[name] = (z["arr_0"], z["arr_1"])
    assert all(o[1].shape == (6,) and o[1].max() < 4 for o in out.values())
    assert np.array_equal(out["g1"][1], out["g3"][1])  # same labels, other images
    assert not np.array_equal(out["g1"][0], out["g3"][0]) and not np.array_equal(out["w1"][0], out["w3"][0])
    with pytest.raises(GuidanceError, match="null class"):
        main(
            ["--model_path", plain, "--num_samples", "2", "--output", str(tmp_path / "x.npz"), "--guidance_scale", "2"]
        )


# --------------------------------------------------------------------------- user-given labels


def test_training_labels_outside_the_classes_are_refused(tmp_path):
    from dkdm.data import load_data
    from dkdm.data.images import DataError

    with pytest.raises(DataError, match=r"labels run from 0 to 9, outside \[0, 5\).*set --num_classes 10"):
        load_data(dataset="digits", batch_size=4, image_size=8, class_cond=True, num_classes=5, rank=0, world_size=1)
    load_data(dataset="digits", batch_size=4, image_size=8, class_cond=True, num_classes=10, rank=0, world_size=1)
    np.savez(tmp_path / "d.npz", arr_0=np.zeros((3, 8, 8, 1), np.uint8), arr_1=np.array([0, -1, 2]))
    with pytest.raises(DataError, match="labels must be >= 0"):
        load_data(data_dir=str(tmp_path / "d.npz"), batch_size=1, image_size=8, class_cond=True, num_classes=3)


# --------------------------------------------------------------------------- the shipped teacher


def test_embedded_class_conditional_teacher_follows_labels_and_guidance():
    from dkdm import digits_metric
    from dkdm.data.arrays import to_uint8
    from dkdm.resolve import ASSETS, resolve

    path = os.path.join(ASSETS, "digits_teacher_cond.pt")
    assert os.path.getsize(path) <= 2 * 2**20
    net = resolve({}, {"timestep_respacing": "ddim10"}, checkpoint=path)
    model = net.build().eval()
    assert model.num_classes == 10 and model.null_class == 10
    diffusion = net.create_diffusion()
    classifier = digits_metric.load_classifier()
    y = torch.arange(100) % 10
    acc = {}
    for w in (0.0, 1.0, 3.0):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x = diffusion.ddim_sample_loop(
                for_sampling(model, w),
                (100, 1, 8, 8),
                noise=torch.randn(100, 1, 8, 8, generator=g),
                model_kwargs={"y": y},
            )
        probs = digits_metric.activations(to_uint8(x), classifier).probs
        acc[w] = float((probs.argmax(1) == y.numpy()).mean())
    # Unconditional (w = 0): chance level; conditional: the requested digit; guided: more so.
    assert acc[0.0] < 0.35 and acc[1.0] > 0.85 and acc[3.0] >= acc[1.0] - 0.02, acc


def test_class_weights_flag_reaches_the_pool(tmp_path):
    np.save(tmp_path / "w.npy", np.array([0.0, 1.0, 0.0, 3.0, 0.0]))
    loop = _loop(tmp_path, _unet(**COND), _vit(**COND), class_weights=str(tmp_path / "w.npy"))
    np.testing.assert_allclose(loop.pool.class_weights, [0, 0.25, 0, 0.75, 0])
    assert set(loop.pool.y.tolist()) <= {1, 3}
    with pytest.raises(ValueError, match="holds 5 weights but the teacher has 7 classes"):
        _loop(
            tmp_path / "b",
            _unet(class_cond=True, num_classes=7),
            _vit(class_cond=True, num_classes=7),
            class_weights=str(tmp_path / "w.npy"),
        )


def test_the_sampling_manifest_records_the_guidance_scale():
    from dkdm import sampling
    from dkdm.config import SampleConfig

    a = sampling.make_manifest(TINY, DiffusionConfig(), SampleConfig(num_samples=4, batch_size=4), "x", "cpu")
    b = sampling.make_manifest(
        TINY, DiffusionConfig(), SampleConfig(num_samples=4, batch_size=4, guidance_scale=3.0), "x", "cpu"
    )
    assert a["sample"]["guidance_scale"] == 1.0 and b["sample"]["guidance_scale"] == 3.0
