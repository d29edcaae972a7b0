"""The dynamic iterative batch pool: preparation, draw/update semantics, variants, state, cache, memory."""

import hashlib
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

import dkdm.distill.pool as pool_mod
from dkdm.diffusion import create_diffusion
from dkdm.distill.pool import (
    DynamicPool,
    PoolMemoryError,
    estimate_pool_bytes,
    pool_size,
    teacher_fingerprint,
)

T = 20
SHAPE = (1, 4, 4)
SIGMA2 = 0.25  # data ~ N(0, SIGMA2 I): the exact epsilon-predictor is linear in x_t


def _diffusion(steps=T):
    return create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=True)


class GaussTeacher:
    """The Bayes-optimal teacher for Gaussian data (zero variance output = halfway v)."""

    def __init__(self, diffusion, fail_after=None, error=None):
        self.abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)
        self.calls = 0
        self.fail_after = fail_after
        self.error = error or KeyboardInterrupt("simulated interruption")

    def __call__(self, x, t, y=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise self.error
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * SIGMA2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(x)], 1)


# ------------------------------------------------------------------ independent references
# Written from the betas in float64 numpy, not with the diffusion module under test.


def _schedule(d):
    """abar, the posterior-mean coefficients and the variance of the teacher's step (v = 0)."""
    b = np.asarray(d.betas, dtype=np.float64)
    ab = np.cumprod(1 - b)
    abp = np.append(1.0, ab[:-1])
    bt = b * (1 - abp) / (1 - ab)
    lo, hi = np.log(np.append(bt[1], bt[1:])), np.log(b)  # IDDPM clips beta~_0 to beta~_1
    c1, c2 = b * np.sqrt(abp) / (1 - ab), np.sqrt(1 - b) * (1 - abp) / (1 - ab)
    return ab, c1, c2, np.exp(0.5 * (lo + hi))  # the variance channel 0 is halfway in log space


def _x0_gain(ab):
    """E[x_0 | x_t] = gain * x_t for data N(0, SIGMA2): what GaussTeacher's epsilon implies."""
    return np.sqrt(ab) * SIGMA2 / (ab * SIGMA2 + 1 - ab)


def _reference_step(d, x, t, z, clip=True):
    """One ancestral step of the Bayes-optimal teacher, float64."""
    ab, c1, c2, var = _schedule(d)
    x = np.asarray(x, dtype=np.float64)
    x0 = _x0_gain(ab[t]) * x
    x0 = np.clip(x0, -1, 1) if clip else x0
    return c1[t] * x0 + c2[t] * x + (np.sqrt(var[t]) * np.asarray(z, dtype=np.float64) if t > 0 else 0.0)


