"""The DKDM objective: values against a float64 hand computation, gradients, conversions, refusals."""

import math

import numpy as np
import pytest
import torch

from dkdm.diffusion import create_diffusion
from dkdm.distill.objective import DKDMObjective, ObjectiveError
from dkdm.models import create_model

T = 50
C = 2


def _diff(**kw):
    base = {"steps": T, "noise_schedule": "cosine", "learn_sigma": True}
    return create_diffusion(**{**base, **kw})


def _schedule():
    d = _diff()
    betas = np.asarray(d.betas, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    return betas, abar, post_logvar_clipped, coef1, coef2


def _hand_gaussian(eps, v, x, t):
    """Mean and log-variance of p(x_{t-1}|x_t) for an eps / learned-range output, by formula (float64)."""
    betas, abar, plv, c1, c2 = _schedule()
    shape = (-1,) + (1,) * (x.ndim - 1)
    ab = abar[t].reshape(shape)
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    mean = c1[t].reshape(shape) * x0 + c2[t].reshape(shape) * x
    frac = (v + 1) / 2
    logvar = frac * np.log(betas[t]).reshape(shape) + (1 - frac) * plv[t].reshape(shape)
    return mean, logvar, x0


def _hand_kl_bits(m1, lv1, m2, lv2):
    kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    return kl.reshape(kl.shape[0], -1).mean(1) / math.log(2)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    B = 6
    x = torch.randn(B, C, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 25, T - 2, T - 1])
    tout = torch.randn(B, 2 * C, 4, 4, generator=g, dtype=torch.float64)
    tout[:, C:] = tout[:, C:].tanh()
    sout = torch.randn(B, 2 * C, 4, 4, generator=g, dtype=torch.float64)
    sout[:, C:] = sout[:, C:].tanh()
    return x, t, tout, sout


def test_matches_float64_hand_computation(batch):
    x, t, tout, sout = batch
    obj = DKDMObjective(_diff(), _diff())
    terms = obj.terms(sout, tout, x, t)
    xn, tn, to, so = x.numpy(), t.numpy(), tout.numpy(), sout.numpy()
    mse = ((to[:, :C] - so[:, :C]) ** 2).reshape(len(xn), -1).mean(1)
    mt, lvt, _ = _hand_gaussian(to[:, :C], to[:, C:], xn, tn)
    ms, lvs, _ = _hand_gaussian(so[:, :C], so[:, C:], xn, tn)
    vb = _hand_kl_bits(mt, lvt, ms, lvs)  # the same KL at t = 0 as elsewhere
    assert terms["mse"].dtype == torch.float64
    np.testing.assert_allclose(terms["mse"].numpy(), mse, rtol=1e-12)
    np.testing.assert_allclose(terms["vb"].detach().numpy(), vb, rtol=1e-9)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), mse + vb, rtol=1e-9)
    assert (vb > 0).all()


def test_clip_teacher_mean_reproduces_the_official_variance_term(batch):
    """The official release's KL target: the teacher's mean from its x_0 clipped to [-1, 1]."""
    x, t, tout, sout = batch
    x = x * 3  # make the teacher's x_0 leave [-1, 1] so the clip matters
    xn, tn, to, so = x.numpy(), t.numpy(), tout.numpy(), sout.numpy()
    *_, c1, c2 = _schedule()
    shape = (-1, 1, 1, 1)
    _, lvt, x0 = _hand_gaussian(to[:, :C], to[:, C:], xn, tn)
    mt = c1[tn].reshape(shape) * np.clip(x0, -1, 1) + c2[tn].reshape(shape) * xn
    ms, lvs, _ = _hand_gaussian(so[:, :C], so[:, C:], xn, tn)
    official = DKDMObjective(_diff(), _diff(), clip_teacher_mean=True).terms(sout, tout, x, t)
    np.testing.assert_allclose(official["vb"].detach().numpy(), _hand_kl_bits(mt, lvt, ms, lvs), rtol=1e-9)
    ours = DKDMObjective(_diff(), _diff()).terms(sout, tout, x, t)
    torch.testing.assert_close(official["mse"], ours["mse"], rtol=0, atol=0)  # L*_simple is unchanged
    # A perfect copy of the teacher: zero KL for ours, positive for the official target.
    assert DKDMObjective(_diff(), _diff()).terms(tout, tout, x, t)["vb"].abs().max() < 1e-12
    assert (DKDMObjective(_diff(), _diff(), clip_teacher_mean=True).terms(tout, tout, x, t)["vb"] > 0).any()


def test_rescaled_learned_sigmas_weights_vb_by_T_over_1000(batch):
    x, t, tout, sout = batch
    plain = DKDMObjective(_diff(), _diff()).terms(sout, tout, x, t)
    rescaled = DKDMObjective(_diff(), _diff(rescale_learned_sigmas=True)).terms(sout, tout, x, t)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * (T / 1000.0))
    torch.testing.assert_close(rescaled["mse"], plain["mse"])


