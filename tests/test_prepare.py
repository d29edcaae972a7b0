"""Pool preparation as its own object: the lane plan, and plan / run / checkpoint / resume."""

import numpy as np
import pytest
import torch

from dkdm.diffusion import create_diffusion
from dkdm.distill.pool import DynamicPool
from dkdm.distill.prepare import ShuffleDenoise, pack_lanes, path_lengths
from dkdm.training.checkpoint import load_file


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_lane_plan_wastes_no_evaluation_and_keeps_busy_lanes_a_prefix(slots):
    rng = np.random.default_rng(slots)
    lengths = rng.integers(0, 30, size=57)
    plan = pack_lanes(lengths, slots)
    active = plan["active"]
    assert active.sum() == lengths.sum()  # every teacher evaluation moves a sample
    assert np.all(np.diff(active) <= 0) and active[0] == min(slots, (lengths > 0).sum())
    # Every sample with work is finished exactly once, at the iteration its lane's clock says.
    assert sorted(plan["item"].tolist()) == sorted(np.flatnonzero(lengths > 0).tolist())
    assert np.all(np.diff(plan["time"]) >= 0)
    # LPT: the lanes' loads differ by at most one sample's length.
    loads = np.bincount(plan["slot"], weights=lengths[plan["item"]], minlength=slots)
    assert loads.max() - loads[loads > 0].min() <= lengths.max()


def test_respaced_path_lengths_count_the_steps_of_a_plain_walk():
    T, grid, exact = 100, 10, 3
    end = np.arange(T)
    want = []
    for e in end:  # the walk written out: jump to the grid point below, never past end + exact
        t, n = T - 1, 0
        while t > e:
            t = t - 1 if t - e <= exact else max(((t - 1) // grid) * grid, e + exact)
            n += 1
        want.append(n)
    assert path_lengths(end, T, "respaced", grid, exact).tolist() == want
    assert path_lengths(end, T, "full", grid, exact).tolist() == (T - 1 - end).tolist()


class _Teacher:
    """Bayes-optimal epsilon for N(0, 0.25) data, zero variance channel; may fail on call ``fail``."""

    def __init__(self, diffusion, fail=None):
        self.abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)
        self.calls, self.fail = 0, fail

    def __call__(self, x, t, y=None):
        self.calls += 1
        if self.fail is not None and self.calls == self.fail:
            raise KeyboardInterrupt("simulated")
        ab = self.abar[t].view(-1, 1, 1, 1)
        return torch.cat([(1 - ab).sqrt() * x / (ab * 0.25 + 1 - ab), torch.zeros_like(x)], 1)


def _pool(d):
    return DynamicPool(d, (1, 4, 4), 8, rho=0.5, teacher_batch=16, seed=5, num_classes=3)


def test_checkpoint_and_resume_reproduce_an_uninterrupted_run(tmp_path):
    d = create_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)
    ref = _pool(d)
    stats = ShuffleDenoise(ref, progress=False).run(_Teacher(d))
    assert stats["iterations"] == ShuffleDenoise(_pool(d), progress=False).iters

    part = str(tmp_path / "prep.partial.pt")
    a = _pool(d)
    prep = ShuffleDenoise(a, part, every_s=0, every_n=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prep.run(_Teacher(d, fail=6))
    assert prep.done == 5 and load_file(part)["iter"] == 5  # saved at the top of the failing batch

    b = _pool(d)
    teacher = _Teacher(d)
    ShuffleDenoise(b, part, progress=False).run(teacher)
    assert teacher.calls == prep.iters - 5
    assert torch.equal(b.x, ref.x) and torch.equal(b.t, ref.t) and torch.equal(b.y, ref.y)
