"""Timestep samplers: uniform and loss-second-moment, locally and across ranks."""

import os
import socket

import numpy as np
import pytest
import torch

from dkdm.diffusion import create_diffusion, create_named_schedule_sampler
from dkdm.diffusion.timesteps import LossSecondMomentResampler, UniformSampler


class ReferenceHistory:
    """IDDPM's sampler state kept the slow, obvious way: a list of the last H losses per step."""

    def __init__(self, T, H=10, uniform_prob=0.001):
        self.T, self.H, self.u = T, H, uniform_prob
        self.hist = [[] for _ in range(T)]

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            self.hist[t] = (self.hist[t] + [loss])[-self.H :]

    def weights(self):
        if any(len(h) < self.H for h in self.hist):
            return np.ones(self.T)
        w = np.array([np.sqrt(np.mean(np.square(h))) for h in self.hist])
        w = w / w.sum()
        return w * (1 - self.u) + self.u / self.T


def diffusion(steps=12):
    return create_diffusion(steps=steps, noise_schedule="cosine")


def test_named_samplers():
    d = diffusion()
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="unknown schedule sampler 'lsm'.*uniform, loss-second-moment"):
        create_named_schedule_sampler("lsm", d)


def test_uniform_sampler():
    s = create_named_schedule_sampler("uniform", diffusion(12))
    t, w = s.sample(6000, "cpu")
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (6000,)
    assert t.min() == 0 and t.max() == 11 and torch.all(w == 1)
    counts = torch.bincount(t, minlength=12).double()
    se = (1 / 12 * 11 / 12 / 6000) ** 0.5  # binomial standard error of one bin's frequency: 0.0036
    assert (counts / 6000 - 1 / 12).abs().max() < 4.5 * se


def test_loss_second_moment_defaults_are_iddpms():
    s = LossSecondMomentResampler(diffusion(12))
    assert (s.history_per_term, s.uniform_prob) == (10, 0.001)


def test_loss_second_moment_matches_reference_semantics():
    T, H = 12, 10
    s = LossSecondMomentResampler(diffusion(T), history_per_term=H)
    ref = ReferenceHistory(T, H)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(s.weights().numpy(), np.ones(T))
    _, w0 = s.sample(64, "cpu")  # warming up: uniform, so every importance weight is 1 (the weights sum to T)
    assert torch.all(w0 == 1)
    # One batch with more than H losses for a step keeps that step's last H.
    burst = np.arange(1, 16, dtype=np.float64)
    s.update_with_local_losses(torch.zeros(15, dtype=torch.long), torch.from_numpy(burst).float())
    ref.update([0] * 15, burst.tolist())
    np.testing.assert_allclose(np.sort(s.state_dict()["loss_history"][0].numpy()), burst[-H:])  # a ring buffer
    for step in range(25):
        # Batches repeat timesteps, sometimes more than H times, to exercise the ordering.
        n = int(rng.integers(1, 40))
        ts = rng.integers(0, 3 if step % 5 == 0 else T, size=n)
        losses = rng.random(n) * (1 + ts)
        s.update_with_local_losses(torch.from_numpy(ts), torch.from_numpy(losses).float())
        ref.update(ts.tolist(), torch.from_numpy(losses).float().double().tolist())
        np.testing.assert_allclose(s.weights().numpy(), ref.weights(), rtol=1e-12)
    assert not np.allclose(ref.weights(), 1)  # warmed up and non-uniform by now

    # Importance weights keep the objective unbiased: weight = 1 / (T p(t)).
    t, w = s.sample(20000, "cpu")
    p = ref.weights() / ref.weights().sum()
    np.testing.assert_allclose(w.numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)
    freq = np.bincount(t.numpy(), minlength=T) / 20000
    assert np.all(np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / 20000))  # 4.5 binomial standard errors

    # State round trip.
    s2 = LossSecondMomentResampler(diffusion(T), history_per_term=H)
    s2.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(s2.weights().numpy(), s.weights().numpy())
    with pytest.raises(ValueError, match="loss history of shape"):
        LossSecondMomentResampler(diffusion(T), history_per_term=5).load_state_dict(s.state_dict())


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = LossSecondMomentResampler(diffusion(6), history_per_term=2)
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            n = 5 + 3 * rank  # ranks hold different batch sizes
            ts = torch.randint(0, 6, (n,), generator=g)
            s.update_with_local_losses(ts, torch.rand(n, generator=g))
        torch.save(s.weights(), os.path.join(result_dir, f"w{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_update_gathers_losses_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    # spawn, not fork: a forked worker would inherit the process group an earlier test of this
    # session set up (setup_dist's one-process group) and could not start its own.
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    w0, w1 = torch.load(tmp_path / "w0.pt"), torch.load(tmp_path / "w1.pt")
    assert torch.equal(w0, w1)
    ref = ReferenceHistory(6, 2)
    for step in range(3):
        for rank in range(2):
            g = torch.Generator().manual_seed(100 * step + rank)
            n = 5 + 3 * rank
            ts = torch.randint(0, 6, (n,), generator=g)
            ref.update(ts.tolist(), torch.rand(n, generator=g).double().tolist())
    np.testing.assert_allclose(w0.numpy(), ref.weights(), rtol=1e-6)
