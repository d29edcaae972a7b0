"""The dynamic iterative batch pool (paper section 3.3, Algorithm 1).

The pool is a tensor, not a list: ``x [N, C, H, W]`` noisy samples and ``t [N]`` their
diffusion steps (optionally ``y [N]`` class labels, for class-conditional teachers, and
``w [N]`` guidance scales, for w-conditioned students of guided teachers). Each
training step draws ``b`` distinct indices on the device, the caller runs the teacher once on
``(x[idx], t[idx])``, and :meth:`DynamicPool.update` takes one ancestral step from that output
and writes the results back in place; a sample that was at ``t = 0`` restarts as fresh noise
at ``T - 1``. Draw and update are index operations with fixed shapes: no host
synchronisation.

Variants (the paper's ablation): ``dynamic`` (the method: ``N = round(rho * T) * b``, random
draws), ``shuffled`` (``N = b``, shuffle-denoised once, the whole pool drawn every step) and
``iterative`` (``N = b``, all samples start at ``T - 1`` and walk down together).

Preparation ("shuffle denoise", :mod:`dkdm.distill.prepare`) gives every sample an end step
drawn uniformly from ``{0, ..., T-1}`` and denoises it from pure noise down to that step with
the teacher, packed into full teacher batches. :meth:`DynamicPool.prepare` caches the result
on disk; the preparation saves its progress periodically and resumes after an interruption.
``warmup="respaced"`` is a cheaper preparation: each sample reaches ``end + warmup_exact``
through deterministic DDIM jumps on a grid of about ``warmup_jumps`` steps, then takes the
last ``warmup_exact`` steps exactly (ancestral, with the teacher's variance).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dkdm import logger
from dkdm.distill.prepare import ShuffleDenoise, TeacherFn, read_cache
from dkdm.fileio import atomic_save, file_sha256, remove_stale_temporaries

__all__ = [
    "VARIANTS",
    "DynamicPool",
    "PoolMemoryError",
    "available_memory",
    "classes_of_uniforms",
    "estimate_pool_bytes",
    "pool_size",
    "read_class_weights",
    "teacher_fingerprint",
]

VARIANTS = ("dynamic", "shuffled", "iterative")
_GiB = float(1 << 30)


class PoolMemoryError(MemoryError):
    """The pool would not fit in the memory of its device; the message lists the options."""


# --------------------------------------------------------------------------- sizes and memory


def pool_size(variant: str, rho: float, num_timesteps: int, batch_size: int) -> int:
    """Number of samples a rank's pool holds: ``round(rho * T) * b`` (dynamic) or ``b``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown pool variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    if variant != "dynamic":
        return batch_size
    k = round(rho * num_timesteps)
    if k < 1:
        raise ValueError(
            f"rho={rho} with T={num_timesteps} steps gives round(rho*T)=0 batches in the pool; "
            f"use rho >= {0.5 / num_timesteps:.4g}"
        )
    return k * batch_size


