"""Step boundaries and switches that a one-character bug would silently break.

Each test is derived independently of the code under test (closed forms in float64, a counted
statistic with a band of a few standard errors), and each fails on a bug that the rest of the
suite let through: no noise at t = 1, the T-fold weight of a KL-only student dropped, a
restarted pool sample keeping its label, the teacher's bf16 autocast switched off.
"""

import math
import types

import numpy as np
import torch

from dkdm.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
)
from dkdm.distill.loop import DistillLoop
from dkdm.distill.objective import DKDMObjective
from dkdm.distill.pool import DynamicPool

T = 20


def _abar(d):
    betas = np.asarray(d.betas, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def test_the_ancestral_step_at_t1_adds_the_posterior_noise():
    d = create_diffusion(steps=T, noise_schedule="cosine", sigma_small=True)  # fixed variance beta~_t
    betas, abar = _abar(d)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 1, 1, 2, 0, 0])
    step = d.p_sample_from_output(eps, x, t, clip_denoised=False, noise=noise)
    tn = t.numpy()
    a, a_prev = abar[tn], np.append(1.0, abar)[tn]  # abar_{t-1}, with abar_{-1} = 1
    x0 = (x.numpy() - np.sqrt(1 - a)[:, None, None, None] * eps.numpy()) / np.sqrt(a)[:, None, None, None]
    coef1 = betas[tn] * np.sqrt(a_prev) / (1 - a)
    coef2 = (1 - a_prev) * np.sqrt(1 - betas[tn]) / (1 - a)
    mean = coef1[:, None, None, None] * x0 + coef2[:, None, None, None] * x.numpy()
    post_var = betas[tn] * (1 - a_prev) / (1 - a)
    std = np.where(tn == 0, 0.0, np.sqrt(np.where(tn == 0, 1.0, post_var)))  # no noise at t = 0 only
    want = mean + std[:, None, None, None] * noise.numpy()
    np.testing.assert_allclose(step["sample"].numpy(), want, rtol=1e-10, atol=1e-12)
    assert (std[:3] > 0.005).all()  # at t = 1 the noise is a visible part of the step


def test_ddim_with_eta_adds_noise_at_t1_and_none_at_t0():
    d = create_diffusion(steps=T, noise_schedule="cosine")
    _, abar = _abar(d)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 1, 0, 5])
    eta = 0.7
    torch.manual_seed(5)
    got = d.ddim_sample(lambda x_, t_: eps, x, t, clip_denoised=False, eta=eta)["sample"].numpy()
    torch.manual_seed(5)
    noise = torch.randn_like(x).numpy()
    tn = t.numpy()
    a, a_prev = abar[tn], np.append(1.0, abar)[tn]
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)  # Song et al. eq. 16
    x0 = (x.numpy() - np.sqrt(1 - a)[:, None, None, None] * eps.numpy()) / np.sqrt(a)[:, None, None, None]
    mean = np.sqrt(a_prev)[:, None, None, None] * x0 + np.sqrt(1 - a_prev - sigma**2)[:, None, None, None] * eps.numpy()
    want = mean + np.where(tn == 0, 0.0, sigma)[:, None, None, None] * noise
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert sigma[0] > 0.01


def _hand_kl_bits(d, tout, sout, x, t):
    """KL(N(m_t, v_t) || N(m_s, v_s)) per sample in bits/dim for eps + learned-range outputs (float64)."""
    betas, abar = _abar(d)
    tn, C = t.numpy(), x.shape[1]
    a, a_prev = abar[tn], np.append(1.0, abar)[tn]
    post_var = betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    log_post = np.log(np.append(post_var[1], post_var[1:]))[tn]
    shape = (-1, 1, 1, 1)

    def gauss(out):
        eps, v = out[:, :C].numpy(), out[:, C:].numpy()
        x0 = (x.numpy() - np.sqrt(1 - a).reshape(shape) * eps) / np.sqrt(a).reshape(shape)
        c1 = (betas[tn] * np.sqrt(a_prev) / (1 - a)).reshape(shape)
        c2 = ((1 - a_prev) * np.sqrt(1 - betas[tn]) / (1 - a)).reshape(shape)
        frac = (v + 1) / 2
        return c1 * x0 + c2 * x.numpy(), frac * np.log(betas[tn]).reshape(shape) + (1 - frac) * log_post.reshape(shape)

    (m1, l1), (m2, l2) = gauss(tout), gauss(sout)
    kl = 0.5 * (-1 + l2 - l1 + np.exp(l1 - l2) + (m1 - m2) ** 2 * np.exp(-l2))
    return kl.reshape(len(kl), -1).mean(1) / math.log(2)


