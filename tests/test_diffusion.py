"""Gaussian diffusion maths: schedules, forward process, posterior, reverse process, losses."""

import math

import numpy as np
import pytest
import torch

from dkdm.config import ConfigError, DiffusionConfig, from_dict, load_yaml
from dkdm.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    normal_kl,
)
from dkdm.diffusion.losses import approx_standard_normal_cdf

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))

MEAN_TYPES = list(ModelMeanType)
VAR_TYPES = list(ModelVarType)


def make(
    steps=20, schedule="cosine", mean=ModelMeanType.EPSILON, var=ModelVarType.FIXED_LARGE, loss=LossType.MSE, **kw
):
    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, steps), model_mean_type=mean, model_var_type=var, loss_type=loss, **kw
    )


class SmoothModel(torch.nn.Module):
    """A tiny deterministic, smooth function of (x, t) with 1 or 2 output groups."""

    def __init__(self, channels=1, learned=False, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(0.3 * torch.randn(channels, channels, generator=g, dtype=dtype))
        self.learned = learned

    def forward(self, x, t):
        tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        h = torch.einsum("oc,bc...->bo...", self.w, torch.tanh(x)) * (1 + 0.001 * tt)
        if self.learned:
            return torch.cat([h, torch.tanh(0.5 * x + 0.01 * tt)], dim=1)
        return h


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_endpoints_and_scaling():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.all(np.diff(b) > 0)
    b100 = get_named_beta_schedule("linear", 100)  # scaled by 1000/100, as guided-diffusion does
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_cosine_schedule_matches_alpha_bar_and_is_capped():
    T = 1000
    b = get_named_beta_schedule("cosine", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert b.max() <= 0.999 and b[-1] == 0.999  # the last step is singular without the cap
    assert np.all(b > 0) and np.all(np.diff(b) >= 0)
    ac = np.cumprod(1 - b)
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    np.testing.assert_allclose(ac[:-1], expected[:-1], rtol=1e-9)
    assert b[0] == pytest.approx(1 - f(1 / T) / f(0), rel=1e-12)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'.*linear, cosine"):
        get_named_beta_schedule("cosin", 10)
    with pytest.raises(ValueError, match="linear schedule needs more than 20 steps"):
        get_named_beta_schedule("linear", 10)


def test_schedule_lengths_and_explicit_ends_at_their_bounds():
    assert get_named_beta_schedule("cosine", 1).shape == (1,)  # one step is a (short) process
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="must be a positive integer"):
            get_named_beta_schedule("cosine", bad)
    assert get_named_beta_schedule("linear", 21)[-1] == pytest.approx(20 / 21)  # the fewest linear steps
    with pytest.raises(ValueError, match="more than 20 steps"):
        get_named_beta_schedule("linear", 20)
    np.testing.assert_array_equal(get_named_beta_schedule("linear:0.01,0.01", 5), np.full(5, 0.01))  # START = END
    for bad in ("linear:0,0.02", "linear:0.01,1", "linear:0.5,1.5", "linear:0.02,0.01"):
        with pytest.raises(ValueError, match="need 0 < START <= END < 1"):
            get_named_beta_schedule(bad, 10)
    with pytest.raises(ValueError, match=r"write scaled_linear:START,END, e\.g\. scaled_linear:0\.0001,0\.02"):
        get_named_beta_schedule("scaled_linear:0.001:0.02", 10)


# ----------------------------------------------------------------------------- forward process


def test_posterior_is_bayes_rule_float64():
    d = make(steps=50, schedule="linear")
    B = 64
    x0 = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    xt = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    t = torch.randint(1, d.num_timesteps, (B,))
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    assert mean.dtype == var.dtype == torch.float64 and var.shape == x0.shape

    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), a product of Gaussians in x_{t-1}.
    beta = torch.from_numpy(d.betas)[t].view(-1, 1, 1, 1)
    abar_prev = torch.from_numpy(np.cumprod(1 - d.betas))[t - 1].view(-1, 1, 1, 1)
    prec = (1 - beta) / beta + 1 / (1 - abar_prev)
    want_var = 1 / prec
    want_mean = want_var * (torch.sqrt(1 - beta) * xt / beta + torch.sqrt(abar_prev) * x0 / (1 - abar_prev))
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, want_var.expand_as(var), rtol=1e-12, atol=0)
    torch.testing.assert_close(logvar, torch.log(want_var).expand_as(var), rtol=1e-12, atol=1e-12)

    # At t = 0 the posterior collapses onto x_0.
    t0 = torch.zeros(B, dtype=torch.long)
    mean0, var0, _ = d.q_posterior_mean_variance(x0, xt, t0)
    torch.testing.assert_close(mean0, x0, rtol=1e-14, atol=1e-14)
    assert torch.all(var0 == 0)


