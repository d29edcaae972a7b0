"""The training loop every dkdm loop shares: data-based training and distillation alike.

A loop supplies two callables and the trainer does the rest:

* ``next_batch() -> dict[str, Tensor]`` -- this rank's batch for one optimizer step, on
  the training device (a data loader's images, or a pool batch prepared with a teacher);
* ``loss_fn(model, batch) -> (loss, terms)`` -- the scalar loss of a (micro)batch and a
  dict of per-sample terms to log; a ``"t"`` entry (timesteps) makes the logger report
  each term by timestep quartile as well.

The trainer splits each batch into microbatches (DDP synchronises gradients only on the
last), runs the forward pass under the precision mode's autocast, steps AdamW with an
optional clip and guided-diffusion's linear lr anneal, updates the fp32 EMAs, logs, and
saves atomic, exactly resumable checkpoints (layout in :mod:`dkdm.training.checkpoint`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dkdm import dist, fileio, logger
from dkdm.config import (
    ConfigError,
    TrainConfig,
    differences,
    dump_yaml,
    load_yaml,
    to_dict,
)
from dkdm.models.checkpoints import save_safetensors
from dkdm.models.winograd import check_winograd_run, use_winograd
from dkdm.training import checkpoint as ckpt
from dkdm.training.compile import FirstCallClock, compile_in_place, to_channels_last
from dkdm.training.precision import Precision, growth_interval_from_rate

# Buffers are not re-broadcast before every forward: the zoo's networks have none, and a
# foreign network's are constants every rank builds alike. torch 2.13 renamed the switch
# (the old name warns); the new one also syncs them once at construction, which is harmless.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)

# Fields a rerun on an existing run directory may change: they decide when the run stops, how
# often it logs and saves, and where things go, never what a step computes. Any other change
# is refused, since the resumed run would silently be half one configuration, half another.
SAFE_TO_CHANGE = frozenset(
    {
        "train.max_steps",
        "train.save_interval",
        "train.log_interval",
        "train.log_dir",
        "train.num_workers",
        "train.resume_checkpoint",
        "train.trust_checkpoints",
        "train.save_safetensors",
        "distill.prep_checkpoint_s",
        "distill.pool_cache_dir",
    }
)

Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def parse_ema_rates(spec: str) -> list[str]:
    """``"0.9999,0.999"`` -> ``["0.9999", "0.999"]`` (kept as written: they name files).

    Raises ValueError for a rate outside [0, 1) or one that is not a number.
    """
    rates = [r.strip() for r in str(spec).split(",") if r.strip()]
    for r in rates:
        try:
            value = float(r)
        except ValueError:
            raise ValueError(f"ema_rate '{r}' is not a number; write rates like 0.9999,0.999") from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ema_rate {r} must lie in [0, 1), e.g. 0.9999")
    if len(set(rates)) != len(rates):
        raise ValueError(f"ema_rate lists a rate twice: {spec}")
    return rates


class _AdamW(torch.optim.AdamW):
    """torch's AdamW whose ``step`` tells autograd that the parameters changed in place.

    The fused kernel writes the parameters without advancing their version counters (torch
    2.13: ``p._version`` stays put), so a cache keyed on the version, such as the Winograd
    layers' filter transforms (dkdm.models.winograd), would keep serving the old weights. One
    ``increment_version`` call over the parameters after each step (metadata only: no kernel,
    no host read) makes the counters true again.
    """

    def step(self, closure=None):
        out = super().step(closure)
        torch.autograd.graph.increment_version([p for group in self.param_groups for p in group["params"]])
        return out


def make_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW every trainer here steps: torch's fused kernel, on a CPU as on CUDA.

    One pass over each tensor instead of a chain of elementwise ops per parameter: on this
    project's CPU it takes a 14M UNet's optimiser step from about 40 to 12 ms (its training step
    at batch 4, one thread: 1.07x faster). With fp16 it also takes GradScaler's scale
    and overflow flag as device tensors, so the step never reads the flag back to the host (the
    foreach AdamW's GradScaler.step calls ``.item()``). Same update as the for-loop AdamW to
    float32 rounding, not bitwise: a run resumed from a checkpoint written before this change
    continues with it (the optimiser state's layout is unchanged).
    """
    return _AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


