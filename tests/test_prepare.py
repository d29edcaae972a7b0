"""Pool preparation as its own object: the lane plan, and plan / run / checkpoint / resume."""

import os

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


# ------------------------------------------------------------------ found by mutation testing


def _lane_queues(plan, slots):
    """Each lane's samples in order, rebuilt from the plan's first samples and its events."""
    queues = [[int(f)] if f >= 0 else [] for f in plan["first"]]
    order = np.lexsort((plan["slot"], plan["time"]))
    for s, nxt in zip(plan["slot"][order], plan["next"][order], strict=True):
        if nxt >= 0:
            queues[s].append(int(nxt))
    return queues


@pytest.mark.parametrize("slots", [1, 4])
def test_lane_plan_chains_every_sample_once_and_numbers_lanes_by_load(slots):
    lengths = np.random.default_rng(7).integers(0, 12, size=40)
    plan = pack_lanes(lengths, slots)
    queues = _lane_queues(plan, slots)
    done = sorted(i for q in queues for i in q)
    assert done == sorted(np.flatnonzero(lengths > 0).tolist())  # each sample exactly once
    loads = [int(lengths[q].sum()) for q in queues]
    assert loads == sorted(loads, reverse=True)  # busy lanes are a prefix
    for s, q in enumerate(queues):  # a lane finishes each sample at the sum of its lengths so far
        ends = np.cumsum(lengths[q])
        mine = plan["slot"] == s
        assert plan["time"][mine].tolist() == ends.tolist() and plan["item"][mine].tolist() == q
    empty = pack_lanes(np.zeros(5, dtype=np.int64), 3)
    assert empty["iters"] == 0 and empty["active"].shape == (0,) and len(empty["item"]) == 0


class _LabelTeacher(_Teacher):
    """Its epsilon depends on the label, so a wrong or missing label shows in the samples."""

    def __call__(self, x, t, y=None):
        out = super().__call__(x, t)
        return torch.cat([out[:, :1] + 0.05 * y.view(-1, 1, 1, 1).float(), out[:, 1:]], 1)


def test_one_lane_replays_as_separate_chains_with_their_labels():
    """With one lane every sample is denoised in turn; each equals its own chain, run alone from
    the same noise draws with its own label (written with p_sample_from_output per step)."""
    d = create_diffusion(steps=12, noise_schedule="cosine", learn_sigma=True)
    pool = DynamicPool(d, (1, 2, 2), 3, rho=1.0, teacher_batch=1, seed=2, num_classes=4, clip_denoised=False)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(pool._noise_gen.get_state())
    prep = ShuffleDenoise(pool, progress=False)
    order = _lane_queues(pack_lanes(prep.lengths, 1), 1)[0]
    assert order[0] != 0 and 0 in order  # sample 0 is reached as a lane's next sample
    prep.run(_LabelTeacher(d))
    teacher = _LabelTeacher(d)
    x = torch.randn((1, 1, 2, 2), generator=gen)  # the lane's first noise
    for i in order:
        t = torch.full((1,), 11)
        for _ in range(int(prep.lengths[i])):
            out = teacher(x, t, pool.y[i : i + 1])
            noise = torch.randn((1, 1, 2, 2), generator=gen)
            x = d.p_sample_from_output(out, x, t, clip_denoised=False, noise=noise)["sample"]
            t = t - 1
        assert int(t) == int(pool.t[i])
        torch.testing.assert_close(pool.x[i : i + 1], x, rtol=0, atol=0)
        x = torch.randn((1, 1, 2, 2), generator=gen)  # the lane's next sample starts from fresh noise