def estimate_pool_bytes(
    num_samples: int,
    sample_shape: tuple[int, ...],
    batch_size: int,
    teacher_batch: int,
    class_cond: bool = False,
    prepare: bool = True,
    bytes_per_value: int = 4,
) -> dict[str, int]:
    """Bytes the pool needs: ``pool`` (x, t, y, on the pool's device) and ``buffers`` (device).

    ``buffers`` counts the per-step tensors of a drawn batch (gathered x, noise, teacher output
    of up to 2C channels, new x) and the preparation slots (about eight sample-sized tensors per
    slot); the teacher's own activations are not included.
    """
    per = int(np.prod(sample_shape)) * bytes_per_value
    pool = num_samples * (per + 8 + (8 if class_cond else 0))
    step = batch_size * per * 5
    prep = min(teacher_batch, num_samples) * per * 8 if prepare else 0
    return {"pool": pool, "buffers": max(step, prep), "per_sample": per + 8 + (8 if class_cond else 0)}


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def available_memory(device: torch.device) -> tuple[int, int]:
    """``(free_bytes, margin_bytes)`` on ``device``; the pool may use ``free - margin``.

    CUDA: ``torch.cuda.mem_get_info`` with a margin of max(2 GiB, 15% of the card) left for the
    teacher, the student and their activations. CPU: ``MemAvailable`` from /proc/meminfo with a
    margin of 1 GiB.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(max(2 * (1 << 30), 0.15 * total))
    return _meminfo_available(), 1 << 30


def _check_fits(need: int, device: torch.device, what: str, options: str) -> None:
    free, margin = available_memory(device)
    logger.log(
        f"pool: {what} needs {need / _GiB:.3f} GiB on {device} ({free / _GiB:.2f} GiB free, "
        f"{margin / _GiB:.2f} GiB kept for models)"
    )
    if need > free - margin:
        raise PoolMemoryError(
            f"the batch pool needs {need / _GiB:.2f} GiB for {what} on {device}, but only "
            f"{free / _GiB:.2f} GiB are free and {margin / _GiB:.2f} GiB are kept for the models. "
            f"Options: {options}"
        )


# --------------------------------------------------------------------------- class distribution


def read_class_weights(path: str, num_classes: int) -> np.ndarray:
    """``num_classes`` non-negative weights from a ``.npy`` or a text file (numbers separated by
    spaces, commas or newlines); refuses a wrong count, negative or non-finite values, or all zeros."""
    try:
        if path.endswith(".npy"):
            w = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                w = np.array([float(v) for v in f.read().replace(",", " ").split()])
    except (OSError, ValueError) as e:
        raise ValueError(f"--class_weights {path}: cannot read {num_classes} numbers ({e})") from None
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape[0] != num_classes:
        raise ValueError(f"--class_weights {path} holds {w.shape[0]} weights but the teacher has {num_classes} classes")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"--class_weights {path}: weights must be finite, non-negative and not all zero")
    return w


def classes_of_uniforms(cdf: Tensor, u: Tensor, last: int) -> Tensor:
    """Inverse-CDF class draw: class ``k`` owns ``[cdf[k-1], cdf[k])`` of the uniforms ``u`` in
    [0, 1), so a class of weight 0 (an empty interval) is never drawn, ``u = 0`` included.
    ``last`` (the last class of non-zero weight) takes a ``u`` at or above a float32 total that
    rounded below 1."""
    return torch.searchsorted(cdf, u, right=True).clamp_(max=last)


# --------------------------------------------------------------------------- fingerprints


def teacher_fingerprint(source: str | torch.nn.Module | dict) -> str:
    """sha256 of a teacher checkpoint file, or of a module's / state dict's tensors."""
    if isinstance(source, str):
        return file_sha256(source)
    h = hashlib.sha256()
    sd = source.state_dict() if isinstance(source, torch.nn.Module) else source
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _diffusion_fingerprint(diffusion: Any) -> str:
    h = hashlib.sha256(np.asarray(diffusion.betas, dtype=np.float64).tobytes())
    h.update(f"{diffusion.model_mean_type}|{diffusion.model_var_type}|{diffusion.num_timesteps}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the pool


class DynamicPool:
    """A rank's pool of teacher-generated noisy samples; see the module docstring.

    ``diffusion`` interprets the teacher's outputs (it is the teacher's diffusion);
    ``sample_shape`` is ``(C, H, W)``; ``batch_size`` the per-rank batch ``b``. The pool lives
    on ``pool_device`` (``None``, ``"auto"`` or ``""``: ``device``); with ``pool_device="cpu"`` and a CUDA ``device``
    it sits in pinned host memory and only drawn batches travel. ``num_classes`` gives every
    sample a label, drawn afresh when it restarts from noise, uniformly or in proportion to
    ``class_weights`` (``num_classes`` non-negative numbers). ``w_range = (w_min, w_max)`` gives
    every sample a guidance scale drawn uniformly from that range, likewise redrawn on restart
    (the teacher function then takes it as a fourth argument). ``seed`` and ``rank`` seed the
    pool's own generators, so ranks hold different pools and a resumed run continues the same
    stream (:meth:`state_dict`). ``discard_prob`` is the supplement's random discard (see
    :meth:`should_discard`).
    """

    def __init__(
        self,
        diffusion: Any,
        sample_shape: tuple[int, ...],
        batch_size: int,
        *,
        rho: float = 0.4,
        variant: str = "dynamic",
        device: str | torch.device = "cpu",
        pool_device: str | torch.device | None = None,
        teacher_batch: int = 1024,
        num_classes: int | None = None,
        class_weights: Any = None,
        w_range: tuple[float, float] | None = None,
        discard_prob: float = 0.0,
        warmup: str = "full",
        warmup_jumps: int = 20,
        warmup_exact: int = 10,
        clip_denoised: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if warmup not in ("full", "respaced"):
            raise ValueError(f"unknown pool warm-up '{warmup}'; choose full or respaced")
        if not 0.0 <= discard_prob < 1.0:
            raise ValueError(f"discard_prob must be in [0, 1), got {discard_prob}")
        if batch_size < 1 or teacher_batch < 1:
            raise ValueError(f"batch_size and teacher_batch must be positive, got {batch_size}, {teacher_batch}")
        self.diffusion = diffusion
        self.T = int(diffusion.num_timesteps)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.batch_size = int(batch_size)
        self.rho = float(rho)
        self.variant = variant
        self.size = pool_size(variant, rho, self.T, batch_size)
        self.device = torch.device(device)
        self.pool_device = torch.device(pool_device) if pool_device not in (None, "auto", "") else self.device
        self.teacher_batch = int(teacher_batch)
        self.num_classes = num_classes
        self.class_weights = None
        self._class_cdf: Tensor | None = None
        if class_weights is not None:
            if num_classes is None:
                raise ValueError("class_weights given for a pool without labels (num_classes is None)")
            cw = np.asarray(class_weights, dtype=np.float64).reshape(-1)
            if cw.shape[0] != num_classes or not np.isfinite(cw).all() or (cw < 0).any() or cw.sum() <= 0:
                raise ValueError(f"class_weights must be {num_classes} finite non-negative numbers, not all zero")
            self.class_weights = cw / cw.sum()
            # Inverse-CDF sampling on the device: a class of weight 0 owns an empty interval.
            self._class_cdf = torch.tensor(np.cumsum(self.class_weights), dtype=torch.float32, device=self.device)
            self._last_class = int(np.flatnonzero(cw)[-1])
        if w_range is not None and not w_range[0] <= w_range[1]:
            raise ValueError(f"w_range must be (w_min, w_max) with w_min <= w_max, got {w_range}")
        self.w_range = None if w_range is None else (float(w_range[0]), float(w_range[1]))
        self.discard_prob = float(discard_prob)
        self.warmup = warmup
        self.warmup_grid = max(1, math.ceil(self.T / max(1, warmup_jumps)))
        self.warmup_exact = max(1, int(warmup_exact))
        self.clip_denoised = clip_denoised
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.prepared = False
        self.prep_stats: dict[str, float] = {}

        self.memory = estimate_pool_bytes(
            self.size,
            self.sample_shape,
            batch_size,
            teacher_batch,
            num_classes is not None,
            prepare=variant != "iterative",
        )
        self._check_memory()

        ss = np.random.SeedSequence([self.seed, self.rank, 0xD4D3])
        s_noise, s_idx, s_plan, s_discard = ss.spawn(4)
        self._noise_gen = torch.Generator(self.device)
        self._noise_gen.manual_seed(int(s_noise.generate_state(1, np.uint64)[0] >> 1))
        self._idx_gen = torch.Generator(self.pool_device)
        self._idx_gen.manual_seed(int(s_idx.generate_state(1, np.uint64)[0] >> 1))
        self._plan_seed = s_plan
        self._discard_rng = np.random.Generator(np.random.PCG64(s_discard))

        pinned = self.pool_device.type == "cpu" and self.device.type == "cuda"
        self.x = torch.empty((self.size, *self.sample_shape), device=self.pool_device, pin_memory=pinned)
        self.t = torch.full((self.size,), self.T - 1, dtype=torch.long, device=self.pool_device)
        self.y = (
            torch.zeros((self.size,), dtype=torch.long, device=self.pool_device) if num_classes is not None else None
        )
        self.w = torch.zeros((self.size,), device=self.pool_device) if self.w_range is not None else None
        if pinned:
            self.t = self.t.pin_memory()
            self.y = self.y.pin_memory() if self.y is not None else None
            self.w = self.w.pin_memory() if self.w is not None else None
        self._all = torch.arange(self.size, device=self.pool_device)
        self._last: tuple[Tensor, dict[str, Tensor]] | None = None
        self._fresh_start()

    # ------------------------------------------------------------------ setup helpers
    def _check_memory(self) -> None:
        m = self.memory
        gib = _GiB
        options = (
            f"a smaller --rho (the pool holds round(rho*T)*b = {self.size} samples of "
            f"{m['per_sample']} bytes; rho={self.rho / 4:.3g} needs about {m['pool'] / gib / 4:.2f} GiB), "
            "a smaller --teacher_batch (preparation buffers), or a smaller per-rank batch (more ranks)"
        )
        if self.pool_device.type == "cuda":
            options += ", or --pool_device cpu (keeps the pool in pinned host memory and moves only the drawn batches)"
        if self.pool_device == self.device:
            _check_fits(m["pool"] + m["buffers"], self.device, f"{self.size} samples + step buffers", options + ".")
        else:
            _check_fits(m["pool"], self.pool_device, f"{self.size} samples", options + ", or more host memory.")
            _check_fits(m["buffers"], self.device, "step buffers", options + ".")

    def _randn(self, n: int) -> Tensor:
        return torch.randn((n, *self.sample_shape), generator=self._noise_gen, device=self.device)

    def _randy(self, n: int) -> Tensor:
        if self._class_cdf is None:
            return torch.randint(0, self.num_classes, (n,), generator=self._noise_gen, device=self.device)
        u = torch.rand((n,), generator=self._noise_gen, device=self.device)
        return classes_of_uniforms(self._class_cdf, u, self._last_class)

    def _randw(self, n: int) -> Tensor:
        lo, hi = self.w_range
        return lo + (hi - lo) * torch.rand((n,), generator=self._noise_gen, device=self.device)

    def _fresh_start(self) -> None:
        # In chunks, so a host-resident pool never needs its full size on the device.
        for a in range(0, self.size, 65536):
            n = min(65536, self.size - a)
            self.x[a : a + n].copy_(self._randn(n))
        self.t.fill_(self.T - 1)
        if self.y is not None:
            self.y.copy_(self._randy(self.size))
        if self.w is not None:
            self.w.copy_(self._randw(self.size))

    # ------------------------------------------------------------------ the hot path
    def draw(self) -> Tensor:
        """``b`` distinct pool indices (LongTensor on the pool's device); no host sync."""
        if self.variant != "dynamic":
            return self._all
        return torch.randperm(self.size, generator=self._idx_gen, device=self.pool_device)[: self.batch_size]

    def gather(self, idx: Tensor) -> dict[str, Tensor]:
        """``{"x_t", "t"(, "y")(, "w")}`` of the drawn samples, on the training device (copies)."""
        batch = {"x_t": self.x.index_select(0, idx), "t": self.t.index_select(0, idx)}
        if self.y is not None:
            batch["y"] = self.y.index_select(0, idx)
        if self.w is not None:
            batch["w"] = self.w.index_select(0, idx)
        if self.pool_device != self.device:
            batch = {
                k: v.pin_memory().to(self.device, non_blocking=True)
                if v.device.type == "cpu" and self.device.type == "cuda"
                else v.to(self.device)
                for k, v in batch.items()
            }
        self._last = (idx, batch)
        return batch

    def update(self, idx: Tensor, teacher_output: Tensor) -> None:
        """Advance the drawn samples one ancestral step with the teacher's output, in place.

        ``teacher_output`` is the teacher's output on :meth:`gather`'s batch for the same
        ``idx``. Samples that were at ``t = 0`` (now finished images) restart as fresh noise at
        ``T - 1``; the noise of the step doubles as their fresh noise because the step adds none
        at ``t = 0``. Everything stays on the device with fixed shapes.
        """
        if self._last is not None and self._last[0] is idx:
            batch = self._last[1]
        else:
            batch = self.gather(idx)
        self._last = None
        x, t = batch["x_t"], batch["t"]
        noise = self._randn(x.shape[0])
        step = self.diffusion.p_sample_from_output(
            teacher_output.float(), x, t, clip_denoised=self.clip_denoised, noise=noise
        )
        restart = t == 0
        new_x = torch.where(restart.view(-1, *([1] * (x.dim() - 1))), noise, step["sample"])
        new_t = torch.where(restart, torch.full_like(t, self.T - 1), t - 1)
        if self.pool_device != self.device:
            new_x, new_t = new_x.to(self.pool_device), new_t.to(self.pool_device)
        self.x.index_copy_(0, idx, new_x)
        self.t.index_copy_(0, idx, new_t)
        if self.y is not None:
            new_y = torch.where(restart, self._randy(x.shape[0]), batch["y"]).to(self.pool_device)
            self.y.index_copy_(0, idx, new_y)
        if self.w is not None:
            new_w = torch.where(restart, self._randw(x.shape[0]), batch["w"]).to(self.pool_device)
            self.w.index_copy_(0, idx, new_w)

    def should_discard(self) -> bool:
        """Whether the batch just advanced is discarded instead of learned from (prob. ``p``).

        Supplement section 11: the teacher keeps denoising, but with probability ``p`` a batch
        it produced is not used for the student's learning (its example: of B1..B5, B1, B3 and
        B4 discarded, B2 and B5 learned), so the teacher prepares 1/(1-p) batches per student
        step on average. A host-side generator (saved in :meth:`state_dict`) decides, so no
        device value is read.
        """
        return self.discard_prob > 0.0 and bool(self._discard_rng.random() < self.discard_prob)

    def t_histogram(self, bins: int = 4) -> Tensor:
        """Fractions of the pool in ``bins`` equal ranges of ``t`` (ascending), on the pool device."""
        # index_add_ into a fixed-size tensor: bincount would read the maximum back to the host.
        which = torch.div(self.t * bins, self.T, rounding_mode="floor")
        counts = torch.zeros(bins, device=self.t.device).index_add_(0, which, torch.ones_like(which, dtype=torch.float))
        return counts / self.size

    # ------------------------------------------------------------------ preparation
    def cache_key(self, teacher_id: str) -> str:
        """Key of this pool's preparation: teacher, diffusion, sizes, rank, seed and variant."""
        desc = {
            "teacher": teacher_id,
            "diffusion": _diffusion_fingerprint(self.diffusion),
            "variant": self.variant,
            "rho": self.rho,
            "b": self.batch_size,
            "N": self.size,
            "shape": list(self.sample_shape),
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "warmup": [self.warmup, self.warmup_grid, self.warmup_exact] if self.warmup != "full" else "full",
            "clip": self.clip_denoised,
            "version": 1,
        }
        if self.class_weights is not None:  # only when set, so earlier caches keep their keys
            desc["class_weights"] = [round(float(v), 12) for v in self.class_weights]
        if self.w_range is not None:
            desc["w_range"] = list(self.w_range)
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def cache_path(self, cache_dir: str, teacher_id: str) -> str:
        """Where :meth:`prepare` keeps this pool's finished preparation in ``cache_dir``."""
        return os.path.join(cache_dir, f"pool_{self.cache_key(teacher_id)[:24]}.pt")

    def prepare(
        self,
        teacher_fn: TeacherFn,
        *,
        teacher_id: str = "",
        cache_dir: str = "",
        checkpoint_every_s: float = 300.0,
        checkpoint_every: int = 0,
        progress: bool = True,
    ) -> None:
        """Shuffle-denoise the pool with ``teacher_fn(x, t, y[, w]) -> output`` (under no_grad).

        ``iterative`` pools need no preparation. With ``cache_dir`` (and ``teacher_id``, e.g.
        from :func:`teacher_fingerprint` plus the teacher's config), a finished preparation is
        loaded from ``pool_<key>.pt`` instead of recomputed, and progress is saved to
        ``pool_<key>.partial.pt`` every ``checkpoint_every_s`` seconds (or every
        ``checkpoint_every`` teacher batches, if > 0) and whenever the teacher raises, so an
        interrupted preparation resumes where it stopped.
        """
        if self.variant == "iterative":
            self.prepared = True
            return
        done_path = part_path = ""
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            done_path = self.cache_path(cache_dir, teacher_id)
            part_path = done_path[: -len(".pt")] + ".partial.pt"
            remove_stale_temporaries(cache_dir, "pool_*")
            cached = read_cache(done_path) if os.path.isfile(done_path) else None
            if cached is not None:
                self.load_state_dict(cached)
                logger.log(f"pool: reusing prepared pool {done_path}")
                self.prep_stats = {"cached": 1.0}
                return
        prep = ShuffleDenoise(self, part_path, checkpoint_every_s, checkpoint_every, progress)
        self.prep_stats = prep.run(teacher_fn)
        self.prepared = True
        if done_path:
            atomic_save(self.state_dict(), done_path)
            if os.path.isfile(part_path):
                os.remove(part_path)
            logger.log(f"pool: saved prepared pool to {done_path}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same stream: samples, steps, labels, RNG states."""
        return {
            "variant": self.variant,
            "num_timesteps": self.T,
            "x": self.x.detach().cpu().clone(),
            "t": self.t.detach().cpu().clone(),
            "y": self.y.detach().cpu().clone() if self.y is not None else None,
            "w": self.w.detach().cpu().clone() if self.w is not None else None,
            "noise_gen": self._noise_gen.get_state(),
            "idx_gen": self._idx_gen.get_state(),
            "discard_rng": self._discard_rng.bit_generator.state,
            "prepared": self.prepared,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a pool of another variant, size or schedule."""
        x = state["x"]
        if (
            state.get("variant") != self.variant
            or state.get("num_timesteps") != self.T
            or tuple(x.shape) != tuple(self.x.shape)
        ):
            raise ValueError(
                f"saved pool ({state.get('variant')}, T={state.get('num_timesteps')}, x {tuple(x.shape)}) does not "
                f"match this run's ({self.variant}, T={self.T}, x {tuple(self.x.shape)}); resume with the same "
                "--pool, --rho, --batch_size, number of ranks and diffusion steps, or start a new run directory."
            )
        for what, mine, key, fix in (
            ("labels", self.y, "y", "the same class conditioning, or start a new run directory"),
            ("guidance scales", self.w, "w", "the same --w_min / --w_max (or none), or start a new run directory"),
        ):
            if (mine is None) != (state.get(key) is None):
                have, saved = (what if v is not None else f"no {what}" for v in (mine, state.get(key)))
                raise ValueError(f"saved pool has {saved} but this run's has {have}; resume with {fix}")
        self.x.copy_(x)
        self.t.copy_(state["t"])
        if self.y is not None:
            self.y.copy_(state["y"])
        if self.w is not None:
            self.w.copy_(state["w"])
        self._noise_gen.set_state(state["noise_gen"].cpu())
        self._idx_gen.set_state(state["idx_gen"].cpu())
        self._discard_rng.bit_generator.state = state["discard_rng"]
        self.prepared = bool(state.get("prepared", True))
        self._last = None