def test_teacher_predicting_x0_is_converted_to_student_eps(batch):
    x, t, tout, sout = batch
    obj = DKDMObjective(_diff(predict_xstart=True), _diff())
    terms = obj.terms(sout, tout, x, t)
    _, abar, _, _, _ = _schedule()
    ab = abar[t.numpy()].reshape(-1, 1, 1, 1)
    x0 = tout[:, :C].numpy()
    eps_t = (x.numpy() - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    mse = ((eps_t - sout[:, :C].numpy()) ** 2).reshape(len(x), -1).mean(1)
    np.testing.assert_allclose(terms["mse"].numpy(), mse, rtol=1e-9)
    # The KL compares distributions, so a teacher whose x0 output equals the student's implied
    # x0 gives zero KL whatever the parameterisation.
    _, _, x0_s = _hand_gaussian(sout[:, :C].numpy(), sout[:, C:].numpy(), x.numpy(), t.numpy())
    tout2 = torch.cat([torch.from_numpy(x0_s), sout[:, C:]], 1)
    assert obj.terms(sout, tout2, x, t)["vb"].abs().max() < 1e-9


def test_student_predicting_x0_gets_teacher_x0(batch):
    x, t, tout, sout = batch
    obj = DKDMObjective(_diff(), _diff(predict_xstart=True))
    _, _, x0_t = _hand_gaussian(tout[:, :C].numpy(), tout[:, C:].numpy(), x.numpy(), t.numpy())
    mse = ((x0_t - sout[:, :C].numpy()) ** 2).reshape(len(x), -1).mean(1)
    np.testing.assert_allclose(obj.terms(sout, tout, x, t)["mse"].numpy(), mse, rtol=1e-9)


def test_vb_gradient_reaches_only_variance_channels(batch):
    x, t, tout, sout = batch
    sout = sout.clone().requires_grad_(True)
    terms = DKDMObjective(_diff(), _diff()).terms(sout, tout, x, t)
    terms["vb"].sum().backward()
    assert sout.grad[:, :C].abs().max() == 0
    assert sout.grad[:, C:].abs().min() > 0
    sout.grad = None
    terms = DKDMObjective(_diff(), _diff()).terms(sout, tout, x, t)
    terms["mse"].sum().backward()
    assert sout.grad[:, C:].abs().max() == 0 and sout.grad[:, :C].abs().min() > 0


def test_zero_loss_when_student_is_teacher():
    torch.manual_seed(0)
    model = create_model("digits-student", num_res_blocks=1, attention_resolutions="", dropout=0.0)
    with torch.no_grad():  # the output layer is zero-initialised; make the outputs non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    d = create_diffusion(steps=100, noise_schedule="cosine", learn_sigma=True)
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 100, (8,))
    t[0] = 0
    with torch.no_grad():
        tout = model(x, d.model_timesteps(t))
    assert tout.abs().mean() > 1e-3
    terms = DKDMObjective(d, d).losses(model, x, t, tout)
    assert terms["mse"].abs().max() == 0
    assert terms["vb"].abs().max() < 1e-5  # guided-diffusion's KL formula rounds in float32
    other = DKDMObjective(d, d).terms(tout + 0.1, tout, x, t)
    assert (other["loss"] > 1e-3).all()


def test_fixed_variance_student_has_no_vb_and_teacher_variance_is_ignored(batch):
    x, t, tout, sout = batch
    obj = DKDMObjective(_diff(), _diff(learn_sigma=False))
    terms = obj.terms(sout[:, :C], tout, x, t)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], ((tout[:, :C] - sout[:, :C]) ** 2).mean((1, 2, 3)))


def test_learned_student_fixed_teacher_targets_teacher_variance(batch):
    x, t, tout, _sout = batch
    obj = DKDMObjective(_diff(learn_sigma=False), _diff())
    assert obj.warnings and "fixed variance" in obj.warnings[0]
    # v = +1 is log(beta_t): the FIXED_LARGE teacher's variance for t > 0, so the KL vanishes
    # when the means agree; any other v costs.
    s = torch.cat([tout[:, :C], torch.ones_like(tout[:, :C])], 1)
    vb = obj.terms(s, tout[:, :C], x, t)["vb"]
    assert vb[1:].abs().max() < 1e-9
    s2 = torch.cat([tout[:, :C], torch.zeros_like(tout[:, :C])], 1)
    # (beta_t and beta~_t nearly coincide at large t, so look where they differ.)
    assert (obj.terms(s2, tout[:, :C], x, t)["vb"][1:4] > 1e-5).all()


