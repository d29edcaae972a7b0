"""Checkpoint reading and strict loading: formats, clear errors, zoo suggestions."""

import argparse
import random

import pytest
import torch

from dkdm.models import CheckpointError, create_model, load_checkpoint, read_state_dict


def _random_state(model):
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def _empty_state(name, **kw):
    """Tensors shaped like a zoo entry's state dict (built on meta, so cheap to describe)."""
    with torch.device("meta"):
        model = create_model(name, **kw)
    return {k: torch.empty(v.shape) for k, v in model.state_dict().items()}


def test_strict_round_trip_through_a_file(tmp_path):
    src = create_model("digits-student")
    sd = _random_state(src)
    path = tmp_path / "ema_0.9999_000100.pt"
    torch.save(sd, path)
    dst = load_checkpoint(create_model("digits-student"), str(path))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 99])
    src.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(src.eval()(x, t), dst.eval()(x, t))


def test_ddp_prefix_and_dit_training_checkpoint(tmp_path):
    model = create_model("digits-vit")
    ema, live = _random_state(model), _random_state(model)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in ema.items()}, ddp)
    assert read_state_dict(str(ddp)).keys() == ema.keys()
    # DiT's train.py saves {"model", "ema", "opt", "args": Namespace}; the EMA is what one samples from.
    dit = tmp_path / "0050000.pt"
    torch.save(
        {
            "model": live,
            "ema": ema,
            "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="DiT-S/2"),
        },
        dit,
    )
    sd = read_state_dict(str(dit))
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    assert all(torch.equal(v, live[k]) for k, v in read_state_dict(str(dit), key="model").items())
    load_checkpoint(model, str(dit))
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])


def test_mismatch_lists_keys_and_suggests_the_fitting_zoo_entry():
    model = create_model("digits-teacher")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = _empty_state("cifar10-57M")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, sd)
    msg = str(e.value)
    assert "missing from the checkpoint:" in msg and "unexpected in the checkpoint:" in msg and "mis-shaped:" in msg
    assert "time_embed.0.weight (checkpoint (512, 128), model (128, 32))" in msg
    assert "... and" in msg  # long lists are abbreviated
    assert "128 channels, 3 res blocks" in msg and "try cifar10-57M" in msg and "imagenet32-57M" in msg
    # nothing was loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_suggestion_names_flags_readable_from_shapes():
    sd = _random_state(create_model("digits-teacher", class_cond=True, num_classes=10, learn_sigma=False))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(create_model("digits-teacher"), sd)
    msg = str(e.value)
    assert "unexpected in the checkpoint: label_emb.weight" in msg
    assert "try digits-teacher with" in msg and "--class_cond True" in msg and "--num_classes 10" in msg
    assert "--learn_sigma False" in msg


def test_single_extra_or_missing_key_is_never_dropped():
    model = create_model("digits-student")
    sd = _random_state(model)
    extra = {**sd, "ema_decay": torch.tensor(0.9999)}
    with pytest.raises(CheckpointError, match=r"(?s)1 unexpected.*ema_decay"):
        load_checkpoint(model, extra)
    sd.pop("out.2.bias")
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*out\.2\.bias") as e:
        load_checkpoint(model, sd)
    assert "no zoo architecture matches" in str(e.value)


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "model000100.pt"
    torch.save(_random_state(create_model("digits-student")), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        read_state_dict(str(path))
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "re-download" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all\n" * 10, random.Random(0).randbytes(4096)],
    ids=["empty", "text", "random-bytes"],
)
def test_garbage_or_empty_file_gives_a_clear_error(tmp_path, content):
    path = tmp_path / "teacher.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(create_model("digits-student"), str(path))


def test_missing_file_and_non_weight_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        read_state_dict(str(tmp_path / "nope.pt"))
    opt = tmp_path / "opt000100.pt"
    torch.save({"state": {}, "param_groups": [{"lr": 1e-4}]}, opt)
    with pytest.raises(
        CheckpointError,
        match=r"opt000100.pt: holds a dict with entries state, param_groups, not model weights",
    ):
        read_state_dict(str(opt))
    code = tmp_path / "pickled_object.pt"
    torch.save({"w": torch.zeros(1), "obj": _Opaque()}, code)
    with pytest.raises(
        CheckpointError,
        match=r"pickled_object.pt contains Python objects other than tensors",
    ):
        read_state_dict(str(code))


class _Opaque:
    pass
