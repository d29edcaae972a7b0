"""The embedded digits teacher: its provenance matches the zoo, and its samples are digits."""

import json
import os

import numpy as np
import pytest
import torch

import dkdm
from dkdm.config import DiffusionConfig, ModelConfig, from_dict, to_dict
from dkdm.data import load_digits
from dkdm.diffusion import create_diffusion
from dkdm.models import create_model, get_config, load_checkpoint

ASSETS = os.path.join(os.path.dirname(dkdm.__file__), "assets")
WEIGHTS = os.path.join(ASSETS, "digits_teacher.pt")
PROVENANCE = os.path.join(ASSETS, "digits_teacher.json")


@pytest.fixture(scope="module")
def provenance():
    with open(PROVENANCE) as f:
        return json.load(f)


def test_provenance_describes_the_shipped_teacher(provenance):
    # Read the way the resolver reads it: fields added to ModelConfig after the teacher was
    # trained take their defaults, and every recorded field is still a field we know.
    assert from_dict(ModelConfig, provenance["model"]) == get_config("digits-teacher")
    assert set(provenance["model"]) <= set(to_dict(get_config("digits-teacher")))
    diffusion = provenance["diffusion"]
    assert diffusion["steps"] == 100 and diffusion["noise_schedule"] == "cosine" and diffusion["learn_sigma"]
    for key in ("train", "steps", "seed", "command", "final_loss", "date", "ema_rate"):
        assert key in provenance, key
    assert "image_train.py" in provenance["command"]
    assert os.path.getsize(WEIGHTS) < 10 * 2**20  # small enough to ship inside the package


def test_teacher_samples_are_digits(provenance):
    from sklearn.linear_model import LogisticRegression

    images, labels = load_digits(8)
    clf = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1).numpy(), labels.numpy())
    model = load_checkpoint(create_model("digits-teacher"), WEIGHTS).eval()
    cfg = from_dict(DiffusionConfig, {**provenance["diffusion"], "timestep_respacing": "50"})
    diffusion = create_diffusion(cfg)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on a shared CPU
    try:
        with torch.no_grad():
            x = diffusion.p_sample_loop(model, (256, 1, 8, 8))
    finally:
        torch.set_num_threads(threads)
    proba = clf.predict_proba(x.clamp(-1, 1).reshape(256, -1).numpy())
    confident = proba.max(axis=1) >= 0.5
    classes = set(np.argmax(proba, axis=1).tolist())
    assert confident.mean() >= 0.9, f"only {confident.mean():.0%} of samples look like a digit"
    assert classes == set(range(10)), f"classes drawn: {sorted(classes)}"
    # Pure noise would fail the same check, so it measures something.
    noise = torch.randn(256, 64).clamp(-1, 1).numpy()
    assert (clf.predict_proba(noise).max(axis=1) >= 0.5).mean() < 0.9
