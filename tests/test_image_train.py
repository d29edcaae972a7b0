"""scripts/image_train.py: defaults, flags, datasets, and errors before training starts."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dkdm import dist, logger
from dkdm.config import ConfigError, load_yaml
from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "image_train.py")


@pytest.fixture(scope="module")
def image_train():
    spec = importlib.util.spec_from_file_location("image_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _clean_state():
    yield
    logger.reset()
    dist.cleanup()


SMALL = ["--arch", "digits-student", "--batch_size", "4", "--num_workers", "0", "--log_interval", "1"]


def run_script(*args):
    env = script_env(OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, SCRIPT, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_no_flags_means_the_digits_teacher(tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_script("--max_steps", "1", "--batch_size", "4", "--log_dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = load_yaml(os.path.join(run_dir, "config.yaml"))
    assert cfg["model"]["name"] == "digits-teacher"
    assert cfg["model"]["image_size"] == 8 and cfg["model"]["in_channels"] == 1
    assert cfg["diffusion"]["steps"] == 100 and cfg["diffusion"]["noise_schedule"] == "cosine"
    assert cfg["diffusion"]["learn_sigma"] is True and cfg["model"]["learn_sigma"] is True
    assert cfg["train"]["max_steps"] == 1 and cfg["train"]["dataset"] == "digits"
    from dkdm.models import create_model, load_checkpoint

    load_checkpoint(create_model("digits-teacher"), os.path.join(run_dir, "model000001.pt"))
    assert os.path.isfile(os.path.join(run_dir, "progress.csv"))


def test_bad_data_dir_is_one_line_on_stderr(tmp_path):
    missing = str(tmp_path / "no_such_dir")
    r = run_script("--data_dir", missing, "--max_steps", "1", "--log_dir", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image_train.py: error:") and missing in lines[0]
    assert not os.path.exists(os.path.join(tmp_path, "run", "model000001.pt"))


def test_trains_on_an_npz_and_flags_reach_the_configs(image_train, tmp_path):
    rng = np.random.default_rng(0)
    npz = str(tmp_path / "imgs.npz")
    np.savez(npz, rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8))
    run_dir = str(tmp_path / "run")
    image_train.main(
        [
            *SMALL,
            "--in_channels",
            "3",
            "--data_dir",
            npz,
            "--max_steps",
            "2",
            "--lr",
            "3e-4",
            "--ema_rate",
            "0.99",
            "--precision",
            "bf16",
            "--seed",
            "7",
            "--log_dir",
            run_dir,
        ]
    )
    cfg = load_yaml(os.path.join(run_dir, "config.yaml"))
    assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["precision"] == "bf16" and cfg["train"]["seed"] == 7
    from dkdm.models import get_config

    student = get_config("digits-student")
    assert cfg["model"]["in_channels"] == 3 and cfg["model"]["name"] == "digits-student"
    assert cfg["model"]["channel_mult"] == student.channel_mult and cfg["model"]["num_channels"] == student.num_channels
    sd = torch.load(os.path.join(run_dir, "ema_0.99_000002.pt"), weights_only=True)
    assert sd["input_blocks.0.0.weight"].shape[1] == 3


def _npz(tmp_path, **arrays):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "argv_fn, error, match",
    [
        (lambda p: ["--data_dir", _npz(p, images=np.zeros((4, 8, 8, 3), np.uint8))], ValueError, "arr_0"),
        (lambda p: ["--data_dir", _npz(p, arr_0=np.zeros((4, 8, 8, 3), np.float32))], ValueError, "uint8"),
        (lambda p: ["--data_dir", str(p)], ValueError, "image"),  # an empty folder
        (lambda p: ["--arch", "digits-teacherr"], ConfigError, "digits-teacher"),
        (lambda p: ["--model.learn_sigma", "false"], ConfigError, "learn_sigma"),
        (lambda p: ["--in_channels", "3"], ValueError, "shape"),  # digits have one channel
        (lambda p: ["--ema_rate", "1.5"], ValueError, "ema_rate"),
        (lambda p: ["--precision", "fp12"], ValueError, "precision"),
    ],
)
def test_bad_input_fails_before_training(image_train, tmp_path, argv_fn, error, match):
    run_dir = tmp_path / "run"
    argv = [*SMALL, "--max_steps", "1", "--log_dir", str(run_dir), *argv_fn(tmp_path)]
    with pytest.raises(error, match=match):
        image_train.main(argv)
    assert not (run_dir / "model000001.pt").exists()


def test_batch_the_world_size_does_not_divide(image_train, tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="batch size 7 cannot be split evenly over 2 processes"):
        image_train.main([*SMALL, "--batch_size", "7", "--max_steps", "1", "--log_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_winograd_reaches_the_trainer_and_is_recorded(image_train, tmp_path, monkeypatch):
    """``--winograd``: the trained network's 3x3 layers take the training path (16 images of 8x8
    are 64 output tiles per call), and config.yaml records the switch."""
    from dkdm.models.winograd import _WinogradGrad

    applied = []
    real = _WinogradGrad.apply
    monkeypatch.setattr(_WinogradGrad, "apply", lambda x, *a: applied.append(x.shape[0]) or real(x, *a))
    run_dir = str(tmp_path / "run")
    small = [a if a != "4" else "16" for a in SMALL]  # batch 16
    image_train.main([*small, "--max_steps", "1", "--winograd", "true", "--log_dir", run_dir])
    assert applied and set(applied) == {16}
    assert load_yaml(os.path.join(run_dir, "config.yaml"))["train"]["winograd"] is True
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert "3x3 convolution(s) by F(4x4,3x3), forward and backward" in f.read()
