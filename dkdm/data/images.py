"""Image datasets (folders, npz files, the embedded digits) as resumable infinite streams.

Every dataset is sharded per rank the way guided-diffusion shards it: rank ``r`` of
``W`` owns examples ``r, r + W, r + 2W, ...`` of the sorted file list (or array).

The stream a rank sees is a pure function of ``(seed, rank, epoch, position)``: epoch
``e`` visits the rank's examples in a permutation drawn from a generator seeded with
``(seed, rank, e)`` (the identity when ``deterministic``), and the same generator decides
each example's horizontal flip. Batches are consecutive slices of the endless
concatenation of epochs, so nothing is dropped and a dataset smaller than a batch still
works. Because no global RNG is touched and the number of DataLoader workers only
changes who decodes an image, the stream is identical for any ``num_workers``, and
``state_dict()`` (the count of batches consumed) is enough to resume it bitwise.

Arrays already at the requested size (digits, an npz of the right resolution) are sliced
directly in the main process: workers would cost more to start than the work they save.
Folders, and npz files that need resizing, decode through a DataLoader with workers.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# What Pillow raises for truncated, corrupt, unknown or oversized files.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The data a user pointed at cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- helpers


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The batch each rank loads when ``global_batch`` is split over ``world_size`` ranks.

    Raises :class:`DataError` unless the world size divides the global batch exactly.
    """
    if global_batch < 1:
        raise DataError(f"batch size must be positive, got {global_batch}")
    if world_size < 1:
        raise DataError(f"world size must be positive, got {world_size}")
    if global_batch % world_size:
        lo = global_batch // world_size * world_size
        hint = f"{lo} or {lo + world_size}" if lo else str(world_size)
        raise DataError(
            f"batch size {global_batch} cannot be split evenly over {world_size} processes; "
            f"use a multiple of {world_size} (e.g. {hint})"
        )
    return global_batch // world_size


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the shorter side is ``image_size`` and crop the centre square (as ADM does).

    Large images are first halved with box filtering while they stay at least twice the
    target, which avoids aliasing, then brought to size with bicubic resampling.
    Returns an ``[S, S, C]`` uint8 array.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _to_unit_range(u8: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, C]`` -> float32 ``[..., C, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.require(u8, requirements=["C", "W"]))
    return (x.movedim(-1, -3).float() / 127.5 - 1.0).contiguous()


def list_image_files(data_dir: str) -> list[str]:
    """All png/jpg/jpeg files under ``data_dir`` (recursively), in a sorted, stable order."""
    if not os.path.exists(data_dir):
        raise DataError(f"data_dir '{data_dir}' does not exist")
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise DataError(f"data_dir '{data_dir}' is not readable (check its permissions)")

    def fail(err: OSError) -> None:
        raise DataError(f"cannot list '{err.filename}' under data_dir: {err.strerror}")

    files = []
    for root, dirs, names in os.walk(data_dir, onerror=fail, followlinks=True):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(
            f"data_dir '{data_dir}' holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
            "files recursively); point --data_dir at an image folder or an .npz file"
        )
    return files