def test_a_kl_only_student_weighs_the_kl_by_T_when_rescaled():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 4, 11, T - 1])
    tout = torch.cat(
        [
            torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64),
            torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1,
        ],
        1,
    )
    sout = torch.cat(
        [
            torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64),
            torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1,
        ],
        1,
    ).requires_grad_()
    teacher = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    hand = _hand_kl_bits(teacher, tout, sout.detach(), x, t)
    rescaled = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, use_kl=True)
    assert rescaled.loss_type == LossType.RESCALED_KL  # guided-diffusion's --use_kl
    plain = GaussianDiffusion(
        betas=teacher.betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.KL,
    )
    for student, weight in ((plain, 1.0), (rescaled, float(T))):
        loss = DKDMObjective(teacher, student).terms(sout, tout, x, t)["loss"]
        np.testing.assert_allclose(loss.detach().numpy(), weight * hand, rtol=1e-9)
        (grad,) = torch.autograd.grad(loss.sum(), sout)
        assert grad[:, :1].abs().sum() > 0  # pure KL trains the mean too (nothing is detached)


def test_a_restarted_pool_sample_draws_a_new_label():
    """Restarted labels are fresh uniform draws: about (K-1)/K of them change (a counted band)."""
    K, n_rounds = 10, 40
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    pool = DynamicPool(d, (1, 2, 2), 50, rho=1.0 / T, teacher_batch=64, seed=0, num_classes=K, variant="iterative")
    pool.prepare(lambda x, t, y=None: torch.zeros(x.shape[0], 2, 2, 2), progress=False)
    changed = total = 0
    counts = np.zeros(K)
    for _ in range(n_rounds):
        idx = pool.draw()
        pool.t[idx] = 0  # every drawn sample finishes this step and restarts
        before = pool.y[idx].clone()
        batch = pool.gather(idx)
        pool.update(idx, torch.zeros(len(idx), 2, *batch["x_t"].shape[2:]))
        after = pool.y[idx]
        changed += int((after != before).sum())
        total += len(idx)
        counts += np.bincount(after.numpy(), minlength=K)
    p = (K - 1) / K
    se = math.sqrt(p * (1 - p) / total)  # 2,000 restarts: se = 0.0067
    assert abs(changed / total - p) < 4 * se, (changed, total)
    expected = total / K  # each class ~ Binomial(total, 1/K): sd = sqrt(total * 0.09) = 13.4
    assert np.abs(counts - expected).max() < 4 * math.sqrt(total * (1 / K) * (1 - 1 / K))


def test_teacher_precision_really_runs_the_teacher_in_bf16():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 2, 3, padding=1)
    )

    class Teacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x) * (1 + t.view(-1, 1, 1, 1).float() / 100)

    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 3, 7, 19])
    outs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        fake = types.SimpleNamespace(
            teacher=Teacher(),
            teacher_diffusion=d,
            teacher_dtype=dtype,
            device=torch.device("cpu"),
            _guide=None,
            teacher_takes_w=False,
        )
        outs[name] = DistillLoop.teacher_forward(fake, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16 must mean: the teacher's ops in bfloat16
        want = Teacher()(x, d.model_timesteps(t)).float()
    assert outs["bf16"].dtype == torch.float32
    assert torch.equal(outs["bf16"], want)
    assert not torch.equal(outs["bf16"], outs["fp32"])
    assert (outs["bf16"] - outs["fp32"]).abs().max() < 0.05
