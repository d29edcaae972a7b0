"""Key-value logging for training loops, in the manner of guided-diffusion's logger.

A loop records scalars with :func:`logkv` (last value wins) or :func:`logkv_mean`
(averaged until the next dump), per-sample losses with :func:`log_loss_dict`, and calls
:func:`dumpkvs` every ``log_interval`` steps. A dump averages every value over ranks with
one all-reduce and rank 0 writes it as a table to stdout and ``log.txt``, as a row of
``progress.csv``, and to TensorBoard event files when tensorboard is installed.

Tensors handed to :func:`logkv_mean` and :func:`log_loss_dict` stay on their device and
are summed there; they become Python floats only inside :func:`dumpkvs`, in a single
device-to-host copy, so logging inside the training step never waits for the GPU.

A module-level logger exists from import on and writes to stdout only, so
:func:`log` works before :func:`configure`. Only rank 0 ever writes anything.
"""

from __future__ import annotations

import csv
import datetime
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import torch

from dkdm import dist
from dkdm.fileio import atomic_write

DEFAULT_FORMATS = ("stdout", "log", "csv", "tensorboard")


# --------------------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:<8.3g}"
    return str(value)


class HumanOutput:
    """A table per dump and plain lines for messages, to a stream or a text file."""

    def __init__(self, path_or_stream: str | TextIO | None = None) -> None:
        # None means "whatever sys.stdout is at write time" (pytest and notebooks swap it).
        self._file = None
        self._stream = None
        if isinstance(path_or_stream, str):
            # Stays open for the run's lifetime; close() releases it.
            self._file = open(path_or_stream, "a")  # noqa: SIM115
        elif path_or_stream is not None:
            self._stream = path_or_stream

    @property
    def stream(self):
        return self._file or self._stream or sys.stdout

    def writekvs(self, kvs: Mapping[str, Any], step: int) -> None:
        if not kvs:
            return
        rows = [(k if len(k) <= 40 else k[:37] + "...", _fmt(v)) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def writeline(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVOutput:
    """``progress.csv`` with one column per key ever logged.

    A key that first appears after some rows were written widens the header: the file is
    rewritten with the new column and empty cells for earlier rows, so the CSV always
    parses. An existing file (a resumed run) is appended to.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: list[str] = []
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
                self.keys = next(csv.reader(f), [])

    def writekvs(self, kvs: Mapping[str, Any], step: int) -> None:
        if not kvs:
            return
        new = sorted(k for k in kvs if k not in self.keys)
        if new:
            rows: list = []
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    rows = list(csv.reader(f))[1:]
            self.keys.extend(new)

            def rewrite(f: Any) -> None:
                w = csv.writer(f)
                w.writerow(self.keys)
                for r in rows:
                    w.writerow(r + [""] * (len(self.keys) - len(r)))

            atomic_write(self.path, rewrite, mode="w")
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["" if kvs.get(k) is None else kvs[k] for k in self.keys])

    def writeline(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardOutput:
    """TensorBoard scalars through ``torch.utils.tensorboard`` (needs tensorboard installed)."""

    def __init__(self, directory: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=directory)

    def writekvs(self, kvs: Mapping[str, Any], step: int) -> None:
        for k, v in kvs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def writeline(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


def make_output(fmt: str, directory: str):
    """One output for a format name: ``stdout``, ``log``, ``csv`` or ``tensorboard``.

    Returns ``None`` for ``tensorboard`` when it is not installed.
    """
    if fmt == "stdout":
        return HumanOutput(None)
    if fmt == "log":
        return HumanOutput(os.path.join(directory, "log.txt"))
    if fmt == "csv":
        return CSVOutput(os.path.join(directory, "progress.csv"))
    if fmt == "tensorboard":
        try:
            return TensorBoardOutput(os.path.join(directory, "tb"))
        except Exception:  # noqa: BLE001 - an optional output must never stop a run
            return None
    raise ValueError(f"unknown log format '{fmt}'; choose from {', '.join(DEFAULT_FORMATS)}")


# --------------------------------------------------------------------------- logger


class Logger:
    """Accumulates key-values between dumps and writes them through its outputs (rank 0)."""

    def __init__(self, directory: str | None, outputs: Sequence[Any]) -> None:
        self.dir = directory
        self.outputs = [o for o in outputs if o is not None]
        self.num_dumps = 0
        self._last: dict[str, Any] = {}  # logkv: key -> value (tensor, number or other)
        self._sum: dict[str, Any] = {}  # logkv_mean: key -> running sum (tensor or float)
        self._cnt: dict[str, Any] = {}  # key -> count (int, or tensor for quartiles)
        self._qsum: dict[str, torch.Tensor] = {}  # log_loss_dict: key -> [4] sums per quartile
        self._qcnt: dict[str, torch.Tensor] = {}

    # ---- recording (no host synchronisation anywhere here)

    def logkv(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = _scalar(value, key)
        self._last[key] = value
        self._sum.pop(key, None)
        self._cnt.pop(key, None)

    def logkv_mean(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = _scalar(value, key).float()
        elif not isinstance(value, (int, float)):
            raise TypeError(f"logkv_mean('{key}') needs a number or a one-element tensor, got {type(value).__name__}")
        self._last.pop(key, None)
        if key in self._sum:
            self._sum[key] = self._sum[key] + value
            self._cnt[key] += 1
        else:
            self._sum[key] = value
            self._cnt[key] = 1

    def log_loss_dict(self, num_timesteps: int, ts: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
        ts = ts.detach().reshape(-1).long()
        quartile = torch.div(ts * 4, num_timesteps, rounding_mode="floor").clamp_(0, 3)
        for key, values in losses.items():
            if values is ts or key == "t":
                continue
            values = values.detach().float()
            if values.ndim == 0:  # an already-reduced scalar has no per-sample timesteps
                self.logkv_mean(key, values)
                continue
            values = values.reshape(-1)
            if values.shape[0] != ts.shape[0]:
                raise ValueError(
                    f"log_loss_dict: '{key}' has {values.shape[0]} values but there are {ts.shape[0]} timesteps"
                )
            self.logkv_mean(key, values.mean())
            q = quartile.to(values.device)
            sums = torch.zeros(4, device=values.device).index_add_(0, q, values)
            # index_add_ rather than bincount: bincount on CUDA syncs to size its output.
            cnts = torch.zeros(4, device=values.device).index_add_(0, q, torch.ones_like(values))
            if key in self._qsum:
                self._qsum[key] += sums
                self._qcnt[key] += cnts
            else:
                self._qsum[key], self._qcnt[key] = sums, cnts

    # ---- dumping

    def _local_entries(self) -> tuple[dict, dict]:
        """Numeric entries as key -> (sum, count); everything else as key -> value."""
        numeric: dict = {}
        other: dict = {}
        for k, v in self._last.items():
            if isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                numeric[k] = (v, 1)
            else:
                other[k] = v
        for k, s in self._sum.items():
            numeric[k] = (s, self._cnt[k])
        for k, s in self._qsum.items():
            c = self._qcnt[k]
            for i in range(4):
                numeric[f"{k}_q{i}"] = (s[i], c[i])
        return numeric, other

    def dumpkvs(self) -> dict:
        """Average the values since the last dump over ranks, write them (rank 0), reset.

        Every rank must call it (it is a collective). Returns the averaged values on every
        rank; a quartile no sample fell into is left out.
        """
        numeric, other = self._local_entries()
        keys = sorted(numeric)
        world = dist.get_world_size()
        if world > 1:
            # Ranks may have logged different keys (a branch taken on one rank only).
            keys = sorted(set().union(*dist.all_gather_object(keys)))
            other = dist.broadcast_object(other)
        if world > 1:
            device = dist.comm_device()
        else:
            # Pack where the tensors already are, so the only copy to host is the last one.
            device = next(
                (v.device for sc in numeric.values() for v in sc if isinstance(v, torch.Tensor)),
                None,
            )
            device = device or torch.device("cpu")
        packed = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
        float_idx, float_val, tens_idx, tens_val = [], [], [], []
        for i, k in enumerate(keys):
            s, c = numeric.get(k, (0.0, 0))
            for j, v in ((2 * i, s), (2 * i + 1, c)):
                if isinstance(v, torch.Tensor):
                    tens_idx.append(j)
                    tens_val.append(v.reshape(()).to(device=device, dtype=torch.float64))
                else:
                    float_idx.append(j)
                    float_val.append(float(v))
        if float_idx:
            packed[torch.tensor(float_idx, device=device)] = torch.tensor(float_val, dtype=torch.float64, device=device)
        if tens_idx:
            packed[torch.tensor(tens_idx, device=device)] = torch.stack(tens_val)
        if world > 1:
            torch.distributed.all_reduce(packed)
        flat = packed.tolist()  # the single device-to-host copy of the interval
        out: dict = {}
        for i, k in enumerate(keys):
            s, c = flat[2 * i], flat[2 * i + 1]
            if c > 0:
                mean = s / c
                # Counters logged as ints (step, samples) stay ints in the table and CSV.
                is_int = isinstance(self._last.get(k), int) and not isinstance(self._last.get(k), bool)
                out[k] = int(mean) if is_int and mean.is_integer() else mean
        out.update(other)
        if _is_writer():
            step = out.get("step", self.num_dumps)
            step = int(step) if isinstance(step, (int, float)) else self.num_dumps
            for o in self.outputs:
                o.writekvs(out, step)
        self.num_dumps += 1
        self._last.clear()
        self._sum.clear()
        self._cnt.clear()
        self._qsum.clear()
        self._qcnt.clear()
        return out

    # ---- messages

    def log(self, *args: Any) -> None:
        if _is_writer():
            text = " ".join(str(a) for a in args)
            for o in self.outputs:
                o.writeline(text)

    def close(self) -> None:
        for o in self.outputs:
            o.close()


def _scalar(value: torch.Tensor, key: str) -> torch.Tensor:
    if value.numel() != 1:
        raise ValueError(f"logged value '{key}' must be a scalar, got a tensor of shape {tuple(value.shape)}")
    return value.detach().reshape(())


def _is_writer() -> bool:
    return dist.launch_rank() == 0


# --------------------------------------------------------------------------- module API

_current = Logger(None, [HumanOutput(None)])


def get_current() -> Logger:
    """The logger the module-level functions write to."""
    return _current


def configure(dir: str | None = None, format_strs: Sequence[str] | str | None = None) -> Logger:
    """Point logging at run directory ``dir`` (created on rank 0) with the given outputs.

    ``format_strs`` is a list or comma-separated string of ``stdout``, ``log`` (log.txt),
    ``csv`` (progress.csv) and ``tensorboard`` (skipped silently when not installed); the
    default is all four. ``dir=None`` uses ``$DKDM_LOGDIR`` or a new temporary folder.
    Files already there (a resumed run) are appended to. Returns the new logger.
    """
    global _current
    if dir is None:
        dir = os.environ.get("DKDM_LOGDIR") or os.path.join(
            tempfile.gettempdir(),
            datetime.datetime.now().strftime("dkdm-%Y-%m-%d-%H-%M-%S-%f"),
        )
    if format_strs is None:
        format_strs = DEFAULT_FORMATS
    elif isinstance(format_strs, str):
        format_strs = [s for s in format_strs.split(",") if s]
    for f in format_strs:
        if f not in DEFAULT_FORMATS:
            raise ValueError(f"unknown log format '{f}'; choose from {', '.join(DEFAULT_FORMATS)}")
    _current.close()
    outputs: list = []
    if _is_writer():
        os.makedirs(dir, exist_ok=True)
        outputs = [make_output(f, dir) for f in format_strs]
    _current = Logger(dir, outputs)
    return _current


def reset() -> None:
    """Close the configured outputs and go back to the stdout-only default logger."""
    global _current
    _current.close()
    _current = Logger(None, [HumanOutput(None)])


def get_dir() -> str | None:
    """The run directory given to :func:`configure` (``None`` before it)."""
    return _current.dir


def logkv(key: str, value: Any) -> None:
    """Record ``value`` for ``key`` until the next dump; a later call replaces it."""
    _current.logkv(key, value)


def logkvs(values: Mapping[str, Any]) -> None:
    """:func:`logkv` for each item of ``values``."""
    for k, v in values.items():
        _current.logkv(k, v)


def logkv_mean(key: str, value: Any) -> None:
    """Add ``value`` (a number, or a 0-d / one-element tensor kept on its device) to the
    running mean of ``key``; the mean is taken and turned into a float at the next dump."""
    _current.logkv_mean(key, value)


def log_loss_dict(num_timesteps: int, ts: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
    """Log each per-sample loss in ``losses`` (tensors ``[B]``) as its mean, and as
    ``<key>_q0`` .. ``<key>_q3``: the mean over samples whose timestep ``ts`` falls in each
    quarter of ``[0, num_timesteps)``. Sums and counts are kept on the device; a key named
    ``t`` (or the ``ts`` tensor itself) is skipped."""
    _current.log_loss_dict(num_timesteps, ts, losses)


def dumpkvs() -> dict:
    """Average everything logged since the last dump over ranks and write it (rank 0).

    A collective: every rank must call it. Returns the averaged values.
    """
    return _current.dumpkvs()


def log(*args: Any) -> None:
    """Write a line (the arguments joined by spaces) to stdout and log.txt, on rank 0."""
    _current.log(*args)


def warn(*args: Any) -> None:
    """:func:`log` with a ``WARNING:`` prefix."""
    _current.log("WARNING:", *args)


def error(*args: Any) -> None:
    """:func:`log` with an ``ERROR:`` prefix."""
    _current.log("ERROR:", *args)
