import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run by every rank: exercises the helpers, the logger's cross-rank averaging and data
# sharding (DDP itself is the trainer tests' business), then writes what it saw to
# <out>/rank<r>.json for the test to check.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from dkdm import dist, logger
    from dkdm.data import load_data

    out = sys.argv[1]
    dist.setup_dist()
    dist.setup_dist()  # idempotent
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {"rank": rank, "world": world, "launcher": dist.launcher(), "local_rank": dist.local_rank(),
           "env": [os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")],
           "is_main": dist.is_main(), "device": str(dist.dev())}
    res["bcast"] = dist.broadcast_object({"from": rank, "list": [rank] * 3})
    res["gathered"] = dist.all_gather_object(("r", rank))
    res["gather0"] = dist.gather(rank * 7)
    dist.barrier()

    logger.configure(os.path.join(out, "run"), format_strs="csv,log")
    logger.logkv_mean("loss", torch.tensor(float(rank)))
    if rank == 1:
        logger.logkv_mean("only_rank1", 5.0)
    # rank 0: t=0 (q0), value 1; rank 1: t=9 (q3), values 3 and t=1 (q0), value 5.
    ts = torch.tensor([0]) if rank == 0 else torch.tensor([9, 1])
    vals = torch.tensor([1.0]) if rank == 0 else torch.tensor([3.0, 5.0])
    logger.log_loss_dict(10, ts, {"mse": vals})
    res["dump"] = logger.dumpkvs()
    logger.log("written by rank", rank)

    # An npz rather than digits: spares each rank importing scikit-learn.
    s = load_data(data_dir=sys.argv[2], batch_size=8, image_size=8, deterministic=True)
    res["shard"] = s.plan(0)[0].tolist()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.cleanup()
    """
)


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "OMPI_", "MPI_", "HYDRA_", "MV2_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["HYDRA_LAUNCHER"] = "fork"  # no ssh needed on one host (CI containers)
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, as in CI
    return env


def _args(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    npz = tmp_path / "d.npz"
    np.savez(npz, np.zeros((40, 8, 8, 3), np.uint8))
    return [str(script), str(tmp_path), str(npz)]


def _results(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _run(cmd, tmp_path, timeout=90):
    proc = subprocess.run(
        cmd + _args(tmp_path),
        check=False,
        env=_env(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _results(tmp_path)


def _check(results, tmp_path, launcher):
    r0, r1 = results
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["launcher"] == launcher
        assert res["local_rank"] == r and res["env"] == [str(r), "2", str(r)]
        assert res["is_main"] == (r == 0) and res["device"] == "cpu"
        assert res["bcast"] == {"from": 0, "list": [0, 0, 0]}
        assert res["gathered"] == [["r", 0], ["r", 1]]
        assert res["shard"] == list(range(r, 16, 2))  # every world_size-th example
    assert r0["gather0"] == [0, 7] and r1["gather0"] is None
    for res in results:
        d = res["dump"]
        assert d["loss"] == pytest.approx(0.5) and d["only_rank1"] == pytest.approx(5.0)
        assert d["mse"] == pytest.approx((1.0 + 4.0) / 2)  # mean of per-rank batch means
        assert d["mse_q0"] == pytest.approx(3.0) and d["mse_q3"] == pytest.approx(3.0)
        assert "mse_q1" not in d
    run = tmp_path / "run"
    rows = (run / "progress.csv").read_text().splitlines()
    assert len(rows) == 2  # one header, one row: rank 1 wrote nothing
    log = (run / "log.txt").read_text()
    assert "written by rank 0" in log and "rank 1" not in log


@pytest.mark.mpi
@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec (pip install mpich) not installed")
def test_mpiexec_two_ranks(tmp_path):
    _check(_run([MPIEXEC, "-n", "2", sys.executable], tmp_path), tmp_path, "mpi")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.mpi
def test_torchrun_style_env_two_ranks(tmp_path):
    """Two processes given exactly the variables torchrun sets (without its agent process)."""
    args = _args(tmp_path)
    port = str(_free_port())
    procs = []
    for r in range(2):
        env = {
            **_env(),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable] + args,
                env=env,
                cwd=str(tmp_path),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    _check(_results(tmp_path), tmp_path, "torchrun")


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "--monitor_interval",
        "0.2",
    ]
    _check(_run(cmd, tmp_path), tmp_path, "torchrun")


SINGLE = """
import os, torch
from dkdm import dist
def threads():
    return len(os.listdir("/proc/self/task"))
assert not torch.distributed.is_initialized()
assert dist.get_rank() == 0 and dist.get_world_size() == 1  # before setup: a world of one
assert dist.all_gather_object(3) == [3] and dist.gather(3) == [3]
dist.setup_dist()
assert torch.distributed.is_initialized() and dist.get_world_size() == 1 and dist.is_main()
assert dist.launcher() == "single"
assert dist.broadcast_object("a") == "a"
net = torch.nn.Linear(2, 2)
ddp = torch.nn.parallel.DistributedDataParallel(net)  # usable with one rank
ddp(torch.ones(1, 2)).sum().backward()
assert net.weight.grad is not None
dist.barrier()
# No import-time default holds the group (torch.distributed.nn's group=group.WORLD) ...
import torch.distributed.nn.functional as F
held = [f for f in vars(F).values() if callable(f) and any(
    isinstance(d, torch.distributed.ProcessGroup) for d in (getattr(f, "__defaults__", None) or ()))]
assert not held, held
# ... so once the DDP wrapper is dropped, cleanup frees the group and joins gloo's worker
# threads (two by default); left running, they can abort the interpreter's shutdown.
during = threads()
del ddp
dist.cleanup()
assert not torch.distributed.is_initialized()
assert threads() <= during - 2, (during, threads())
print("ok")
"""


def test_single_process():
    """In a fresh process, so no process group of an earlier test can make the checks vacuous."""
    env = {
        k: v
        for k, v in _env().items()
        if k
        not in (
            "PMI_RANK",
            "PMI_SIZE",
            "MPI_LOCALRANKID",
            "OMPI_COMM_WORLD_RANK",
            "RANK",
            "WORLD_SIZE",
            "HYDRA_LAUNCHER",
        )
    }
    proc = subprocess.run(
        [sys.executable, "-c", SINGLE], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_single_process_needs_no_mpi():
    code = (
        "import sys; from dkdm import dist; dist.setup_dist(); "
        "assert dist.launcher() == 'single' and dist.get_world_size() == 1; "
        "assert 'mpi4py' not in sys.modules; dist.cleanup()"
    )
    env = _env()
    env.pop("HYDRA_LAUNCHER")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dkdm_device_overrides_the_choice(monkeypatch):
    """DKDM_DEVICE=cpu keeps a GPU machine's run on the CPU; cuda without a GPU fails loudly;
    anything else is refused with the values it takes."""
    import torch

    from dkdm import dist

    monkeypatch.setenv("DKDM_DEVICE", "cpu")
    assert dist.dev() == torch.device("cpu") and dist._default_backend() == "gloo"
    monkeypatch.setenv("DKDM_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        dist.dev()
    monkeypatch.setenv("DKDM_DEVICE", "cuda")
    if torch.cuda.is_available():
        assert dist.dev().type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            dist.dev()
    monkeypatch.delenv("DKDM_DEVICE")
    assert dist.dev().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_launcher_of_another_mpi_is_refused(monkeypatch):
    """mpiexec -n 2 of one MPI with mpi4py built on another: each process a world of one, which
    would train twice into one directory. The announced size and rank must match MPI's."""
    from dkdm import dist

    for var in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    dist.check_mpi_world(0, 1)  # nothing announced: a singleton is fine
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    dist.check_mpi_world(1, 2)
    with pytest.raises(RuntimeError, match=r"rank 1 of 2, but mpi4py's MPI \(Open MPI v5\) sees rank 0 of 1"):
        dist.check_mpi_world(0, 1, lambda: "Open MPI v5\nmore")
    monkeypatch.setenv("PMI_SIZE", "3")
    with pytest.raises(RuntimeError, match="another MPI"):
        dist.check_mpi_world(1, 2)
