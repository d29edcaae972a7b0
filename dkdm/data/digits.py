"""The embedded default dataset: scikit-learn's handwritten digits (no download).

1,797 grey-scale images of 8x8 pixels with values 0..16 and labels 0..9, shipped inside
scikit-learn. They are scaled to [-1, 1] like every other dataset here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NATIVE_SIZE = 8


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_digits(image_size: int = NATIVE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images FloatTensor[N, 1, S, S] in [-1, 1], labels LongTensor[N])``.

    ``image_size`` other than 8 resizes every image: area averaging when shrinking,
    bilinear interpolation when enlarging. The tensors are fresh copies the caller may
    modify.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"digits: image_size must be a positive integer, got {image_size!r}")
    images, labels = _raw()
    x = torch.from_numpy(images).unsqueeze(1) * (2.0 / 16.0) - 1.0
    if image_size < NATIVE_SIZE:
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    elif image_size > NATIVE_SIZE:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous(), torch.from_numpy(labels.copy())
