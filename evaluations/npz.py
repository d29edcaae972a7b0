"""Reading and checking ADM-format image batches (`.npz` with `arr_0`: [N, H, W, 3] in [0, 255]).

Sample batches can be far larger than memory (50,000 x 256 x 256 x 3 uint8 is 9.8 GB), so
arrays are streamed from inside the zip archive a batch at a time, as ADM does, and all
checks read only headers, except the value-range check of non-uint8 arrays, which streams
once. numpy only.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NpzArrayInfo",
    "NpzArrayReader",
    "NpzFormatError",
    "check_image_batch",
    "check_value_range",
    "inspect_npz",
    "open_npz_array",
]


class NpzFormatError(ValueError):
    """A batch file that is not what the evaluator needs; the message says how to fix it."""


@dataclass(frozen=True)
class NpzArrayInfo:
    """Header of one array inside an npz: enough to validate without reading the data."""

    path: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    keys: tuple[str, ...]


def _npz_keys(zip_f: zipfile.ZipFile) -> tuple[str, ...]:
    return tuple(n[: -len(".npy")] for n in zip_f.namelist() if n.endswith(".npy"))


def _read_header(arr_f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of an .npy stream, or None for format versions we do not stream."""
    version = np.lib.format.read_magic(arr_f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(arr_f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(arr_f)
    return None


@contextmanager
def _open_member(path: str, name: str):
    if not os.path.isfile(path):
        raise NpzFormatError(f"{path}: no such file")
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f, "r") as zip_f:
            keys = _npz_keys(zip_f)
            if name not in keys:
                raise NpzFormatError(
                    f"{path} has no array '{name}' (it holds {list(keys) or 'no arrays'}); "
                    f"save the images with np.savez(path, {name}=images) as ADM batches do"
                )
            with zip_f.open(f"{name}.npy", "r") as arr_f:
                yield arr_f, keys
    except zipfile.BadZipFile as e:
        raise NpzFormatError(
            f"{path} is not an .npz archive ({e}); save the images with np.savez(path, arr_0=images)"
        ) from None


def inspect_npz(path: str, name: str = "arr_0") -> NpzArrayInfo:
    """Read the header of array `name` in the npz at `path`, with a clear error if it is not there."""
    with _open_member(path, name) as (arr_f, keys):
        try:
            header = _read_header(arr_f)
        except ValueError as e:
            raise NpzFormatError(f"{path}: '{name}' is not a valid .npy array ({e})") from None
        if header is None:
            with np.load(path, allow_pickle=False) as obj:
                arr = obj[name]
            shape, dtype = arr.shape, arr.dtype
        else:
            shape, _, dtype = header
    return NpzArrayInfo(path=path, name=name, shape=tuple(shape), dtype=np.dtype(dtype), keys=keys)


def check_image_batch(info: NpzArrayInfo, min_images: int = 2) -> None:
    """Raise NpzFormatError unless `info` describes >= min_images NHWC RGB images of a numeric dtype."""
    shape, dtype, where = info.shape, info.dtype, f"{info.path} ({info.name})"
    if dtype.kind not in "uif":
        raise NpzFormatError(
            f"{where} has dtype {dtype}; expected uint8 images with values in [0, 255] "
            "(integer or float arrays in that range are accepted too)"
        )
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
        raise NpzFormatError(
            f"{where} has shape {shape}, which looks like NCHW; the evaluator needs NHWC "
            "[N, H, W, 3]: use images.transpose(0, 2, 3, 1)"
        )
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        raise NpzFormatError(
            f"{where} has shape {shape}: single-channel images; the Inception network needs "
            "RGB [N, H, W, 3]: repeat the channel, e.g. np.repeat(images[..., None], 3, -1) for [N, H, W]"
        )
    if len(shape) != 4 or shape[3] != 3:
        raise NpzFormatError(f"{where} has shape {shape}; expected NHWC RGB images [N, H, W, 3]")
    if shape[1] < 1 or shape[2] < 1:
        raise NpzFormatError(f"{where} has empty images of shape {shape[1:]}")
    if shape[0] < min_images:
        raise NpzFormatError(
            f"{where} holds {shape[0]} image(s); the metrics need at least {min_images} "
            "(a covariance needs 2, k-nearest-neighbour precision/recall k + 1)"
        )


def check_value_range(path: str, name: str = "arr_0", chunk: int = 256) -> None:
    """Stream a non-uint8 array once and raise NpzFormatError if any value is outside [0, 255] or NaN,
    or if a float array never exceeds 1 (pixels in [0, 1], not the 0-255 the metrics expect)."""
    info = inspect_npz(path, name)
    if info.dtype == np.uint8:
        return
    lo, hi = np.inf, -np.inf
    with open_npz_array(path, name) as reader:
        for batch in reader.read_batches(chunk):
            if info.dtype.kind == "f" and not np.isfinite(batch).all():
                raise NpzFormatError(f"{path} ({name}) contains NaN or infinite values")
            lo, hi = min(lo, batch.min()), max(hi, batch.max())
    if lo < 0 or hi > 255:
        hint = " (it looks like [-1, 1] model output: map with (x + 1) * 127.5)" if lo >= -1 and hi <= 1 else ""
        raise NpzFormatError(f"{path} ({name}) has values in [{lo}, {hi}]; images must lie in [0, 255]{hint}")
    if info.dtype.kind == "f" and hi <= 1.0:
        # Float pixels in [0, 1] would be scored as near-black 0-255 images: a wrong FID, not an error.
        raise NpzFormatError(
            f"{path} ({name}) is a float array with values in [{lo}, {hi}]: these look like [0, 1] images, "
            "but ADM npz pixels are 0-255; convert with np.round(x * 255).clip(0, 255).astype(np.uint8)"
        )


class NpzArrayReader:
    """Batches of the leading axis of one array, read sequentially from a stream or from memory."""

    def __init__(self, shape, dtype, stream=None, array=None):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._stream = stream
        self._array = array
        self._idx = 0

    def __len__(self) -> int:
        return self.shape[0]

    def remaining(self) -> int:
        """Rows not read yet."""
        return max(0, self.shape[0] - self._idx)

    def read_batch(self, batch_size: int) -> np.ndarray | None:
        """The next up to `batch_size` rows, or None at the end."""
        n = min(batch_size, self.remaining())
        if n == 0:
            return None
        start, self._idx = self._idx, self._idx + n
        if self._array is not None:
            return self._array[start : start + n]
        nbytes = int(n * np.prod(self.shape[1:], dtype=np.int64) * self.dtype.itemsize)
        data = _read_exactly(self._stream, nbytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:]))

    def read_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Iterate over the remaining rows in batches of `batch_size` (the last may be shorter)."""
        while (batch := self.read_batch(batch_size)) is not None:
            yield batch


def _read_exactly(stream, nbytes: int) -> bytes:
    buf = io.BytesIO()
    while buf.tell() < nbytes:
        chunk = stream.read(nbytes - buf.tell())
        if not chunk:
            raise NpzFormatError(f"array data ends early: expected {nbytes} bytes, got {buf.tell()}")
        buf.write(chunk)
    return buf.getvalue()


@contextmanager
def open_npz_array(path: str, name: str = "arr_0") -> Iterator[NpzArrayReader]:
    """Open array `name` of an npz for batched reading without loading it whole.

    C-ordered arrays of plain dtypes stream straight out of the (possibly compressed) zip
    member; Fortran-ordered or exotic ones fall back to loading into memory, as ADM does.
    """
    with _open_member(path, name) as (arr_f, _):
        header = _read_header(arr_f)
        if header is not None and not header[1] and not header[2].hasobject:
            shape, _, dtype = header
            yield NpzArrayReader(shape, dtype, stream=arr_f)
            return
    with np.load(path, allow_pickle=False) as obj:
        arr = obj[name]
    yield NpzArrayReader(arr.shape, arr.dtype, array=arr)