def class_labels_from_names(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class index per file from the file-name prefix before the first ``_`` (as guided-diffusion).

    Returns the labels and the sorted class names they index.
    """
    names = [os.path.basename(p).split("_")[0] for p in paths]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def _open_npy_in_zip(path: str, member: str) -> np.ndarray | None:
    """Memory-map one member of an uncompressed npz; ``None`` when it cannot be mapped."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        if dtype.hasobject:
            return None
        offset = f.tell()
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(
        path,
        dtype=dtype,
        mode="r",
        shape=shape,
        order="F" if fortran else "C",
        offset=offset,
    )


def read_npz(path: str, want_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (uint8 NHWC, memory-mapped when stored uncompressed) and ``arr_1`` if present.

    Raises :class:`DataError` naming the file for a missing ``arr_0``, a dtype other than
    uint8, a layout other than NHWC with 1 or 3 channels, or labels that do not match.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if "arr_0" not in keys:
                raise DataError(
                    f"{path} has no 'arr_0' (it holds {', '.join(keys) or 'nothing'}); "
                    "expected images as arr_0 (uint8, N x H x W x C) as ADM's npz files store them"
                )
            images = _open_npy_in_zip(path, "arr_0.npy")
            if images is None:
                images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read '{path}' as an npz file: {e}") from None
    if images.dtype != np.uint8:
        raise DataError(
            f"{path}: arr_0 has dtype {images.dtype}, expected uint8 pixels 0..255 "
            "(convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) for [-1, 1] floats)"
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = ""
        if images.ndim == 4 and images.shape[1] in (1, 3):
            hint = " - it looks like N x C x H x W; transpose it with x.transpose(0, 2, 3, 1)"
        raise DataError(f"{path}: arr_0 has shape {tuple(images.shape)}, expected N x H x W x C with C = 1 or 3{hint}")
    if images.shape[0] == 0:
        raise DataError(f"{path}: arr_0 holds no images")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{path}: arr_1 (labels) must be {images.shape[0]} integers, got {labels.dtype} of shape {labels.shape}"
            )
        labels = labels.astype(np.int64)
    if want_labels and labels is None:
        raise DataError(f"{path} has no labels (arr_1) but class_cond is on; add arr_1 or turn class_cond off")
    return images, labels


# --------------------------------------------------------------------------- sources


class ArraySource:
    """Images already at the target size, sliced a batch at a time in the main process."""

    direct = True

    def __init__(self, images: Any, labels: np.ndarray | torch.Tensor | None, uint8: bool) -> None:
        self.images = images  # uint8 NHWC (array / memmap) or float NCHW tensor in [-1, 1]
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.uint8 = uint8

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: np.ndarray, flip: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.uint8:
            x = _to_unit_range(self.images[idx])
        else:
            x = self.images[torch.from_numpy(idx)]
        if flip.any():
            f = torch.from_numpy(flip).view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(-1), x)
        y = None if self.labels is None else self.labels[torch.from_numpy(idx)]
        return x, y


class DecodedSource(torch.utils.data.Dataset):
    """Images decoded and centre-cropped one at a time (in DataLoader workers)."""

    direct = False

    def __init__(
        self,
        image_size: int,
        labels: np.ndarray | None,
        paths: list[str] | None = None,
        array: Any = None,
    ) -> None:
        self.image_size = image_size
        self.paths = paths
        self.array = array
        self.channels = 3 if array is None else array.shape[-1]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.array)

    def load(self, index: int) -> np.ndarray:
        if self.paths is not None:
            path = self.paths[index]
            try:
                with Image.open(path) as im:
                    im.load()
                    image = im.convert("RGB")  # palette, alpha, grey, CMYK: all RGB
            except _PIL_ERRORS as e:
                raise DataError(f"cannot read image '{path}': {e}") from None
        else:
            a = np.asarray(self.array[index])
            image = Image.fromarray(a[..., 0] if self.channels == 1 else a)
        arr = center_crop_arr(image, self.image_size)
        return arr[..., None] if arr.ndim == 2 else arr

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        arr = self.load(index)
        if flip:
            arr = arr[:, ::-1]
        y = -1 if self.labels is None else int(self.labels[index])
        return _to_unit_range(arr), y


# --------------------------------------------------------------------------- the stream


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    state = np.random.SeedSequence([seed % (1 << 63), rank, epoch]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


class _Plan:
    """Which examples, flipped or not, make batch ``k`` of one rank's stream."""

    def __init__(
        self,
        local: np.ndarray,
        batch_size: int,
        shuffle: bool,
        random_flip: bool,
        seed: int,
        rank: int,
    ):
        self.local, self.batch_size = local, batch_size
        self.shuffle, self.random_flip = shuffle, random_flip
        self.seed, self.rank = seed, rank
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            n = len(self.local)
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.rank, e))
            order = torch.randperm(n, generator=g).numpy() if self.shuffle else np.arange(n)
            flips = (torch.rand(n, generator=g) < 0.5).numpy() if self.random_flip else np.zeros(n, bool)
            if len(self._epochs) >= 3:
                self._epochs.pop(min(self._epochs))
            # flips[j] belongs to the j-th local example, whatever position it is visited at.
            self._epochs[e] = (self.local[order], flips[order])
        return self._epochs[e]

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.local)
        start, stop = k * self.batch_size, (k + 1) * self.batch_size
        idx, flip = [], []
        pos = start
        while pos < stop:
            e, off = divmod(pos, n)
            order, flips = self._epoch(e)
            take = min(stop - pos, n - off)
            idx.append(order[off : off + take])
            flip.append(flips[off : off + take])
            pos += take
        return np.concatenate(idx), np.concatenate(flip)


class _PlanSampler:
    """Batch sampler that hands the DataLoader the stream's batches from ``start`` on.

    It holds the plan, not the stream: a stream -> loader -> sampler -> stream cycle would
    leave the workers to the cyclic garbage collector, whose late shutdown of them stalls.
    """

    def __init__(self, plan: _Plan, start: int) -> None:
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[list]:
        k = self.start
        while True:
            idx, flip = self.plan(k)
            yield list(zip(idx.tolist(), flip.tolist()))
            k += 1


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-image work; threads would only contend


