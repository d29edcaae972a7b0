"""Checkpoint reading and strict loading: formats, clear errors, zoo suggestions."""

import argparse
import random

import pytest
import torch

from dkdm.config import ModelConfig
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
    with pytest.raises(CheckpointError, match=str(path)) as e:
        load_checkpoint(create_model("digits-student"), str(path))
    # damage, not untrusted objects: torch's refusal of a garbage pickle also mentions weights_only
    expected = "is empty (0 bytes)" if not content else "it is truncated, corrupted or not a checkpoint"
    assert expected in str(e.value) and "Python objects" not in str(e.value)


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


# --------------------------------------------------------------------------- what each message says


def test_long_lists_are_cut_and_counted():
    from dkdm.models.checkpoints import _abbreviate

    assert _abbreviate(list(range(8))) == "0, 1, 2, 3, 4, 5, 6, 7"
    assert _abbreviate(list(range(11))) == "0, 1, 2, 3, 4, 5, 6, 7, ... and 3 more"
    assert _abbreviate(["a", "b", "c"], 2) == "a, b, ... and 1 more"
    # mis-shaped tensors are listed five at a time, a wrapper's entries six
    model = create_model("digits-student")
    sd = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, sd)
    shaped = next(line for line in str(e.value).splitlines() if "mis-shaped:" in line)
    assert shaped.count(" (checkpoint ") == 5 and shaped.endswith(f"... and {len(sd) - 5} more")
    with pytest.raises(CheckpointError, match=r"entries a, b, c, d, e, f, \.\.\. and 1 more, not model weights"):
        load_checkpoint(model, {k: 1 for k in "abcdefg"})


def test_where_the_weights_came_from_and_which_model_refused_them_are_named(tmp_path):
    student = create_model("digits-student")
    sd = _random_state(student)
    sd.pop("out.2.bias")
    with pytest.raises(CheckpointError, match=r"^the given state dict does not fit the model 'digits-student'"):
        load_checkpoint(student, sd)
    path = tmp_path / "student.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {path} does not fit the model 'digits-student'"):
        load_checkpoint(student, str(path))
    with pytest.raises(
        CheckpointError, match=r"does not fit the model 'Linear': it has 2 tensors, the model expects 2"
    ):
        load_checkpoint(torch.nn.Linear(2, 3), {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)})
    from dkdm.models.checkpoints import unwrap_state_dict

    with pytest.raises(CheckpointError, match=r"^checkpoint: holds a int, not model weights"):
        unwrap_state_dict(5)
    with pytest.raises(CheckpointError, match=r"^checkpoint: holds an empty dict, not model weights"):
        unwrap_state_dict({})
    with pytest.raises(CheckpointError, match=r"has no entry 'ema' \(it has: Tensor\)"):
        unwrap_state_dict(torch.zeros(2), key="ema")
    with pytest.raises(CheckpointError, match=r"^the given state dict: has no entry 'ema' \(it has: model, opt\)"):
        load_checkpoint(student, {"model": sd, "opt": {}}, key="ema")
    one = {"w": torch.ones(2)}
    assert unwrap_state_dict(one) == one  # a single tensor is still a state dict


def test_an_explicit_key_picks_the_entry_from_a_file_or_a_dict(tmp_path):
    model = create_model("digits-student")
    ema, live = _random_state(model), _random_state(model)
    path = tmp_path / "train.pt"
    torch.save({"model": live, "ema": ema}, path)
    for source in (str(path), {"model": live, "ema": ema}):
        load_checkpoint(model, source, key="model")
        assert torch.equal(model.out[2].weight, live["out.2.weight"])
        load_checkpoint(model, source)  # the EMA by default
        assert torch.equal(model.out[2].weight, ema["out.2.weight"])


def test_a_narrower_copy_of_every_layer_is_named_as_a_pruned_network():
    model = create_model("digits-student")
    own = model.state_dict()
    narrow = {k: v[:-1] if k.startswith("out.2.") else v for k, v in own.items()}  # fewer output channels
    with pytest.raises(CheckpointError, match="it is a pruned network, which only the config saved with it rebuilds"):
        load_checkpoint(model, narrow)
    del narrow["out.2.bias"]  # a missing tensor as well: not the pruning case
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, narrow)
    assert "pruned" not in str(e.value)


