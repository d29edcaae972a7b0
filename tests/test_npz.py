"""evaluations.npz: the header checks, the value-range check, and streaming without loading."""

import io
import zipfile

import numpy as np
import pytest

from evaluations import npz
from evaluations.npz import NpzFormatError, check_image_batch, check_value_range, inspect_npz, open_npz_array


def _info(shape, dtype=np.uint8):
    return npz.NpzArrayInfo(path="b.npz", name="arr_0", shape=shape, dtype=np.dtype(dtype), keys=("arr_0",))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((8, 1, 24, 24), "looks like NCHW"),
        ((8, 3, 24, 24), "looks like NCHW"),
        ((8, 3, 24, 1), "single-channel"),
        ((8, 24, 24, 4), r"expected NHWC RGB images \[N, H, W, 3\]$"),
        ((8, 24, 24, 5), r"expected NHWC RGB images \[N, H, W, 3\]$"),
        ((8, 24, 24, 3, 1), r"expected NHWC RGB images \[N, H, W, 3\]$"),
        ((8, 0, 24, 3), r"empty images of shape \(0, 24, 3\)"),
        ((8, 24, 0, 3), r"empty images of shape \(24, 0, 3\)"),
        ((1, 24, 24, 3), r"holds 1 image\(s\); the metrics need at least 2"),
    ],
)
def test_image_batch_shapes_refused_with_their_reason(shape, match):
    with pytest.raises(NpzFormatError, match=match):
        check_image_batch(_info(shape))


@pytest.mark.parametrize("shape", [(2, 24, 24, 3), (8, 3, 24, 3), (8, 1, 1, 3), (8, 1, 5, 3)])
def test_image_batch_shapes_accepted(shape):
    check_image_batch(_info(shape))  # two images are enough for a covariance; odd but valid NHWC


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "lo, hi, refused, hint",
    [
        (-1.0, 1.0, True, True),  # [-1, 1] model output, bounds included
        (-1.0, 0.5, True, True),
        (-2.0, 1.0, True, False),
        (-5.0, 0.5, True, False),
        (-0.5, 300.0, True, False),
        (0.0, 255.5, True, False),
        (0.0, 1.0, True, False),  # [0, 1] images: refused by the second check
        (-1.0, 1.5, True, False),
        (0.0, 1.5, False, False),  # a dark 0-255 image
        (0.0, 255.0, False, False),
    ],
)
def test_value_range_and_its_hint(tmp_path, lo, hi, refused, hint):
    x = np.full((4, 2, 2, 3), lo, np.float32)
    x[-1, -1, -1, -1] = hi
    path = _save(tmp_path / "b.npz", arr_0=x)
    if not refused:
        check_value_range(path)
        return
    with pytest.raises(NpzFormatError) as e:
        check_value_range(path)
    assert ("it looks like [-1, 1] model output: map with (x + 1) * 127.5" in str(e.value)) == hint


def test_value_range_reads_the_named_array(tmp_path):
    path = _save(tmp_path / "b.npz", arr_0=np.zeros((4, 2, 2, 3), np.uint8), images=np.full((4, 2, 2, 3), -9.0))
    check_value_range(path)
    with pytest.raises(NpzFormatError, match=r"\(images\) has values in \[-9.0, -9.0\]"):
        check_value_range(path, name="images")
    info = inspect_npz(path, "images")
    assert (info.name, info.shape, info.dtype, info.keys) == ("images", (4, 2, 2, 3), np.float64, ("arr_0", "images"))


def _npz_with_version(path, arr, version):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", buf.getvalue())
    return str(path)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_headers_of_both_versions_are_read_without_loading_the_array(tmp_path, monkeypatch, version):
    arr = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    path = _npz_with_version(tmp_path / "b.npz", arr, version)

    def no_load(*args, **kwargs):
        raise AssertionError("np.load read the whole array")

    monkeypatch.setattr(npz.np, "load", no_load)
    info = inspect_npz(path)
    assert (info.shape, info.dtype) == ((5, 2, 2, 3), np.uint8)
    with open_npz_array(path) as reader:
        assert [b.tolist() for b in reader.read_batches(2)] == [arr[:2].tolist(), arr[2:4].tolist(), arr[4:].tolist()]


def test_a_version_three_array_falls_back_to_loading(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    path = _npz_with_version(tmp_path / "b.npz", arr, (3, 0))
    assert inspect_npz(path).shape == (2, 2, 2, 3)
    with open_npz_array(path) as reader:
        assert np.array_equal(reader.read_batch(5), arr)


class _Trickle(io.RawIOBase):
    """A stream that hands out at most 7 bytes per read, as a decompressing reader may."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        n = 7 if n < 0 else min(n, 7)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def test_short_reads_are_completed_exactly():
    s = _Trickle(bytes(range(100)))
    assert npz._read_exactly(s, 50) == bytes(range(50))
    assert npz._read_exactly(s, 30) == bytes(range(50, 80))
    with pytest.raises(NpzFormatError, match="expected 30 bytes, got 20"):
        npz._read_exactly(s, 30)


def test_the_loading_fallback_never_unpickles(tmp_path):
    arr = np.empty((2, 2, 2, 3), dtype=object)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(3, 0), allow_pickle=True)
    path = tmp_path / "b.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", buf.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        inspect_npz(str(path))
