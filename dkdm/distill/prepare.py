"""Pool preparation ("shuffle denoise"): every pool sample from pure noise to its own end step.

Each sample gets an end step drawn uniformly from ``{0, ..., T-1}`` and is denoised from
noise at ``T - 1`` down to it by the teacher, which costs about ``N * T / 2`` teacher
evaluations for a pool of ``N``. :class:`ShuffleDenoise` packs that work into full teacher
batches: a fixed set of lanes (``teacher_batch`` of them) each carries one sample at its own
current step; when a sample reaches its end step it is written into the pool and the lane
takes the next one. Which lane finishes when is planned on the host in advance (every path
length is known once the end steps are drawn), so the loop never reads the device.

The object has four parts: :meth:`~ShuffleDenoise.__init__` plans, :meth:`run` runs,
:meth:`checkpoint` writes the lanes and the pool so far, and a preparation whose checkpoint
exists resumes from it. A warm-up of ``respaced`` reaches ``end + exact`` through DDIM jumps
(``GaussianDiffusion.ddim_jump_from_xstart``) on a grid of ``grid`` steps and takes the last
``exact`` steps exactly.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dkdm import logger
from dkdm.fileio import atomic_save
from dkdm.training.checkpoint import load_file

TeacherFn = Callable[..., Tensor]  # (x, t, y) -> output, or (x, t, y, w) when the pool carries scales w


# --------------------------------------------------------------------------- planning (host)


def next_step(t, end, grid: int, exact: int):
    """Step after ``t`` on the way to ``end`` (numpy or torch, elementwise, integers >= 0).

    Exact single steps within ``exact`` of the end; before that, jumps down to the grid
    point below ``t`` (multiples of ``grid``), never past ``end + exact``.
    """
    jump = ((t - 1) // grid) * grid
    if isinstance(t, np.ndarray):
        jump = np.maximum(jump, end + exact)
        return np.where(t - end <= exact, t - 1, jump)
    jump = torch.maximum(jump, end + exact)
    return torch.where(t - end <= exact, t - 1, jump)


def path_lengths(end: np.ndarray, T: int, warmup: str, grid: int, exact: int) -> np.ndarray:
    """Teacher evaluations each sample needs to go from ``T - 1`` down to its ``end``."""
    if warmup == "full":
        return (T - 1 - end).astype(np.int64)
    t = np.full_like(end, T - 1)
    length = np.zeros_like(end)
    active = t > end
    while active.any():
        t = np.where(active, next_step(t, end, grid, exact), t)
        length += active
        active = t > end
    return length.astype(np.int64)


def pack_lanes(lengths: np.ndarray, slots: int) -> dict[str, np.ndarray]:
    """Pack samples into ``slots`` lanes, longest first onto the least-loaded lane (LPT).

    Returns the first sample of each lane, ``active[k]`` (lanes still busy at iteration
    ``k``) and, sorted by time, the events "after iteration ``time - 1`` lane ``slot`` finishes
    sample ``item`` and takes sample ``next`` (-1: none left)". Lanes are numbered by
    decreasing total load, so the busy lanes are always a prefix: the teacher runs on
    ``lanes[:active[k]]`` and no evaluation is wasted on an idle lane. LPT keeps the lanes'
    loads within one sample length of each other, so the batch shrinks only at the very end.
    """
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    heap = [(0, s) for s in range(slots)]
    queues: list[list[int]] = [[] for _ in range(slots)]
    for i in order.tolist():
        load, s = heapq.heappop(heap)
        queues[s].append(i)
        heapq.heappush(heap, (load + int(lengths[i]), s))
    loads = np.array([sum(int(lengths[i]) for i in q) for q in queues], dtype=np.int64)
    queues = [queues[s] for s in np.argsort(-loads, kind="stable")]
    loads = np.sort(loads)[::-1]
    first = np.array([q[0] if q else -1 for q in queues], dtype=np.int64)
    iters = int(loads[0]) if len(loads) else 0
    active = (loads[None, :] > np.arange(iters)[:, None]).sum(1) if iters else np.zeros(0, np.int64)
    ev_time, ev_slot, ev_item, ev_next = [], [], [], []
    for s, q in enumerate(queues):
        clock = 0
        for j, i in enumerate(q):
            clock += int(lengths[i])
            ev_time.append(clock)
            ev_slot.append(s)
            ev_item.append(i)
            ev_next.append(q[j + 1] if j + 1 < len(q) else -1)
    ev_time_a = np.asarray(ev_time, dtype=np.int64)
    srt = np.argsort(ev_time_a, kind="stable")
    return {
        "first": first,
        "time": ev_time_a[srt],
        "slot": np.asarray(ev_slot, dtype=np.int64)[srt],
        "item": np.asarray(ev_item, dtype=np.int64)[srt],
        "next": np.asarray(ev_next, dtype=np.int64)[srt],
        "iters": iters,
        "active": active,
    }


def read_cache(path: str) -> Any | None:
    """A pool cache file (finished or partial), or None when it was unreadable and set aside.

    The cache may be shared between runs and people, so a truncated or empty file (a full
    disk, a copy that stopped) is named, renamed to ``<file>.corrupt-<time>`` and rebuilt.
    """
    try:
        return load_file(path)
    except ValueError as e:
        bad = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, bad)
        reason = str(e).split("(", 1)[-1].split(");", 1)[0]
        logger.warn(f"pool: the cache file {path} cannot be read ({reason}); set aside as {bad}, preparing afresh")
        return None


# --------------------------------------------------------------------------- the preparation


class ShuffleDenoise:
    """The resumable preparation of one pool: plan (here), :meth:`run`, :meth:`checkpoint`.

    ``pool`` is a :class:`~dkdm.distill.pool.DynamicPool`; its samples, steps and noise
    generator are written in place. ``part_path`` ("" for none) is where progress is saved
    every ``every_s`` seconds (or every ``every_n`` teacher batches when > 0) and whenever
    the teacher raises; when it already holds progress, :meth:`run` resumes from it.
    """

    def __init__(
        self, pool: Any, part_path: str = "", every_s: float = 300.0, every_n: int = 0, progress: bool = True
    ) -> None:
        self.pool, self.part_path, self.every_s, self.every_n, self.progress = (
            pool,
            part_path,
            every_s,
            every_n,
            progress,
        )
        T, dev = pool.T, pool.device
        rng = np.random.Generator(np.random.PCG64(pool._plan_seed))
        self.end = rng.integers(0, T, size=pool.size).astype(np.int64)
        self.lengths = path_lengths(self.end, T, pool.warmup, pool.warmup_grid, pool.warmup_exact)
        self.slots = max(1, min(pool.teacher_batch, int((self.lengths > 0).sum())))
        plan = pack_lanes(self.lengths, self.slots)
        self.iters, self.active = plan["iters"], plan["active"]
        self.offsets = np.searchsorted(plan["time"], np.arange(self.iters + 2), side="left")
        self.end_dev = torch.from_numpy(self.end).to(dev)
        self.ev_slot = torch.from_numpy(plan["slot"]).to(dev)
        self.ev_item = torch.from_numpy(plan["item"]).to(pool.pool_device)
        self.ev_next = torch.from_numpy(np.maximum(plan["next"], 0)).to(dev)
        self.first = torch.from_numpy(np.maximum(plan["first"], 0)).to(dev)
        self.y_dev = pool.y.to(dev) if pool.y is not None else None
        self.w_dev = pool.w.to(dev) if pool.w is not None else None
        # The lanes: sample, current step, end step, label and guidance scale of each.
        self.x = self.t = self.e = self.y = self.w = None
        self.done = 0  # teacher batches completed

    def _start(self) -> None:
        pool = self.pool
        state = read_cache(self.part_path) if self.part_path and os.path.isfile(self.part_path) else None
        if state is not None:
            dev = pool.device
            pool.load_state_dict(state["pool"])
            self.x, self.t, self.e = state["x_act"].to(dev), state["t_act"].to(dev), state["e_act"].to(dev)
            self.y = state["y_act"].to(dev) if state["y_act"] is not None else None
            self.w = state["w_act"].to(dev) if state.get("w_act") is not None else None
            self.done = int(state["iter"])
            logger.log(f"pool: resuming preparation at teacher batch {self.done}/{self.iters} from {self.part_path}")
            return
        pool.t.copy_(torch.from_numpy(self.end).to(pool.pool_device))
        self.x = pool._randn(self.slots)
        self.t = torch.full((self.slots,), pool.T - 1, dtype=torch.long, device=pool.device)
        self.e = self.end_dev.index_select(0, self.first)
        self.y = self.y_dev.index_select(0, self.first) if self.y_dev is not None else None
        self.w = self.w_dev.index_select(0, self.first) if self.w_dev is not None else None

    def checkpoint(self) -> None:
        """Write the lanes and the pool so far to ``part_path`` (consistent between batches)."""
        if not self.part_path:
            return
        atomic_save(
            {
                "iter": self.done,
                "pool": self.pool.state_dict(),
                "x_act": self.x.cpu(),
                "t_act": self.t.cpu(),
                "e_act": self.e.cpu(),
                "y_act": self.y.cpu() if self.y is not None else None,
                "w_act": self.w.cpu() if self.w is not None else None,
            },
            self.part_path,
        )

    def _batch(self, teacher_fn: TeacherFn, k: int) -> None:
        pool = self.pool
        n = int(self.active[k])  # host-planned: busy lanes are the prefix [:n]
        xa, ta = self.x[:n], self.t[:n]
        try:
            ya = self.y[:n] if self.y is not None else None
            out = teacher_fn(xa, ta, ya) if self.w is None else teacher_fn(xa, ta, ya, self.w[:n])
        except BaseException:
            self.checkpoint()  # nothing of batch k is applied yet: the lanes are consistent
            raise
        step = pool.diffusion.p_sample_from_output(
            out.float(), xa, ta, clip_denoised=pool.clip_denoised, noise=pool._randn(n)
        )
        if pool.warmup == "full":
            self.x[:n] = step["sample"]
            self.t[:n] -= 1
        else:
            s_next = next_step(ta, self.e[:n], pool.warmup_grid, pool.warmup_exact)
            exact = (s_next == ta - 1).view(-1, *([1] * len(pool.sample_shape)))
            ddim = pool.diffusion.ddim_jump_from_xstart(xa, ta, step["pred_xstart"], s_next)
            self.x[:n] = torch.where(exact, step["sample"], ddim)
            self.t[:n] = s_next
        a, b = int(self.offsets[k + 1]), int(self.offsets[k + 2])
        if b > a:  # lanes whose sample reached its end step: into the pool, next sample in
            sl, nx = self.ev_slot[a:b], self.ev_next[a:b]
            pool.x.index_copy_(0, self.ev_item[a:b], self.x.index_select(0, sl).to(pool.pool_device))
            self.x = self.x.index_copy(0, sl, pool._randn(b - a))
            self.t = self.t.index_fill(0, sl, pool.T - 1)
            self.e = self.e.index_copy(0, sl, self.end_dev.index_select(0, nx))
            if self.y is not None:
                self.y = self.y.index_copy(0, sl, self.y_dev.index_select(0, nx))
            if self.w is not None:
                self.w = self.w.index_copy(0, sl, self.w_dev.index_select(0, nx))

    def run(self, teacher_fn: TeacherFn) -> dict[str, float]:
        """Run (or resume) to the end with ``teacher_fn(x, t, y[, w]) -> output``; returns statistics."""
        pool = self.pool
        self._start()
        start = self.done
        useful = int(self.lengths.sum())
        logger.log(
            f"pool: shuffle-denoising {pool.size} samples ({pool.variant}, warm-up {pool.warmup}): "
            f"{useful} teacher evaluations in {self.iters} batches of {self.slots}"
        )
        bar = None
        if self.progress and pool.rank == 0 and self.iters > start:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.iters, initial=start, desc="pool preparation", unit="batch", dynamic_ncols=True)
        t0 = last_save = time.perf_counter()
        try:
            for k in range(start, self.iters):
                self._batch(teacher_fn, k)
                self.done = k + 1
                if bar is not None:
                    bar.update(1)
                now = time.perf_counter()
                if (self.every_n > 0 and self.done % self.every_n == 0) or (
                    self.every_s > 0 and now - last_save > self.every_s
                ):
                    self.checkpoint()
                    last_save = now
        finally:
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - t0
        total = int(self.active[start:].sum())
        logger.log(f"pool: prepared in {secs:.1f}s ({total} teacher evaluations, {useful} useful)")
        return {
            "useful_evals": float(useful),
            "total_evals": float(total),
            "seconds": secs,
            "evals_per_s": useful / secs if secs > 0 and start == 0 else float("nan"),
            "slots": float(self.slots),
            "iterations": float(self.iters - start),
        }
