"""The distillation loop: one teacher call per step feeds both the target and the pool.

``DistillLoop`` joins a frozen teacher, a student, the :class:`~dkdm.distill.pool.DynamicPool`
and the :class:`~dkdm.distill.objective.DKDMObjective` on the shared
:class:`~dkdm.training.Trainer`. Each step ``next_batch`` draws ``b`` pool indices, runs the
teacher once on them, advances the pool with that output and hands ``(x_t, t, teacher_out)``
to the trainer, whose microbatches go through ``loss_fn`` (the objective). Microbatching,
DDP, precision, EMA, lr anneal, checkpoints and exact resume are the trainer's; the pool
rides along as ``extra_state`` (``poolNNNNNN.pt`` per rank).

Class-conditional teachers: every pool sample carries a label (uniform, or ``--class_weights``)
and teacher and student both get it. Guided teachers (``--guidance_scale w``, or a
w-conditioned student learning ``[w_min, w_max]``): the teacher call is one call of doubled
batch (conditional and null labels) whose guided output (:mod:`dkdm.models.guidance`) is both
the target and what advances the pool; with a w range each pool sample carries its own ``w``.

The method is an object (:mod:`dkdm.distill.objectives`, picked by ``distill.objective``):
DKDM as above, or a step-distillation method (Luhman, progressive, TRACT, consistency) whose
``next_batch`` builds its targets from :meth:`DistillLoop.pool_step` and the teacher, and
whose own state (round, target network) rides in the checkpoints beside the pool.
"""

from __future__ import annotations

import contextlib
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
from dkdm.distill.objectives import build_objective
from dkdm.distill.pool import DynamicPool, read_class_weights, teacher_fingerprint
from dkdm.models.guidance import Guided, check_guidable
from dkdm.models.winograd import check_winograd_run, use_winograd
from dkdm.training import Trainer
from dkdm.training.compile import compile_in_place, to_channels_last
from dkdm.training.precision import autocast, autocast_dtype

__all__ = ["DistillLoop", "check_conditioning", "teacher_id"]


def teacher_id(checkpoint: str | torch.nn.Module, model_config: Any = None) -> str:
    """Identity of a teacher for the pool cache: checkpoint sha256 plus its model config."""
    desc = {"weights": teacher_fingerprint(checkpoint), "model": to_dict(model_config) if model_config else None}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def teacher_numerics(distill: DistillConfig, train: TrainConfig) -> str:
    """How the teacher's arithmetic differs from plain fp32 eager NCHW, as a suffix of the pool cache's
    key ("" when it does not, so a default teacher's earlier caches keep their keys): a pool prepared
    in bf16, in channels_last or by compiled kernels is another pool, not the one this run would
    compute. A cache written under the old key is named in the log by :meth:`DistillLoop.prepare_pool`."""
    parts = []
    if distill.teacher_precision != "fp32":
        parts.append(f"teacher_precision={distill.teacher_precision}")
    if distill.teacher_channels_last:
        parts.append("teacher_channels_last")
    if distill.teacher_winograd:
        parts.append("teacher_winograd=F4p")
    if train.compile:
        parts.append(f"compile={train.compile_backend}")
    return "".join(f"|{p}" for p in parts)


def check_conditioning(
    teacher: torch.nn.Module, student: torch.nn.Module, distill: DistillConfig
) -> tuple[int | None, tuple[float, float] | None]:
    """Refuse teacher/student/flag combinations that do not make a conditional distillation.

    Returns the pool's number of classes (None: unconditional) and its guidance range (None:
    one scale, ``--guidance_scale``, for every sample). Checks that both networks agree on class
    conditioning and the number of classes, that guidance has a teacher with a null class (or a
    w-conditioned teacher, which takes ``w`` itself: Meng et al.'s stage two distils such a
    network again), and that a w-conditioned student comes with ``--w_min < --w_max`` (and only then).
    """
    t_classes = getattr(teacher, "num_classes", None)
    s_classes = getattr(student, "num_classes", None)
    if (t_classes is None) != (s_classes is None):
        raise ValueError(
            f"the teacher is {'class-conditional' if t_classes is not None else 'unconditional'} but the student "
            f"{'is not' if s_classes is None else 'is'}; set --student.class_cond {str(t_classes is not None).lower()}"
            + (f" --student.num_classes {t_classes}" if t_classes is not None else "")
        )
    if t_classes is not None and t_classes != s_classes:
        raise ValueError(
            f"the teacher has {t_classes} classes but the student {s_classes}; set --student.num_classes {t_classes}"
        )
    if getattr(student, "null_class", None) is not None:
        raise ValueError(
            "the student drops labels to a null class (class_dropout_prob > 0), but DKDM gives it the teacher's "
            "output for the pool's label; set --student.class_dropout_prob 0"
        )
    if distill.class_weights and t_classes is None:
        raise ValueError(f"--class_weights {distill.class_weights} needs a class-conditional teacher; drop it")
    w_cond = bool(getattr(student, "guidance_cond", False))
    ranged = (distill.w_min, distill.w_max) != (0.0, 0.0)
    if w_cond:
        if not distill.w_min < distill.w_max:
            raise ValueError(
                "a w-conditioned student (guidance_cond) learns a range of guidance scales; set --w_min < --w_max "
                f"(got {distill.w_min}, {distill.w_max}), e.g. --w_min 0 --w_max 4"
            )
        if distill.guidance_scale != 1.0:
            raise ValueError(
                "--guidance_scale is one w for a plain student; a w-conditioned student learns --w_min..--w_max: "
                "drop --guidance_scale"
            )
    elif ranged:
        raise ValueError(
            "--w_min/--w_max are for a w-conditioned student: set --student.guidance_cond true, or use "
            "--guidance_scale for a student of one w"
        )
    if (w_cond or distill.guidance_scale != 1.0) and not getattr(teacher, "guidance_cond", False):
        check_guidable(teacher, "teacher", "--w_min/--w_max" if w_cond else "--guidance_scale")
    return t_classes, ((distill.w_min, distill.w_max) if w_cond else None)


