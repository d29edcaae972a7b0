"""scripts/dkdm_train.py: the paper's configs resolve, whole runs in subprocesses (one process, mpiexec)."""

import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from dkdm.models import create_model
from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "dkdm_train.py")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _script():
    spec = importlib.util.spec_from_file_location("dkdm_train_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _params_meta(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(cfg).parameters())


PAPER = sorted(
    glob.glob(os.path.join(ROOT, "configs", "cifar10_32", "[ac][br]*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "*", "dkdm*.yaml"))
)
PAPER = [p for p in PAPER if "baseline" not in p and "digits" not in p and "_256" not in p]  # latent: test_latent.py


def test_every_paper_experiment_has_a_config():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in PAPER}
    expect = {f"cifar10_32/dkdm_{s}.yaml" for s in ("57M", "44M", "32M", "24M", "14M")}
    expect |= {f"cifar10_32/ablation_{v}.yaml" for v in ("iterative", "shuffled", "dynamic")}
    expect |= {f"cifar10_32/ablation_rho{r}.yaml" for r in ("0.01", "0.05", "0.1", "0.2", "0.3")}
    expect |= {
        "cifar10_32/cross_vit19M_from_cnn57M.yaml",
        "cifar10_32/cross_cnn57M_from_vit19M.yaml",
        "celeba_64/dkdm_57M.yaml",
        "imagenet_32/dkdm_14M.yaml",
    }
    assert expect <= names, expect - names


@pytest.mark.parametrize("path", PAPER, ids=lambda p: os.path.relpath(p, ROOT))
def test_paper_config_resolves(path):
    """Each config resolves to the supplement's hyperparameters (Tab. 6, 8, 10); models on meta only."""
    cfgs, teacher_path = _script().resolve(["--config", path])
    t, s, d, td = cfgs["teacher"], cfgs["student"], cfgs["diffusion"], cfgs["teacher_diffusion"]
    train, distill = cfgs["train"], cfgs["distill"]
    assert teacher_path == distill.teacher_path and teacher_path.startswith("teachers/")
    assert d.steps == td.steps == 1000 and d.noise_schedule == td.noise_schedule == "cosine"
    assert d.learn_sigma and s.learn_sigma and t.learn_sigma and td.learn_sigma
    assert train.lr == 1e-4 and train.precision == "fp16" and train.ema_rate == "0.9999"
    dataset = os.path.basename(os.path.dirname(path))
    bs, steps = {"cifar10_32": (128, 200000), "celeba_64": (256, 100000), "imagenet_32": (512, 500000)}[dataset]
    assert (train.batch_size, train.max_steps) == (bs, steps)
    name = os.path.basename(path)
    want_rho = float(name[len("ablation_rho") : -5]) if name.startswith("ablation_rho") else 0.4
    assert distill.rho == want_rho
    assert distill.pool == (
        name[len("ablation_") : -5] if name in ("ablation_iterative.yaml", "ablation_shuffled.yaml") else "dynamic"
    )
    sizes = {t.name: _params_meta(t), s.name: _params_meta(s)}
    for arch, n in sizes.items():
        want = float(arch.split("-")[-1][:-1]) * 1e6
        assert abs(n - want) / want < 0.12, (arch, n)
    assert (t.image_size, s.image_size) == ({"celeba_64": 64}.get(dataset, 32),) * 2


def test_cross_architecture_configs_pair_cnn_and_vit():
    arch = {}
    for p in PAPER:
        if "cross_" in p:
            c, _ = _script().resolve(["--config", p])
            arch[os.path.basename(p)] = (c["teacher"].arch, c["student"].arch)
    assert arch["cross_vit19M_from_cnn57M.yaml"] == ("unet", "vit")
    assert arch["cross_cnn57M_from_vit19M.yaml"] == ("vit", "unet")
    c, _ = _script().resolve(["--config", os.path.join(ROOT, "configs", "cifar10_32", "cross_vit19M_from_cnn57M.yaml")])
    assert (c["student"].depth, c["student"].patch_size, c["student"].hidden_size, c["student"].num_heads) == (
        7,
        2,
        384,
        6,
    )


def test_flags_override_and_teacher_diffusion(tmp_path):
    cfg = os.path.join(ROOT, "configs", "cifar10_32", "dkdm_14M.yaml")
    c, path = _script().resolve(
        [
            "--config",
            cfg,
            "--rho",
            "0.1",
            "--pool",
            "shuffled",
            "--teacher_path",
            "x.pt",
            "--teacher_diffusion.predict_xstart",
            "--student.arch",
            "cifar10-24M",
            "--simple_only",
            "--discard_prob",
            "0.2",
            "--pool_device",
            "cpu",
        ]
    )
    assert path == "x.pt" and c["distill"].rho == 0.1 and c["distill"].pool == "shuffled"
    assert c["distill"].simple_only and c["distill"].discard_prob == 0.2 and c["distill"].pool_device == "cpu"
    assert c["teacher_diffusion"].predict_xstart and not c["diffusion"].predict_xstart
    assert c["student"].name == "cifar10-24M"


def test_non_digits_teacher_needs_a_checkpoint():
    from dkdm.config import ConfigError

    with pytest.raises(ConfigError, match="--teacher_path"):
        _script().resolve(["--teacher.arch", "cifar10-57M"])


# ------------------------------------------------------------------ whole runs


TINY_T = {
    "arch": "vit",
    "image_size": 8,
    "in_channels": 1,
    "learn_sigma": True,
    "hidden_size": 48,
    "depth": 2,
    "num_heads": 2,
    "patch_size": 2,
}
TINY_S = dict(TINY_T, hidden_size=32)


@pytest.fixture
def tiny(tmp_path):
    for name, cfg in (("teacher", TINY_T), ("student", TINY_S)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    teacher = create_model(str(tmp_path / "teacher.yaml"))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    return tmp_path


def _args(d, run="run", steps=4):
    return [
        "--teacher_path",
        str(d / "teacher.pt"),
        "--teacher.arch",
        str(d / "teacher.yaml"),
        "--student.arch",
        str(d / "student.yaml"),
        "--steps",
        "20",
        "--noise_schedule",
        "cosine",
        "--batch_size",
        "8",
        "--rho",
        "0.5",
        "--teacher_batch",
        "32",
        "--max_steps",
        str(steps),
        "--save_interval",
        "2",
        "--log_interval",
        "2",
        "--ema_rate",
        "0.99",
        "--lr",
        "1e-3",
        "--log_dir",
        str(d / run),
    ]


def _run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_script_runs_and_resumes(tiny):
    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=2)])
    assert p.returncode == 0, p.stderr[-3000:]
    run = tiny / "run"
    for f in ("model000002.pt", "pool000002.pt", "opt000002.pt", "config.yaml", "progress.csv"):
        assert (run / f).exists(), f
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert set(saved) >= {"teacher", "student", "diffusion", "teacher_diffusion", "train", "distill"}
    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=4)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout and "shuffle-denoising" not in p.stdout
    assert (run / "model000004.pt").exists()


