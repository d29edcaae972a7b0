"""The digits metric: the shipped classifier and the FD / IS / precision / recall it feeds."""

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from dkdm import digits_metric as dm
from dkdm.data.arrays import save_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def real():
    return dm.real_digits()


@pytest.fixture(scope="module")
def classifier():
    return dm.load_classifier()


@pytest.fixture(scope="module")
def real_acts(real, classifier):
    return dm.activations(real[0], classifier)


def test_asset_loads_with_provenance_and_classifies_held_out_digits(real, classifier):
    with open(os.path.splitext(dm.CLASSIFIER_PATH)[0] + ".json") as f:
        prov = json.load(f)
    assert os.path.getsize(dm.CLASSIFIER_PATH) < 1_000_000  # tiny enough to ship
    assert prov["command"].startswith("python scripts/train_digits_classifier.py")
    assert {"seed", "epochs", "test_accuracy"} <= set(prov)
    images, labels = real
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
    _, test_idx = dm.split_indices(len(images), prov["split"]["test_fraction"], prov["split"]["seed"])
    with torch.no_grad():
        pred = classifier(dm.to_input(images[test_idx])).argmax(1).numpy()
    acc = (pred == labels[test_idx]).mean()
    assert acc >= 0.95
    assert abs(acc - prov["test_accuracy"]) < 1e-3  # the json tells the truth about these weights


def test_real_against_itself_is_perfect(real_acts):
    m = dm.score(real_acts, real_acts)
    assert abs(m["fd"]) < 1e-6
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert 9.0 < m["is"] <= 10.0  # ten balanced, confidently classified classes


def test_is_is_bounded_by_the_number_of_classes(real, classifier):
    # One class only: IS near 1; a random network's probabilities can never exceed 10.
    images, labels = real
    one = dm.score(dm.activations(images[labels == 3], classifier), dm.activations(images, classifier))
    assert 1.0 <= one["is"] < 1.2
    probs = np.random.default_rng(0).dirichlet(np.full(10, 0.01), size=500)
    from evaluations.metrics import inception_score

    assert 1.0 <= inception_score(probs) <= 10.0


def test_degraded_samples_score_worse(real, real_acts, classifier):
    images = real[0]
    rng = np.random.default_rng(0)
    mild = np.clip(images.astype(np.int16) + rng.normal(0, 25, images.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(images.astype(np.int16) + rng.normal(0, 90, images.shape), 0, 255).astype(np.uint8)
    m_mild = dm.score(dm.activations(mild, classifier), real_acts)
    m_heavy = dm.score(dm.activations(heavy, classifier), real_acts)
    assert 0.0 < m_mild["fd"] < m_heavy["fd"]
    assert m_heavy["is"] < m_mild["is"]
    assert m_heavy["precision"] < m_mild["precision"] <= 1.0
    # Only zeros: good precision, poor recall (mode collapse shows up as recall).
    zeros = dm.score(dm.activations(images[real[1] == 0], classifier), real_acts)
    assert zeros["precision"] > 0.9 and zeros["recall"] < 0.3


def test_three_channel_input_equals_one_channel(real, classifier):
    x = real[0][:200]
    a1 = dm.activations(x, classifier)
    a3 = dm.activations(np.repeat(x, 3, axis=3), classifier)
    np.testing.assert_allclose(a1.features, a3.features, rtol=1e-6, atol=1e-6)


def test_wrong_shape_or_dtype_is_refused():
    with pytest.raises(ValueError, match="8, 8, 1"):
        dm.to_input(np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dm.to_input(np.zeros((4, 8, 8, 1), np.float32))


def test_command_line_prints_the_metrics(tmp_path, real, monkeypatch, capsys):
    main = runpy.run_path(os.path.join(ROOT, "scripts", "digits_eval.py"))["main"]
    path = tmp_path / "real.npz"
    save_npz(str(path), real[0][:400])
    monkeypatch.setattr(sys, "argv", ["digits_eval.py", str(path), "--json", str(tmp_path / "m.json")])
    assert main() == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    (rec_,) = json.loads((tmp_path / "m.json").read_text())  # the printed numbers, for scripts
    assert rec_["n"] == 400 and rec_["label_accuracy"] is None and rec_["samples"] == str(path)
    assert [round(rec_[k], 3) for k in ("fd", "is")] == [round(float(v), 3) for v in row.split()[2:4]]
    assert header.split()[1:] == ["N", "FD", "IS", "precision", "recall", "label", "acc"]
    n, fd, is_, prec, rec, acc = row.split()[1:]
    assert 0 < float(rec) <= 1 and acc == "-"  # no labels, no label accuracy
    assert n == "400" and float(prec) > 0.9 and 0 <= float(fd) < 20 and 8 < float(is_) <= 10
    # With the true labels in arr_1 the classifier names the requested label; with wrong ones it does not.
    labels = real[1][:400]
    for name, y, lo, hi in (("right", labels, 0.95, 1.0), ("wrong", (labels + 1) % 10, 0.0, 0.05)):
        save_npz(str(tmp_path / f"{name}.npz"), real[0][:400], y)
        monkeypatch.setattr(sys, "argv", ["digits_eval.py", str(tmp_path / f"{name}.npz")])
        assert main() == 0
        assert lo <= float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1]) <= hi
    monkeypatch.setattr(sys, "argv", ["digits_eval.py", str(tmp_path / "none.npz")])
    assert main() == 1
    assert "does not exist" in capsys.readouterr().err