def _reference_variance(d, ends, respaced=None):
    """E[x^2] per dimension of a sample brought from N(0, 1) at T - 1 to each end step without
    clipping: every step is linear in x (an ancestral step adds its variance, a DDIM jump none).
    ``respaced=(grid, exact)`` walks the respaced warm-up's path, written out here."""
    ab, c1, c2, var = _schedule(d)
    k, steps = _x0_gain(ab), len(ab)

    def walk(end):
        t, v = steps - 1, 1.0
        while t > end:
            s = t - 1
            if respaced and t - end > respaced[1]:
                s = max(((t - 1) // respaced[0]) * respaced[0], end + respaced[1])
            if s == t - 1:
                v = (c1[t] * k[t] + c2[t]) ** 2 * v + var[t]
            else:  # x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, both linear in x_t
                eps_gain = (1 - np.sqrt(ab[t]) * k[t]) / np.sqrt(1 - ab[t])
                v = (np.sqrt(ab[s]) * k[t] + np.sqrt(1 - ab[s]) * eps_gain) ** 2 * v
            t = s
        return v

    table = {e: walk(e) for e in set(ends.tolist())}
    return np.array([table[e] for e in ends.tolist()])


def _check_marginal(pool, d, respaced=None):
    """The pool's second moment, normalised by the data's true marginal, against the exact value
    of the chain it ran, within 4 standard errors (z^2 of a N(0, r) value has variance 2 r^2)."""
    ab = _schedule(d)[0][pool.t.numpy()]
    ratio = _reference_variance(d, pool.t.numpy(), respaced) / (ab * SIGMA2 + 1 - ab)
    z2 = (pool.x.flatten(1).double().numpy() ** 2) / (ab * SIGMA2 + 1 - ab)[:, None]
    dims = z2.shape[1]
    expect = ratio.mean()
    se = np.sqrt(np.sum(2 * ratio**2) * dims) / z2.size  # about 0.008 for 32,000 values
    assert abs(z2.mean() - expect) < 4 * se, (z2.mean(), expect, se)
    return expect, se


def _make(batch_size=8, **kw):
    d = kw.pop("diffusion", None) or _diffusion()
    args = {"rho": 0.5, "teacher_batch": 64, "seed": 3}
    args.update(kw)
    return DynamicPool(d, SHAPE, batch_size, **args), d


def test_size_and_memory_estimate():
    assert pool_size("dynamic", 0.4, 1000, 128) == 400 * 128
    assert pool_size("shuffled", 0.4, 1000, 128) == 128
    assert pool_size("iterative", 0.4, 1000, 128) == 128
    with pytest.raises(ValueError, match="rho"):
        pool_size("dynamic", 0.0001, 100, 8)
    m = estimate_pool_bytes(51200, (3, 32, 32), 128, 1024)
    assert m["per_sample"] == 3 * 32 * 32 * 4 + 8
    assert m["pool"] == 51200 * m["per_sample"]


def test_preparation_gives_uniform_steps_and_uses_full_teacher_batches():
    pool, d = _make(batch_size=100, rho=1.0, teacher_batch=128)  # N = 20 * 100
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    counts = np.bincount(pool.t.numpy(), minlength=T)
    assert counts.sum() == pool.size == 2000
    assert stats.chisquare(counts).pvalue > 0.01
    s = pool.prep_stats
    # Every sample took exactly T-1-end evaluations, none was wasted on an idle lane, and
    # the batches stayed full but for the last few.
    assert s["useful_evals"] == s["total_evals"] == (T - 1 - pool.t.numpy()).sum()
    assert teacher.calls == s["iterations"]
    assert teacher.calls <= s["useful_evals"] / 128 + T
    # Without clipping the chain is linear-Gaussian, so its marginal variance is exact (below);
    # a 5% error in the step's variance moves the mean of z^2 by ~8 standard errors.
    unclipped, d = _make(batch_size=100, rho=1.0, teacher_batch=128, clip_denoised=False)
    unclipped.prepare(GaussTeacher(d), progress=False)
    _check_marginal(unclipped, d)


def test_preparation_matches_a_straight_ancestral_chain():
    """A sample prepared in a slot equals the same chain run alone with the same noises."""
    pool, d = _make(batch_size=4, rho=0.25, teacher_batch=1)  # N = 20: one lane, sequential
    teacher = GaussTeacher(d)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(pool._noise_gen.get_state())
    pool.prepare(teacher, progress=False)
    # Replay the first sample of the single lane: the plan puts the longest chain first.
    lengths = T - 1 - pool.t.numpy()
    first = int(np.argsort(-lengths, kind="stable")[0])
    x = torch.randn((1, *SHAPE), generator=gen)
    t = torch.full((1,), T - 1)
    x = x.double().numpy()
    for _ in range(lengths[first]):
        x = _reference_step(d, x, int(t), torch.randn((1, *SHAPE), generator=gen).numpy())
        t = t - 1
    assert int(t) == int(pool.t[first])
    np.testing.assert_allclose(pool.x[first : first + 1].double().numpy(), x, rtol=0, atol=2e-5)


def test_a_step_replaces_exactly_the_drawn_indices():
    pool, d = _make(batch_size=8)
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    pool.t[:5] = 0  # make sure some drawn samples restart
    x0, t0 = pool.x.clone(), pool.t.clone()
    for _ in range(3):
        idx = pool.draw()
        assert idx.shape == (8,) and len(set(idx.tolist())) == 8
        batch = pool.gather(idx)
        pool.update(idx, teacher(batch["x_t"], batch["t"]))
        mask = torch.zeros(pool.size, dtype=torch.bool)
        mask[idx] = True
        assert torch.equal(pool.x[~mask], x0[~mask]) and torch.equal(pool.t[~mask], t0[~mask])
        assert not torch.isclose(pool.x[mask], x0[mask]).flatten(1).all(1).any()
        expect = torch.where(t0[mask] == 0, torch.full_like(t0[mask], T - 1), t0[mask] - 1)
        assert torch.equal(pool.t[mask], expect)
        x0, t0 = pool.x.clone(), pool.t.clone()


def test_sample_past_zero_restarts_as_fresh_noise():
    pool, d = _make(batch_size=8)
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    idx = pool.draw()
    pool.t[idx[:3]] = 0
    batch = pool.gather(idx)
    state = pool._noise_gen.get_state()
    pool.update(idx, teacher(batch["x_t"], batch["t"]))
    noise = torch.randn((8, *SHAPE), generator=torch.Generator().set_state(state))
    assert (pool.t[idx[:3]] == T - 1).all()
    torch.testing.assert_close(pool.x[idx[:3]], noise[:3], rtol=0, atol=0)
    # The others took an ordinary ancestral step with the same noise.
    for i in range(3, 8):
        want = _reference_step(d, batch["x_t"][i].numpy(), int(batch["t"][i]), noise[i].numpy())
        np.testing.assert_allclose(pool.x[idx[i]].double().numpy(), want, rtol=0, atol=1e-5)


def test_iterative_walks_one_batch_down_together():
    pool, d = _make(batch_size=6, variant="iterative")
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    assert teacher.calls == 0 and pool.size == 6 and (pool.t == T - 1).all()
    for k in range(T):
        idx = pool.draw()
        assert torch.equal(idx, torch.arange(6))
        assert (pool.t == T - 1 - k).all()
        b = pool.gather(idx)
        pool.update(idx, teacher(b["x_t"], b["t"]))
    assert (pool.t == T - 1).all()  # finished together, restarted together


def test_shuffled_draws_the_whole_shuffled_batch():
    pool, d = _make(batch_size=40, variant="shuffled")
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    assert pool.size == 40 and len(set(pool.t.tolist())) > 10  # steps spread out
    t0 = pool.t.clone()
    idx = pool.draw()
    assert torch.equal(idx, torch.arange(40))
    b = pool.gather(idx)
    pool.update(idx, teacher(b["x_t"], b["t"]))
    assert torch.equal(pool.t, torch.where(t0 == 0, torch.full_like(t0, T - 1), t0 - 1))


def test_dynamic_draws_are_random_subsets():
    pool, _ = _make(batch_size=8)
    seen = torch.zeros(pool.size, dtype=torch.long)
    for _ in range(200):
        seen[pool.draw()] += 1
    assert seen.min() > 0  # every sample gets drawn
    assert stats.chisquare(seen.numpy()).pvalue > 0.001


def test_state_dict_continues_the_same_stream():
    a, d = _make(batch_size=8, discard_prob=0.3)
    teacher = GaussTeacher(d)
    a.prepare(teacher, progress=False)
    for _ in range(3):
        i = a.draw()
        b = a.gather(i)
        a.update(i, teacher(b["x_t"], b["t"]))
    b_pool, _ = _make(batch_size=8, discard_prob=0.3, seed=99)
    b_pool.load_state_dict(a.state_dict())
    for _ in range(4):
        ia, ib = a.draw(), b_pool.draw()
        assert torch.equal(ia, ib)
        ba, bb = a.gather(ia), b_pool.gather(ib)
        a.update(ia, teacher(ba["x_t"], ba["t"]))
        b_pool.update(ib, teacher(bb["x_t"], bb["t"]))
        assert a.should_discard() == b_pool.should_discard()
    assert torch.equal(a.x, b_pool.x) and torch.equal(a.t, b_pool.t)
    other, _ = _make(batch_size=4)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(a.state_dict())


def test_ranks_and_seeds_give_different_pools():
    pools = []
    for rank in (0, 1):
        p, d = _make(batch_size=8, rank=rank, world_size=2)
        p.prepare(GaussTeacher(d), progress=False)
        pools.append(p)
    assert not torch.equal(pools[0].t, pools[1].t)
    assert pools[0].cache_key("x") != pools[1].cache_key("x")


def test_discard_probability():
    pool, _ = _make(batch_size=8, discard_prob=0.25)
    frac = np.mean([pool.should_discard() for _ in range(4000)])
    assert abs(frac - 0.25) < 0.03  # standard error sqrt(0.25 * 0.75 / 4000) = 0.0068: 4.4 SE
    never, _ = _make(batch_size=8)
    assert not any(never.should_discard() for _ in range(100))


def test_class_labels_kept_and_redrawn_on_restart():
    pool, d = _make(batch_size=8, num_classes=10)
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    assert pool.y is not None and pool.y.max() < 10 and len(set(pool.y.tolist())) > 3
    idx = pool.draw()
    pool.t[idx[:4]] = 0
    pool.t[idx[4:]] = 5
    y0 = pool.y.clone()
    b = pool.gather(idx)
    assert torch.equal(b["y"], y0[idx])
    pool.update(idx, teacher(b["x_t"], b["t"]))
    assert torch.equal(pool.y[idx[4:]], y0[idx[4:]])


def test_memory_refusal(monkeypatch):
    monkeypatch.setattr(pool_mod, "available_memory", lambda device: (10 * 2**20, 2**20))
    with pytest.raises(PoolMemoryError) as e:
        DynamicPool(_diffusion(1000), (3, 32, 32), 128, rho=0.4)
    msg = str(e.value)
    # 51200 samples of 12296 bytes (0.586 GiB) + 1024 preparation slots (0.094 GiB)
    assert "needs 0.68 GiB for 51200 samples" in msg and "only 0.01 GiB are free" in msg
    assert "--rho" in msg and "rho=0.1 needs about 0.15 GiB" in msg
    assert "--pool_device cpu" not in msg  # already on the host
    DynamicPool(_diffusion(1000), (3, 32, 32), 2, rho=0.01, teacher_batch=2)  # a tiny pool fits


def test_memory_refusal_on_gpu_offers_the_host(monkeypatch):
    monkeypatch.setattr(pool_mod, "available_memory", lambda device: (10 * 2**20, 2**20))
    pool = DynamicPool.__new__(DynamicPool)  # only the check, no CUDA allocation
    pool.size, pool.rho, pool.T = 51200, 0.4, 1000
    pool.device = pool.pool_device = torch.device("cuda", 0)
    pool.memory = estimate_pool_bytes(51200, (3, 32, 32), 128, 1024)
    with pytest.raises(PoolMemoryError, match="--pool_device cpu"):
        pool._check_memory()


def test_cache_is_reused(tmp_path):
    a, d = _make(batch_size=8)
    teacher = GaussTeacher(d)
    a.prepare(teacher, teacher_id="tiny", cache_dir=str(tmp_path), progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("pool_")
    b, _ = _make(batch_size=8)
    never = GaussTeacher(d, fail_after=0, error=AssertionError("the cache was not used: the teacher ran"))
    b.prepare(never, teacher_id="tiny", cache_dir=str(tmp_path), progress=False)
    assert never.calls == 0
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    assert torch.equal(a.draw(), b.draw())  # generators restored too
    c, _ = _make(batch_size=8)
    other = GaussTeacher(d)
    c.prepare(other, teacher_id="another teacher", cache_dir=str(tmp_path), progress=False)
    assert other.calls > 0


def test_interrupted_preparation_resumes(tmp_path):
    ref, d = _make(batch_size=16, teacher_batch=16)
    ref.prepare(GaussTeacher(d), progress=False)

    a, _ = _make(batch_size=16, teacher_batch=16)
    with pytest.raises(KeyboardInterrupt):
        a.prepare(
            GaussTeacher(d, fail_after=7), teacher_id="k", cache_dir=str(tmp_path), checkpoint_every=3, progress=False
        )
    partial = [f.name for f in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].endswith(".partial.pt")

    b, _ = _make(batch_size=16, teacher_batch=16)
    teacher = GaussTeacher(d)
    b.prepare(teacher, teacher_id="k", cache_dir=str(tmp_path), progress=False)
    assert teacher.calls == ref.prep_stats["iterations"] - 7  # resumed at the batch where it was interrupted
    assert b.prep_stats["iterations"] == teacher.calls and np.isnan(b.prep_stats["evals_per_s"])
    assert torch.equal(b.x, ref.x) and torch.equal(b.t, ref.t)
    assert [f.name for f in tmp_path.iterdir()] == [partial[0].replace(".partial", "")]


def test_respaced_warmup_is_cheaper_and_lands_on_the_end_steps():
    d = _diffusion(100)
    kw = {"batch_size": 20, "diffusion": d, "rho": 0.5, "clip_denoised": False}
    full, _ = _make(**kw)
    full.prepare(GaussTeacher(d), progress=False)
    cheap, _ = _make(**kw, warmup="respaced", warmup_jumps=10, warmup_exact=3)
    cheap.prepare(GaussTeacher(d), progress=False)
    assert torch.equal(cheap.t, full.t)  # same plan of end steps
    assert cheap.prep_stats["useful_evals"] < 0.35 * full.prep_stats["useful_evals"]
    # Each lands on the exact variance of the chain it ran (grid of ceil(100 / 10) = 10 steps,
    # the last 3 exact), within 4 standard errors of 16,000 values.
    _check_marginal(full, d)
    _check_marginal(cheap, d, respaced=(10, 3))


def test_respaced_warmup_with_a_full_grid_equals_full():
    full, d = _make(batch_size=8)
    full.prepare(GaussTeacher(d), progress=False)
    same, _ = _make(batch_size=8, warmup="respaced", warmup_jumps=T)
    same.prepare(GaussTeacher(d), progress=False)
    assert torch.equal(full.t, same.t)
    torch.testing.assert_close(full.x, same.x)


def test_histogram():
    pool, _ = _make(batch_size=8)
    pool.t.copy_(torch.arange(pool.size) % T)
    torch.testing.assert_close(pool.t_histogram(4), torch.full((4,), 0.25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pool_device", [None, "cpu"])
def test_draw_and_update_never_sync_on_cuda(pool_device):
    d = _diffusion()
    pool = DynamicPool(d, SHAPE, 8, rho=0.5, teacher_batch=64, device="cuda", pool_device=pool_device, seed=0)
    teacher = GaussTeacher(d)
    teacher.abar = teacher.abar.cuda()
    pool.prepare(teacher, progress=False)
    assert pool.x.device.type == (pool_device or "cuda") and pool.x.is_pinned() == (pool_device == "cpu")
    if pool_device == "cpu":
        return  # the host-resident pool copies its batches back, which waits by nature
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            idx = pool.draw()
            b = pool.gather(idx)
            pool.update(idx, teacher(b["x_t"], b["t"]))
            pool.t_histogram()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(pool.x).all()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_corrupt_cache_is_named_set_aside_and_rebuilt(tmp_path, damage, capsys):
    from dkdm import logger

    logger.reset()  # to stdout, whatever an earlier test configured
    ref, d = _make(batch_size=8)
    ref.prepare(GaussTeacher(d), teacher_id="tiny", cache_dir=str(tmp_path), progress=False)
    (cache,) = tmp_path.iterdir()
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    b, _ = _make(batch_size=8)
    teacher = GaussTeacher(d)
    b.prepare(teacher, teacher_id="tiny", cache_dir=str(tmp_path), progress=False)
    assert teacher.calls > 0 and torch.equal(b.x, ref.x) and torch.equal(b.t, ref.t)  # rebuilt, same pool
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names[0] == cache.name and names[1].startswith(cache.name + ".corrupt-") and len(names) == 2
    assert cache.read_bytes() == data
    out = capsys.readouterr()
    logger.reset()
    assert str(cache) in out.out + out.err and "set aside" in out.out + out.err


def test_stale_temporaries_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f".pool_abc.pt.tmp-{int(dead.stdout)}"
    live = tmp_path / f".pool_abc.pt.tmp-{os.getppid()}"  # a live process (the test runner's parent)
    stale.write_bytes(b"half a pool")
    live.write_bytes(b"being written")
    a, d = _make(batch_size=8)
    a.prepare(GaussTeacher(d), teacher_id="tiny", cache_dir=str(tmp_path), progress=False)
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------ found by mutation testing


def test_every_input_of_the_preparation_changes_the_cache_key():
    base = {"batch_size": 8, "rho": 0.5, "teacher_batch": 64, "seed": 3}
    ref, _ = _make(**base)
    key = ref.cache_key("teacher-a")
    assert key == _make(**base)[0].cache_key("teacher-a")  # deterministic
    changes = [
        {"rho": 0.25},
        {"batch_size": 4},
        {"seed": 4},
        {"rank": 1, "world_size": 2},
        {"world_size": 2},
        {"num_classes": 10},
        {"variant": "shuffled"},
        {"warmup": "respaced"},
        {"clip_denoised": False},
        {"diffusion": create_diffusion(steps=T, noise_schedule="linear:0.001,0.2", learn_sigma=True)},
    ]
    keys = {_make(**{**base, **c})[0].cache_key("teacher-a") for c in changes}
    keys.add(ref.cache_key("teacher-b"))
    keys.add(_make(**{**base, "warmup": "respaced", "warmup_jumps": 5})[0].cache_key("teacher-a"))
    bigger = DynamicPool(_diffusion(), (1, 8, 8), 8, rho=0.5, teacher_batch=64, seed=3)
    keys.add(bigger.cache_key("teacher-a"))
    assert key not in keys and len(keys) == len(changes) + 3


def test_labels_and_the_prepared_flag_survive_a_round_trip():
    a, d = _make(batch_size=8, num_classes=5)
    a.prepare(GaussTeacher(d), progress=False)
    assert a.prepared and a.prep_stats["iterations"] > 0
    b, _ = _make(batch_size=8, num_classes=5, seed=42)
    assert not b.prepared and not torch.equal(a.y, b.y)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.y, b.y) and b.prepared
    fresh, _ = _make(batch_size=8, num_classes=5)
    state = fresh.state_dict()
    assert state["prepared"] is False
    b.load_state_dict(state)
    assert not b.prepared
    del state["prepared"]  # a pool saved before the flag existed was always prepared
    b.load_state_dict(state)
    assert b.prepared
    unconditional, _ = _make(batch_size=8)
    with pytest.raises(
        ValueError,
        match="saved pool has labels but this run's has no labels; resume with the same class conditioning, or start a new run directory$",
    ):
        unconditional.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"^saved pool \(dynamic, T=20, x \(80, 1, 4, 4\)\) does not match"):
        _make(batch_size=4)[0].load_state_dict(unconditional.state_dict())
    iterative, _ = _make(batch_size=8, variant="iterative")
    iterative.prepare(GaussTeacher(d), progress=False)
    assert iterative.prepared


def test_a_cached_preparation_reports_itself_and_no_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, d = _make(batch_size=8)
    a.prepare(GaussTeacher(d), progress=False)
    assert list(tmp_path.iterdir()) == []  # no cache_dir: nothing on disk
    cache = tmp_path / "cache"
    _make(batch_size=8)[0].prepare(GaussTeacher(d), teacher_id="k", cache_dir=str(cache), progress=False)
    b, _ = _make(batch_size=8)
    b.prepare(GaussTeacher(d), teacher_id="k", cache_dir=str(cache), progress=False)
    assert b.prep_stats == {"cached": 1.0} and b.prepared and torch.equal(a.x, b.x)


def test_update_uses_the_batch_of_its_own_indices_and_the_pools_clipping():
    pool, d = _make(batch_size=8, clip_denoised=False)
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    first, second = pool.draw(), pool.draw()
    pool.gather(first)  # gathered, then another draw is the one updated
    pool.x[second] = 8 * pool.x[second]  # far out, where clipping x_0 would change the step
    x, t = pool.x[second].clone(), pool.t[second].clone()
    state = pool._noise_gen.get_state()
    pool.update(second, teacher(x, t))
    noise = torch.randn((8, *SHAPE), generator=torch.Generator().set_state(state))
    for i in range(8):
        if int(t[i]) == 0:
            continue
        want = _reference_step(d, x[i].numpy(), int(t[i]), noise[i].numpy(), clip=False)
        np.testing.assert_allclose(pool.x[second[i]].double().numpy(), want, rtol=0, atol=1e-5)


def test_the_histogram_has_four_bins_by_default():
    pool, _ = _make(batch_size=8)
    assert pool.t_histogram().shape == (4,) and float(pool.t_histogram().sum()) == pytest.approx(1.0)


def test_the_memory_model_is_the_documented_one():
    """x at 4 bytes per value plus an 8-byte step (and an 8-byte label); step buffers of five
    batch-sized tensors, preparation buffers of eight slot-sized tensors: 12 KB per 32x32 sample."""
    per = 3 * 32 * 32 * 4
    m = estimate_pool_bytes(1000, (3, 32, 32), 16, 64, class_cond=True)
    assert m == {"pool": 1000 * (per + 16), "buffers": max(16 * per * 5, 64 * per * 8), "per_sample": per + 16}
    m = estimate_pool_bytes(1000, (3, 32, 32), 256, 64, prepare=False)
    assert m == {"pool": 1000 * (per + 8), "buffers": 256 * per * 5, "per_sample": per + 8}
    assert estimate_pool_bytes(10, (3, 32, 32), 256, 64)["buffers"] == 256 * per * 5  # step > 10 prep slots
    pool, _ = _make(batch_size=8, num_classes=3)
    assert pool.memory["per_sample"] == 16 * 4 + 16 and pool.prep_stats == {} and not pool.prepared
    assert _make(batch_size=8, variant="iterative")[0].memory["buffers"] == 8 * 16 * 4 * 5


def test_free_memory_is_read_from_proc_meminfo_with_a_one_gib_margin():
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    free, margin = pool_mod.available_memory(torch.device("cpu"))
    assert margin == 1 << 30 and abs(free - kb * 1024) < 0.2 * kb * 1024  # memory moves a little meanwhile


def test_meminfo_kilobytes_become_bytes_exactly(monkeypatch):
    import io

    fake = "MemTotal:       32000000 kB\nMemAvailable:   12345678 kB\n"
    monkeypatch.setattr(pool_mod, "open", lambda path, *a, **k: io.StringIO(fake), raising=False)
    assert pool_mod._meminfo_available() == 12345678 * 1024


def test_the_pools_default_warmup_grid_is_the_configs():
    from dkdm.config import DistillConfig

    # T = 1000 (not 100): ceil(T / jumps) tells 20 jumps (50) from 21 (48), as 100 does not.
    pool = DynamicPool(_diffusion(1000), SHAPE, 1, warmup="respaced")
    assert pool.warmup_grid == math.ceil(1000 / DistillConfig().warmup_jumps) == 50


def test_fitting_is_need_against_free_minus_margin_and_the_message_has_the_numbers(monkeypatch, capsys):
    gib = 1 << 30
    monkeypatch.setattr(pool_mod, "available_memory", lambda device: (10 * gib, 2 * gib))
    pool_mod._check_fits(8 * gib, torch.device("cpu"), "the samples", "fewer")  # exactly fits
    with pytest.raises(pool_mod.PoolMemoryError) as e:
        pool_mod._check_fits(8 * gib + 1, torch.device("cpu"), "the samples", "fewer")
    assert "needs 8.00 GiB for the samples on cpu, but only 10.00 GiB are free and 2.00 GiB are kept" in str(e.value)
    assert str(e.value).endswith("Options: fewer")


def test_pool_arguments_are_checked_and_defaulted_to_the_papers():
    d = _diffusion(100)
    plain = DynamicPool(d, SHAPE, 200)  # rho 0.4 (the paper's), 1024 preparation slots, seed 0
    assert plain.size == 40 * 200 and plain.memory["buffers"] == 1024 * 16 * 4 * 8
    assert torch.equal(plain.x, DynamicPool(d, SHAPE, 200, seed=0).x)
    respaced = DynamicPool(d, SHAPE, 8, warmup="respaced")
    assert (respaced.warmup_grid, respaced.warmup_exact) == (5, 10)  # 20 jumps, 10 exact steps
    for bad, msg in (
        ({"discard_prob": 1.0}, r"discard_prob must be in \[0, 1\), got 1.0"),
        ({"discard_prob": -0.1}, "discard_prob must be in"),
        ({"teacher_batch": 0}, "batch_size and teacher_batch must be positive, got 8, 0"),
        ({"batch_size": 0}, "batch_size and teacher_batch must be positive"),
    ):
        with pytest.raises(ValueError, match=msg):
            _make(**{"batch_size": 8, **bad})
    assert _make(batch_size=1)[0].size == 10  # one sample per batch is allowed
    assert pool_size("dynamic", 0.05, 20, 8) == 8  # round(rho * T) = 1 batch is allowed
    with pytest.raises(ValueError, match=r"round\(rho\*T\)=0 batches in the pool; use rho >= 0.025"):
        pool_size("dynamic", 0.02, 20, 8)
    one, _ = _make(batch_size=8, warmup="respaced", warmup_jumps=1, warmup_exact=1)
    assert (one.warmup_grid, one.warmup_exact) == (T, 1)
    other_t, _ = _make(batch_size=8, diffusion=_diffusion(40), rho=0.25)  # same size, other T
    with pytest.raises(ValueError, match="does not match"):
        other_t.load_state_dict(_make(batch_size=8)[0].state_dict())


def test_preparation_statistics():
    import inspect

    params = inspect.signature(DynamicPool.prepare).parameters
    assert (params["checkpoint_every_s"].default, params["checkpoint_every"].default) == (300.0, 0)
    assert params["cache_dir"].default == "" and params["teacher_id"].default == ""
    pool, d = _make(batch_size=16, teacher_batch=16)
    teacher = GaussTeacher(d)
    pool.prepare(teacher, progress=False)
    s = pool.prep_stats
    assert 0 < s["seconds"] < 60 and s["evals_per_s"] == pytest.approx(s["useful_evals"] / s["seconds"])
    assert s["slots"] == 16 and s["iterations"] == teacher.calls


def test_teacher_fingerprint_of_a_module_its_state_dict_and_its_file(tmp_path):
    net = torch.nn.Conv2d(2, 3, 3)
    fp = teacher_fingerprint(net)
    assert teacher_fingerprint(net.state_dict()) == fp  # a state dict is taken as it is
    with torch.no_grad():
        net.bias[0] += 1
    assert teacher_fingerprint(net) != fp
    (tmp_path / "t.pt").write_bytes(b"weights")
    assert teacher_fingerprint(str(tmp_path / "t.pt")) == hashlib.sha256(b"weights").hexdigest()


def test_the_cache_key_of_a_plain_pool_is_pinned():
    """A pool cache is found again by its key: a changed description (say a key added for an
    option that is not set) orphans every cache written before. Change this value only on purpose."""
    pool, _ = _make(batch_size=8, rho=0.5, teacher_batch=64, seed=3)
    assert pool.cache_key("teacher-a") == "d5d67faa05bbed183158a42b0c01e398727140c8bf7f9bba8a5d5e68da963531"


def test_guidance_scales_range_checked_and_kept_through_a_round_trip():
    with pytest.raises(ValueError, match=r"w_min <= w_max, got \(3\.0, 1\.0\)"):
        _make(batch_size=8, w_range=(3.0, 1.0))
    fixed, _ = _make(batch_size=8, w_range=(2.0, 2.0))  # one scale for every sample
    assert fixed.w_range == (2.0, 2.0) and torch.all(fixed.w == 2.0)
    a, _ = _make(batch_size=8, w_range=(0.0, 4.0))
    assert a.w_range == (0.0, 4.0) and 0.0 <= float(a.w.min()) < float(a.w.max()) <= 4.0
    b, _ = _make(batch_size=8, w_range=(0.0, 4.0), seed=9)
    assert not torch.equal(a.w, b.w)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.w, b.w)
    plain, _ = _make(batch_size=8)
    with pytest.raises(
        ValueError,
        match="saved pool has guidance scales but this run's has no guidance scales; resume with the same --w_min / --w_max ",
    ):
        plain.load_state_dict(a.state_dict())
    with pytest.raises(
        ValueError,
        match=r"saved pool has no guidance scales but this run's has guidance scales; resume with the same --w_min / --w_max \(or none\), or start a new run directory$",
    ):
        a.load_state_dict(plain.state_dict())


def test_update_without_gather_gathers_itself():
    a, d = _make(batch_size=8, seed=4)
    b, _ = _make(batch_size=8, seed=4)
    idx = a.draw()
    assert torch.equal(idx, b.draw())
    batch = a.gather(idx)
    out = GaussTeacher(d)(batch["x_t"], batch["t"])
    a.update(idx, out)  # right after its own gather
    b.update(idx, out)  # no gather before: update gathers the same batch itself
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
