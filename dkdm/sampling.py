"""Drawing many samples into an ADM-format npz: shards, resume, merge.

The work is cut into *shards* of ``batch_size`` images (the last one partial). Shard
``i`` is drawn from a seed derived from ``(seed, i)`` alone -- its starting noise and
labels from an explicit generator, its per-step noise from the global generator forked
and re-seeded for that shard only -- so an image depends on the seed, the batch size,
its position and the device type, never on how many ranks drew the rest or in which
order. Rank ``r`` of ``W`` draws shards ``r, r + W, ...``.

Each finished shard is written atomically into a shard directory beside the output,
together with a manifest of everything that decides the pixels (model and diffusion
configs, checkpoint hash, sampler settings). A rerun with the same manifest skips the
shards already there; a different manifest is refused rather than mixed. Rank 0 merges
the shards into one npz laid out as guided-diffusion's ``image_sample.py`` writes it:
``arr_0`` uint8 ``[N, H, W, C]`` (C is the model's channel count, so the embedded 1-channel
digits stay ``8x8x1``) and ``arr_1`` int64 labels for class-conditional models.

Reading datasets into the same layout (image folders, npz files, CIFAR-10's python
pickles, the embedded digits) lives here too, for the reference-batch and mixing scripts.
"""

from __future__ import annotations

import json
import os
import pickle
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dkdm.config import DiffusionConfig, ModelConfig, SampleConfig, differences, to_dict
from dkdm.fileio import atomic_write
from dkdm.training.precision import AUTOCAST_DTYPES, autocast

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class SamplingError(ValueError):
    """A sampling run cannot go ahead; the message says why and what to do."""


# --------------------------------------------------------------------------- ADM arrays


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
    from PIL import Image

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
        raise SamplingError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name, raw in _cifar_pickles(source, names).items():
        if raw is None:
            raise SamplingError(
                f"{source} has no '{name}'; expected the python version of CIFAR-10 "
                "(cifar-10-batches-py with data_batch_1..5 and test_batch)"
            )
        batch = pickle.loads(raw, encoding="bytes")
        data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
        if data is None:
            raise SamplingError(f"{source}/{name} is not a CIFAR-10 python batch (no 'data' entry)")
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
    from dkdm.data.images import (
        DataError,
        center_crop_arr,
        class_labels_from_names,
        list_image_files,
        read_npz,
    )

    if source == "digits":
        from dkdm.data.digits import load_digits

        x, y = load_digits(image_size=image_size or 8)
        return to_uint8(x), y.numpy()
    if not os.path.exists(source):
        raise SamplingError(
            f"dataset '{source}' does not exist (give 'digits', an .npz, a CIFAR-10 python folder or an image folder)"
        )
    try:
        if is_cifar_python(source):
            images, labels = read_cifar_python(source, split)
        elif os.path.isfile(source):
            images, labels = read_npz(source, want_labels=False)
            images = np.asarray(images)
        else:
            from PIL import Image

            files = list_image_files(source)
            arrays = []
            for path in files:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    arrays.append(center_crop_arr(im, image_size) if image_size else np.asarray(im))
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise SamplingError(
                    f"images under {source} have different sizes ({sorted(shapes)[:3]}...); pass --image_size"
                )
            images = np.stack(arrays)
            labels = class_labels_from_names(files)[0] if class_labels else None
    except DataError as e:
        raise SamplingError(str(e)) from None
    if image_size and images.shape[1:3] != (image_size, image_size):
        from PIL import Image

        gray = images.shape[3] == 1
        resized = [center_crop_arr(Image.fromarray(a[..., 0] if gray else a), image_size) for a in images]
        images = np.stack(resized).reshape(len(images), image_size, image_size, images.shape[3])
    return images, labels


# --------------------------------------------------------------------------- shards


