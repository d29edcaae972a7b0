"""Data-based training in latent space: a dataset encoded by its first stage once, then streamed as latents.

The paper's data-based baselines in latent space would otherwise call the encoder every step
(CompVis's LatentDiffusion does). Here the whole dataset is encoded once, the result cached on
disk beside the run (keyed by the data, the first stage and its scale), and batches are sliced
from it: a KL first stage's posterior is kept as mean and standard deviation, so every batch
still draws a fresh latent sample as CompVis does, for the price of one randn. Random flips are
off: a flipped latent is not the latent of the flipped image.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from dkdm.data.images import DataStream, open_source
from dkdm.fileio import atomic_save, file_sha256


class LatentSource:
    """Encoded images: ``mean`` [N, C, h, w] (and ``std`` for a KL first stage), sliced a batch at a time."""

    direct = True

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        self.mean, self.std, self.labels = mean, std, labels

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, idx: np.ndarray, flip: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        i = torch.from_numpy(idx)
        x = self.mean[i]
        if self.std is not None:  # a fresh posterior sample per use, from the global (checkpointed) RNG
            x = x + self.std[i] * torch.randn_like(x)
        return x, None if self.labels is None else self.labels[i]


def _pixels(source: Any, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    if getattr(source, "direct", False):
        return source.batch(idx, np.zeros(len(idx), dtype=bool))
    items = [source[(int(i), False)] for i in idx]
    y = torch.tensor([it[1] for it in items]) if source.labels is not None else None
    return torch.stack([it[0] for it in items]), y


def encode_dataset(source: Any, stage: Any, device: torch.device | str = "cpu", chunk: int = 256) -> dict:
    """``{"mean", "std" (KL only), "labels"}`` of every image of ``source``, scaled, on the CPU."""
    means, stds, labels = [], [], []
    ae = stage.to(device)
    n = len(source)
    for start in range(0, n, chunk):
        x, y = _pixels(source, np.arange(start, min(n, start + chunk)))
        x = x.to(device, stage.dtype)
        with torch.no_grad():
            if stage.kind == "vq":
                means.append(ae.ae.encode(x).latents.float().cpu() * stage.scale_factor)
            else:
                dist = ae.ae.encode(x).latent_dist
                means.append(dist.mean.float().cpu() * stage.scale_factor)
                stds.append(dist.std.float().cpu() * stage.scale_factor)
        if y is not None:
            labels.append(y.long())
    return {
        "mean": torch.cat(means),
        "std": torch.cat(stds) if stds else None,
        "labels": torch.cat(labels) if labels else None,
    }


def cache_key(space: Any, dataset: str, data_dir: str, image_size: int) -> str:
    """What decides the encodings: the data, the first stage's files, its scale."""
    stage = space.first_stage
    if os.path.isdir(stage):  # a diffusers folder: its config and weights
        names = sorted(os.listdir(stage))
        stage_id = [(n, file_sha256(os.path.join(stage, n))) for n in names if os.path.isfile(os.path.join(stage, n))]
    else:
        stage_id = file_sha256(stage) if os.path.isfile(stage) else stage
    data_id = f"{os.path.abspath(data_dir)}:{os.path.getmtime(data_dir)}" if data_dir else dataset
    text = json.dumps([data_id, image_size, stage_id, space.first_stage_scale, "v1"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_latent_data(
    space: Any,
    *,
    dataset: str,
    data_dir: str,
    batch_size: int,
    class_cond: bool,
    deterministic: bool,
    seed: int,
    cache_dir: str,
    device: torch.device | str = "cpu",
) -> tuple[DataStream, dict]:
    """A :class:`DataStream` of latents of the dataset, encoded once (cached in ``cache_dir``).

    Rank 0 encodes and writes the cache; the others wait and read it. Returns the stream and
    ``{"cached": bool, "path": str, "seconds": float}`` about the encoding.
    """
    import time

    from dkdm import dist

    stage = space.load_first_stage()
    image_size = stage.image_shape(space.shape)[1]
    key = cache_key(space, dataset, data_dir, image_size)
    path = os.path.join(cache_dir, f"latents-{key}.pt")
    info = {"cached": os.path.isfile(path), "path": path, "seconds": 0.0}
    if dist.is_main() and not info["cached"]:
        start = time.perf_counter()
        source, _ = open_source(dataset, data_dir, image_size, class_cond)
        enc = encode_dataset(source, stage, device)
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save(enc, path)
        info["seconds"] = time.perf_counter() - start
    dist.barrier()
    enc = torch.load(path, map_location="cpu", weights_only=True)
    if tuple(enc["mean"].shape[1:]) != tuple(space.shape):
        raise ValueError(f"the cached latents {path} have shape {tuple(enc['mean'].shape[1:])}, not {space.shape}")
    stream = DataStream(
        LatentSource(enc["mean"], enc["std"], enc["labels"]),
        batch_size=batch_size,
        class_cond=class_cond,
        shuffle=not deterministic,
        random_flip=False,
        seed=seed,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        num_workers=0,
    )
    return stream, info
