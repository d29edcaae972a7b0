"""Distributed start and the few collectives the loops need.

Three ways to start, picked from the environment by :func:`setup_dist`:

* ``mpiexec -n N python script.py`` -- ranks come from MPI (mpi4py); rank 0 picks a free
  TCP port and broadcasts its address and port over MPI, then every rank joins a
  torch.distributed group through ``env://``. mpi4py is imported only in this case, so
  single-process use needs no MPI installation.
* ``torchrun --nproc_per_node N script.py`` -- the ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables torchrun sets.
* ``srun -n N python script.py`` under SLURM without an MPI plugin -- ``SLURM_PROCID`` /
  ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID`` give rank, world and local rank; rank 0's
  address is ``MASTER_ADDR`` (loopback when the step runs on one node; required across
  nodes) and the port ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``, so every task
  agrees without talking first.
* a plain ``python script.py`` -- a world of one. A process group of size one is still
  created, backed by an in-process ``HashStore`` (no port, no network, ~1 ms), so
  ``DistributedDataParallel`` and every collective work unchanged; with one rank they
  cost next to nothing.

The backend is NCCL when the processes train on CUDA and gloo otherwise; each process uses
the GPU of its local rank (:func:`dev`). ``DKDM_DEVICE=cpu`` keeps a run (and the test suite,
whose tests are CPU tests unless marked) on the CPU of a machine that has GPUs;
``DKDM_DEVICE=cuda`` insists on CUDA and fails at once where there is none. Every helper also
works when :func:`setup_dist` was never called: it then behaves as a world of one.
"""

from __future__ import annotations

import gc
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

# Environment variables set by MPI launchers (MPICH/Hydra, Intel MPI, Open MPI, MVAPICH).
_MPI_RANK_VARS = (
    "PMI_RANK",
    "OMPI_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_RANK",
    "PMIX_RANK",
)
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_LOCAL_VARS = (
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
)

_LOCAL_RANK = 0
_LAUNCHER = "none"


def launched_by_mpi() -> bool:
    """True when this process was started by an MPI launcher (``mpiexec``/``mpirun``)."""
    return any(v in os.environ for v in _MPI_RANK_VARS + _MPI_SIZE_VARS + _MPI_LOCAL_VARS)


def launched_by_torchrun() -> bool:
    """True when torchrun (or another ``env://`` launcher) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not launched_by_mpi()


def launched_by_slurm() -> bool:
    """True for a task of a multi-task ``srun`` step that no MPI launcher or torchrun started."""
    try:
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        tasks = 1
    return tasks > 1 and "SLURM_PROCID" in os.environ and not launched_by_mpi() and "RANK" not in os.environ


def _slurm_env() -> dict[str, str]:
    """torchrun-style variables for this SLURM task; refuses what cannot work."""
    env = os.environ
    rank, size = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1)
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 else "")
    if not addr:
        raise RuntimeError(
            f"this srun step spans {nodes} nodes: set MASTER_ADDR to the first node's hostname, e.g. "
            "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1), and rerun"
        )
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return {
        "RANK": rank,
        "WORLD_SIZE": size,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def launch_rank() -> int:
    """This process's rank as its launcher announced it, readable before :func:`setup_dist`.

    The logger uses it to keep ranks other than 0 quiet from the very first line.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in _MPI_RANK_VARS + ("RANK",) + (("SLURM_PROCID",) if launched_by_slurm() else ()):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def _default_backend() -> str:
    return "nccl" if dev().type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_mpi_world(rank: int, size: int, library_version=None) -> None:
    """Refuse a world that disagrees with what the launcher announced.

    An ``mpiexec`` of one MPI (say the mpich wheel's) starting an mpi4py built against another
    (say Open MPI) leaves every process a singleton: N processes each train as rank 0 of a
    world of 1 and overwrite each other's files, exit code 0. Seen on a machine with both.
    """
    announced = next((os.environ[v] for v in _MPI_SIZE_VARS if v in os.environ), None)
    own = next((os.environ[v] for v in _MPI_RANK_VARS if v in os.environ), None)
    try:
        want = int(announced) if announced is not None else None
        want_rank = int(own) if own is not None else None
    except ValueError:
        return
    if (want is not None and want != size) or (want_rank is not None and want_rank != rank):
        lib = (library_version() if library_version else "").strip().splitlines()[:1]
        raise RuntimeError(
            f"the MPI launcher started this process as rank {want_rank} of {want}, but mpi4py's MPI "
            f"({lib[0] if lib else 'unknown library'}) sees rank {rank} of {size}: the mpiexec used belongs to "
            "another MPI than the one mpi4py was built with. Launch with the matching mpiexec (pip's mpich "
            "wheel puts one beside this python), or use torchrun."
        )