class Trainer:
    """Optimizer, microbatches, DDP, precision, EMA, lr anneal, logging, save and resume.

    ``model`` is the unwrapped network (moved to :func:`dkdm.dist.dev`, wrapped in DDP
    when there are several ranks); ``diffusion`` (optional) only provides
    ``num_timesteps`` for quartile logging. ``cfg`` is the :class:`TrainConfig`,
    ``run_dir`` where checkpoints and ``config.yaml`` go, ``config_to_save`` the resolved
    config (group name -> dataclass or dict) written there and into every checkpoint.
    ``extra_state`` maps names to per-rank objects with ``state_dict``/``load_state_dict``
    that get their own checkpoint files (e.g. ``{"pool": pool}`` -> ``poolNNNNNN.pt``);
    ``loop_state`` does the same for small per-rank states stored inside ``optNNNNNN.pt``
    (the data stream position, a schedule sampler). Construction resumes from
    ``cfg.resume_checkpoint`` or, if empty, from the newest complete checkpoint in
    ``run_dir``; otherwise it seeds every generator with ``cfg.seed + rank``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: Any = None,
        *,
        cfg: TrainConfig,
        run_dir: str,
        config_to_save: Mapping[str, Any] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        loop_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self._config_objs = dict(config_to_save or {"train": cfg})
        self.config = to_dict(self._config_objs)
        self.extra_state = dict(extra_state or {})
        self.loop_state = dict(loop_state or {})
        self.num_timesteps = getattr(diffusion, "num_timesteps", None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = dist.dev()
        if cfg.batch_size % self.world:
            raise ValueError(
                f"batch size {cfg.batch_size} cannot be split evenly over {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        self.ema_rates = parse_ema_rates(cfg.ema_rate)
        for name in self.extra_state:
            if not name.isidentifier() or name in ("model", "opt") or name.startswith("ema"):
                raise ValueError(f"extra_state name '{name}' must be an identifier other than model, opt, ema*")

        # Master weights are fp32 whatever the precision mode: autocast lowers only the ops.
        self.model = model.to(self.device)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            logger.warn("model parameters are not all fp32; converting (train.precision picks the compute dtype)")
            self.model.float()
        if cfg.channels_last:  # before the optimiser and EMA copy the parameters: their state follows the order
            to_channels_last(self.model)
        if cfg.winograd:  # parameters and state-dict keys unchanged: checkpoints are the direct network's
            check_winograd_run("--winograd", self.device.type, cfg.compile)
            routed = use_winograd(self.model, train=True)
            logger.log(f"winograd: {routed} 3x3 convolution(s) by F(4x4,3x3), forward and backward, the others direct")
        self.param_names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self._param_data = [p.detach() for p in self.params]
        self.opt = make_adamw(self.params, cfg.lr, cfg.weight_decay)
        self.precision = Precision(cfg.precision, self.device, growth_interval_from_rate(cfg.fp16_scale_growth))
        self.step = 0
        self.samples = 0
        self.ema: dict[str, list[torch.Tensor]] = {}
        self._ema_fns = {r: get_ema_multi_avg_fn(float(r)) for r in self.ema_rates}
        self._last_saved = -1
        self._tick = time.perf_counter()
        self._steps_since_dump = 0
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

        error = None
        if dist.is_main():  # one run per directory: a second launch stops here, before writing
            try:
                note = fileio.acquire_lock(run_dir)
                if note:
                    logger.log(note)
            except fileio.RunDirectoryLocked as e:
                error = str(e)
        error = dist.broadcast_object(error)
        if error:
            raise fileio.RunDirectoryLocked(error)
        resume = self._resume_path()
        changes = self._check_config(resume)  # every rank refuses alike, before anything is written
        if dist.is_main():
            os.makedirs(run_dir, exist_ok=True)
            stale = ckpt.remove_stale_temporaries(run_dir)
            if stale:
                logger.log(f"removed {len(stale)} temporary file(s) an interrupted save left in {run_dir}")
        dist.barrier()
        rank_state = self._load(resume) if resume else None
        if dist.is_main():  # only now is the run known to continue
            self._write_config(changes)
        dist.barrier()

        # DDP's constructor broadcasts rank 0's parameters and buffers, so every rank starts
        # from identical weights whether they came from a seed or each rank read the files.
        if cfg.compile:  # in place: state-dict keys, checkpoints and EMA stay the eager network's
            compile_in_place(model, cfg.compile_backend)
        self.ddp_model = model
        if self.world > 1:
            self.ddp_model = DDP(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_NO_FORWARD_BUFFER_SYNC,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        for rate in self.ema_rates:
            if rate not in self.ema:
                self.ema[rate] = [p.detach().clone().float() for p in self.params]

        # Generators last: nothing above may consume randomness a straight run would not.
        if rank_state is not None:
            ckpt.set_rng_state(rank_state["rng"])
        else:
            ckpt.seed_all(cfg.seed + self.rank + (1_000_003 * self.step if resume else 0))

    # ------------------------------------------------------------------ state

    def _check_config(self, resume: str | None) -> list[tuple[str, Any, Any]]:
        """Compare this run's config with the one saved in ``run_dir``; return the allowed changes.

        The saved ``config.yaml`` is the truth of a run (``sample.py`` reads it). Resuming with a
        change outside :data:`SAFE_TO_CHANGE` raises :class:`ConfigError` naming every changed
        field. A field the saved file lacks (written before the field existed) counts as
        changed only when the new value is not the field's default.
        """
        path = os.path.join(self.run_dir, "config.yaml")
        own = resume and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(self.run_dir)
        if not own or not os.path.isfile(path):
            return []
        saved = load_yaml(path)
        defaults = {
            g: to_dict(type(v)()) for g, v in (self._config_objs or {}).items() if hasattr(v, "__dataclass_fields__")
        }
        changes = []
        for key, old, new in differences(saved, self.config):
            group, _, name = key.partition(".")
            if old is None and group in saved and defaults.get(group, {}).get(name, object()) == new:
                continue
            changes.append((key, old, new))
        unsafe = [c for c in changes if c[0] not in SAFE_TO_CHANGE]
        if unsafe:
            listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in unsafe)
            raise ConfigError(
                f"{self.run_dir} holds a run with a different configuration ({listed}); resuming would mix two "
                f"runs. Rerun with the saved values to continue it, or give a new --log_dir. Only "
                f"{', '.join(sorted(k.split('.', 1)[1] for k in SAFE_TO_CHANGE))} may change on resume."
            )
        return changes

    def _write_config(self, changes: list[tuple[str, Any, Any]]) -> None:
        """Write ``config.yaml``; after allowed changes the previous one is kept as ``config.stepN.yaml``."""
        path = os.path.join(self.run_dir, "config.yaml")
        if changes and os.path.isfile(path):
            keep = os.path.join(self.run_dir, f"config.step{self.step:06d}.yaml")
            n = 1
            while os.path.exists(keep):
                keep, n = os.path.join(self.run_dir, f"config.step{self.step:06d}.{n}.yaml"), n + 1
            os.replace(path, keep)
            logger.log(
                f"resuming at step {self.step} with {', '.join(f'{k} {a!r} -> {b!r}' for k, a, b in changes)}; "
                f"the previous config is kept as {os.path.basename(keep)}"
            )
        dump_yaml(self.config, path)

    def _resume_path(self) -> str | None:
        """The checkpoint to start from: the run directory's newest complete one, unless
        ``resume_checkpoint`` names a file inside the run directory (a deliberate roll-back).

        A run started from a checkpoint elsewhere (fine-tuning a teacher) and then
        relaunched with the same command after a crash thus continues where it stopped.
        """
        own = ckpt.find_resume_checkpoint(self.run_dir)
        given = self.cfg.resume_checkpoint
        if not given:
            return own
        inside = os.path.dirname(os.path.abspath(given)) == os.path.abspath(self.run_dir)
        if own and not inside:
            logger.log(f"{self.run_dir} already holds checkpoints: continuing from {own}, not {given}")
            return own
        return given

    def _load(self, path: str) -> dict | None:
        """Load a checkpoint (every rank reads the files itself); return this rank's saved state."""
        from dkdm.models.checkpoints import load_checkpoint, read_state_dict

        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_checkpoint {path} does not exist")
        directory, step = os.path.dirname(os.path.abspath(path)), ckpt.parse_step(path)
        logger.log(f"resuming from {path}")
        load_checkpoint(self.model, path)
        if step is None:
            logger.log("the checkpoint name carries no step number: starting at step 0 from its weights")
            return None
        self.step = step
        for rate in self.ema_rates:
            p = ckpt.ema_path(directory, rate, step)
            if os.path.isfile(p):
                sd = read_state_dict(p)
                missing = [n for n in self.param_names if n not in sd]
                if missing:
                    raise ValueError(f"EMA checkpoint {p} lacks {len(missing)} parameters, e.g. {missing[0]}")
                self.ema[rate] = [sd[n].to(self.device, torch.float32).clone() for n in self.param_names]
            else:
                logger.warn(f"no {os.path.basename(p)} beside the checkpoint: EMA {rate} restarts from the model")
        opt_file = ckpt.opt_path(directory, step)
        if not os.path.isfile(opt_file):
            logger.warn(f"no {os.path.basename(opt_file)}: optimizer, RNG and data stream start afresh at step {step}")
            return None
        trusted = self.cfg.trust_checkpoints
        state = ckpt.load_file(opt_file, map_location=self.device, trusted=trusted)
        self.opt.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["precision"])
        if state["step"] != step:
            raise ValueError(f"{opt_file} records step {state['step']}, its name says {step}")
        self.samples = int(state.get("samples", 0))
        for name, obj in self.extra_state.items():
            p = ckpt.extra_path(directory, name, step, self.rank)
            if os.path.isfile(p):
                obj.load_state_dict(ckpt.load_file(p, map_location=self.device, trusted=trusted))
            else:
                logger.warn(f"no {os.path.basename(p)}: '{name}' starts afresh")
        ranks = state.get("rank_states", [])
        if len(ranks) != self.world:
            logger.warn(
                f"the checkpoint was written by {len(ranks)} processes, this run has {self.world}: "
                "random generators and data streams restart (the run stays valid, not bitwise reproducible)"
            )
            return None
        mine = ranks[self.rank]
        for name, obj in self.loop_state.items():
            if name in mine["loop"]:
                obj.load_state_dict(mine["loop"][name])
            else:
                logger.warn(f"the checkpoint holds no '{name}' state; it starts afresh")
        self._last_saved = step
        return mine

    def ema_state_dict(self, rate: str) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA ``rate``'s parameters in place of the live ones."""
        sd = self.model.state_dict()
        for name, value in zip(self.param_names, self.ema[rate]):
            sd[name] = value
        return sd

    def save(self) -> None:
        """Write the checkpoint of the current step (collective: every rank must call it).

        Per-rank extra files first, then model and EMAs, then -- once every rank has
        finished -- ``optNNNNNN.pt``, whose presence marks the checkpoint complete.
        """
        try:
            self._save()
        except fileio.DiskFullError as e:
            last = f"step {self._last_saved}" if self._last_saved >= 0 else "none yet"
            raise fileio.DiskFullError(
                e.errno,
                f"{e.strerror}. The checkpoint of step {self.step} is incomplete and is ignored on resume; "
                f"the last complete checkpoint ({last}) is intact",
            ) from None

    def _save(self) -> None:
        step, d = self.step, self.run_dir
        self._check_finite()
        if dist.is_main() and os.path.exists(ckpt.opt_path(d, step)):
            # Re-saving a step (a run resumed from an older checkpoint): drop the marker first
            # so a crash half-way cannot leave old and new files looking like one checkpoint.
            os.remove(ckpt.opt_path(d, step))
        dist.barrier()
        for name, obj in self.extra_state.items():
            ckpt.atomic_save(obj.state_dict(), ckpt.extra_path(d, name, step, self.rank))
        mine = {"rng": ckpt.rng_state(), "loop": {k: v.state_dict() for k, v in self.loop_state.items()}}
        rank_states = dist.all_gather_object(mine)
        if dist.is_main():
            weights = {ckpt.model_path(d, step): _cpu(self.model.state_dict())}
            weights.update({ckpt.ema_path(d, rate, step): _cpu(self.ema_state_dict(rate)) for rate in self.ema_rates})
            for path, sd in weights.items():
                ckpt.atomic_save(sd, path)
                if self.cfg.save_safetensors:
                    save_safetensors(sd, path[: -len(".pt")] + ".safetensors")
        dist.barrier()
        if dist.is_main():
            state = {
                "format": 1,
                "step": step,
                "samples": self.samples,
                "optimizer": self.opt.state_dict(),
                "precision": self.precision.state_dict(),
                "ema_rates": self.ema_rates,
                "extra_state": sorted(self.extra_state),
                "world_size": self.world,
                "rank_states": rank_states,
                "config": self.config,
            }
            ckpt.atomic_save(state, ckpt.opt_path(d, step))
            logger.log(f"saved checkpoint {ckpt.model_path(d, step)}")
        dist.barrier()
        self._last_saved = step

    # ------------------------------------------------------------------ loop

    def done(self) -> bool:
        """True once ``max_steps`` or ``lr_anneal_steps`` (whichever is set and smaller) is reached."""
        c = self.cfg
        return bool(
            (c.max_steps and self.step >= c.max_steps) or (c.lr_anneal_steps and self.step >= c.lr_anneal_steps)
        )

    def current_lr(self) -> float:
        """guided-diffusion's anneal: ``lr * (1 - step / lr_anneal_steps)``, constant when 0."""
        c = self.cfg
        if not c.lr_anneal_steps:
            return c.lr
        return c.lr * max(0.0, 1.0 - self.step / c.lr_anneal_steps)

    def run(self, next_batch: Callable[[], Batch], loss_fn: LossFn) -> int:
        """Train until :meth:`done`, logging every ``log_interval`` steps and saving every
        ``save_interval`` steps and at the end; return the final step.

        Raises FloatingPointError naming the step when the loss stops being finite; that
        is detected at the next log or save, before anything is written.
        """
        c = self.cfg
        try:
            if self.done() and self.step > 0:
                logger.log(
                    f"{self.run_dir} already finished at step {self.step} (max_steps {c.max_steps}, "
                    f"lr_anneal_steps {c.lr_anneal_steps}): nothing to train; raise --max_steps (not past "
                    "--lr_anneal_steps) to go on"
                )
                return self.step
            self._tick = time.perf_counter()
            self._steps_since_dump = 0
            first = FirstCallClock("step", c.compile_backend) if c.compile else contextlib.nullcontext()
            while not self.done():
                with first:
                    self.run_step(next_batch, loss_fn)
                if c.log_interval > 0 and self.step % c.log_interval == 0:
                    self.dump_logs()
                if c.save_interval > 0 and self.step % c.save_interval == 0:
                    self.save()
            if self._steps_since_dump:
                self.dump_logs()
            if self._last_saved != self.step:
                self.save()
            return self.step
        finally:
            if dist.is_main():
                fileio.release_lock(self.run_dir)

    def run_step(self, next_batch: Callable[[], Batch], loss_fn: LossFn) -> None:
        """One optimizer step on ``next_batch()`` (no host synchronisation inside)."""
        batch = next_batch()
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(sizes) != 1:
            raise ValueError(
                f"next_batch() must return tensors sharing their first dimension, got sizes {sorted(sizes)}"
            )
        bs = sizes.pop()
        micro = self.cfg.microbatch if self.cfg.microbatch > 0 else bs
        self.opt.zero_grad(set_to_none=True)
        for i in range(0, bs, micro):
            mb = {k: (v[i : i + micro] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
            n = min(micro, bs - i)
            last = i + micro >= bs
            sync = contextlib.nullcontext() if last or self.ddp_model is self.model else self.ddp_model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss, terms = loss_fn(self.ddp_model, mb)
                # Weighted so microbatching changes the batch's gradient only by rounding.
                self.precision.backward(loss * (n / bs))
            self._log_terms(loss.detach(), terms)
        lr = self.current_lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        grad_norm = self.precision.unscale_and_clip(self.opt, self.params, self.cfg.grad_clip)
        self.precision.step(self.opt)
        for rate in self.ema_rates:
            self._ema_fns[rate](self.ema[rate], self._param_data, None)
        self.step += 1
        self.samples += bs * self.world
        self._steps_since_dump += 1
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", torch.nn.utils.get_total_norm(self._param_data, foreach=True))
        logger.logkv("lr", lr)

    def _log_terms(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        bad = ~torch.isfinite(loss)
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.step + 1, self._first_bad)
        terms = {k: v.detach() for k, v in terms.items()}
        if "loss" not in terms:
            logger.logkv_mean("loss", loss)
        t = terms.get("t")
        if t is not None and self.num_timesteps:
            logger.log_loss_dict(self.num_timesteps, t, terms)
        else:
            for k, v in terms.items():
                if k != "t":
                    logger.logkv_mean(k, v.float().mean())

    def _check_finite(self) -> None:
        """Raise if any step since the start had a non-finite loss (one small host sync)."""
        flag = self._first_bad.clone()
        if self.world > 1:
            # A NaN on one rank must stop every rank, or the others wait forever.
            comm = flag.to(dist.comm_device())
            torch.distributed.all_reduce(comm, op=torch.distributed.ReduceOp.MAX)
            flag = comm
        bad = int(flag)
        if bad >= 0:
            last = f"{ckpt.model_path(self.run_dir, self._last_saved)}" if self._last_saved >= 0 else "none was written"
            raise FloatingPointError(
                f"the loss became NaN or infinite at step {bad}; training stopped without saving "
                f"(last good checkpoint: {last}). Lower the lr, set grad_clip, or check the data"
            )

    def dump_logs(self) -> dict:
        """Write the values logged since the last dump (collective) after checking the loss is finite."""
        self._check_finite()
        now = time.perf_counter()
        steps = max(1, self._steps_since_dump)
        # Wall time between dumps: the dump synchronises, so this is true step time on GPUs too.
        logger.logkv("step_time", (now - self._tick) / steps)
        logger.logkv("step", self.step)
        logger.logkv("samples", self.samples)
        if self.precision.mode == "fp16":
            logger.logkv("loss_scale", self.precision.loss_scale())
        out = logger.dumpkvs()
        self._tick = time.perf_counter()
        self._steps_since_dump = 0
        return out


def _cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights to write: on the CPU, in the standard memory order (a --channels_last run's files are
    byte for byte what the same weights give without it)."""
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------------- data-based training


def batches_from_stream(
    stream: Any, device: torch.device, expect: tuple[int, int, int] | None = None
) -> Callable[[], Batch]:
    """``next_batch`` for :meth:`Trainer.run` from an iterator of ``(x, cond)`` pairs.

    The batch dict holds ``x`` plus every entry of ``cond`` (e.g. ``y``), moved to
    ``device``. With ``expect = (C, H, W)`` the first batch's image shape is checked, so a
    model/data mismatch fails with a clear message before any step is taken.
    """
    checked = expect is None

    def next_batch() -> Batch:
        nonlocal checked
        x, cond = next(stream)
        if not checked:
            if tuple(x.shape[1:]) != tuple(expect):
                raise ValueError(
                    f"the data gives images of shape {tuple(x.shape[1:])} (C, H, W) but the model expects "
                    f"{tuple(expect)}; choose an --arch for this data or set --image_size / --in_channels"
                )
            checked = True
        batch = {"x": x.to(device, non_blocking=True)}
        batch.update({k: v.to(device, non_blocking=True) for k, v in cond.items()})
        return batch

    return next_batch


def diffusion_loss_fn(diffusion: Any, schedule_sampler: Any) -> LossFn:
    """``loss_fn`` for :meth:`Trainer.run`: ``diffusion.training_losses`` at sampled timesteps.

    Timesteps come from ``schedule_sampler`` (importance weights applied); a loss-aware
    sampler is fed the per-sample losses. Batch entries other than ``x`` are passed to
    the model as keywords (``y`` for class-conditional models).
    """

    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"]
        kwargs = {k: v for k, v in batch.items() if k != "x"}
        t, weights = schedule_sampler.sample(x.shape[0], x.device)
        losses = diffusion.training_losses(model, x, t, model_kwargs=kwargs)
        schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        terms = {k: v * weights for k, v in losses.items()}
        terms["t"] = t
        return terms["loss"].mean(), terms

    return loss_fn