def _frozen_forward(
    net: Any, diffusion: Any, x: Tensor, t: Tensor, kwargs: dict[str, Tensor], device_type: str, dtype: Any
) -> Tensor:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    ts = diffusion.model_timesteps(t)
    with autocast(device_type, dtype):
        out = net(x, ts, **kwargs)
    return out if dtype is None else out.float()


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
    means hashing the teacher's weights. Construction builds the objective, the pool (if the
    objective uses one) and the trainer, which resumes from ``run_dir`` if a checkpoint is there
    (pool and objective state included); :meth:`run` prepares the pool when it was not restored
    and trains.
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
        if distill.teacher_channels_last:
            to_channels_last(self.teacher)
        if distill.teacher_winograd:
            check_winograd_run("--teacher_winograd", self.device.type, train.compile)
            logger.log(f"teacher: {use_winograd(self.teacher)} 3x3 convolution(s) by Winograd F(4x4,3x3)")
        if train.compile:  # the teacher's forward is the largest single cost of a step
            compile_in_place(self.teacher, train.compile_backend)
        self.student = student
        self.teacher_diffusion, self.student_diffusion = teacher_diffusion, student_diffusion
        self.objective: Any = None
        if distill.objective == "dkdm":
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
        self.sample_shape = shape
        num_classes, w_range = check_conditioning(teacher, student, distill)
        self.guided = w_range is not None or distill.guidance_scale != 1.0
        self.guidance_scale = distill.guidance_scale
        self.student_takes_w = w_range is not None
        # A w-conditioned teacher takes w as its input; any other guided teacher runs as Guided (one doubled call).
        self.teacher_takes_w = bool(getattr(teacher, "guidance_cond", False))
        self._guide = Guided(self.teacher, distill.guidance_scale) if self.guided and not self.teacher_takes_w else None
        weights = read_class_weights(distill.class_weights, num_classes) if distill.class_weights else None
        self.latent = bool(getattr(tcfg, "first_stage", ""))
        if self.latent and distill.objective != "dkdm" and distill.step_clip:
            raise ValueError(
                f"--objective {distill.objective} clips the teacher's DDIM x_0 to [-1, 1] (--step_clip), but this "
                "teacher works on latents, which have no such range; set --step_clip false"
            )
        if distill.feature_kd_weight > 0 and (distill.objective != "dkdm" or self._guide is not None):
            raise ValueError(
                "--feature_kd_weight adds feature KD to --objective dkdm with an unguided teacher (the stages of its "
                "one teacher call); drop --feature_kd_weight, or use --objective dkdm without guidance"
            )
        self.run_dir = run_dir
        self.teacher_key = teacher_key
        # The method decides whether there is a pool; it may initialise the student (before the trainer
        # resumes, which then overwrites the weights) and adds its own state to the checkpoints.
        self.method = build_objective(self, distill, class_cond=num_classes is not None)
        self.pool: DynamicPool | None = None
        if self.method.uses_pool:
            self.pool = DynamicPool(
                teacher_diffusion,
                shape,
                self.batch_size,
                rho=distill.rho,
                variant=distill.pool,
                device=self.device,
                pool_device=distill.pool_device,  # "auto" / "": the pool takes ``device``
                teacher_batch=distill.teacher_batch,
                num_classes=num_classes,
                class_weights=weights,
                w_range=w_range,
                discard_prob=distill.discard_prob,
                clip_denoised=not self.latent,  # latents have no [-1, 1] range to clip to
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
        logger.log(self.method.describe())
        extra = {"pool": self.pool} if self.pool is not None else {}
        extra.update(self.method.extra_state())
        self.trainer = Trainer(
            student,
            student_diffusion,
            cfg=train,
            run_dir=run_dir,
            config_to_save=config_to_save or {"train": train, "distill": distill},
            extra_state=extra,
        )
        self._timer = _Timer(self.device)
        self.features = None
        if distill.feature_kd_weight > 0:  # hooks record the teacher's stages in the step's one teacher call
            from dkdm.distill.features import FeatureKD

            self.features = FeatureKD(self.teacher, student, distill.feature_kd_layers, distill.feature_kd_weight)

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
    def teacher_forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """The teacher's output at step indices ``t`` (no grad; autocast if fp16/bf16).

        Guided: the classifier-free-guided output at ``w`` (per sample) or ``--guidance_scale``,
        from one teacher call of doubled batch.
        """
        if self.teacher_takes_w and w is None:
            w = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        if self._guide is None:
            kwargs = {"y": y, "w": w if self.teacher_takes_w else None}
            return _frozen_forward(
                self.teacher, self.teacher_diffusion, x, t, kwargs, self.device.type, self.teacher_dtype
            )
        ts = self.teacher_diffusion.model_timesteps(t)
        with autocast(self.device.type, self.teacher_dtype):
            out = self._guide(x, ts, y, w)
        return out if self.teacher_dtype is None else out.float()

    @torch.no_grad()
    def run_net(
        self,
        net: torch.nn.Module,
        diffusion: Any,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        w: Tensor | None = None,
    ) -> Tensor:
        """A frozen network's output at step indices ``t`` of ``diffusion``, under the teacher's precision."""
        return _frozen_forward(net, diffusion, x, t, {"y": y, "w": w}, self.device.type, self.teacher_dtype)

    def prepare_pool(self, progress: bool = True) -> None:
        """Shuffle-denoise the pool (or load it from the cache); every rank its own pool."""
        if self.pool is None or self.pool.prepared:
            return
        key = self.teacher_key or teacher_id(self.teacher, getattr(self.teacher, "config", None))
        if self.guided and not self.student_takes_w:  # a guided pool is another pool (a w range is in its key)
            key = f"{key}|guidance_scale={self.guidance_scale!r}"
        numerics = teacher_numerics(self.cfg, self.train_cfg)
        cache = self.cfg.pool_cache_dir or os.path.join(self.run_dir, "pool_cache")
        own, legacy = self.pool.cache_path(cache, key + numerics), self.pool.cache_path(cache, key)
        if numerics and not os.path.isfile(own) and os.path.isfile(legacy):
            # A cache from before the teacher's numerics were in the key: it may hold either's pool.
            logger.log(
                f"pool: {legacy} is a prepared pool of this teacher from before its numerics "
                f"({numerics[1:].replace('|', ', ')}) were part of the cache key, and may have been prepared "
                f"with others; preparing anew. To reuse it, rename it to {os.path.basename(own)}"
            )
        key += numerics
        self.pool.prepare(
            self.teacher_forward,
            teacher_id=key,
            cache_dir=cache,
            checkpoint_every_s=self.cfg.prep_checkpoint_s,
            progress=progress,
        )

    # ------------------------------------------------------------------ trainer callables
    def pool_step(self) -> tuple[dict[str, Tensor], Tensor]:
        """Draw ``b`` samples, run the teacher once, advance the pool; return the batch and the teacher's output.

        The batch holds the samples as drawn (before the step). With ``discard_prob`` the teacher
        may run several times; only the last batch is returned.
        """
        timer = self._timer
        timer.mark("student_end")
        timer.span("student_ms", "update_end", "student_end")
        timer.flush()
        while True:
            idx = self.pool.draw()
            batch = self.pool.gather(idx)
            timer.mark("teacher_start")
            with self.features.teacher_call() if self.features else contextlib.nullcontext():
                out = self.teacher_forward(batch["x_t"], batch["t"], batch.get("y"), batch.get("w"))
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
        return batch, out

    def next_batch(self) -> dict[str, Tensor]:
        """One step's batch from the objective (DKDM: the pool batch with the teacher's output)."""
        with torch.no_grad():
            batch = self.method.next_batch(self)
        if self.features:  # the stages the pool step's teacher call recorded
            batch.update(self.features.teacher_targets())
        return batch

    def loss_fn(self, model: torch.nn.Module, micro: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on a microbatch: ``(mean loss, per-sample terms)``, plus feature KD if asked."""
        loss, terms = self.method.loss_fn(model, micro)
        if not self.features:
            return loss, terms
        terms["feat"] = self.features.terms(micro)
        terms["loss"] = terms["loss"] + self.features.weight * terms["feat"]
        return terms["loss"].mean(), terms

    def run(self, progress: bool = True) -> int:
        """Prepare the pool if needed, then distill until the trainer is done; return the step."""
        self.prepare_pool(progress=progress)
        step = self.trainer.run(self.next_batch, self.loss_fn)
        self.method.finish(self)
        return step