def _setup_mpi(backend: str) -> None:
    global _LOCAL_RANK
    from mpi4py import MPI  # only under mpiexec: single-process use needs no MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    check_mpi_world(rank, size, MPI.Get_library_version)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    _LOCAL_RANK, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    if rank == 0:
        # On one node the loopback address always works, even where the hostname does
        # not resolve (containers, CI); across nodes the others must reach rank 0's host.
        if local_size == size:
            addr = "127.0.0.1"
        else:
            addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.getfqdn())
        port = int(os.environ.get("MASTER_PORT", "0")) or _free_port()
        info = (addr, port)
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    os.environ.update(
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(_LOCAL_RANK),
    )
    _set_device()
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size)


def _set_device() -> None:
    if dev().type == "cuda":
        torch.cuda.set_device(dev())


def setup_dist(backend: str | None = None) -> None:
    """Join (or create) the process group for however this process was launched.

    Idempotent: later calls do nothing. ``backend`` overrides the choice of NCCL (CUDA)
    or gloo (CPU). Under mpiexec the port is chosen by rank 0 unless ``MASTER_PORT`` is
    set; under torchrun its variables are used as given; a lone process gets a group of
    size one backed by an in-process store, so DDP works without a network.
    """
    global _LOCAL_RANK, _LAUNCHER
    if dist.is_initialized():
        return
    # torch.distributed.nn's functions default to ``group=group.WORLD``, evaluated when it is
    # first imported; DDP imports it. Imported after the group exists, ten defaults hold the
    # group forever, destroy_process_group cannot free it, and gloo's worker threads outlive
    # the interpreter: one that drops a Python-owned tensor during finalisation aborts the
    # process after a complete run ("terminate called without an active exception", exit 6;
    # seen about once in 100 two-rank runs). Imported now, the defaults are None.
    import torch.distributed.nn  # noqa: F401

    backend = backend or _default_backend()
    if launched_by_mpi():
        _LAUNCHER = "mpi"
        _setup_mpi(backend)
    elif launched_by_torchrun() or launched_by_slurm():
        _LAUNCHER = "torchrun" if launched_by_torchrun() else "slurm"
        if _LAUNCHER == "slurm":
            os.environ.update(_slurm_env())
        _LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
        _set_device()
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        _LAUNCHER = "single"
        _LOCAL_RANK = 0
        _set_device()
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def launcher() -> str:
    """How :func:`setup_dist` started this process: ``mpi``, ``torchrun``, ``slurm``, ``single`` or ``none``."""
    return _LAUNCHER


def get_rank() -> int:
    """Rank in the process group (0 when no group was set up)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 when no group was set up)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes logs and checkpoints."""
    return get_rank() == 0


def local_rank() -> int:
    """Index of this process among the processes on its node; picks its GPU."""
    return _LOCAL_RANK


DEVICE_ENV = "DKDM_DEVICE"


def dev() -> torch.device:
    """The device this process trains on: its local rank's GPU, or the CPU.

    ``DKDM_DEVICE`` overrides the choice: ``cpu``, or ``cuda`` (refused where CUDA is absent);
    unset or ``auto`` means CUDA when there is one.
    """
    want = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={want!r}: use cpu, cuda or auto (unset)")
    if want == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", _LOCAL_RANK % torch.cuda.device_count())
    if want == "cuda":
        raise RuntimeError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device; unset it to run on the CPU")
    return torch.device("cpu")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where tensors must live for the group's backend (NCCL wants CUDA tensors)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[dev().index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s picklable ``obj`` on every rank (the argument is ignored elsewhere)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


@torch.no_grad()
def all_gather_object(obj: Any) -> list:
    """Every rank's picklable ``obj``, as a list indexed by rank, on every rank."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj: Any, dst: int = 0) -> list | None:
    """Every rank's picklable ``obj`` as a list on rank ``dst``; ``None`` on the other ranks."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    if dist.get_backend() == "nccl":
        # NCCL has no gather for objects; all_gather then drop is the portable way.
        out = all_gather_object(obj)
        return out if rank == dst else None
    out = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def cleanup() -> None:
    """Leave the process group (safe to call when none was set up).

    Call it once nothing holds the group any more (drop the DDP wrapper, i.e. the trainer,
    first): the group is freed, and its gloo worker threads joined, only when its last
    reference goes. Threads still running while Python shuts down can abort the process
    (see :func:`setup_dist`); ``gc.collect()`` here frees wrappers kept only by cycles.
    """
    global _LAUNCHER
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _LAUNCHER = "none"