def test_rerun_with_another_config_is_refused_and_the_saved_config_stays_the_truth(tiny):
    run = tiny / "run"
    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=2)])
    assert p.returncode == 0, p.stderr[-3000:]
    saved = (run / "config.yaml").read_bytes()
    files = sorted(os.listdir(run))
    (tiny / "other_teacher.pt").write_bytes((tiny / "teacher.pt").read_bytes())
    for flags, field in (
        (["--predict_xstart"], "diffusion.predict_xstart"),
        (["--batch_size", "4"], "train.batch_size"),
        (["--lr", "2e-3"], "train.lr"),
        (["--seed", "1"], "train.seed"),
        (["--teacher_path", str(tiny / "other_teacher.pt")], "distill.teacher_path"),
    ):
        p = _run([sys.executable, SCRIPT, *_args(tiny, steps=4), *flags])
        assert p.returncode == 1 and "dkdm_train.py: error:" in p.stderr and field in p.stderr, (flags, p.stderr)
        assert "different configuration" in p.stderr and "--log_dir" in p.stderr
        assert (run / "config.yaml").read_bytes() == saved and sorted(os.listdir(run)) == files
    # Fields that only say when to stop and how often to save may change; the old config is kept.
    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=4), "--save_interval", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "model000003.pt").exists() and (run / "model000004.pt").exists()
    assert (run / "config.step000002.yaml").read_bytes() == saved
    now = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert now["max_steps"] == 4 and now["save_interval"] == 1
    # A finished run says so and writes nothing.
    files = {f: (run / f).stat().st_mtime_ns for f in os.listdir(run) if f.endswith(".pt")}
    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=4), "--save_interval", "1"])
    assert p.returncode == 0 and "already finished at step 4" in p.stdout
    assert {f: (run / f).stat().st_mtime_ns for f in os.listdir(run) if f.endswith(".pt")} == files


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--max_steps", "-1"], "--max_steps must be 0 or more"),
        (["--save_interval", "-5"], "--save_interval must be 0 or more"),
        (["--lr_anneal_steps", "-2"], "--lr_anneal_steps must be 0 or more"),
        (["--max_steps", "3000"], "--max_steps 3000 lies past --lr_anneal_steps 1200.*--lr_anneal_steps 3000"),
    ],
)
def test_step_limits_are_checked_before_anything_runs(flags, match):
    from dkdm.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _script().resolve(flags)  # the digits default has lr_anneal_steps 1200
    cfgs, _ = _script().resolve(["--max_steps", "3000", "--lr_anneal_steps", "3000"])
    assert cfgs["train"].max_steps == cfgs["train"].lr_anneal_steps == 3000


