"""GaussianDiffusion.ddim_jump_from_xstart: the eta=0 DDIM step to any earlier step (the pool's warm-up)."""

import numpy as np
import torch

from dkdm.diffusion import create_diffusion


def test_ddim_jump_matches_float64_formula_and_one_step_ddim():
    d = create_diffusion(steps=100, noise_schedule="cosine")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 4, 4, generator=g)
    x0 = torch.randn(5, 2, 4, 4, generator=g).clamp(-1, 1)
    t = torch.tensor([99, 50, 10, 3, 1])
    s = torch.tensor([40, 20, 9, 0, 0])
    out = d.ddim_jump_from_xstart(x, t, x0, s)
    ab = d.alphas_cumprod
    xd, x0d = x.double().numpy(), x0.double().numpy()
    for i in range(5):
        eps = (xd[i] / np.sqrt(ab[t[i]]) - x0d[i]) / np.sqrt(1 / ab[t[i]] - 1)
        ref = np.sqrt(ab[s[i]]) * x0d[i] + np.sqrt(1 - ab[s[i]]) * eps
        np.testing.assert_allclose(out[i].double().numpy(), ref, rtol=1e-5, atol=1e-5)
    # One step down it is exactly DDIM with eta = 0 (the model predicting eps consistent with x0).
    eps = d.predict_eps_from_xstart(x, t, x0)
    step = d.ddim_sample(lambda x_, t_, **k: eps, x, t, clip_denoised=False, eta=0.0)
    torch.testing.assert_close(d.ddim_jump_from_xstart(x, t, step["pred_xstart"], t - 1), step["sample"])