def test_use_kl_student_trains_mean_through_kl(batch):
    x, t, tout, sout = batch
    obj = DKDMObjective(_diff(), _diff(use_kl=True))
    sout = sout.clone().requires_grad_(True)
    terms = obj.terms(sout, tout, x, t)
    assert "mse" not in terms
    terms["loss"].sum().backward()
    assert sout.grad[:, :C].abs().max() > 0


@pytest.mark.parametrize(
    "teacher_kw, student_kw, simple_only, match",
    [
        ({}, {"steps": 2 * T}, False, "diffusion steps"),
        ({}, {"noise_schedule": "linear"}, False, "noise schedule"),
        ({}, {}, True, "variance channels would stay untrained"),
        ({}, {"timestep_respacing": "10"}, False, "respaced"),
        ({}, {"use_kl": True, "learn_sigma": True}, True, "variance channels|use_kl"),
    ],
)
def test_refusals(teacher_kw, student_kw, simple_only, match):
    with pytest.raises(ObjectiveError, match=match):
        DKDMObjective(_diff(**teacher_kw), _diff(**student_kw), simple_only=simple_only)


def test_previous_x_refused():
    d = _diff()
    from dkdm.diffusion import ModelMeanType

    d.model_mean_type = ModelMeanType.PREVIOUS_X
    with pytest.raises(ObjectiveError, match="PREVIOUS_X"):
        DKDMObjective(d, _diff())


def test_simple_only_with_fixed_variance_student(batch):
    x, t, tout, sout = batch
    obj = DKDMObjective(_diff(learn_sigma=False), _diff(learn_sigma=False), simple_only=True)
    terms = obj.terms(sout[:, :C], tout[:, :C], x, t)
    torch.testing.assert_close(terms["loss"], ((tout[:, :C] - sout[:, :C]) ** 2).mean((1, 2, 3)))


# ------------------------------------------------------------------ found by mutation testing


def _gaussian(betas, learn_sigma=True):
    from dkdm.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType

    var = ModelVarType.LEARNED_RANGE if learn_sigma else ModelVarType.FIXED_SMALL
    return GaussianDiffusion(
        betas=np.asarray(betas, dtype=np.float64),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=var,
        loss_type=LossType.MSE,
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b * (1 + 3e-6),  # a relative change above the 1e-6 tolerance
        lambda b: b + 5e-9,  # an absolute change above the 1e-9 floor
    ],
)
def test_schedules_that_differ_slightly_are_still_different(change):
    betas = np.asarray(_diff().betas)
    from dkdm.distill.objective import check_compatible

    assert check_compatible(_gaussian(betas), _gaussian(betas)) == []
    with pytest.raises(ObjectiveError, match=r"^teacher and student use different noise schedules \(betas differ\)"):
        check_compatible(_gaussian(betas), _gaussian(change(betas)))


def test_refusals_name_the_side_and_warnings_fire_exactly_when_due():
    from dkdm.diffusion import ModelMeanType
    from dkdm.distill.objective import check_compatible

    for who in ("teacher", "student"):
        pair = {"teacher": _diff(), "student": _diff()}
        pair[who].model_mean_type = ModelMeanType.PREVIOUS_X
        with pytest.raises(ObjectiveError, match=f"^the {who} predicts x_\\(t-1\\) directly"):
            check_compatible(pair["teacher"], pair["student"])
        pair = {"teacher": _diff(), "student": _diff(), who: _diff(timestep_respacing="10")}
        with pytest.raises(ObjectiveError, match=f"^the {who} diffusion is respaced"):
            check_compatible(pair["teacher"], pair["student"])
    with pytest.raises(ObjectiveError, match=r"^--simple_only trains the mean only, but the student learns"):
        check_compatible(_diff(), _diff(), simple_only=True)
    learned, fixed = _diff(), _diff(learn_sigma=False)
    warning = check_compatible(fixed, learned)
    assert len(warning) == 1 and warning[0].startswith("the teacher has a fixed variance; the student's learned")
    assert check_compatible(learned, learned) == []  # the default is simple_only=False: no refusal
    assert check_compatible(fixed, fixed) == [] and check_compatible(learned, fixed) == []
    assert check_compatible(fixed, fixed, simple_only=True) == []


def test_losses_pass_the_labels_to_the_student(batch):
    x, t, tout, _ = batch
    obj = DKDMObjective(_diff(), _diff())
    seen = {}

    def student(x_, t_, y=None):
        seen["y"] = y
        return torch.zeros(x_.shape[0], 2 * C, *x_.shape[2:], dtype=x_.dtype)

    y = torch.arange(x.shape[0])
    obj.losses(student, x, t, tout, model_kwargs={"y": y})
    assert seen["y"] is y
