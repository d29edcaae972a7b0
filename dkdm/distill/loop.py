"""The distillation loop: one teacher call per step feeds both the target and the pool.

``DistillLoop`` joins a frozen teacher, a student, the :class:`~dkdm.distill.pool.DynamicPool`
and the :class:`~dkdm.distill.objective.DKDMObjective` on the shared
:class:`~dkdm.training.Trainer`. Each step ``next_batch`` draws ``b`` pool indices, runs the
teacher once on them, advances the pool with that output and hands ``(x_t, t, teacher_out)``
to the trainer, whose microbatches go through ``loss_fn`` (the objective). Microbatching,
DDP, precision, EMA, lr anneal, checkpoints and exact resume are the trainer's; the pool
rides along as ``extra_state`` (``poolNNNNNN.pt`` per rank).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch
from torch import Tensor

from dkdm import dist, logger
from dkdm.config import DistillConfig, TrainConfig, to_dict
from dkdm.data import per_rank_batch
from dkdm.distill.objective import DKDMObjective
from dkdm.distill.pool import DynamicPool, teacher_fingerprint
from dkdm.training import Trainer
from dkdm.training.precision import autocast, autocast_dtype

__all__ = ["DistillLoop", "teacher_id"]


def teacher_id(checkpoint: str | torch.nn.Module, model_config: Any = None) -> str:
    """Identity of a teacher for the pool cache: checkpoint sha256 plus its model config."""
    desc = {"weights": teacher_fingerprint(checkpoint), "model": to_dict(model_config) if model_config else None}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


class _Timer:
    """Teacher and student step times without host syncs: CUDA events read once complete."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, Any, Any]] = []
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def span(self, key: str, start: str, end: str) -> None:
        a, b = self.marks.get(start), self.marks.get(end)
        if a is None or b is None:
            return
        if self.cuda:
            self.pending.append((key, a, b))
        else:
            logger.logkv_mean(key, 1000.0 * (b - a))

    def flush(self) -> None:
        # Event.query() only asks whether the GPU got there; it never waits.
        while self.pending and self.pending[0][2].query():
            key, a, b = self.pending.pop(0)
            logger.logkv_mean(key, a.elapsed_time(b))
        del self.pending[:-64]