def test_q_sample_moments():
    d = make(steps=10, schedule="cosine")
    N = 40000
    x0 = torch.full((N, 1), 0.7, dtype=torch.float64)
    for step in (0, 4, 9):
        t = torch.full((N,), step, dtype=torch.long)
        xt = d.q_sample(x0, t)
        ab = np.cumprod(1 - d.betas)[step]
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=4 / math.sqrt(N))
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.05)
        m, v, lv = d.q_mean_variance(x0[:2], t[:2])
        torch.testing.assert_close(m, math.sqrt(ab) * x0[:2])
        torch.testing.assert_close(v, torch.full_like(v, 1 - ab))
        torch.testing.assert_close(lv, torch.full_like(v, math.log(1 - ab)))
    noise = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 9])
    xt = d.q_sample(torch.zeros(5, 2, dtype=torch.float64), t, noise=noise)
    torch.testing.assert_close(xt, noise * torch.from_numpy(d.sqrt_one_minus_alphas_cumprod)[t][:, None])


def test_coefficients_follow_input_dtype_and_are_cached():
    d = make()
    t = torch.tensor([0, 5])
    x32 = torch.randn(2, 1, 2, 2)
    assert d.q_sample(x32, t).dtype == torch.float32
    assert d.q_sample(x32.double(), t).dtype == torch.float64
    assert d.q_sample(x32.half(), t).dtype == torch.float32  # as guided-diffusion: float32 coefficients
    n = len(d._tables)
    d.q_sample(x32, torch.tensor([3, 7]))
    assert len(d._tables) == n  # a second call only gathers from the cached table


# ----------------------------------------------------------------------------- likelihood pieces


def test_normal_kl_zero_and_closed_form():
    m = torch.randn(100, dtype=torch.float64)
    lv = torch.randn(100, dtype=torch.float64)
    assert torch.all(normal_kl(m, lv, m, lv).abs() < 1e-15)
    m2, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    s1, s2 = torch.exp(0.5 * lv), torch.exp(0.5 * lv2)
    closed = torch.log(s2 / s1) + (s1**2 + (m - m2) ** 2) / (2 * s2**2) - 0.5
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), closed, rtol=1e-12, atol=1e-12)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, s1), torch.distributions.Normal(m2, s2))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref)
    # Numbers broadcast against tensors (the prior term uses N(0, 1)).
    torch.testing.assert_close(normal_kl(m, lv, 0.0, 0.0), normal_kl(m, lv, torch.zeros_like(m), torch.zeros_like(m)))
    # A float64 number stays float64 (0.1 is not a float32 value), on either side; all numbers is refused.
    full = torch.full_like(m, 0.1)
    m3 = torch.full_like(m, 0.3)
    torch.testing.assert_close(normal_kl(0.3, 0.1, m2, lv2), normal_kl(m3, full, m2, lv2), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(normal_kl(m, lv, 0.3, 0.1), normal_kl(m, lv, m3, full), rtol=1e-13, atol=1e-15)
    with pytest.raises(TypeError, match="at least one tensor"):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, -1.0), (0.3, -3.0), (-0.9, 0.5)):
        x = bins.view(-1, 1)
        lp = discretized_gaussian_log_likelihood(
            x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, log_scale)
        )
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        if log_scale < 0:  # narrow enough that the bin holding the mean is the likeliest
            assert torch.argmax(lp).item() == int(torch.argmin((bins - mean).abs()))


def test_approx_standard_normal_cdf_is_the_normal_cdf():
    # The tanh approximation of Phi (Page 1977) used by the discretized likelihood: within 2e-4 everywhere.
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max()
    assert err < 2e-4, float(err)