def shard_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of the shards that make ``num_samples``: full batches, the last one partial."""
    if num_samples < 1 or batch_size < 1:
        raise SamplingError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}")
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def shard_seed(seed: int, index: int) -> int:
    """A 63-bit seed for shard ``index`` that depends on nothing but ``(seed, index)``."""
    if seed < 0:
        raise SamplingError(f"--seed must be a non-negative integer, got {seed}")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def make_manifest(
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    sample_cfg: SampleConfig,
    checkpoint_sha256: str,
    device_type: str,
) -> dict[str, Any]:
    """Everything that decides a shard's pixels; two runs may share shards only if this matches."""
    shard_sizes(sample_cfg.num_samples, sample_cfg.batch_size)  # validates both before anything is written
    if sample_cfg.precision not in AUTOCAST_DTYPES:
        raise SamplingError(f"--precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {sample_cfg.precision!r}")
    shard_seed(sample_cfg.seed, 0)
    s = to_dict(sample_cfg)
    keep = ("num_samples", "batch_size", "seed", "use_ddim", "eta", "clip_denoised", "precision")
    return {
        "format": MANIFEST_FORMAT,
        "sample": {k: s[k] for k in keep},
        "model": to_dict(model_cfg),
        "diffusion": to_dict(diffusion_cfg),
        "checkpoint_sha256": checkpoint_sha256,
        "device_type": device_type,
    }