class DistillLoop:
    """Data-free distillation of ``student`` from ``teacher`` (paper Algorithm 1).

    ``teacher_diffusion`` interprets the teacher's outputs and advances the pool;
    ``student_diffusion`` the student's (same schedule; mean and variance types may differ,
    see :class:`DKDMObjective`). ``train`` and ``distill`` are the configs; ``run_dir`` gets
    checkpoints, logs and (unless ``distill.pool_cache_dir`` says otherwise) the pool cache.
    ``teacher_key`` identifies the teacher for the cache (see :func:`teacher_id`); empty
    means hashing the teacher's weights. Construction builds the pool and the trainer, which
    resumes from ``run_dir`` if a checkpoint is there (the pool included); :meth:`run`
    prepares the pool when it was not restored and trains.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        teacher_diffusion: Any,
        student_diffusion: Any,
        *,
        train: TrainConfig,
        distill: DistillConfig,
        run_dir: str,
        config_to_save: dict | None = None,
        teacher_key: str = "",
    ) -> None:
        self.train_cfg, self.cfg = train, distill
        self.device = dist.dev()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.batch_size = per_rank_batch(train.batch_size, self.world)
        self.teacher_dtype = autocast_dtype(distill.teacher_precision, "teacher_precision")

        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher_diffusion, self.student_diffusion = teacher_diffusion, student_diffusion
        self.objective = DKDMObjective(
            teacher_diffusion,
            student_diffusion,
            simple_only=distill.simple_only,
            clip_teacher_mean=distill.clip_teacher_mean,
        )
        for w in self.objective.warnings:
            logger.warn(w)

        tcfg = getattr(teacher, "config", None)
        scfg = getattr(student, "config", None)
        shape = self._sample_shape(tcfg, scfg)
        class_cond = bool(getattr(tcfg, "class_cond", False))
        if scfg is not None and bool(getattr(scfg, "class_cond", False)) != class_cond:
            raise ValueError(
                "teacher and student must both be class-conditional or both unconditional "
                f"(teacher class_cond={class_cond}); set --student.class_cond accordingly"
            )
        self.pool = DynamicPool(
            teacher_diffusion,
            shape,
            self.batch_size,
            rho=distill.rho,
            variant=distill.pool,
            device=self.device,
            pool_device=self.device if distill.pool_device in ("", "auto") else distill.pool_device,
            teacher_batch=distill.teacher_batch,
            num_classes=tcfg.num_classes if class_cond else None,
            discard_prob=distill.discard_prob,
            clip_denoised=not getattr(tcfg, "first_stage", ""),  # latents have no [-1, 1] range to clip to
            warmup=distill.warmup,
            warmup_jumps=distill.warmup_jumps,
            warmup_exact=distill.warmup_exact,
            seed=train.seed,
            rank=self.rank,
            world_size=self.world,
        )
        logger.log(
            f"pool: {distill.pool}, {self.pool.size} samples per rank (rho={distill.rho}, b={self.batch_size}), "
            f"{self.pool.memory['pool'] / 2**20:.1f} MiB on {self.pool.pool_device}, "
            f"{self.pool.memory['per_sample']} bytes per sample"
        )
        self.run_dir = run_dir
        self.teacher_key = teacher_key
        self.trainer = Trainer(
            student,
            student_diffusion,
            cfg=train,
            run_dir=run_dir,
            config_to_save=config_to_save or {"train": train, "distill": distill},
            extra_state={"pool": self.pool},
        )
        self._timer = _Timer(self.device)

    @staticmethod
    def _sample_shape(tcfg: Any, scfg: Any) -> tuple[int, int, int]:
        if tcfg is None:
            if scfg is None:
                raise ValueError("cannot tell the sample shape: neither network carries a .config (ModelConfig)")
            tcfg = scfg
        shape = (tcfg.in_channels, tcfg.image_size, tcfg.image_size)
        if scfg is not None and (scfg.in_channels, scfg.image_size, scfg.image_size) != shape:
            raise ValueError(
                f"the teacher works on {shape} (C, H, W) samples but the student on "
                f"{(scfg.in_channels, scfg.image_size, scfg.image_size)}; set --student.image_size and "
                "--student.in_channels to the teacher's"
            )
        return shape

    # ------------------------------------------------------------------ the teacher
    @torch.no_grad()
    def teacher_forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The teacher's output at step indices ``t`` (no grad; autocast if fp16/bf16)."""
        kwargs = {"y": y} if y is not None else {}
        ts = self.teacher_diffusion.model_timesteps(t)
        with autocast(self.device.type, self.teacher_dtype):
            out = self.teacher(x, ts, **kwargs)
        return out if self.teacher_dtype is None else out.float()

    def prepare_pool(self, progress: bool = True) -> None:
        """Shuffle-denoise the pool (or load it from the cache); every rank its own pool."""
        if self.pool.prepared:
            return
        key = self.teacher_key or teacher_id(self.teacher, getattr(self.teacher, "config", None))
        cache = self.cfg.pool_cache_dir or os.path.join(self.run_dir, "pool_cache")
        self.pool.prepare(
            self.teacher_forward,
            teacher_id=key,
            cache_dir=cache,
            checkpoint_every_s=self.cfg.prep_checkpoint_s,
            progress=progress,
        )

    # ------------------------------------------------------------------ trainer callables
    def next_batch(self) -> dict[str, Tensor]:
        """Draw ``b`` samples, run the teacher once, advance the pool; return the batch."""
        timer = self._timer
        timer.mark("student_end")
        timer.span("student_ms", "update_end", "student_end")
        timer.flush()
        while True:
            idx = self.pool.draw()
            batch = self.pool.gather(idx)
            timer.mark("teacher_start")
            out = self.teacher_forward(batch["x_t"], batch["t"], batch.get("y"))
            timer.mark("teacher_end")
            self.pool.update(idx, out)
            timer.mark("update_end")
            timer.span("teacher_ms", "teacher_start", "teacher_end")
            if not self.pool.should_discard():
                break
        if self.train_cfg.log_interval > 0 and (self.trainer.step + 1) % self.train_cfg.log_interval == 0:
            hist = self.pool.t_histogram(4)
            for i in range(4):
                logger.logkv_mean(f"pool_t_q{i}", hist[i])
        batch["teacher_out"] = out
        return batch

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The DKDM objective on a microbatch: ``(mean loss, per-sample terms with t)``."""
        kwargs = {"y": micro["y"]} if "y" in micro else {}
        terms = self.objective.losses(model, micro["x_t"], micro["t"], micro["teacher_out"], kwargs)
        terms["t"] = micro["t"]
        return terms["loss"].mean(), terms

    def run(self, progress: bool = True) -> int:
        """Prepare the pool if needed, then distill until the trainer is done; return the step."""
        self.prepare_pool(progress=progress)
        return self.trainer.run(self.next_batch, self.loss_fn)
