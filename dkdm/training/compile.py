"""``torch.compile`` as a switch (``--compile``, ``--compile_backend``) for training and sampling.

The network is compiled in place (:meth:`torch.nn.Module.compile`), so its state-dict keys,
checkpoints, EMA and DDP wrapping are exactly those of the eager network; the first call
compiles (minutes for a 57M UNet's forward and backward), which the caller reports. Compiled
kernels fuse operations, so results match eager ones to float rounding, not bitwise: a run
keeps the setting it started with (resume refuses a change, as for ``precision``).

Measured on an H100 (benchmarks/results/README.md): 2.5x on sampling the 57M at batch 256,
1.5x on the DKDM step 57M -> 14M; on a CPU the gain is small (about 1.1x) and the compile
long, so the default is off.
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
