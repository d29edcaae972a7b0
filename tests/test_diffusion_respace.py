"""Respacing: which steps are kept, the spaced schedule, and the timesteps a model sees."""

import numpy as np
import pytest
import torch

from dkdm.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)


def test_space_timesteps_sections():
    # 300 steps in three sections of 100: 10, 15 and 20 evenly spread steps.
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    first, second, third = steps[:10], steps[10:25], steps[25:]
    assert first[0] == 0 and first[-1] == 99 and all(s < 100 for s in first)
    assert second[0] == 100 and second[-1] == 199 and third[0] == 200 and third[-1] == 299
    assert space_timesteps(300, [10, 15, 20]) == set(steps)
    fifty = sorted(space_timesteps(1000, "50"))
    assert len(fifty) == 50 and fifty[0] == 0 and fifty[-1] == 999
    assert np.all(np.diff(fifty) >= 20) and np.all(np.diff(fifty) <= 21)
    assert space_timesteps(1000, "1000") == set(range(1000))
    # Uneven division: the first sections get the extra steps.
    assert sorted(space_timesteps(10, "2,2,2")) == [0, 3, 4, 6, 7, 9]


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    assert space_timesteps(100, "ddim7") == set(range(0, 100, 15))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ddim7x", "expected 'ddim' followed by a number"),
        ("ddim400", "no integer stride gives exactly 400"),
        ("ten", "comma-separated step counts"),
        ("60,10", "section 0 of 100 steps has 50 steps, cannot take 60"),
        ("0", "not all zero"),
    ],
)
def test_space_timesteps_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(100 if spec != "ddim400" else 1000, spec)


def spaced(spec, steps=200, rescale=False, var=ModelVarType.LEARNED_RANGE, schedule="linear"):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, spec),
        betas=get_named_beta_schedule(schedule, steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=var,
        loss_type=LossType.MSE,
        rescale_timesteps=rescale,
    )


@pytest.mark.parametrize("spec", ["10", "ddim20", "5,10,3", "200"])
def test_respaced_alphas_cumprod_equal_originals_at_kept_steps(spec):
    base = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 200),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    d = spaced(spec)
    assert d.timestep_map == sorted(space_timesteps(200, spec)) and d.original_num_steps == 200
    assert d.num_timesteps == len(d.timestep_map)
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-13, atol=0)
    if spec == "200":
        np.testing.assert_allclose(d.betas, base.betas, rtol=1e-12)
    else:
        # A spaced step spans one or more original steps, so it carries at least their noise.
        assert np.all(d.betas >= base.betas[d.timestep_map] * (1 - 1e-12))
        assert np.any(d.betas > 2 * base.betas[d.timestep_map])


class Recorder(torch.nn.Module):
    """A tiny conv net that records the timesteps it is called with."""

    def __init__(self, channels=1, out_mult=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels * out_mult, 3, padding=1)
        self.emb = torch.nn.Linear(1, channels * out_mult)
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        h = self.conv(x) + self.emb(t.float()[:, None] / 1000.0)[:, :, None, None]
        return torch.tanh(h)


def test_wrapped_model_sees_original_timesteps():
    d = spaced("10")
    model = Recorder()
    x = torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 4, 9])
    d.p_mean_variance(model, x, t)
    d.training_losses(model, x.clamp(-1, 1), t)
    want = torch.tensor(d.timestep_map)[t]
    assert len(model.seen) == 2
    for seen in model.seen:
        assert seen.dtype == torch.long and torch.equal(seen, want)
    assert torch.equal(d.model_timesteps(t), want)
    # With rescale_timesteps the model sees floats on the 0..1000 scale of the original process.
    dr = spaced("10", rescale=True)
    model.seen.clear()
    dr.p_mean_variance(model, x, t)
    assert model.seen[0].dtype == torch.float32
    torch.testing.assert_close(model.seen[0], want.float() * (1000.0 / 200))
    # The un-spaced diffusion rescales by its own length.
    full = create_diffusion(steps=200, rescale_timesteps=True)
    torch.testing.assert_close(full.model_timesteps(t), t.float() * 5.0)


