"""Images as ADM arrays: uint8 ``[N, H, W, C]`` in and out.

guided-diffusion's ``image_sample.py`` writes its samples as ``arr_0`` (uint8 NHWC) and,
for class-conditional models, ``arr_1`` (int64 labels); its evaluator reads the same
layout. This module converts model outputs to that layout, writes it (npz and a PNG
grid), and reads every dataset a user may hold into it (the embedded digits, an npz,
CIFAR-10's python pickles, an image folder) for reference batches and dataset mixing.
"""

from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np
import torch
from PIL import Image

from dkdm.data.images import DataError, center_crop_arr, class_labels_from_names, list_image_files, read_npz
from dkdm.fileio import atomic_write


def npz_name(num: int, height: int, width: int, channels: int) -> str:
    """guided-diffusion's file name for ``num`` samples: ``samples_50000x32x32x3.npz``."""
    return f"samples_{num}x{height}x{width}x{channels}.npz"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[N, C, H, W]`` in [-1, 1] to the ADM layout: uint8 ``[N, H, W, C]``."""
    x = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def save_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write ``arr_0`` (and ``arr_1`` when ``labels`` is given) atomically, uncompressed."""
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_grid(images: np.ndarray, path: str, nrow: int = 8, min_side: int = 256) -> None:
    """A PNG grid of uint8 NHWC ``images`` (up to ``nrow**2``), upscaled so it is viewable."""
    images = images[: nrow * nrow]
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + k * (w + 2) : 2 + k * (w + 2) + w] = images[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, -(-min_side // max(grid.shape[:2])))
    if scale > 1:  # nearest keeps 8x8 digits crisp
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def _cifar_pickles(source: str, names: list[str]) -> dict[str, bytes | None]:
    """The raw bytes of CIFAR-10 batch files from a folder or a tar archive (None if absent)."""
    if os.path.isdir(source):
        out: dict[str, bytes | None] = {}
        for n in names:
            path = os.path.join(source, n)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[n] = f.read()
            else:
                out[n] = None
        return out
    with tarfile.open(source) as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        out = dict.fromkeys(names)
        for n in names:
            if n in members:
                f = tar.extractfile(members[n])
                out[n] = f.read() if f else None
        return out


def is_cifar_python(source: str) -> bool:
    """True for the ``cifar-10-batches-py`` folder or the ``cifar-10-python.tar.gz`` archive."""
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, "test_batch")) or os.path.isfile(
            os.path.join(source, "data_batch_1")
        )
    return source.endswith((".tar.gz", ".tgz", ".tar")) and os.path.isfile(source)


def read_cifar_python(source: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's python pickles (folder or tar.gz) as uint8 ``[N, 32, 32, 3]`` and labels."""
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name, raw in _cifar_pickles(source, names).items():
        if raw is None:
            raise DataError(
                f"{source} has no '{name}'; expected the python version of CIFAR-10 "
                "(cifar-10-batches-py with data_batch_1..5 and test_batch)"
            )
        batch = pickle.loads(raw, encoding="bytes")
        data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
        if data is None:
            raise DataError(f"{source}/{name} is not a CIFAR-10 python batch (no 'data' entry)")
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_images(
    source: str, image_size: int | None = None, split: str = "train", class_labels: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Any dataset a user has as an ADM array: uint8 ``[N, H, W, C]`` and labels or None.

    ``source`` is ``digits`` (the embedded default), an ``.npz`` (``arr_0``, labels from
    ``arr_1``), CIFAR-10's python pickles (folder or tar.gz; ``split`` picks train or
    test), or an image folder (read recursively in sorted order; labels from the file-name
    prefix before ``_`` when ``class_labels``). ``image_size`` resizes and centre-crops as
    ADM does; without it, every image must already have the same size.
    """
    if source == "digits":
        from dkdm.data.digits import load_digits

        x, y = load_digits(image_size=image_size or 8)
        return to_uint8(x), y.numpy()
    if not os.path.exists(source):
        raise DataError(
            f"dataset '{source}' does not exist (give 'digits', an .npz, a CIFAR-10 python folder or an image folder)"
        )
    if is_cifar_python(source):
        images, labels = read_cifar_python(source, split)
    elif os.path.isfile(source):
        images, labels = read_npz(source, want_labels=False)
        images = np.asarray(images)
    else:
        files = list_image_files(source)
        arrays = []
        for path in files:
            with Image.open(path) as im:
                im = im.convert("RGB")
                arrays.append(center_crop_arr(im, image_size) if image_size else np.asarray(im))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"images under {source} have different sizes ({sorted(shapes)[:3]}...); pass --image_size")
        images = np.stack(arrays)
        labels = class_labels_from_names(files)[0] if class_labels else None
    if image_size and images.shape[1:3] != (image_size, image_size):
        gray = images.shape[3] == 1
        resized = [center_crop_arr(Image.fromarray(a[..., 0] if gray else a), image_size) for a in images]
        images = np.stack(resized).reshape(len(images), image_size, image_size, images.shape[3])
    return images, labels
