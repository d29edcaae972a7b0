"""dkdm.training.checkpoint: file names, loading trainer-written files safely, generator states."""

import os
import pickle
import random
import sys
import warnings

import numpy as np
import pytest
import torch

from dkdm.training import checkpoint as ckpt
from dkdm.training.checkpoint import UntrustedFileError, load_file, rng_state


class _Payload:
    """Unpickling this runs code: it deletes the canary file."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.remove, (self.canary,))


def test_trainer_files_load_weights_only_and_code_is_refused(tmp_path):

    ours = tmp_path / "opt000001.pt"
    torch.save({"step": 1, "rank_states": [{"rng": rng_state()}], "optimizer": {"state": {}}}, ours)
    loaded = load_file(str(ours))  # numpy generator states are allow-listed, nothing else is needed
    assert isinstance(loaded["rank_states"][0]["rng"]["numpy"][1], np.ndarray)
    canary = tmp_path / "canary"
    canary.write_text("still here")
    evil = tmp_path / "pool000001.pt"
    torch.save({"x": torch.zeros(2), "payload": _Payload(str(canary))}, evil)
    with pytest.raises(UntrustedFileError, match="--trust_checkpoints") as e:
        load_file(str(evil))
    assert str(evil) in str(e.value) and canary.exists()
    load_file(str(evil), trusted=True)  # the user vouched for it: plain torch.load
    assert not canary.exists()


class _Kept:
    """A plain class: loading it needs full unpickling, which runs no harmful code."""


class _Gone:
    """Saved, then removed from this module: the file names a class the reader no longer has."""


class _Evil:
    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return (self.fn, ("/nonexistent/never-touched",))


def test_names_and_steps():
    assert ckpt.model_path("r", 300) == os.path.join("r", "model000300.pt")
    assert ckpt.ema_path("r", "0.9999", 3) == os.path.join("r", "ema_0.9999_000003.pt")
    assert ckpt.extra_path("r", "pool", 3, 0) == os.path.join("r", "pool000003.pt")
    assert ckpt.extra_path("r", "pool", 3, 2) == os.path.join("r", "pool000003_rank2.pt")
    assert ckpt.parse_step("/a/model000300.pt") == 300 and ckpt.parse_step("/a/ema_0.9_1234567.pt") == 1234567
    assert ckpt.parse_step("/a/config.yaml") is None and ckpt.parse_step("/a/model12.pt") is None


def test_resume_finds_the_newest_complete_checkpoint(tmp_path):
    assert ckpt.find_resume_checkpoint("") is None and ckpt.find_resume_checkpoint(str(tmp_path / "no")) is None
    for name in ["model000002.pt", "opt000002.pt", "model000004.pt", "opt000006.pt", "opt00008.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert ckpt.complete_steps(str(tmp_path)) == [2]  # 4 lacks its opt file, 6 its model, 8 is misnamed
    assert ckpt.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "model000002.pt")


def test_load_file_honours_map_location_on_both_paths(tmp_path):
    plain, odd = tmp_path / "opt000001.pt", tmp_path / "pool000001.pt"
    torch.save({"x": torch.ones(2)}, plain)
    assert load_file(str(plain), map_location="meta")["x"].is_meta
    torch.save({"x": torch.ones(2), "keep": _Kept()}, odd)  # needs unpickling a class: the trusted path
    with pytest.raises(UntrustedFileError):
        load_file(str(odd), map_location="meta")
    assert load_file(str(odd), map_location="meta", trusted=True)["x"].is_meta


def test_untrusted_files_name_at_most_four_of_their_globals(tmp_path):
    path = tmp_path / "pool000001.pt"
    fns = [os.remove, os.rmdir, os.unlink, os.chdir, os.listdir]
    torch.save([_Evil(fn) for fn in fns], path)
    with pytest.raises(UntrustedFileError) as e:
        load_file(str(path))
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert len(names) == 5
    assert f"{path} holds {', '.join(names[:4])} beyond tensors" in str(e.value)


@pytest.mark.parametrize(
    "message, refused",
    [
        ("Weights only load failed. ...", UntrustedFileError),  # torch's wording, either spelling
        ("... rerun with weights_only=False ...", UntrustedFileError),
        ("invalid load key, 'x'.", ValueError),  # not about weights_only: a damaged file
    ],
)
def test_which_unpickling_errors_mean_untrusted(tmp_path, monkeypatch, message, refused):
    path = tmp_path / "opt000001.pt"
    torch.save({"x": torch.zeros(1)}, path)

    def fake_load(*args, **kwargs):
        raise pickle.UnpicklingError(message)

    monkeypatch.setattr(torch, "load", fake_load)
    with pytest.raises(refused) as e:
        load_file(str(path))
    assert type(e.value) is refused
    if refused is ValueError:
        assert f"{path} cannot be read (UnpicklingError: {message}); it may be truncated" in str(e.value)


def test_a_damaged_trainer_file_says_what_failed(tmp_path):
    path = tmp_path / "opt000002.pt"
    torch.save({"x": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError) as e:
        load_file(str(path))
    assert str(e.value).startswith(f"checkpoint file {path} cannot be read (RuntimeError: ")
    assert str(e.value).endswith("delete this checkpoint's files to resume from an older one")


def test_a_trusted_file_that_still_cannot_be_read_says_why(tmp_path, monkeypatch):
    path = tmp_path / "pool000001.pt"
    torch.save({"x": torch.zeros(1), "obj": _Gone()}, path)
    monkeypatch.delattr(sys.modules[__name__], "_Gone")
    with pytest.raises(ValueError) as e:
        load_file(str(path), trusted=True)
    assert f"checkpoint file {path} cannot be read (AttributeError: " in str(e.value)
    assert "_Gone" in str(e.value)


def test_generator_states_load_without_deprecated_numpy_paths(tmp_path):
    path = tmp_path / "opt000001.pt"
    torch.save({"rng": rng_state()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 warns on np.core; the allow-list must use np._core
        assert isinstance(load_file(str(path))["rng"]["numpy"][1], np.ndarray)


def test_seed_all_seeds_every_generator_as_their_own_seeding_would():
    seed = 2**32 + 7  # beyond numpy's range: numpy gets it modulo 2**32
    ckpt.seed_all(seed)
    got = (random.random(), np.random.random(), torch.rand(1))
    torch.manual_seed(seed)
    assert got == (random.Random(seed).random(), np.random.RandomState(7).random(), torch.rand(1))
    ckpt.seed_all(12345)
    assert np.random.random() == np.random.RandomState(12345).random()


def test_cuda_generator_state_is_saved_and_restored_only_where_cuda_is(monkeypatch):
    """The CUDA branch's logic on a CPU machine: availability and initialisation faked, the
    CUDA generator calls recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: calls.append("get") or torch.zeros(3, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(("set", s.tolist())))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in rng_state() and calls == []  # never initialised: there is no CUDA stream to save
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    state = rng_state()
    assert calls == ["get"] and state["cuda"].tolist() == [0, 0, 0]
    calls.clear()
    state["cuda"] = torch.tensor([1, 2], dtype=torch.uint8)
    ckpt.set_rng_state(state)
    assert calls == [("set", [1, 2])]
    calls.clear()
    ckpt.set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # saved on a CPU run: nothing to restore
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt.set_rng_state(state)  # saved on a GPU, resumed without one: the CUDA state is skipped
    assert calls == []
