"""scripts/mix_dataset.py: the data-limited baseline's P% real / synthetic mix."""

import os
import runpy
import sys

import numpy as np
import pytest

from dkdm.data import DataError
from dkdm.data.arrays import save_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = runpy.run_path(os.path.join(ROOT, "scripts", "mix_dataset.py"))


def _sets(n_real=300, n_syn=200, labels=True):
    # Real images are all 200, synthetic all 10 plus their index, so every image says where it came from.
    real = np.full((n_real, 8, 8, 1), 200, np.uint8)
    syn = np.zeros((n_syn, 8, 8, 1), np.uint8)
    syn[:, 0, 0, 0] = np.arange(n_syn) % 50
    yr = np.arange(n_real) % 10 if labels else None
    ys = (np.arange(n_syn) + 3) % 10 if labels else None
    return (real, yr), (syn, ys)


@pytest.mark.parametrize("fraction,expected_real", [(0.0, 0), (0.05, 10), (0.2, 40), (0.15, 30), (1.0, 200)])
def test_exact_proportions_at_synthetic_size(fraction, expected_real):
    real, syn = _sets()
    images, labels, n_real = SCRIPT["mix"](real, syn, fraction, seed=0)
    assert n_real == expected_real
    assert images.shape == (200, 8, 8, 1) and images.dtype == np.uint8
    is_real = images[:, 1, 1, 0] == 200
    assert is_real.sum() == expected_real
    assert labels is not None and labels.shape == (200,)


def test_no_duplicates_and_shuffled():
    real = (np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(8, 1).repeat(8, 2), None)
    syn = ((np.arange(100, dtype=np.uint8) + 100).reshape(100, 1, 1, 1).repeat(8, 1).repeat(8, 2), None)
    images, labels, n_real = SCRIPT["mix"](real, syn, 0.2, seed=1)
    ids = images[:, 0, 0, 0]
    assert len(set(ids.tolist())) == 100 and n_real == 20 and labels is None
    assert (ids[:20] < 100).sum() < 20  # real images are not all at the front


def test_deterministic_with_seed_and_different_across_seeds():
    real, syn = _sets()
    a = SCRIPT["mix"](real, syn, 0.2, seed=7)
    b = SCRIPT["mix"](real, syn, 0.2, seed=7)
    c = SCRIPT["mix"](real, syn, 0.2, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_bad_requests_are_refused():
    real, syn = _sets(n_real=10)
    with pytest.raises(DataError, match="only 10"):
        SCRIPT["mix"](real, syn, 0.2, seed=0)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        SCRIPT["mix"](*_sets(), 1.5, seed=0)
    rgb = (np.zeros((300, 8, 8, 3), np.uint8), None)
    with pytest.raises(DataError, match="same size"):
        SCRIPT["mix"](rgb, _sets()[1], 0.2, seed=0)


def test_command_line_with_embedded_digits(tmp_path, monkeypatch, capsys):
    syn = tmp_path / "synthetic.npz"
    save_npz(str(syn), np.zeros((500, 8, 8, 1), np.uint8))
    out = tmp_path / "mix.npz"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "mix_dataset.py",
            "--real",
            "digits",
            "--synthetic",
            str(syn),
            "--real_fraction",
            "0.1",
            "--output",
            str(out),
            "--seed",
            "3",
        ],
    )
    assert SCRIPT["main"]() == 0
    assert "50 real, 450 synthetic" in capsys.readouterr().out
    with np.load(out) as z:
        assert z.files == ["arr_0"] and z["arr_0"].shape == (500, 8, 8, 1)
        assert (z["arr_0"].reshape(500, -1).max(1) > 0).sum() == 50  # real digits are the non-blank ones
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "mix_dataset.py",
            "--real",
            "digits",
            "--synthetic",
            str(tmp_path / "no.npz"),
            "--real_fraction",
            "0.1",
            "--output",
            str(out),
        ],
    )
    assert SCRIPT["main"]() == 1
    assert "does not exist" in capsys.readouterr().err


def test_baseline_configs_resolve_for_image_train():
    import glob

    from dkdm.config import ConfigParser, DiffusionConfig, ModelConfig, TrainConfig
    from dkdm.models import get_config

    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "baseline_*.yaml")))
    datasets = {os.path.basename(os.path.dirname(f)) for f in files}
    assert {"cifar10_32", "celeba_64", "imagenet_32", "digits"} <= datasets
    for ds in datasets:
        names = {os.path.basename(f) for f in files if os.path.basename(os.path.dirname(f)) == ds}
        assert names >= {"baseline_data_free.yaml"} | {f"baseline_data_limited_{p}.yaml" for p in (5, 10, 15, 20)}
    for f in files:
        groups = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig}
        args = ConfigParser("t", groups).parse(["--config", f])
        model = args.resolve("model", get_config(args.overrides["model"].pop("arch")))
        train = args.resolve("train")
        assert model.learn_sigma == args.resolve("diffusion").learn_sigma
        assert train.data_dir.endswith(".npz")  # trained on the synthetic set or the mix, never the real set alone
        if "limited" in f:
            p = os.path.basename(f).rsplit("_", 1)[1].split(".")[0]
            with open(f) as fh:
                text = fh.read()
            assert f"--real_fraction {int(p) / 100:g}" in text and train.data_dir in text