def test_spaced_training_losses_pass_noise_and_model_kwargs_on():
    d = spaced("10")
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 4, 9])
    noise = torch.randn_like(x)

    def zero_model(x_t, ts, y):  # needs its keyword; predicts epsilon = 0 (and a variance) at original steps
        assert torch.equal(ts, torch.tensor(d.timestep_map)[t]) and torch.equal(y, torch.tensor([1, 2, 3]))
        return torch.zeros(x_t.shape[0], 2, *x_t.shape[2:])

    terms = d.training_losses(zero_model, x, t, model_kwargs={"y": torch.tensor([1, 2, 3])}, noise=noise)
    torch.testing.assert_close(terms["mse"], (noise**2).mean(dim=(1, 2, 3)), rtol=0, atol=0)


def test_from_output_path_matches_with_model_timesteps():
    """The teacher-once path: call the network at model_timesteps(t), then interpret its output."""
    d = spaced("ddim20", rescale=True)
    model = Recorder()
    x = torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 3, 11, 19])
    a = d.p_mean_variance(model, x, t)
    b = d.p_mean_variance_from_output(model(x, d.model_timesteps(t)), x, t)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_respaced_p_sample_loop_end_to_end():
    d = create_diffusion(steps=100, noise_schedule="cosine", learn_sigma=True, timestep_respacing="8")
    model = Recorder()
    shape = (2, 1, 8, 8)
    samples = list(d.p_sample_loop_progressive(model, shape))
    assert len(samples) == 8
    out = samples[-1]["sample"]
    assert out.shape == shape and torch.isfinite(out).all()
    # Called from the noisiest step down, each time with the original step index.
    seen = torch.stack([s[0] for s in model.seen]).tolist()
    assert seen == sorted(d.timestep_map, reverse=True) and seen[0] == 99 and seen[-1] == 0
    # The last step adds no noise: it is the mean.
    assert torch.equal(samples[-1]["sample"], samples[-1]["mean"])
    torch.manual_seed(5)
    a = d.p_sample_loop(model, shape, progress=True)
    torch.manual_seed(5)
    b = d.p_sample_loop(model, shape)
    assert torch.equal(a, b)
    noise = torch.randn(shape)
    ddim = d.ddim_sample_loop(model, shape, noise=noise)
    assert torch.equal(ddim, d.ddim_sample_loop(model, shape, noise=noise.clone()))
    with pytest.raises(ValueError, match="noise shape"):
        d.p_sample_loop(model, (3, 1, 8, 8), noise=noise)


def test_spaced_diffusion_rejects_bad_steps():
    with pytest.raises(ValueError, match="out of range"):
        SpacedDiffusion(
            use_timesteps=[0, 5, 300],
            betas=get_named_beta_schedule("linear", 100),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE,
        )


def test_section_counts_edges():
    assert space_timesteps(100, "ddim1") == {0} and space_timesteps(100, "ddim100") == set(range(100))
    assert space_timesteps(100, "ddim2") == {0, 50}
    # A section may take no steps; a negative count is refused even when the total is positive.
    assert space_timesteps(30, "2,0,2") == {0, 9, 20, 29}
    assert space_timesteps(30, "1,1,1") == {0, 10, 20}
    with pytest.raises(ValueError, match="must be non-negative and not all zero"):
        space_timesteps(30, "5,-1,2")
    with pytest.raises(ValueError, match="must be non-negative and not all zero"):
        space_timesteps(30, "0,0")


def test_spaced_diffusion_names_the_steps_out_of_range():
    def make(steps):
        return SpacedDiffusion(
            use_timesteps=steps,
            betas=get_named_beta_schedule("linear", 100),
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE,
        )

    assert make([0, 99]).timestep_map == [0, 99]
    with pytest.raises(ValueError, match=r"subset of 0\.\.99; got 2 steps, out of range: \[100\]$"):
        make([0, 100])
    with pytest.raises(ValueError, match=r"out of range: \[-1, 100, 101, 102, 103\]$"):  # the first five
        make([-1, 5, 100, 101, 102, 103, 104])
    with pytest.raises(ValueError, match=r"non-empty subset of 0\.\.99; got 0 steps$"):
        make([])