class DataStream:
    """An endless, resumable iterator of ``(x [B, C, H, W] in [-1, 1], cond)`` batches.

    ``cond`` holds ``"y"`` (LongTensor[B]) when ``class_cond``. ``state_dict()`` is the
    number of batches consumed (identical on every rank, so rank 0's copy serves all);
    ``load_state_dict()`` makes the next batch the one an uninterrupted run would get.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        class_cond: bool,
        shuffle: bool,
        random_flip: bool,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        num_classes: int | None = None,
    ) -> None:
        n = len(source)
        self.local = np.arange(rank, n, world_size, dtype=np.int64)
        if len(self.local) == 0:
            raise DataError(f"the dataset has {n} examples, fewer than the {world_size} processes sharing it")
        if class_cond and source.labels is None:
            raise DataError("class_cond is on but the dataset has no labels")
        if class_cond and num_classes is not None and n:
            lo, hi = int(np.min(np.asarray(source.labels))), int(np.max(np.asarray(source.labels)))
            if lo < 0 or hi >= num_classes:
                raise DataError(
                    f"the dataset's labels run from {lo} to {hi}, outside [0, {num_classes}) of the model's "
                    f"num_classes {num_classes}; set --num_classes {max(hi + 1, num_classes)} (labels must be >= 0)"
                )
        self.source = source
        self.batch_size = batch_size
        self.class_cond = class_cond
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = num_workers
        self.num_examples = n
        self._batches = 0
        self._plan = _Plan(self.local, batch_size, shuffle, random_flip, seed, rank)
        self._loader_iter: Iterator | None = None

    def plan(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global example indices and flip flags of batch ``k`` of this rank's stream."""
        return self._plan(k)

    # ---- iteration

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, dict]:
        if self.source.direct:
            x, y = self.source.batch(*self.plan(self._batches))
        else:
            if self._loader_iter is None:
                self._loader_iter = iter(self._make_loader(self._batches))
            x, y = next(self._loader_iter)
        self._batches += 1
        return x, ({"y": y} if self.class_cond else {})

    def _make_loader(self, start: int) -> torch.utils.data.DataLoader:
        workers = max(0, int(self.num_workers))
        return torch.utils.data.DataLoader(
            self.source,
            batch_sampler=_PlanSampler(self._plan, start),
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    # ---- resume

    def state_dict(self) -> dict:
        return {
            "batches": self._batches,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_examples": self.num_examples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [
            k for k in ("batch_size", "world_size", "num_examples", "seed", "shuffle") if state.get(k) != mine[k]
        ]
        if changed:
            from dkdm import logger

            logger.warn(
                "data stream resumed with different "
                + ", ".join(f"{k} ({state.get(k)} -> {mine[k]})" for k in changed)
                + f"; continuing after batch {state['batches']}, but not the exact stream of the original run"
            )
        self._batches = int(state["batches"])
        self._loader_iter = None  # batches prefetched for the old position are stale

    def close(self) -> None:
        """Stop the DataLoader workers, if any (also happens when the stream is dropped)."""
        self._loader_iter = None


# --------------------------------------------------------------------------- entry point


def open_source(dataset: str, data_dir: str, image_size: int, class_cond: bool) -> tuple[Any, bool]:
    """The dataset behind ``load_data``'s arguments, and whether random flips suit it."""
    if data_dir:
        if os.path.isfile(data_dir):
            if not data_dir.lower().endswith(".npz"):
                raise DataError(f"data_dir '{data_dir}' is a file but not an .npz; give an image folder or an .npz")
            images, labels = read_npz(data_dir, class_cond)
            if images.shape[1] == images.shape[2] == image_size:
                return ArraySource(images, labels, uint8=True), True
            return DecodedSource(image_size, labels, array=images), True
        paths = list_image_files(data_dir)
        labels = class_labels_from_names(paths)[0] if class_cond else None
        try:
            with Image.open(paths[0]) as im:
                im.verify()
        except _PIL_ERRORS as e:
            raise DataError(f"cannot read image '{paths[0]}': {e}") from None
        return DecodedSource(image_size, labels, paths=paths), True
    if dataset in ("digits", ""):
        from dkdm.data.digits import load_digits

        images, labels = load_digits(image_size)
        # A mirrored 2, 3, 4, 7 or 9 is not a digit: flipping would teach wrong shapes.
        return ArraySource(images, labels, uint8=False), False
    raise DataError(f"unknown dataset '{dataset}'; use 'digits' or give data_dir (an image folder or .npz)")


def load_data(
    *,
    dataset: str = "digits",
    data_dir: str = "",
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_flip: bool = True,
    num_workers: int = 2,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_classes: int | None = None,
) -> DataStream:
    """An endless, resumable stream of ``(x [B, C, H, W] in [-1, 1], cond)`` for this rank.

    ``batch_size`` is the PER-RANK batch (see :func:`per_rank_batch` to split a global
    one). ``data_dir`` -- an image folder (png/jpg/jpeg, recursive; classes from file-name
    prefixes) or an ``.npz`` (``arr_0`` uint8 NHWC, optional ``arr_1`` labels) -- takes
    precedence over ``dataset``, whose only built-in value is ``digits`` (never flipped:
    a mirrored digit is not a digit). Images are centre-cropped and resized to
    ``image_size``. ``deterministic`` visits examples in a fixed order instead of a fresh
    permutation per epoch. ``rank``/``world_size`` default to the process group's.
    ``num_classes``: with ``class_cond``, labels outside ``[0, num_classes)`` are refused.
    Problems with the data raise :class:`DataError` here, before any training starts.
    """
    from dkdm import dist

    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside a world of {world_size} processes")
    source, flips_ok = open_source(dataset, data_dir, image_size, class_cond)
    return DataStream(
        source,
        batch_size=batch_size,
        class_cond=class_cond,
        shuffle=not deterministic,
        random_flip=random_flip and flips_ok,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        num_classes=num_classes,
    )