class ShardStore:
    """A directory of finished shards (``shard_000000.npz`` ...) and the manifest they belong to."""

    def __init__(self, directory: str, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    def path(self, index: int) -> str:
        """Where shard ``index`` lives."""
        return os.path.join(self.directory, f"shard_{index:06d}.npz")

    def prepare(self) -> None:
        """Create the directory and write (or check) the manifest; run on one rank only.

        Raises :class:`SamplingError` when the directory cannot be written or already holds
        shards of a different run. A manifest with no shard beside it (a run stopped before
        its first shard) binds nothing and is replaced.
        """
        try:
            os.makedirs(self.directory, exist_ok=True)
            probe = os.path.join(self.directory, f".probe-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise SamplingError(
                f"cannot write to the shard directory {self.directory} ({e.strerror or e}); "
                "choose an --output in a writable place"
            ) from None
        path = os.path.join(self.directory, MANIFEST)
        shards = [n for n in os.listdir(self.directory) if n.startswith("shard_")]
        if os.path.isfile(path) and shards:
            with open(path) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    old = None
            if old != self.manifest:
                diff = (
                    [f"{k}: {a!r} there, {b!r} now" for k, a, b in differences(old, self.manifest)]
                    if isinstance(old, dict)
                    else ["unreadable manifest"]
                )
                raise SamplingError(
                    f"{self.directory} holds shards of a different sampling run ({'; '.join(diff[:6])}); "
                    "they will not be mixed: rerun with the same settings to resume, or remove that "
                    "directory (or pick another --output) to start afresh"
                )
            return
        if shards and not os.path.isfile(path):
            raise SamplingError(
                f"{self.directory} holds {len(shards)} shard(s) but no manifest, so their settings are "
                "unknown; remove that directory or pick another --output"
            )
        atomic_write(path, lambda f: f.write(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"), mode="w")

    def done(self, index: int, size: int) -> bool:
        """True when shard ``index`` is on disk, readable and holds ``size`` images."""
        path = self.path(index)
        if not os.path.isfile(path):
            return False
        try:
            with np.load(path) as z:
                return z["arr_0"].shape[0] == size
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: draw it again
            return False

    def write(self, index: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        """Store one finished shard atomically."""
        save_npz(self.path(index), images, labels)

    def merge(self, sizes: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """All shards, in order, as one array (and labels when the shards carry them)."""
        images, labels = [], []
        for i, size in enumerate(sizes):
            if not self.done(i, size):
                raise SamplingError(f"shard {i} is missing or damaged in {self.directory}; rerun to draw it")
            with np.load(self.path(i)) as z:
                images.append(z["arr_0"])
                if "arr_1" in z.files:
                    labels.append(z["arr_1"])
        return np.concatenate(images), (np.concatenate(labels) if labels else None)

    def remove(self) -> None:
        """Delete the shards and the manifest (after a successful merge)."""
        for name in os.listdir(self.directory):
            if name.startswith("shard_") or name == MANIFEST:
                os.remove(os.path.join(self.directory, name))
        try:
            os.rmdir(self.directory)
        except OSError:
            pass  # something else lives there; leave it


# --------------------------------------------------------------------------- drawing


class _Precision(torch.nn.Module):
    """Runs the network under autocast and hands the diffusion maths float32 outputs."""

    def __init__(self, model: torch.nn.Module, precision: str) -> None:
        super().__init__()
        if precision not in AUTOCAST_DTYPES:
            raise SamplingError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        self.model = model
        self.dtype = AUTOCAST_DTYPES[precision]

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with autocast(x.device.type, self.dtype):
            out = self.model(x, t, **kwargs)
        return out if self.dtype is None else out.float()


def draw_shard(
    model: torch.nn.Module,
    diffusion: Any,
    size: int,
    shape: tuple[int, int, int],
    seed: int,
    cfg: SampleConfig,
    num_classes: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``size`` images of ``shape`` (C, H, W) from ``seed``; labels when ``num_classes``.

    The starting noise and labels come from a CPU generator (the same on every device);
    the sampler's per-step noise from the global generators, forked so the caller's RNG
    state is untouched.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((size, *shape), generator=gen).to(device)
    kwargs = {}
    labels = None
    if num_classes:
        labels = torch.randint(0, num_classes, (size,), generator=gen)
        kwargs["y"] = labels.to(device)
    net = _Precision(model, cfg.precision)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed ^ 0x5DEECE66D)
        loop = diffusion.ddim_sample_loop if cfg.use_ddim else diffusion.p_sample_loop
        extra = {"eta": cfg.eta} if cfg.use_ddim else {}
        x = loop(net, (size, *shape), noise=noise, clip_denoised=cfg.clip_denoised, model_kwargs=kwargs, **extra)
    return to_uint8(x), (labels.numpy().astype(np.int64) if labels is not None else None)


@dataclass
class SampleStats:
    """What one rank did: shards and images drawn now, skipped as already done, seconds spent."""

    shards_drawn: int
    images_drawn: int
    shards_skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput of the shards drawn in this call (0 when none were)."""
        return self.images_drawn / self.seconds if self.seconds > 0 else 0.0


def draw_shards(
    model: torch.nn.Module,
    diffusion: Any,
    store: ShardStore,
    cfg: SampleConfig,
    shape: tuple[int, int, int],
    num_classes: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    on_shard: Callable[[int, bool], None] | None = None,
) -> SampleStats:
    """Draw this rank's missing shards (``rank, rank + world_size, ...``) into ``store``.

    ``on_shard(n, drawn)`` is called for each of this rank's shards with its image count,
    ``drawn`` False for one found finished on disk (for progress bars).
    """
    sizes = shard_sizes(cfg.num_samples, cfg.batch_size)
    mine: Iterable[int] = range(rank, len(sizes), world_size)
    drawn = images = skipped = 0
    seconds = 0.0
    model.eval()
    for i in mine:
        if store.done(i, sizes[i]):
            skipped += 1
            if on_shard:
                on_shard(sizes[i], False)
            continue
        start = time.perf_counter()
        arr, labels = draw_shard(model, diffusion, sizes[i], shape, shard_seed(cfg.seed, i), cfg, num_classes, device)
        seconds += time.perf_counter() - start
        store.write(i, arr, labels)
        drawn, images = drawn + 1, images + sizes[i]
        if on_shard:
            on_shard(sizes[i], True)
    return SampleStats(drawn, images, skipped, seconds)


def resolve_output(output: str, num: int, shape: tuple[int, int, int]) -> str:
    """The npz path for ``--output``: a ``.npz`` file as given, else guided-diffusion's name inside that folder."""
    c, h, w = shape
    if output.endswith(".npz"):
        return output
    return os.path.join(output or ".", npz_name(num, h, w, c))


def shard_dir_for(output_path: str) -> str:
    """The shard directory that belongs to an output npz: ``<output>.shards``."""
    return output_path[: -len(".npz")] + ".shards" if output_path.endswith(".npz") else output_path + ".shards"


def finish(
    store: ShardStore, cfg: SampleConfig, output_path: str, keep_shards: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Merge every shard into ``output_path`` (plus a PNG grid of the first 64); rank 0 only."""
    images, labels = store.merge(shard_sizes(cfg.num_samples, cfg.batch_size))
    save_npz(output_path, images, labels)
    save_grid(images[:64], output_path[: -len(".npz")] + ".png")
    if not keep_shards:
        store.remove()
    return images, labels


# --------------------------------------------------------------------------- configs

TEACHER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits_teacher.pt")


def checkpoint_configs(model_path: str) -> tuple[dict | None, dict | None, str]:
    """The model and diffusion configs recorded beside a checkpoint, and the file they came from.

    Looks for the run directory's ``config.yaml`` (written by the Trainer; the model under
    ``model`` or, for a distilled student, ``student``), then for a ``.json`` of the same
    name (the embedded teacher's provenance). Returns ``(None, None, "")`` when neither exists.
    """
    from dkdm.config import load_yaml

    run_yaml = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.yaml")
    side_json = os.path.splitext(model_path)[0] + ".json"
    if os.path.isfile(run_yaml):
        data, source = load_yaml(run_yaml), run_yaml
    elif os.path.isfile(side_json):
        with open(side_json) as f:
            data, source = json.load(f), side_json
    else:
        return None, None, ""
    if isinstance(data.get("config"), dict):  # provenance files may nest the configs one level down
        data = data["config"]
    model = next((data[k] for k in ("model", "student", "model_config") if isinstance(data.get(k), dict)), None)
    diffusion = next(
        (data[k] for k in ("diffusion", "student_diffusion", "diffusion_config") if isinstance(data.get(k), dict)), None
    )
    return model, diffusion, source


def resolve_configs(model_path: str, overrides: dict[str, dict]) -> tuple[ModelConfig, DiffusionConfig, str]:
    """The model and diffusion configs to sample ``model_path`` with.

    Base: ``overrides['model']['arch']`` when it names a zoo entry or YAML file, else what
    :func:`checkpoint_configs` finds beside the checkpoint. Then the remaining overrides
    (``--config`` files and flags) are applied. ``learn_sigma`` follows the model unless the
    diffusion overrides set it. Raises :class:`SamplingError` when no architecture is known.
    """
    from dkdm.config import from_dict, update
    from dkdm.models import get_config

    model_over = dict(overrides.get("model", {}))
    diff_over = dict(overrides.get("diffusion", {}))
    arch = model_over.pop("arch", None)
    model_dict, diff_dict, source = checkpoint_configs(model_path)
    if arch and arch not in ("unet", "vit"):
        base, source = get_config(arch), f"--arch {arch}"
    elif model_dict is not None:
        model_dict = dict(model_dict)
        named = model_dict.get("arch")
        if named not in (None, "unet", "vit"):  # a zoo name left unresolved in a hand-written config
            base = update(get_config(named), {k: v for k, v in model_dict.items() if k != "arch"})
        else:
            base = from_dict(ModelConfig, model_dict, source)
        if arch:
            base = update(base, {"arch": arch})
    elif arch:
        base, source = ModelConfig(arch=arch), "flags"
    elif not os.path.isfile(model_path):
        raise SamplingError(f"checkpoint not found: {model_path}; pass --model_path a modelNNNNNN.pt or ema_*.pt file")
    else:
        raise SamplingError(
            f"no config.yaml or .json beside {model_path} says which network it holds; pass --arch "
            "(a zoo name such as cifar10-14M, or a model YAML) and the diffusion flags it was trained with "
            "(e.g. --config configs/diffusion/cosine-1000-learned.yaml)"
        )
    model_cfg = update(base, model_over, "model")
    diff_base = from_dict(DiffusionConfig, diff_dict, source) if diff_dict else DiffusionConfig()
    diff_over.setdefault("learn_sigma", model_cfg.learn_sigma)
    diff_cfg = update(diff_base, diff_over, "diffusion")
    if diff_cfg.learn_sigma != model_cfg.learn_sigma:
        raise SamplingError("model.learn_sigma and diffusion.learn_sigma differ; set both with --learn_sigma")
    return model_cfg, diff_cfg, source