def test_mean_flat():
    x = torch.arange(24.0).view(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
    torch.testing.assert_close(mean_flat(x[:, :, 0]), torch.tensor([4.0, 16.0]))  # [B, D] -> [B]
    v = torch.tensor([1.0, 2.0, 3.0])
    assert mean_flat(v) is v  # per-sample values already


# ----------------------------------------------------------------------------- reverse process


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_p_mean_variance_from_output_is_bit_identical(mean_type, var_type):
    d = make(steps=30, mean=mean_type, var=var_type)
    learned = var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    model = SmoothModel(channels=2, learned=learned, dtype=torch.float32)
    x = torch.randn(6, 2, 4, 4)
    t = torch.tensor([0, 1, 7, 15, 28, 29])
    denoised_fn = lambda z: 0.9 * z
    for clip in (True, False):
        a = d.p_mean_variance(model, x, t, clip_denoised=clip, denoised_fn=denoised_fn)
        out = model(x, d.model_timesteps(t))
        b = d.p_mean_variance_from_output(out, x, t, clip_denoised=clip, denoised_fn=denoised_fn)
        assert set(a) == set(b) == {"mean", "variance", "log_variance", "pred_xstart"}
        for k in a:
            assert a[k].shape == x.shape
            assert torch.equal(a[k], b[k]), k


def test_variance_types_interpolate_as_iddpm_eq12():
    d = make(steps=30, var=ModelVarType.LEARNED_RANGE)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 29])
    eps = torch.zeros_like(x)
    # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), written from the betas; at t = 0 it is
    # 0, and IDDPM clips its log to beta~_1's.
    betas = np.asarray(d.betas)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    clipped = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
    lo = torch.from_numpy(clipped)[t].view(-1, 1, 1, 1).expand_as(x)
    hi = torch.from_numpy(np.log(betas))[t].view(-1, 1, 1, 1).expand_as(x)
    for v, want in ((-1.0, lo), (1.0, hi), (0.0, 0.5 * (lo + hi))):
        out = d.p_mean_variance_from_output(torch.cat([eps, torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"], want)
        torch.testing.assert_close(out["variance"], want.exp())
    d_learned = make(steps=30, var=ModelVarType.LEARNED)
    lv = torch.randn_like(x)
    torch.testing.assert_close(d_learned.p_mean_variance_from_output(torch.cat([eps, lv], 1), x, t)["log_variance"], lv)
    small = make(steps=30, var=ModelVarType.FIXED_SMALL).p_mean_variance_from_output(eps, x, t)
    large = make(steps=30, var=ModelVarType.FIXED_LARGE).p_mean_variance_from_output(eps, x, t)
    torch.testing.assert_close(small["log_variance"], lo)
    torch.testing.assert_close(large["log_variance"][1:], hi[1:])
    torch.testing.assert_close(large["log_variance"][0], lo[0])  # t = 0 borrows the posterior's


def test_mean_types_agree_on_the_same_prediction():
    """An eps-, an x0- and an x_{t-1}-model that say the same thing give the same p(x_{t-1} | x_t)."""
    kw = {"steps": 25, "var": ModelVarType.FIXED_SMALL}
    d_eps, d_x0, d_prev = (
        make(mean=m, **kw) for m in (ModelMeanType.EPSILON, ModelMeanType.START_X, ModelMeanType.PREVIOUS_X)
    )
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 5, 12, 24])
    eps = torch.randn_like(x)
    x0 = d_eps.predict_xstart_from_eps(x, t, eps)
    torch.testing.assert_close(d_eps.predict_eps_from_xstart(x, t, x0), eps)
    prev = d_eps.q_posterior_mean_variance(x0, x, t)[0]
    a = d_eps.p_mean_variance_from_output(eps, x, t, clip_denoised=False)
    b = d_x0.p_mean_variance_from_output(x0, x, t, clip_denoised=False)
    c = d_prev.p_mean_variance_from_output(prev, x, t, clip_denoised=False)
    for k in ("mean", "pred_xstart", "log_variance"):
        torch.testing.assert_close(a[k], b[k])
        torch.testing.assert_close(a[k], c[k])


def test_model_output_with_wrong_channels_is_a_clear_error():
    d = make(var=ModelVarType.LEARNED_RANGE)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"expected \(2, 6, 4, 4\).*learn_sigma"):
        d.p_mean_variance_from_output(torch.randn(2, 3, 4, 4), x, torch.tensor([1, 2]))


def test_p_sample_from_output_step_and_no_noise_at_t0():
    d = make(steps=20, var=ModelVarType.LEARNED_RANGE)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 3, 0, 19])
    out = torch.randn(4, 2, 3, 3, dtype=torch.float64).clamp(-1, 1)
    noise = torch.randn_like(x)
    step = d.p_sample_from_output(out, x, t, noise=noise)
    p = d.p_mean_variance_from_output(out, x, t)
    torch.testing.assert_close(step["mean"], p["mean"])
    torch.testing.assert_close(step["log_variance"], p["log_variance"])
    want = (
        p["mean"]
        + torch.tensor([0.0, 1, 0, 1], dtype=torch.float64).view(-1, 1, 1, 1) * (0.5 * p["log_variance"]).exp() * noise
    )
    torch.testing.assert_close(step["sample"], want, rtol=0, atol=0)
    # p_sample draws its own noise but otherwise is the same step.
    model = lambda x_, t_: out
    torch.manual_seed(3)
    a = d.p_sample(model, x, t)
    torch.manual_seed(3)
    b = d.p_sample_from_output(out, x, t)
    assert torch.equal(a["sample"], b["sample"])


# ----------------------------------------------------------------------------- DDIM


def test_ddim_eta0_is_deterministic_and_reverse_inverts_it():
    d = create_diffusion(steps=1000, noise_schedule="linear", timestep_respacing="100")
    model = SmoothModel(channels=2)
    x_T = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    torch.manual_seed(1)
    a = d.ddim_sample_loop(model, x_T.shape, noise=x_T, clip_denoised=False)
    torch.manual_seed(2)
    b = d.ddim_sample_loop(model, x_T.shape, noise=x_T, clip_denoised=False)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = d.ddim_sample_loop(model, x_T.shape, noise=x_T, clip_denoised=False, eta=1.0)
    assert not torch.allclose(a, c)  # eta = 1 does add noise

    # One step there and back.
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for step in (1, 30, 98):
        t = torch.full((3,), step)
        down = d.ddim_sample(model, x, t, clip_denoised=False)["sample"]
        up = d.ddim_reverse_sample(model, down, t - 1, clip_denoised=False)["sample"]
        err = (up - x).abs().max().item()
        assert err < 3e-3
        assert (down - x).abs().max().item() > 10 * err
    # Half the ODE: encode with reverse steps (index i -> i+1), decode with ddim_sample (i -> i-1).
    # The round trip is exact up to the discretisation, an error of first order in the step.
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 1.6 - 0.8
    errors = []
    for spacing in ("100", "400"):
        dd = create_diffusion(steps=1000, noise_schedule="linear", timestep_respacing=spacing)
        n = dd.num_timesteps // 2
        z = x0
        with torch.no_grad():
            for i in range(n):
                z = dd.ddim_reverse_sample(model, z, torch.full((3,), i), clip_denoised=False)["sample"]
            assert (z - x0).abs().max().item() > 0.3  # it did travel
            for i in range(n, 0, -1):
                z = dd.ddim_sample(model, z, torch.full((3,), i), clip_denoised=False)["sample"]
        errors.append((z - x0).abs().max().item())
    assert errors[0] < 1e-2 and errors[1] < errors[0] / 3
    with pytest.raises(ValueError, match="eta must be 0"):
        d.ddim_reverse_sample(model, x, torch.full((3,), 2), eta=0.5)


