"""epsilon, x_0 and v predictions: every conversion pair against the closed forms in float64,
v-prediction training targets, the DKDM objective across parameterisations, explicit-end schedules."""

import itertools

import numpy as np
import pytest
import torch

from dkdm.config import ConfigError
from dkdm.diffusion import create_diffusion, get_named_beta_schedule
from dkdm.diffusion.gaussian import ModelMeanType
from dkdm.distill.objective import DKDMObjective

KINDS = (ModelMeanType.EPSILON, ModelMeanType.START_X, ModelMeanType.VELOCITY)
T = 50


def _truth(seed=0):
    g = torch.Generator().manual_seed(seed)
    d = create_diffusion(steps=T, noise_schedule="cosine")
    x0 = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 25, 48, 49])
    abar = np.cumprod(1.0 - get_named_beta_schedule("cosine", T))  # written from the betas, not the module
    a = torch.from_numpy(np.sqrt(abar))[t].view(-1, 1, 1, 1)
    s = torch.from_numpy(np.sqrt(1.0 - abar))[t].view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    return d, x_t, t, {ModelMeanType.EPSILON: eps, ModelMeanType.START_X: x0, ModelMeanType.VELOCITY: v}


@pytest.mark.parametrize("source, target", list(itertools.product(KINDS, KINDS)))
def test_every_conversion_pair_matches_the_closed_form(source, target):
    d, x_t, t, truth = _truth()
    got = d.convert_prediction(x_t, t, truth[source], source, target)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, truth[target], rtol=1e-9, atol=1e-9)


def test_previous_x_does_not_convert():
    d, x_t, t, truth = _truth()
    with pytest.raises(ValueError, match="PREVIOUS_X"):
        d.convert_prediction(x_t, t, truth[ModelMeanType.EPSILON], ModelMeanType.PREVIOUS_X, ModelMeanType.EPSILON)


def test_v_prediction_trains_towards_v_and_samples_through_its_x0():
    d = create_diffusion(steps=T, noise_schedule="cosine", predict_v=True)
    assert d.model_mean_type == ModelMeanType.VELOCITY
    _, _, t, _ = _truth()
    x0 = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    abar = torch.from_numpy(np.cumprod(1.0 - get_named_beta_schedule("cosine", T)))[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def exact(x, ts):
        return v

    def eps_model(x, ts):
        return noise

    assert d.training_losses(exact, x0, t, noise=noise)["mse"].abs().max() < 1e-20
    assert d.training_losses(eps_model, x0, t, noise=noise)["mse"].min() > 1e-3
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = d.p_mean_variance(exact, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-9, atol=1e-9)
    with pytest.raises(ConfigError, match="predict_v"):
        create_diffusion(steps=T, predict_v=True, predict_xstart=True)


@pytest.mark.parametrize("teacher_kind, student_kind", list(itertools.product(KINDS, KINDS)))
def test_dkdm_target_in_the_students_space_for_every_pair(teacher_kind, student_kind):
    flags = {ModelMeanType.START_X: {"predict_xstart": True}, ModelMeanType.VELOCITY: {"predict_v": True}}
    td = create_diffusion(steps=T, noise_schedule="cosine", **flags.get(teacher_kind, {}))
    sd = create_diffusion(steps=T, noise_schedule="cosine", **flags.get(student_kind, {}))
    _, x_t, t, truth = _truth(1)
    obj = DKDMObjective(td, sd)
    terms = obj.terms(truth[student_kind], truth[teacher_kind], x_t, t)  # a student that is exactly right
    assert terms["mse"].abs().max() < 1e-18
    wrong = obj.terms(truth[student_kind] + 0.1, truth[teacher_kind], x_t, t)
    torch.testing.assert_close(wrong["mse"], torch.full_like(wrong["mse"], 0.01), rtol=1e-9, atol=1e-12)


def test_explicit_end_schedules():
    lin = get_named_beta_schedule("linear:0.0001,0.02", 1000)
    np.testing.assert_array_equal(lin, get_named_beta_schedule("linear", 1000))  # ADM's at T = 1000
    sq = get_named_beta_schedule("scaled_linear:0.0015,0.0195", 1000)
    assert sq[0] == pytest.approx(0.0015, rel=1e-12) and sq[-1] == pytest.approx(0.0195, rel=1e-12)
    steps = np.diff(np.sqrt(sq))
    np.testing.assert_allclose(steps, (0.0195**0.5 - 0.0015**0.5) / 999, rtol=1e-9)  # linear in sqrt(beta)
    for bad in ("scaled_linear:", "linear:0.02,0.0001", "linear:0,0.1", "scaled_linear:a,b"):
        with pytest.raises(ValueError, match="noise schedule"):
            get_named_beta_schedule(bad, 100)
