"""Whole runs of scripts/image_train.py in subprocesses: killed and resumed, and under mpiexec.

A small driver runs the real script's ``main`` with two test-only patches: it can SIGKILL
itself before a given step (a crash between saves), and after training each rank writes
its final weights, EMA and optimizer state so the test can compare runs and ranks bitwise.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from dkdm import dist, logger
from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

DRIVER = """
import os, signal, sys
import torch
sys.path.insert(0, os.path.join({root!r}, "scripts"))
import image_train
from dkdm import dist
from dkdm.training import Trainer

kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
run_step, run = Trainer.run_step, Trainer.run

def killing_run_step(self, *a, **k):
    if kill_at and self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return run_step(self, *a, **k)

def reporting_run(self, *a, **k):
    out = run(self, *a, **k)
    state = {{"model": self.model.state_dict(), "ema": self.ema, "opt": self.opt.state_dict()["state"]}}
    torch.save(state, os.path.join(self.run_dir, f"final_rank{{dist.get_rank()}}.pt"))
    return out

Trainer.run_step, Trainer.run = killing_run_step, reporting_run
image_train.main(sys.argv[1:])
"""

# The small digits UNet, with dropout (so the RNG state matters), a few steps.
ARGS = [
    "--arch",
    "digits-student",
    "--batch_size",
    "8",
    "--save_interval",
    "2",
    "--log_interval",
    "2",
    "--ema_rate",
    "0.9,0.99",
    "--lr",
    "1e-3",
    "--num_workers",
    "0",
]


def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(root=ROOT))
    return str(path)


def run(cmd, env_extra=None, timeout=240):
    env = script_env(OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final(run_dir, rank=0):
    return torch.load(os.path.join(run_dir, f"final_rank{rank}.pt"), weights_only=False)


def assert_equal_states(a, b):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for rate in a["ema"]:
        assert all(torch.equal(x, y) for x, y in zip(a["ema"][rate], b["ema"][rate])), rate
    for i in a["opt"]:
        for k in a["opt"][i]:
            assert torch.equal(a["opt"][i][k], b["opt"][i][k]), (i, k)


def disk_state(run_dir, step):
    """What a run left on disk at ``step``: model, EMAs, optimizer moments."""
    load = lambda f: torch.load(os.path.join(run_dir, f), weights_only=False)
    ema = {r: list(load(f"ema_{r}_{step:06d}.pt").values()) for r in ("0.9", "0.99")}
    return {"model": load(f"model{step:06d}.pt"), "ema": ema, "opt": load(f"opt{step:06d}.pt")["optimizer"]["state"]}


def test_killed_run_resumes_bitwise(tmp_path, monkeypatch):
    drv = driver(tmp_path)
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    r = run([sys.executable, drv, *ARGS, "--max_steps", "6", "--log_dir", crashed], {"KILL_AT_STEP": "5"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert os.path.isfile(os.path.join(crashed, "opt000004.pt"))
    assert not os.path.exists(os.path.join(crashed, "model000006.pt"))
    r = run([sys.executable, drv, *ARGS, "--max_steps", "6", "--log_dir", crashed])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout and "model000004.pt" in r.stdout
    # The uninterrupted run, in this process (same code and seeds, one thread like the others).
    spec = importlib.util.spec_from_file_location("image_train", os.path.join(ROOT, "scripts", "image_train.py"))
    image_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image_train.main([*ARGS, "--max_steps", "6", "--log_dir", straight])
    finally:
        torch.set_num_threads(threads)
        logger.reset()
        dist.cleanup()
    a, b = disk_state(straight, 6), disk_state(crashed, 6)
    assert_equal_states(a, b)
    # And training did move the weights.
    start = torch.load(os.path.join(straight, "model000002.pt"), weights_only=True)
    assert any(not torch.equal(start[k], a["model"][k]) for k in start)


def _mpiexec():
    exe = os.path.join(BIN, "mpiexec")
    if not os.path.exists(exe):
        exe = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    return exe


@pytest.mark.mpi
def test_two_processes_agree_and_resume(tmp_path):
    mpiexec = _mpiexec()
    if not mpiexec:
        pytest.skip("mpiexec / mpi4py not installed")
    drv = driver(tmp_path)
    split = str(tmp_path / "split")
    base = [mpiexec, "-n", "2", sys.executable, drv, *ARGS]
    r = run([*base, "--max_steps", "2", "--log_dir", split])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_equal_states(final(split, 0), final(split, 1))
    state = torch.load(os.path.join(split, "opt000002.pt"), weights_only=False)
    assert state["world_size"] == 2 and len(state["rank_states"]) == 2
    # The two ranks drew different data and noise (else DDP would be pointless).
    assert not torch.equal(state["rank_states"][0]["rng"]["torch"], state["rank_states"][1]["rng"]["torch"])
    r = run([*base, "--max_steps", "4", "--log_dir", split])  # every rank reads the files itself
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    assert_equal_states(final(split, 0), final(split, 1))
    assert os.path.isfile(os.path.join(split, "opt000004.pt"))