def test_safetensors_beside_the_pt_files_load_and_sample_the_same(tiny):
    from safetensors.torch import load_file

    from dkdm.models.checkpoints import read_state_dict

    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=2), "--save_safetensors"])
    assert p.returncode == 0, p.stderr[-2000:]
    run = tiny / "run"
    for name in ("model000002", "ema_0.99_000002"):
        pt, st = read_state_dict(str(run / f"{name}.pt")), load_file(str(run / f"{name}.safetensors"))
        assert set(pt) == set(st) and all(torch.equal(pt[k], st[k]) for k in pt)
        assert read_state_dict(str(run / f"{name}.safetensors")).keys() == pt.keys()
    sample = os.path.join(ROOT, "scripts", "sample.py")
    for ext in ("pt", "safetensors"):
        q = _run(
            [
                sys.executable,
                sample,
                "--model_path",
                str(run / f"ema_0.99_000002.{ext}"),
                "--num_samples",
                "8",
                "--batch_size",
                "8",
                "--timestep_respacing",
                "4",
                "--output",
                str(tiny / f"s_{ext}.npz"),
            ]
        )
        assert q.returncode == 0, q.stderr[-2000:]
    import numpy as np

    a, b = (np.load(tiny / f"s_{e}.npz")["arr_0"] for e in ("pt", "safetensors"))
    assert np.array_equal(a, b)
    (run / "broken.safetensors").write_bytes(b"\x00" * 16)
    from dkdm.models import CheckpointError

    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        read_state_dict(str(run / "broken.safetensors"))