def test_reading_a_safetensors_file_and_an_unreadable_pickle_say_which(tmp_path, monkeypatch):
    import math

    from dkdm.models.checkpoints import save_safetensors

    sd = _random_state(create_model("digits-student"))
    path = tmp_path / "ema_0.9999_000100.safetensors"
    save_safetensors(sd, str(path))
    with monkeypatch.context() as m:  # the safetensors library reads it (torch.load only can from torch 2.13 on)
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("a .safetensors file went to torch.load"))
        assert all(torch.equal(v, sd[k]) for k, v in read_state_dict(str(path)).items())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\); the save was interrupted"):
        read_state_dict(str(empty))
    # A pickled function is refused as an object; a text file, whose refusal also mentions weights_only, as damage.
    code = tmp_path / "function.pt"
    torch.save({"w": torch.zeros(1), "f": math.floor}, code)
    with pytest.raises(Exception) as refused:  # torch's own refusal, whatever its type
        torch.load(code, weights_only=True)
    first = str(refused.value).strip().splitlines()[0][:200]
    with pytest.raises(CheckpointError) as e:
        read_state_dict(str(code))
    assert f"contains Python objects other than tensors ({first}); re-save just its state dict" in str(e.value)
    text = tmp_path / "notes.pt"
    text.write_bytes(b"not a checkpoint\n" * 4)
    with pytest.raises(Exception) as refused:
        torch.load(text, weights_only=True)
    kind, first = type(refused.value).__name__, str(refused.value).strip().splitlines()[0][:200]
    with pytest.raises(CheckpointError) as e:
        read_state_dict(str(text))
    assert f"not a checkpoint ({kind}: {first}); re-download" in str(e.value)


def test_shapes_reveal_conditioning_channels_and_learned_sigma():
    from dkdm.models.checkpoints import _inferred_overrides

    unet = create_model("digits-teacher", class_cond=True, num_classes=7, learn_sigma=False).state_dict()
    assert _inferred_overrides(unet) == {"class_cond": True, "num_classes": 7, "in_channels": 1, "learn_sigma": False}
    half = {k: v for k, v in unet.items() if k != "out.2.weight"}  # both ends are needed for the channels
    assert _inferred_overrides(half) == {"class_cond": True, "num_classes": 7}
    kw = {"arch": "vit", "image_size": 8, "hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 2}
    for learn_sigma in (True, False):
        vit = create_model(ModelConfig(**kw, in_channels=3, learn_sigma=learn_sigma)).state_dict()
        assert _inferred_overrides(vit) == {"in_channels": 3, "learn_sigma": learn_sigma}
        alone = {k: v for k, v in vit.items() if k != "final_layer.linear.weight"}
        assert _inferred_overrides(alone) == {}
    assert _inferred_overrides({"x_embedder.proj.weight": torch.zeros(32, 3, 2, 2)}) == {}


def test_a_vits_label_table_is_read_with_a_null_row_first_and_the_other_reading_offered():
    from dkdm.models.checkpoints import suggest_architecture

    with torch.device("meta"):
        dit = create_model("dit-s2-256").state_dict()
        digits = create_model("digits-vit", class_cond=True, num_classes=10, class_dropout_prob=0.1).state_dict()
        cifar = create_model("cifar10-57M").state_dict()
    assert suggest_architecture(dit) == (
        "this looks like a ViT with hidden size 384, depth 12, patch size 2: try dit-s2-256 "
        "(or --num_classes 1001 --class_dropout_prob 0 if none of its 1001 label rows is a null class)"
    )
    assert suggest_architecture(digits) == (
        "this looks like a ViT with hidden size 128, depth 4, patch size 2: try digits-vit with --class_cond True "
        "--num_classes 10 --class_dropout_prob 0.1 "
        "(or --num_classes 11 --class_dropout_prob 0 if none of its 11 label rows is a null class)"
    )
    assert suggest_architecture(cifar) == (
        "this looks like 128 channels, 3 res blocks, channel_mult 1,2,2,2: try cifar10-57M (same tensors: imagenet32-57M)"
    )
    assert suggest_architecture({"w": torch.zeros(1)}) is None
    with torch.device("meta"):
        plain = create_model("digits-vit").state_dict()  # no label table: no other reading to offer
    assert (
        suggest_architecture(plain)
        == "this looks like a ViT with hidden size 128, depth 4, patch size 2: try digits-vit"
    )


def test_files_are_unpickled_safely_onto_the_cpu_whatever_torchs_default(tmp_path, monkeypatch):
    """torch < 2.6 (setup.py allows 2.1) defaults to unpickling anything; the reader never relies on the default."""
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "model000100.pt"
    torch.save(_random_state(create_model("digits-student")), path)
    read_state_dict(str(path))
    assert seen == {"map_location": "cpu", "weights_only": True}
