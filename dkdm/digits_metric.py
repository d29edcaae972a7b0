"""A feature extractor for the embedded digits, standing in for Inception.

Inception-v3 sees nothing useful in an 8x8 grayscale digit, so the embedded default is
scored with a small CNN trained on the real digits (``scripts/train_digits_classifier.py``,
weights shipped in ``dkdm/assets/digits_classifier.pt`` with provenance in the ``.json``
beside it). Its penultimate layer gives the features for the Frechet distance and for
precision / recall, its softmax the class probabilities for the Inception Score; the maths
itself is ``evaluations/metrics.py``, the same code the ADM-compatible evaluator uses.

Images enter as ADM sample arrays: uint8, NHWC, 8x8, one channel (three equal channels
are accepted too). The real digits go through the very same uint8 round trip, so the
reference and the samples are quantised identically.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import LinAlgWarning
from torch import nn

from dkdm.data.arrays import to_uint8

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLASSIFIER_PATH = os.path.join(ASSET_DIR, "digits_classifier.pt")
IMAGE_SIZE = 8


class DigitsClassifier(nn.Module):
    """Three 3x3 convolutions and two linear layers; ``features`` is the penultimate layer.

    Small enough to ship in the package (~75k parameters) and to score 2,000 samples in
    well under a second on a CPU.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feature_dim]`` of images ``[B, 1, 8, 8]`` in [-1, 1]."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 2x2
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.fc2(self.dropout(self.features(x)))


# --------------------------------------------------------------------------- data


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real digits as an ADM array (uint8 ``[N, 8, 8, 1]``) and their labels."""
    from dkdm.data.digits import load_digits

    images, labels = load_digits(image_size=IMAGE_SIZE)
    return to_uint8(images), labels.numpy().astype(np.int64)


def split_indices(num: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split of ``num`` items (the classifier's provenance records it)."""
    perm = np.random.default_rng(seed).permutation(num)
    n_test = round(num * test_fraction)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def to_input(images: np.ndarray) -> torch.Tensor:
    """An ADM array (uint8 NHWC, 8x8, 1 or 3 channels) to classifier input ``[N, 1, 8, 8]``."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[3] not in (1, 3):
        raise ValueError(
            f"the digits metric expects uint8 images [N, 8, 8, 1] (or [N, 8, 8, 3]), got shape "
            f"{list(images.shape)}; it scores only the embedded digits (use evaluations/evaluator.py "
            "for other datasets)"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"the digits metric expects uint8 images (ADM format), got {images.dtype}")
    x = torch.from_numpy(images.astype(np.float32)).mean(dim=3, keepdim=True)  # 3 equal channels -> gray
    return x.permute(0, 3, 1, 2) / 127.5 - 1


# --------------------------------------------------------------------------- weights


def load_classifier(path: str = CLASSIFIER_PATH, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The shipped classifier (or one at ``path``), in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; train them with "
            "`python scripts/train_digits_classifier.py`"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path} is not a digits classifier file (expected keys 'config' and 'state_dict')")
    model = DigitsClassifier(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def save_classifier(model: DigitsClassifier, path: str, provenance: dict[str, Any]) -> None:
    """Write weights to ``path`` and ``provenance`` to the ``.json`` beside it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"config": model.config, "state_dict": state}, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- scoring


@dataclass
class Activations:
    """What the classifier says about a set of images."""

    features: np.ndarray  # [N, feature_dim] float64
    probs: np.ndarray  # [N, num_classes] float64


@torch.no_grad()
def activations(images: np.ndarray, classifier: DigitsClassifier | None = None, batch_size: int = 1000) -> Activations:
    """Penultimate features and softmax probabilities of an ADM array of digits."""
    classifier = classifier or load_classifier()
    device = next(classifier.parameters()).device
    x = to_input(images)
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        f = classifier.features(xb)
        feats.append(f.double().cpu())
        probs.append(F.softmax(classifier.fc2(f), dim=1).double().cpu())
    return Activations(torch.cat(feats).numpy(), torch.cat(probs).numpy())


def _metrics_module() -> Any:
    """``evaluations.metrics`` (installed beside ``dkdm`` by setup.py; imported late: it is numpy/scipy only)."""
    try:
        from evaluations import metrics
    except ImportError as e:
        raise ImportError(f"{e}; install the repository (make install, or pip install -e .) to get evaluations") from e
    return metrics


def score(samples: Activations, reference: Activations, k: int = 3) -> dict[str, float]:
    """FD, IS, precision and recall of ``samples`` against ``reference`` (ADM evaluator maths)."""
    m = _metrics_module()
    mu_s, sigma_s = m.compute_statistics(samples.features)
    mu_r, sigma_r = m.compute_statistics(reference.features)
    precision, recall = m.precision_recall(reference.features, samples.features, k=k)
    with warnings.catch_warnings():
        # ReLU features have dead units, so the covariances are singular and scipy warns on
        # every call; the square root is still accurate (FD of a set against itself is ~1e-12).
        warnings.simplefilter("ignore", LinAlgWarning)
        fd = m.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    return {
        "fd": float(fd),
        "is": float(m.inception_score(samples.probs)),
        "precision": float(precision),
        "recall": float(recall),
    }


def evaluate(
    samples: np.ndarray, reference: np.ndarray | None = None, classifier: DigitsClassifier | None = None
) -> dict[str, float]:
    """Score an ADM array of digit samples against ``reference`` (default: all real digits)."""
    classifier = classifier or load_classifier()
    if reference is None:
        reference = real_digits()[0]
    return score(activations(samples, classifier), activations(reference, classifier))
