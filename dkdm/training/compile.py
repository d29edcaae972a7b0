"""Switches of how the network executes, for training and sampling: ``torch.compile`` (``--compile``,
``--compile_backend``) and the channels-last memory order (``--channels_last``).

The network is compiled in place (:meth:`torch.nn.Module.compile`), so its state-dict keys,
checkpoints, EMA and DDP wrapping are exactly those of the eager network; the first call
compiles (minutes for a 57M UNet's forward and backward), which the caller reports. Compiled
kernels fuse operations, so results match eager ones to float rounding, not bitwise: a run
keeps the setting it started with (resume refuses a change, as for ``precision``).

Measured on an H100 (benchmarks/results/README.md): 2.5x on sampling the 57M at batch 256,
1.5x on the DKDM step 57M -> 14M; on a CPU the gain is small (about 1.1x) and the compile
long, so the default is off.

``channels_last`` stores the convolution weights in NHWC order; oneDNN and cuDNN then run NHWC
kernels, and their outputs (so every activation after the first convolution) keep that order.
Which order is faster depends on the machine (benchmarks/results/README.md): on the 2-core AMD
EPYC with AVX-512 of earlier measurements the 57M teacher's forward took 1.09x longer in
channels_last; on a 2-core EPYC with AVX2 only (Zen 3) the 14M's sampling loops at batch 4 ran
about 1.1x faster (against guided-diffusion: 1.00-1.01 -> 1.11-1.14), its training step and
the 57M teacher's forward no faster (paired roofline switch: 0.96 and 1.05 in two runs); on an H100
the 57M's bf16 sampling took 1.2x longer. Hence a switch per role (the trained network, a
distillation's teacher, the sampler), off by default. The
products are summed in another order, so results agree to float rounding (fp32: 1e-5), and a
run keeps the setting it started with, as for ``--compile``. Checkpoints are written in the
standard order either way.
"""

from __future__ import annotations

import time

import torch

from dkdm import logger
from dkdm.config import check_compile_backend


def compile_in_place(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile ``model`` in place (the first call compiles) and return it."""
    check_compile_backend(backend)
    model.compile(backend=backend)
    return model


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store ``model``'s 4-D parameters and buffers in channels_last order (5-D: channels_last_3d), in
    place (the Parameter objects stay, so optimisers and hooks built on them still hold), and return it."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    return model._apply(convert)


class FirstCallClock:
    """Logs how long the first of the calls it times took: ``with clock:`` around each call, or
    :meth:`start` / :meth:`stop` where the call is not one block. Under ``--compile`` that first
    call is where the compilation happens."""

    def __init__(self, what: str, backend: str) -> None:
        self.what, self.backend = what, backend
        self.seconds: float | None = None
        self._t0: float | None = None

    def start(self) -> None:
        if self.seconds is None:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.seconds is None and self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
            logger.log(
                f"torch.compile ({self.backend}): the first {self.what} took {self.seconds:.1f} s, compiling included"
            )

    def __enter__(self) -> FirstCallClock:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.stop()