def test_one_run_per_directory_and_stale_locks(tiny):
    run = tiny / "run"
    code = (
        "import sys, time; from dkdm.fileio import acquire_lock; "
        "acquire_lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=script_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = _run([sys.executable, SCRIPT, *_args(tiny, steps=2)])
        assert p.returncode == 1 and f"is in use by process {holder.pid} on this host" in p.stderr, p.stderr[-2000:]
        assert not (run / "config.yaml").exists() and not list(run.glob("*.pt"))
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the lock file stays behind
        holder.wait()
    assert (run / "run.lock").exists()
    p = _run([sys.executable, SCRIPT, *_args(tiny, steps=2)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"removed a stale lock of process {holder.pid}" in p.stdout and (run / "model000002.pt").exists()
    assert not (run / "run.lock").exists()  # released at the end


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--pool_device", "gpu"], "--pool_device must be auto"),
        (["--teacher_precision", "fp8"], "--teacher_precision must be"),
    ],
)
def test_bad_device_or_precision_is_a_one_line_error(flags, match, tmp_path):
    p = _run([sys.executable, SCRIPT, *flags, "--max_steps", "1", "--log_dir", str(tmp_path / "r")])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dkdm_train.py: error:") and match in lines[0]
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_wrong_teacher_architecture_fails_with_the_checkpoint_message(tiny):
    args = _args(tiny)
    args[args.index("--teacher.arch") + 1] = str(tiny / "student.yaml")
    p = _run([sys.executable, SCRIPT, *args])
    assert p.returncode == 1
    assert "dkdm_train.py: error:" in p.stderr and "does not fit the model" in p.stderr
    assert "mis-shaped" in p.stderr


def test_unknown_flag_names_the_closest(tiny):
    p = _run([sys.executable, SCRIPT, "--rhoo", "0.1"])
    assert p.returncode != 0 and "--rho" in p.stderr


DRIVER = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
from dkdm import dist
from dkdm.training import Trainer
real_run = Trainer.run
seen = {{}}
def threads():
    return len(os.listdir("/proc/self/task"))
def run(self, *a, **k):
    out = real_run(self, *a, **k)
    pool = self.extra_state["pool"]
    seen.update(rank=dist.get_rank(), run_dir=self.run_dir, during=threads())
    torch.save({{"model": self.model.state_dict(), "pool_x": pool.x, "pool_t": pool.t}},
               f"{{self.run_dir}}/final_rank{{dist.get_rank()}}.pt")
    return out
Trainer.run = run
import importlib.util
spec = importlib.util.spec_from_file_location("s", {script!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
m.main(sys.argv[1:])
seen["after"] = threads()  # main has returned: gloo's worker threads must be joined by now
with open(f"{{seen['run_dir']}}/threads_rank{{seen['rank']}}.json", "w") as f:
    json.dump(seen, f)
"""


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.mpi
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(
            [MPIEXEC, "-n", "2", sys.executable],
            marks=pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec (pip install mpich) not installed"),
            id="mpiexec",
        ),
        pytest.param(TORCHRUN, id="torchrun"),
    ],
)
def test_two_ranks_have_different_pools_and_identical_students(tiny, launcher):
    driver = tiny / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, script=SCRIPT))
    p = _run([*launcher, str(driver), *_args(tiny, steps=3)], timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "`broadcast_buffers` is deprecated" not in p.stderr  # DDP's switch under its current name
    _check_two_ranks(tiny)


@pytest.mark.mpi
def test_two_slurm_tasks_on_two_nodes_over_loopback(tiny):
    """Two separate launches, as srun starts one task per node: rank and world from SLURM_* alone."""
    driver = tiny / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, script=SCRIPT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(
            OMP_NUM_THREADS="1",
            SLURM_PROCID=str(rank),
            SLURM_STEP_NUM_TASKS="2",
            SLURM_LOCALID="0",
            SLURM_STEP_NUM_NODES="2",
            SLURM_JOB_ID="4242",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(driver), *_args(tiny, steps=3)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "2 process(es)" in outs[0][0]
    _check_two_ranks(tiny)


def test_a_multi_node_slurm_step_without_master_addr_is_refused(monkeypatch):
    from dkdm import dist

    for k, v in {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2"}.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    # A fresh task: no process group yet (an earlier test of this session may have set up its one-process group).
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    assert dist.launched_by_slurm() and dist.launch_rank() == 1
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        dist._slurm_env()
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "1")
    assert dist._slurm_env()["MASTER_ADDR"] == "127.0.0.1"


def _check_two_ranks(tiny):
    r0, r1 = (torch.load(tiny / "run" / f"final_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["pool_x"].shape[0] == 40  # round(0.5 * 20) * (8 / 2 ranks)
    assert not torch.equal(r0["pool_x"], r1["pool_x"]) and not torch.equal(r0["pool_t"], r1["pool_t"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert (tiny / "run" / "pool000003.pt").exists() and (tiny / "run" / "pool000003_rank1.pt").exists()
    assert len(glob.glob(str(tiny / "run" / "pool_cache" / "pool_*.pt"))) == 2
    for r in (0, 1):
        # Gloo's two worker threads gone before the interpreter shuts down: left running
        # (the group still held), one could abort a finished run at exit.
        seen = json.loads((tiny / "run" / f"threads_rank{r}.json").read_text())
        assert seen["after"] <= seen["during"] - 2, seen
