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

The layout itself (conversion, npz and grid writers, dataset readers) is
:mod:`dkdm.data.arrays`; which network and diffusion a checkpoint holds is
:mod:`dkdm.resolve`.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dkdm.config import DiffusionConfig, ModelConfig, SampleConfig, differences, to_dict
from dkdm.data.arrays import npz_name, save_grid, save_npz, to_uint8
from dkdm.fileio import atomic_write
from dkdm.training.precision import AUTOCAST_DTYPES, autocast

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class SamplingError(ValueError):
    """A sampling run cannot go ahead; the message says why and what to do."""


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
    keep = ("num_samples", "batch_size", "seed", "use_ddim", "eta", "clip_denoised", "precision", "guidance_scale")
    sample = {k: s[k] for k in keep}
    if sample_cfg.compile:  # compiled kernels round differently; absent when off, as in older manifests
        sample["compile_backend"] = sample_cfg.compile_backend
    if sample_cfg.channels_last:  # so do NHWC kernels (to float rounding); absent when off, as compile_backend
        sample["channels_last"] = True
    if sample_cfg.winograd:  # and Winograd products (to about 2x fp32's rounding); absent when off
        sample["winograd"] = "F4p"
    return {
        "format": MANIFEST_FORMAT,
        "sample": sample,
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
        """Delete the shards, then the manifest (after a successful merge).

        The manifest goes last: a process killed half way leaves the manifest with fewer shards,
        which a rerun resumes (it redraws the missing ones and writes the same npz); shards left
        without their manifest would be refused as of unknown settings.
        """
        for name in sorted(os.listdir(self.directory)):
            if name.startswith("shard_"):
                os.remove(os.path.join(self.directory, name))
        if os.path.exists(os.path.join(self.directory, MANIFEST)):
            os.remove(os.path.join(self.directory, MANIFEST))
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
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``size`` images of ``shape`` (C, H, W) from ``seed``; labels when ``num_classes``.

    ``decode`` (a first stage's ``decode_uint8``) turns sampled latents into uint8 NHWC images;
    latents are never clipped. The starting noise and labels come from a CPU generator (the same on every device);
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
        clip = cfg.clip_denoised and decode is None
        x = loop(net, (size, *shape), noise=noise, clip_denoised=clip, model_kwargs=kwargs, **extra)
        images = to_uint8(x) if decode is None else decode(x).numpy()
    return images, (labels.numpy().astype(np.int64) if labels is not None else None)


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
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        seed = shard_seed(cfg.seed, i)
        arr, labels = draw_shard(model, diffusion, sizes[i], shape, seed, cfg, num_classes, device, decode)
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
