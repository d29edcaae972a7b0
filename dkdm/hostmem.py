"""Host memory allocator settings for the training and sampling scripts (glibc malloc).

A forward pass on a CPU allocates and frees a few dozen megabytes of activations. With
glibc's defaults a freed block at the top of the heap above the (dynamic) trim threshold is
handed back to the kernel, and blocks above the (dynamic) mmap threshold are mapped fresh
each time: the next pass then takes a page fault for every 4 KiB it touches again. A 14M UNet
forward at batch 4 took 5,000-20,000 page faults and 10-20% of its time in them on this
project's CPU (``tests/test_hostmem.py`` counts them; timings of the scripts with and without in
``benchmarks/results/README.md``, "Host allocator"). Fixing the mmap
threshold at its maximum (32 MiB: smaller blocks come from the heap) and the trim threshold at
1 GiB (freed memory stays with the process) removes them; the process keeps its peak heap
instead of returning it, which is what a training or sampling process wants. Same results:
only where memory comes from changes.

The scripts call :func:`tune_host_allocator` once at start; ``DKDM_HOST_ALLOCATOR=default``
leaves glibc's settings alone. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "DKDM_HOST_ALLOCATOR"
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 1 << 30


def tune_host_allocator() -> str:
    """Apply the settings above; returns what was done, for the run's log.

    ``"tuned: ..."`` when glibc accepted both, ``"default (...)"`` with the reason otherwise.
    A value other than ``tuned``/``default`` in ``DKDM_HOST_ALLOCATOR`` is refused.
    """
    choice = os.environ.get(ENV, "tuned")
    if choice not in ("tuned", "default"):
        raise ValueError(f"{ENV} must be 'tuned' or 'default', got {choice!r}")
    if choice == "default":
        return f"default ({ENV}=default)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return "default (glibc refused the mallopt settings)"
    return f"tuned: glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"


def describe_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, widest vector ISA and family/model numbers, for benchmark records.

    E.g. ``"AMD EPYC (AVX-512; family 25 model 17)"``. The same kernels run at very different
    speeds on machines of one name: the development machines have been an AVX2 EPYC (family 25
    model 1, Zen 3) and two AVX-512 ones, one whose oneDNN 3x3 convolution ran at 219 GFLOP/s on
    a thread and a family 25 model 17 (Zen 4, AVX-512 on 256-bit units) at about 100. The ISA
    alone does not tell the last two apart; family and model do. Falls back to
    :func:`platform.processor` where there is no ``/proc/cpuinfo``.
    """
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    first = text.split("\n\n", 1)[0]  # the first processor's block; every core reports the same
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), "")
    name = fields.get("model name", platform.machine())
    family, model = fields.get("cpu family"), fields.get("model")
    ident = [isa] if isa else []
    if family and model:
        ident.append(f"family {family} model {model}")
    return f"{name} ({'; '.join(ident)})" if ident else name