# ----------------------------------------------------------------------------- losses


def test_vb_gradient_reaches_only_variance_channels():
    for loss in (LossType.MSE, LossType.RESCALED_MSE):
        d = make(steps=40, var=ModelVarType.LEARNED_RANGE, loss=loss)
        B, C = 6, 2
        x0 = torch.rand(B, C, 4, 4, dtype=torch.float64) * 2 - 1
        t = torch.tensor([0, 1, 5, 20, 38, 39])
        out = (0.5 * torch.randn(B, 2 * C, 4, 4, dtype=torch.float64)).requires_grad_()
        terms = d.training_losses(lambda x_, t_, out=out: out, x0, t)
        assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (B,) for v in terms.values())
        (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
        assert torch.all(g_vb[:, :C] == 0)
        assert torch.all(g_vb[:, C:].abs().flatten(1).sum(1) > 0)
        (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out, retain_graph=True)
        assert torch.all(g_mse[:, C:] == 0) and torch.all(g_mse[:, :C].abs().flatten(1).sum(1) > 0)
        torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_rescaled_mse_scales_vb_by_steps_over_1000():
    x0 = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 3, 17, 39])
    noise = torch.randn_like(x0)
    out = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    vb = {}
    for loss in (LossType.MSE, LossType.RESCALED_MSE):
        d = make(steps=40, var=ModelVarType.LEARNED_RANGE, loss=loss)
        vb[loss] = d.training_losses(lambda x_, t_: out, x0, t, noise=noise)["vb"]
    torch.testing.assert_close(vb[LossType.RESCALED_MSE], vb[LossType.MSE] * 40 / 1000)


def test_mse_targets_per_mean_type():
    x0 = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 5, 19])
    noise = torch.randn_like(x0)
    for mean_type in MEAN_TYPES:
        d = make(steps=20, mean=mean_type, var=ModelVarType.FIXED_SMALL)
        xt = d.q_sample(x0, t, noise=noise)
        abar = torch.from_numpy(np.cumprod(1 - np.asarray(d.betas)))[t].view(-1, 1, 1, 1)
        target = {
            ModelMeanType.EPSILON: noise,
            ModelMeanType.VELOCITY: abar.sqrt() * noise - (1 - abar).sqrt() * x0,
            ModelMeanType.START_X: x0,
            ModelMeanType.PREVIOUS_X: d.q_posterior_mean_variance(x0, xt, t)[0],
        }[mean_type]
        terms = d.training_losses(lambda x_, t_, y=target: y, x0, t, noise=noise)
        assert set(terms) == {"loss", "mse"}
        assert torch.all(terms["mse"] < 1e-20)
        off = d.training_losses(lambda x_, t_, y=target: y + 0.1, x0, t, noise=noise)
        torch.testing.assert_close(off["loss"], torch.full((3,), 0.01, dtype=torch.float64))


