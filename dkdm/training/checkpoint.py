"""Checkpoint files: atomic writes, names, finding the newest complete one, RNG state.

A checkpoint at step N (N optimizer steps done) is a set of files in the run directory:

* ``modelN.pt`` -- plain state dict of the unwrapped model (guided-diffusion's tools read it);
* ``ema_<rate>_N.pt`` -- plain state dict of each EMA, same keys;
* ``<name>N.pt`` on rank 0 and ``<name>N_rank<r>.pt`` on rank r > 0 for every per-rank
  extra state of the loop (the distillation pool: each rank has its own);
* ``optN.pt`` -- optimizer, loss scaler, step, each rank's RNG and data-stream state, the
  resolved config. It is written last, so its presence marks the checkpoint complete.

N is zero-padded to six digits, as guided-diffusion writes it. Every file is written to a
hidden temporary name in the same directory, flushed to disk and renamed over its final
name, so a crash or a full disk never leaves a half-written file under a real name and
never touches an older checkpoint.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import re
from typing import Any

import numpy as np
import torch

from dkdm import fileio
from dkdm.fileio import atomic_save  # noqa: F401  (re-exported: the trainer's and loops' writer)

_STEP_RE = re.compile(r"(\d{6,})\.pt$")


def model_path(run_dir: str, step: int) -> str:
    """``run_dir/modelNNNNNN.pt``."""
    return os.path.join(run_dir, f"model{step:06d}.pt")


def ema_path(run_dir: str, rate: str, step: int) -> str:
    """``run_dir/ema_<rate>_NNNNNN.pt`` (``rate`` as the user wrote it, e.g. ``0.9999``)."""
    return os.path.join(run_dir, f"ema_{rate}_{step:06d}.pt")


def opt_path(run_dir: str, step: int) -> str:
    """``run_dir/optNNNNNN.pt``, the file that completes a checkpoint."""
    return os.path.join(run_dir, f"opt{step:06d}.pt")


def extra_path(run_dir: str, name: str, step: int, rank: int) -> str:
    """``run_dir/<name>NNNNNN.pt`` for rank 0, ``<name>NNNNNN_rank<r>.pt`` for rank r > 0."""
    suffix = "" if rank == 0 else f"_rank{rank}"
    return os.path.join(run_dir, f"{name}{step:06d}{suffix}.pt")


def parse_step(path: str) -> int | None:
    """The step in a checkpoint file name (``model000300.pt`` -> 300), or None if it has none."""
    m = _STEP_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete temporary files a killed save left in ``run_dir``; return their paths."""
    return fileio.remove_stale_temporaries(run_dir, "*.pt")


def complete_steps(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir`` (``optN.pt`` and ``modelN.pt`` present), ascending."""
    steps = []
    for p in glob.glob(os.path.join(run_dir, "opt*.pt")):
        step = parse_step(p)
        if (
            step is not None
            and os.path.basename(p) == f"opt{step:06d}.pt"
            and os.path.isfile(model_path(run_dir, step))
        ):
            steps.append(step)
    return sorted(steps)


def find_resume_checkpoint(run_dir: str) -> str | None:
    """Path of ``modelN.pt`` of the newest complete checkpoint in ``run_dir``, or None."""
    if not run_dir or not os.path.isdir(run_dir):
        return None
    steps = complete_steps(run_dir)
    return model_path(run_dir, steps[-1]) if steps else None


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    kinds = (np.bool_, np.uint8, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64)
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *{type(np.dtype(k)) for k in kinds}]


class UntrustedFileError(ValueError):
    """A file would need arbitrary unpickling to load; the message says how to allow it."""


def load_file(path: str, map_location: Any = "cpu", trusted: bool = False) -> Any:
    """Load a trainer-written file (optimizer / extra state / pool cache), naming the file on failure.

    Read with ``weights_only=True``: tensors, numbers, strings, containers and, allow-listed,
    the numpy arrays of generator states -- nothing that can run code. A file that needs more
    (written by other code, or tampered with) raises :class:`UntrustedFileError` unless
    ``trusted`` (``--trust_checkpoints``) says the user vouches for it.
    """
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise _unreadable(path, e) from None
        if not trusted:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)[:4]) or "objects"
            raise UntrustedFileError(
                f"{path} holds {unsafe} beyond tensors and plain data; unpickling it could run code. If you "
                "wrote it or trust its source, rerun with --trust_checkpoints"
            ) from None
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:  # noqa: BLE001 - as below
            raise _unreadable(path, e2) from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises RuntimeError, EOFError, struct.error, ...
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: BaseException) -> ValueError:
    return ValueError(
        f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); it may be truncated "
        "or corrupted: delete this checkpoint's files to resume from an older one"
    )


# --------------------------------------------------------------------------- RNG


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device's) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch CPU, the current CUDA device, numpy, Python."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (a CUDA state is restored only where CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
