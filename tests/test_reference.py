"""scripts/make_reference.py: datasets a user already has -> the evaluator's reference npz."""

import os
import pickle
import runpy
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from dkdm.data.arrays import read_images, save_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = runpy.run_path(os.path.join(ROOT, "scripts", "make_reference.py"))["main"]


def _run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["make_reference.py", *args])
    return MAIN()


def _fake_cifar(directory, per_batch=4):
    """CIFAR-10's python layout: pickled dicts with b'data' [N, 3072] (CHW rows) and b'labels'."""
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    expected = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        chw = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(per_batch)]
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump({b"data": chw.reshape(per_batch, -1), b"labels": labels, b"batch_label": name.encode()}, f)
        expected[name] = (chw.transpose(0, 2, 3, 1), np.array(labels))
    return expected


def test_cifar_python_folder_and_tarball(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    expected = _fake_cifar(str(folder))
    out = tmp_path / "ref.npz"
    assert _run(monkeypatch, "--source", str(folder), "--output", str(out)) == 0
    with np.load(out) as z:
        assert z.files == ["arr_0"]
        ref = z["arr_0"]
    assert ref.dtype == np.uint8 and ref.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(ref, np.concatenate([expected[f"data_batch_{i}"][0] for i in range(1, 6)]))
    # The test split, with labels, from the tar.gz as downloaded from the CIFAR site.
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    images, labels = read_images(str(tgz), split="test")
    np.testing.assert_array_equal(images, expected["test_batch"][0])
    np.testing.assert_array_equal(labels, expected["test_batch"][1])


def test_missing_cifar_batch_is_named(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    _fake_cifar(str(folder))
    os.remove(folder / "data_batch_3")
    assert _run(monkeypatch, "--source", str(folder), "--output", str(tmp_path / "r.npz")) == 1
    assert "data_batch_3" in capsys.readouterr().err


def test_image_folder_with_resize_and_subset(tmp_path, monkeypatch):
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 0, 255 - 40 * i)).save(folder / f"cls{i % 2}_{i}.png")
    out = tmp_path / "ref.npz"
    assert _run(monkeypatch, "--source", str(tmp_path / "imgs"), "--image_size", "16", "--output", str(out)) == 0
    with np.load(out) as z:
        ref = z["arr_0"]
    assert ref.shape == (6, 16, 16, 3) and ref.dtype == np.uint8
    # Sorted file order: cls0_0, cls0_2, cls0_4, cls1_1, ...; colours survive the resize.
    assert [round(int(v) / 40) for v in ref[:, 8, 8, 0]] == [0, 2, 4, 1, 3, 5]
    assert (
        _run(
            monkeypatch,
            "--source",
            str(tmp_path / "imgs"),
            "--image_size",
            "16",
            "--num",
            "4",
            "--labels",
            "--output",
            str(out),
        )
        == 0
    )
    with np.load(out) as z:
        assert z["arr_0"].shape == (4, 16, 16, 3) and set(z["arr_1"].tolist()) <= {0, 1}


def test_mixed_sizes_without_image_size_are_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (9, 9)).save(tmp_path / "imgs" / "b.png")
    assert _run(monkeypatch, "--source", str(tmp_path / "imgs"), "--output", str(tmp_path / "r.npz")) == 1
    assert "--image_size" in capsys.readouterr().err


def test_npz_and_digits(tmp_path, monkeypatch):
    src = tmp_path / "samples.npz"
    arr = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    save_npz(str(src), arr, np.arange(10))
    out = tmp_path / "ref.npz"
    assert _run(monkeypatch, "--source", str(src), "--output", str(out)) == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], arr)
    assert _run(monkeypatch, "--source", "digits", "--output", str(out)) == 0
    with np.load(out) as z:
        digits = z["arr_0"]
    assert digits.shape == (1797, 8, 8, 1) and digits.min() == 0 and digits.max() == 255


@pytest.mark.parametrize("source", ["nothing-here", "nothing.npz"])
def test_missing_source(tmp_path, monkeypatch, capsys, source):
    assert _run(monkeypatch, "--source", str(tmp_path / source), "--output", str(tmp_path / "r.npz")) == 1
    assert "does not exist" in capsys.readouterr().err