def test_vb_terms_zero_for_the_true_posterior_and_decoder_nll_at_t0():
    d = make(steps=30, mean=ModelMeanType.START_X, var=ModelVarType.FIXED_SMALL, loss=LossType.KL)
    x0 = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 15, 29])
    xt = d.q_sample(x0, t)
    vb = d._vb_terms_bpd(lambda x_, t_: x0, x0, xt, t, clip_denoised=False)["output"]
    assert torch.all(vb[1:].abs() < 1e-12)  # p equals q: KL 0
    p = d.p_mean_variance_from_output(x0, xt, t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
    assert vb[0].item() == pytest.approx((mean_flat(nll) / math.log(2))[0].item())
    # KL loss types: the VB term, times T for rescaled_kl.
    noise = torch.randn_like(x0)
    model = lambda x_, t_: 0.5 * x_
    kl = d.training_losses(model, x0, t, noise=noise)
    d_r = make(steps=30, mean=ModelMeanType.START_X, var=ModelVarType.FIXED_SMALL, loss=LossType.RESCALED_KL)
    torch.testing.assert_close(d_r.training_losses(model, x0, t, noise=noise)["loss"], kl["loss"] * 30)
    assert set(kl) == {"loss"}


@pytest.mark.parametrize("channels", [1, 3])  # 3: a batch (2) that is not the channel count
def test_calc_bpd_loop(channels):
    d = make(steps=8, var=ModelVarType.LEARNED_RANGE)
    x0 = torch.rand(2, channels, 4, 4, dtype=torch.float64) * 2 - 1
    res = d.calc_bpd_loop(SmoothModel(channels, learned=True), x0)
    assert res["vb"].shape == res["mse"].shape == res["xstart_mse"].shape == (2, 8)
    torch.testing.assert_close(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"])
    assert torch.all(res["vb"] >= 0) and torch.all(res["prior_bpd"] >= 0)
    # The prior term is the KL of q(x_T | x_0) to N(0, I), in bits.
    ab = d.alphas_cumprod[-1]
    want = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(res["prior_bpd"], want)


# ----------------------------------------------------------------------------- factory and presets


def test_create_diffusion_maps_guided_diffusion_keywords():
    d = create_diffusion()
    assert d.num_timesteps == 1000 and d.model_var_type == ModelVarType.FIXED_LARGE and d.loss_type == LossType.MSE
    assert d.model_mean_type == ModelMeanType.EPSILON and d.timestep_map == list(range(1000))
    d = create_diffusion(steps=50, learn_sigma=True, use_kl=True, predict_xstart=True)
    assert (d.model_var_type, d.loss_type, d.model_mean_type) == (
        ModelVarType.LEARNED_RANGE,
        LossType.RESCALED_KL,
        ModelMeanType.START_X,
    )
    assert create_diffusion(steps=50, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert create_diffusion(steps=50, learn_sigma=True, rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    cfg = DiffusionConfig(steps=100, noise_schedule="cosine", timestep_respacing="ddim10")
    d = create_diffusion(cfg, learn_sigma=True)
    assert d.num_timesteps == 10 and d.original_num_steps == 100 and d.model_var_type == ModelVarType.LEARNED_RANGE
    np.testing.assert_array_equal(create_diffusion(cfg).alphas_cumprod, d.alphas_cumprod)
    assert create_diffusion({"steps": 7, "noise_schedule": "cosine"}).num_timesteps == 7
    with pytest.raises(ConfigError, match="unknown field 'stepz'.*did you mean 'steps'"):
        create_diffusion(stepz=3)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion(noise_schedule="sqrt")


@pytest.mark.parametrize("name", ["digits", "cosine-1000-learned", "linear-1000-learned", "linear-1000"])
def test_presets_load_and_build(name):
    import os

    data = load_yaml(os.path.join(ROOT, "configs", "diffusion", f"{name}.yaml"))
    assert set(data) == {"diffusion"}
    cfg = from_dict(DiffusionConfig, data["diffusion"])
    d = create_diffusion(cfg)
    assert d.num_timesteps == cfg.steps
    if name == "digits":
        assert (cfg.steps, cfg.noise_schedule, cfg.learn_sigma) == (100, "cosine", True)
        assert d.model_var_type == ModelVarType.LEARNED_RANGE


# ----------------------------------------------------------------------------- found by mutation testing
# Every entry point must forward its options (labels, clipping, denoised_fn, eta) to each step.
# References are written with the one-step building blocks and the DDIM formulas, not the loops.


class LabelModel(torch.nn.Module):
    """Needs its labels (a missing y is an error) and predicts large x_0, so clipping matters."""

    def forward(self, x, t, y):
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        shift = y.to(x.dtype).view(-1, 1, 1, 1)
        eps = -3.0 * torch.tanh(x) + 0.1 * shift + 0.001 * tt
        return torch.cat([eps, torch.tanh(x + shift)], 1)


def _halve(x0):
    return 0.5 * x0


def _ddim_reference(d, model, x, t, y, eta, noise, clip, denoised_fn):
    out = d.p_mean_variance_from_output(model(x, t, y), x, t, clip_denoised=clip, denoised_fn=denoised_fn)
    abar = np.cumprod(1 - np.asarray(d.betas))
    ab, abp = abar[t.numpy()], np.append(1.0, abar[:-1])[t.numpy()]
    ab, abp = (torch.from_numpy(a).view(-1, 1, 1, 1) for a in (ab, abp))
    eps = (x - ab.sqrt() * out["pred_xstart"]) / (1 - ab).sqrt()
    sigma = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
    mean = out["pred_xstart"] * abp.sqrt() + (1 - abp - sigma**2).sqrt() * eps
    return mean + (t != 0).view(-1, 1, 1, 1) * sigma * noise, out["pred_xstart"]


@pytest.mark.parametrize("clip", [True, False])
def test_loops_forward_labels_clipping_and_denoised_fn(clip):
    d = make(steps=6, var=ModelVarType.LEARNED_RANGE)
    model = LabelModel()
    y = torch.tensor([0, 3])
    start = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = {"clip_denoised": clip, "denoised_fn": _halve, "model_kwargs": {"y": y}}
    # Ancestral: the loop equals p_sample_from_output stepped by hand with the same draws.
    torch.manual_seed(5)
    got = d.p_sample_loop(model, start.shape, noise=start, **kw)
    torch.manual_seed(5)
    x = start
    for i in range(5, -1, -1):
        t = torch.full((2,), i)
        out = model(x, t, y)
        x = d.p_sample_from_output(out, x, t, clip_denoised=clip, noise=torch.randn_like(x), denoised_fn=_halve)
        x = x["sample"]
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
    # DDIM with eta: the loop, and each step's pred_xstart, equal the DDIM formulas.
    torch.manual_seed(6)
    got = d.ddim_sample_loop(model, start.shape, noise=start, eta=0.5, **kw)
    torch.manual_seed(6)
    x = start
    for i in range(5, -1, -1):
        t = torch.full((2,), i)
        step = d.ddim_sample(model, x, t, eta=0.5, **kw)
        torch.manual_seed(100 + i)
        x_ref, x0_ref = _ddim_reference(d, model, x, t, y, 0.5, torch.randn_like(x), clip, _halve)
        torch.manual_seed(100 + i)
        step = d.ddim_sample(model, x, t, eta=0.5, **kw)
        torch.testing.assert_close(step["sample"], x_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step["pred_xstart"], x0_ref, rtol=1e-12, atol=1e-12)
        x = x_ref
    assert got.shape == start.shape
    # DDIM reversed: x_{t+1} = sqrt(abar_{t+1}) x_0 + sqrt(1 - abar_{t+1}) eps.
    t = torch.tensor([1, 4])
    rev = d.ddim_reverse_sample(model, start, t, **kw)
    out = d.p_mean_variance_from_output(model(start, t, y), start, t, clip_denoised=clip, denoised_fn=_halve)
    abar = torch.from_numpy(np.cumprod(1 - np.asarray(d.betas)))
    ab, an = abar[t].view(-1, 1, 1, 1), abar[t + 1].view(-1, 1, 1, 1)
    eps = (start - ab.sqrt() * out["pred_xstart"]) / (1 - ab).sqrt()
    torch.testing.assert_close(rev["sample"], out["pred_xstart"] * an.sqrt() + (1 - an).sqrt() * eps)
    torch.testing.assert_close(rev["pred_xstart"], out["pred_xstart"])


def test_the_loops_really_use_their_options():
    """The options change the result (so the test above could see them dropped)."""
    d = make(steps=6, var=ModelVarType.LEARNED_RANGE)
    model, y = LabelModel(), torch.tensor([0, 3])
    start = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for kw in ({}, {"clip_denoised": False}, {"denoised_fn": _halve}, {"model_kwargs": {"y": y + 1}}):
        torch.manual_seed(5)
        args = {"model_kwargs": {"y": y}, **kw}
        steps = d.ddim_sample_loop_progressive(model, start.shape, noise=start, **args)
        results.append(torch.stack([o["sample"] for o in steps]))
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(results[a], results[b])
    with pytest.raises(TypeError):
        d.p_sample_loop(model, start.shape, noise=start)  # the labels are required


@pytest.mark.parametrize("loss", [LossType.MSE, LossType.KL])
def test_training_losses_forward_labels_and_keep_the_vb_unclipped_in_bits(loss):
    d = make(steps=10, var=ModelVarType.LEARNED_RANGE, loss=loss)
    model, y = LabelModel(), torch.tensor([1, 2, 0])
    x0 = torch.rand(3, 1, 3, 3, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 5, 9])
    noise = torch.randn_like(x0)
    terms = d.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
    # KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / log 2 by formula, with the model's x_0 unclipped.
    betas = np.asarray(d.betas)
    abar = np.cumprod(1 - betas)
    abp = np.append(1.0, abar[:-1])
    bt = betas * (1 - abp) / (1 - abar)
    lo, hi = np.log(np.append(bt[1], bt[1:])), np.log(betas)
    c1, c2 = betas * np.sqrt(abp) / (1 - abar), np.sqrt(1 - betas) * (1 - abp) / (1 - abar)

    def col(a):
        return torch.from_numpy(a[t.numpy()]).view(-1, 1, 1, 1)

    x_t = col(np.sqrt(abar)) * x0 + col(np.sqrt(1 - abar)) * noise
    out = model(x_t, t, y)
    eps, v = out[:, :1], out[:, 1:]
    x0_hat = (x_t - col(np.sqrt(1 - abar)) * eps) / col(np.sqrt(abar))
    m_true, m_model = col(c1) * x0 + col(c2) * x_t, col(c1) * x0_hat + col(c2) * x_t
    lv_true, lv_model = col(lo), (v + 1) / 2 * col(hi) + (1 - v) / 2 * col(lo)
    kl = 0.5 * (
        -1 + lv_model - lv_true + torch.exp(lv_true - lv_model) + (m_true - m_model) ** 2 * torch.exp(-lv_model)
    )
    want = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    if loss == LossType.KL:
        torch.testing.assert_close(terms["loss"], want, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(terms["vb"], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(terms["mse"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))


def _cond_fn(x, t, y):
    return 0.2 * torch.ones_like(x) * (1 + y.view(-1, 1, 1, 1))


def test_loops_forward_the_guidance_function():
    d = make(steps=5, var=ModelVarType.LEARNED_RANGE)
    model, y = LabelModel(), torch.tensor([0, 2])
    start = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = {"model_kwargs": {"y": y}, "clip_denoised": False}
    for loop, step in ((d.p_sample_loop, d.p_sample), (d.ddim_sample_loop, d.ddim_sample)):
        torch.manual_seed(1)
        guided = loop(model, start.shape, noise=start, cond_fn=_cond_fn, **kw)
        torch.manual_seed(1)
        x = start
        for i in range(4, -1, -1):
            x = step(model, x, torch.full((2,), i), cond_fn=_cond_fn, **kw)["sample"]
        torch.testing.assert_close(guided, x, rtol=1e-12, atol=1e-12)
        torch.manual_seed(1)
        assert not torch.allclose(guided, loop(model, start.shape, noise=start, **kw))


def test_calc_bpd_loop_terms_against_their_formulas():
    d = make(steps=6, var=ModelVarType.LEARNED_RANGE)
    model, y = LabelModel(), torch.tensor([1, 0])
    x0 = torch.rand(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    torch.manual_seed(9)
    got = d.calc_bpd_loop(model, x0, clip_denoised=False, model_kwargs={"y": y})
    assert got["vb"].shape == got["mse"].shape == got["xstart_mse"].shape == (2, 6)
    abar = torch.from_numpy(np.cumprod(1 - np.asarray(d.betas)))
    torch.manual_seed(9)
    for col, i in enumerate(range(5, -1, -1)):  # columns run from t = T-1 down to 0
        noise = torch.randn_like(x0)
        ab = abar[i]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        eps = model(x_t, torch.full((2,), i), y)[:, :1]
        x0_hat = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()  # unclipped, as asked
        torch.testing.assert_close(got["xstart_mse"][:, col], ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)))
        torch.testing.assert_close(got["mse"][:, col], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    prior = 0.5 * (-1 - (1 - abar[-1]).log() + (1 - abar[-1]) + abar[-1] * x0**2)  # KL(q(x_T|x_0) || N(0, 1))
    torch.testing.assert_close(got["prior_bpd"], prior.mean(dim=(1, 2, 3)) / math.log(2.0))
    torch.testing.assert_close(got["total_bpd"], got["vb"].sum(1) + got["prior_bpd"])
    torch.manual_seed(9)
    clipped = d.calc_bpd_loop(model, x0, clip_denoised=True, model_kwargs={"y": y})
    assert not torch.allclose(clipped["vb"], got["vb"])  # clipping reaches the VB terms


def test_schedule_validation_and_tables_in_float64():
    for bad in (np.zeros(5), np.array([0.1, 1.5]), np.array([]), np.array([[0.1, 0.2]])):
        with pytest.raises(ValueError, match="betas must"):
            GaussianDiffusion(betas=bad, model_mean_type="epsilon", model_var_type="fixed_small", loss_type="mse")
    for ok in (np.array([0.5]), np.array([0.1, 1.0]), np.array([0.1, 0.2], dtype=np.float32)):
        d = GaussianDiffusion(betas=ok, model_mean_type="epsilon", model_var_type="fixed_small", loss_type="mse")
        assert d.betas.dtype == d.alphas_cumprod.dtype == np.float64
    # IDDPM clips the log of beta~_0 (= 0) to beta~_1; a 2-step chain still has a beta~_1.
    d = make(steps=2)
    b = np.asarray(d.betas)
    beta_tilde_1 = b[1] * (1 - (1 - b[0])) / (1 - (1 - b[0]) * (1 - b[1]))
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(beta_tilde_1), rel=1e-12)
    # DDIM reversed from the last step goes to abar = 0: pure noise, x_T = eps.
    d = make(steps=6, var=ModelVarType.LEARNED_RANGE)
    x, t = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.tensor([5, 5])
    rev = d.ddim_reverse_sample(LabelModel(), x, t, clip_denoised=False, model_kwargs={"y": torch.tensor([0, 1])})
    ab = float(np.cumprod(1 - np.asarray(d.betas))[5])
    eps = (x - math.sqrt(ab) * rev["pred_xstart"]) / math.sqrt(1 - ab)
    torch.testing.assert_close(rev["sample"], eps)


def test_wrong_channel_counts_say_what_was_expected():
    x, t = torch.zeros(1, 2, 2, 2), torch.tensor([1])
    with pytest.raises(ValueError, match=r"\(the variance is learned, so 2C channels are expected\)"):
        make(var=ModelVarType.LEARNED_RANGE).p_mean_variance_from_output(torch.zeros(1, 2, 2, 2), x, t)
    with pytest.raises(ValueError, match=r"\(the variance is fixed\)"):
        make().p_mean_variance_from_output(torch.zeros(1, 4, 2, 2), x, t)


def test_the_output_level_step_applies_denoised_fn():
    d = make(steps=6, var=ModelVarType.LEARNED_RANGE)
    x, t = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.tensor([2, 4])
    out = LabelModel()(x, t, torch.tensor([0, 1]))
    plain = d.p_mean_variance_from_output(out, x, t, clip_denoised=False)
    halved = d.p_sample_from_output(out, x, t, clip_denoised=False, noise=torch.zeros_like(x), denoised_fn=_halve)
    torch.testing.assert_close(halved["pred_xstart"], 0.5 * plain["pred_xstart"])


def test_guidance_shifts_by_the_stated_formulas():
    """condition_mean: mean + variance * grad (Sohl-Dickstein et al.); condition_score:
    eps - sqrt(1 - abar) * grad, then x_0 and the posterior mean from it (Song et al.)."""
    d = make(steps=6, var=ModelVarType.LEARNED_RANGE)
    x, t, y = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.tensor([1, 4]), torch.tensor([0, 2])

    def grad(x_, t_, y):  # depends on t, so a wrong t shows
        return 0.1 * (1 + t_.view(-1, 1, 1, 1).to(x_.dtype)) * (1 + y.view(-1, 1, 1, 1)) * torch.ones_like(x_)

    out = d.p_mean_variance(LabelModel(), x, t, clip_denoised=False, model_kwargs={"y": y})
    g = grad(x, t, y)
    torch.testing.assert_close(d.condition_mean(grad, out, x, t, {"y": y}), out["mean"] + out["variance"] * g)
    abar = torch.from_numpy(np.cumprod(1 - np.asarray(d.betas)))[t].view(-1, 1, 1, 1)
    eps = (x - abar.sqrt() * out["pred_xstart"]) / (1 - abar).sqrt() - (1 - abar).sqrt() * g
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    got = d.condition_score(grad, out, x, t, {"y": y})
    torch.testing.assert_close(got["pred_xstart"], x0)
    torch.testing.assert_close(got["mean"], d.q_posterior_mean_variance(x0, x, t)[0])
    torch.manual_seed(0)
    a = d.p_sample(LabelModel(), x, t, clip_denoised=False, cond_fn=grad, model_kwargs={"y": y})["mean"]
    torch.testing.assert_close(a, out["mean"] + out["variance"] * g)


def test_the_deterministic_ddim_loop_is_its_steps():
    d = make(steps=5, var=ModelVarType.LEARNED_RANGE)
    model, y = LabelModel(), torch.tensor([1, 3])
    start = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for clip in (True, False):
        kw = {"clip_denoised": clip, "denoised_fn": _halve, "model_kwargs": {"y": y}}
        x = start
        for i in range(4, -1, -1):
            x, _ = _ddim_reference(d, model, x, torch.full((2,), i), y, 0.0, torch.zeros_like(x), clip, _halve)
        torch.testing.assert_close(d.ddim_sample_loop(model, start.shape, noise=start, **kw), x)
        steps = list(d.ddim_sample_loop_progressive(model, start.shape, noise=start, **kw))  # eta defaults to 0
        torch.testing.assert_close(steps[-1]["sample"], x)


def test_public_sampling_defaults_are_guided_diffusions():
    """Called without them, the entry points clip x_0 (and DDIM is deterministic), as guided-diffusion's do."""
    d = make(steps=4, var=ModelVarType.LEARNED_RANGE)
    model, kw = LabelModel(), {"model_kwargs": {"y": torch.tensor([1, 2])}}
    start = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([1, 3])

    def same(call):
        torch.manual_seed(3)
        a = call({})
        torch.manual_seed(3)
        b = call({"clip_denoised": True})
        torch.manual_seed(3)
        c = call({"clip_denoised": False})
        assert torch.equal(a, b) and not torch.allclose(a, c)

    same(lambda o: d.p_sample_loop(model, start.shape, noise=start, **kw, **o))
    same(
        lambda o: torch.stack(
            [s["sample"] for s in d.p_sample_loop_progressive(model, start.shape, noise=start, **kw, **o)]
        )
    )
    same(lambda o: d.ddim_sample(model, start, t, **kw, **o)["sample"])
    same(lambda o: d.ddim_reverse_sample(model, start, t, **kw, **o)["sample"])
    same(lambda o: d.ddim_sample_loop(model, start.shape, noise=start, **kw, **o))
    same(lambda o: d._vb_terms_bpd(model, start.clamp(-1, 1), start, t, **kw, **o)["output"])
    same(lambda o: d.calc_bpd_loop(model, start.clamp(-1, 1), **kw, **o)["vb"])
    steps = [s["sample"] for s in d.ddim_sample_loop_progressive(model, start.shape, noise=start, **kw)]
    torch.manual_seed(99)
    again = [s["sample"] for s in d.ddim_sample_loop_progressive(model, start.shape, noise=start, **kw)]
    assert all(torch.equal(a, b) for a, b in zip(steps, again, strict=True))  # eta defaults to 0


def test_unknown_enum_names_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown ModelMeanType 'bogus'"):
        GaussianDiffusion(
            betas=np.array([0.1, 0.2]), model_mean_type="bogus", model_var_type="fixed_small", loss_type="mse"
        )