@pytest.mark.parametrize("every_s, every_n", [(0.0, 2), (300.0, 2), (300.0, 1)])
def test_progress_is_saved_every_n_batches_and_no_path_writes_nothing(tmp_path, monkeypatch, every_s, every_n):
    d = create_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)
    part = str(tmp_path / "prep.partial.pt")
    seen = []

    class Watch(_Teacher):
        def __call__(self, x, t, y=None):
            import os

            seen.append(load_file(part)["iter"] if os.path.exists(part) else None)
            return super().__call__(x, t)

    prep = ShuffleDenoise(_pool(d), part, every_s=every_s, every_n=every_n, progress=False)
    prep.run(Watch(d))
    n = every_n  # saved after batches n, 2n, ...
    assert seen == [None if k < n else n * (k // n) for k in range(prep.iters)]
    monkeypatch.chdir(tmp_path / "..")
    before = set(os.listdir("."))
    ShuffleDenoise(_pool(d), progress=False).run(_Teacher(d))
    assert set(os.listdir(".")) == before


def test_a_class_conditional_preparation_resumes_with_its_labels(tmp_path):
    d = create_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)
    ref = _pool(d)
    ShuffleDenoise(ref, progress=False).run(_LabelTeacher(d))
    part = str(tmp_path / "p.pt")
    with pytest.raises(KeyboardInterrupt):
        ShuffleDenoise(_pool(d), part, progress=False).run(_LabelTeacher(d, fail=9))
    b = _pool(d)
    ShuffleDenoise(b, part, progress=False).run(_LabelTeacher(d))
    assert torch.equal(b.x, ref.x) and torch.equal(b.y, ref.y)


class _GuidedTeacher(_LabelTeacher):
    """A w-conditioned teacher: its epsilon depends on the label and on the guidance scale."""

    def __call__(self, x, t, y=None, w=None):
        out = super().__call__(x, t, y)
        return torch.cat([out[:, :1] + 0.03 * w.view(-1, 1, 1, 1), out[:, 1:]], 1)


def _guided_pool(d, **kw):
    return DynamicPool(d, (1, 4, 4), 8, rho=0.5, teacher_batch=16, seed=5, num_classes=3, w_range=(0.0, 4.0), **kw)


def test_a_guidance_conditioned_preparation_gives_each_sample_its_w_and_resumes_with_it(tmp_path):
    d = create_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)
    ref = _guided_pool(d)
    ShuffleDenoise(ref, progress=False).run(_GuidedTeacher(d))
    shifted = _guided_pool(d)
    shifted.w.add_(1.0)  # the same noise and labels, other scales: other samples
    ShuffleDenoise(shifted, progress=False).run(_GuidedTeacher(d))
    assert not torch.allclose(shifted.x, ref.x, atol=1e-3)
    part = str(tmp_path / "p.pt")
    with pytest.raises(KeyboardInterrupt):
        ShuffleDenoise(_guided_pool(d), part, progress=False).run(_GuidedTeacher(d, fail=9))
    assert load_file(part)["w_act"] is not None  # the lanes' scales are saved with them
    b = _guided_pool(d)
    ShuffleDenoise(b, part, progress=False).run(_GuidedTeacher(d))
    assert torch.equal(b.x, ref.x) and torch.equal(b.w, ref.w)


def test_one_lane_gives_each_chain_its_own_guidance_scale():
    d = create_diffusion(steps=12, noise_schedule="cosine", learn_sigma=True)
    pool = DynamicPool(
        d, (1, 2, 2), 3, rho=1.0, teacher_batch=1, seed=2, num_classes=4, clip_denoised=False, w_range=(0.0, 4.0)
    )
    gen = torch.Generator().manual_seed(0)
    gen.set_state(pool._noise_gen.get_state())
    prep = ShuffleDenoise(pool, progress=False)
    order = _lane_queues(pack_lanes(prep.lengths, 1), 1)[0]
    prep.run(_GuidedTeacher(d))
    teacher = _GuidedTeacher(d)
    x = torch.randn((1, 1, 2, 2), generator=gen)
    for i in order:
        t = torch.full((1,), 11)
        for _ in range(int(prep.lengths[i])):
            out = teacher(x, t, pool.y[i : i + 1], pool.w[i : i + 1])
            noise = torch.randn((1, 1, 2, 2), generator=gen)
            x = d.p_sample_from_output(out, x, t, clip_denoised=False, noise=noise)["sample"]
            t = t - 1
        torch.testing.assert_close(pool.x[i : i + 1], x, rtol=0, atol=0)
        x = torch.randn((1, 1, 2, 2), generator=gen)
