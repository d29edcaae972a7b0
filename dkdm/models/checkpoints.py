"""Reading checkpoints (ours and foreign) and loading them strictly, with errors a user can act on.

Formats understood by ``read_state_dict``:
  * plain state dicts: ours (``modelNNNNNN.pt``, ``ema_<rate>_NNNNNN.pt``), guided-diffusion,
    improved-diffusion, DDPM-IP, and DiT's released weights;
  * wrapped dicts such as DiT's training checkpoints ``{"model", "ema", "opt", "args"}``.
    The ``"ema"`` entry is taken when present, because the EMA weights are what DiT (and
    every diffusion codebase) samples and distils from; otherwise ``"model"``, then
    ``"state_dict"``. Pass ``key=`` to choose explicitly;
  * DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are stripped when
    every key carries them.
  * ``.safetensors`` files (the ``safetensors`` library; what ``--save_safetensors`` writes
    beside the ``.pt`` files).
Files are opened with ``torch.load(weights_only=True)`` or safetensors, so a checkpoint cannot run code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch
from torch import nn

_WRAPPER_KEYS = ("ema", "model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model; the message says what to do."""


def _abbreviate(items: list, limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _strip_prefixes(sd: dict) -> dict:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def unwrap_state_dict(obj: object, source: str = "checkpoint", key: str | None = None) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object (see the module docstring)."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{source}: has no entry '{key}' (it has: {have})")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not _is_state_dict(obj):
        for k in _WRAPPER_KEYS:
            if k in obj and _is_state_dict(obj[k]):
                obj = obj[k]
                break
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            what = f"a dict with entries {_abbreviate([str(k) for k in obj], 6)}" if obj else "an empty dict"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{source}: holds {what}, not model weights (a mapping of names to tensors); "
            "point to a model or EMA checkpoint (e.g. ema_0.9999_NNNNNN.pt), not an optimizer or pool file"
        )
    return _strip_prefixes(dict(obj))


def read_state_dict(path: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load the model weights of the checkpoint at ``path`` onto the CPU.

    Accepts the formats listed in the module docstring; ``key`` picks an entry of a
    wrapped checkpoint explicitly. A missing, empty, truncated, corrupted or
    non-checkpoint file raises ``CheckpointError`` naming the file and what to do.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}; check the path (and the run directory)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes); the save was interrupted, use another file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        # DiT's training checkpoints carry their argparse Namespace; allow just that.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        # A class or function in the pickle ("Unsupported global"); a damaged or foreign file fails on
        # an opcode instead ("Unsupported operand"), and both messages mention weights_only.
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"checkpoint file {path} contains Python objects other than tensors ({first}); "
                "re-save just its state dict (torch.save(model.state_dict(), path)) from a trusted source"
            ) from None
        raise CheckpointError(
            f"checkpoint file {path} ({os.path.getsize(path):,} bytes) cannot be read as a PyTorch "
            f"checkpoint: it is truncated, corrupted or not a checkpoint ({type(e).__name__}: {first}); "
            "re-download or re-copy it, or use an earlier checkpoint of the run"
        ) from None
    return unwrap_state_dict(obj, source=f"checkpoint file {path}", key=key)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path} is a safetensors file: pip install safetensors (the dev extra has it)") from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {path} ({os.path.getsize(path):,} bytes) cannot be read as safetensors "
            f"({type(e).__name__}: {str(e)[:200]}); re-copy it, or use an earlier checkpoint of the run"
        ) from None


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a model state dict as ``.safetensors`` (atomically; tensors made contiguous, on the CPU)."""
    from safetensors.torch import save

    from dkdm.fileio import atomic_write

    data = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    atomic_write(path, lambda f: f.write(data))


def _signature(sd: Mapping[str, torch.Tensor]) -> frozenset:
    return frozenset((k, tuple(v.shape)) for k, v in sd.items())


def _inferred_overrides(sd: Mapping[str, torch.Tensor]) -> dict:
    """Options readable from tensor shapes alone: class conditioning and learned sigma."""
    over: dict = {}
    if "label_emb.weight" in sd:  # UNet
        over.update(class_cond=True, num_classes=sd["label_emb.weight"].shape[0])
    if "input_blocks.0.0.weight" in sd and "out.2.weight" in sd:
        c_in, c_out = (
            sd["input_blocks.0.0.weight"].shape[1],
            sd["out.2.weight"].shape[0],
        )
        over.update(in_channels=c_in, learn_sigma=c_out == 2 * c_in)
    if "x_embedder.proj.weight" in sd and "final_layer.linear.weight" in sd:  # ViT
        c_in, p = (
            sd["x_embedder.proj.weight"].shape[1],
            sd["x_embedder.proj.weight"].shape[-1],
        )
        over.update(
            in_channels=c_in,
            learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * c_in * p * p,
        )
    return over


def suggest_architecture(sd: Mapping[str, torch.Tensor]) -> str | None:
    """A sentence naming the zoo architecture whose tensors match ``sd`` exactly, if any.

    Each zoo entry is built on the meta device (no memory) with the options the shapes
    reveal (class conditioning, learned sigma) and its (key, shape) set compared.
    """
    from .zoo import (  # zoo imports the networks; keep this module light
        ZOO,
        create_model,
    )

    target = _signature(sd)
    inferred = _inferred_overrides(sd)
    rows = sd["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" in sd else None
    found: list = []  # (name, description, extra flags, the other reading of a ViT's label table)
    for name, cfg in ZOO.items():
        v = inferred
        if rows is not None and cfg.arch == "vit":
            # DiT's label table has a null row for classifier-free guidance: 1001 rows are 1000 classes.
            v = {**inferred, "class_cond": True, "num_classes": rows - 1, "class_dropout_prob": 0.1}
        try:
            with torch.device("meta"):
                model = create_model(name, **v)
        except ValueError:
            continue
        if _signature(model.state_dict()) == target:
            c = model.config
            if c.arch == "unet":
                desc = f"{c.num_channels} channels, {c.num_res_blocks} res blocks, channel_mult {c.channel_mult}"
            else:
                desc = f"a ViT with hidden size {c.hidden_size}, depth {c.depth}, patch size {c.patch_size}"
            extra = "".join(f" --{k} {val}" for k, val in v.items() if getattr(cfg, k) != val)
            alt = ""
            if c.arch == "vit" and rows is not None:  # the same tensors, read without a null row
                alt = f" (or --num_classes {rows} --class_dropout_prob 0 if none of its {rows} label rows is a null class)"
            found.append((name, desc, extra, alt))
    if not found:
        return None
    name, desc, extra, alt = found[0]
    also = f" (same tensors: {', '.join(f[0] for f in found[1:])})" if len(found) > 1 else ""
    return f"this looks like {desc}: try {name}{' with' + extra if extra else ''}{alt}{also}"


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | Mapping[str, torch.Tensor],
    key: str | None = None,
) -> nn.Module:
    """Load weights into ``model`` strictly and return it.

    ``path_or_state_dict`` is a file (read with ``read_state_dict``) or a state dict. Any
    missing, unexpected or mis-shaped tensor raises one ``CheckpointError`` listing them
    (abbreviated) and, when the tensors match a zoo architecture, naming it. Nothing is
    ever dropped or partially loaded.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"checkpoint file {os.fspath(path_or_state_dict)}"
        sd = read_state_dict(os.fspath(path_or_state_dict), key=key)
    else:
        source = "the given state dict"
        sd = unwrap_state_dict(path_or_state_dict, source, key)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        name = getattr(getattr(model, "config", None), "name", "") or type(model).__name__
        lines = [
            (
                f"{source} does not fit the model '{name}': it has {len(sd)} tensors, the model expects "
                f"{len(own)}; {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped."
            )
        ]
        if missing:
            lines.append(f"  missing from the checkpoint: {_abbreviate(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint: {_abbreviate(unexpected)}")
        if shapes:
            lines.append(f"  mis-shaped: {_abbreviate(shapes, 5)}")
        hint = suggest_architecture(sd)
        if shapes and not missing and not unexpected and all(sd[k].numel() <= own[k].numel() for k in own):
            hint = (
                "the checkpoint's layers are narrower than the model's: it is a pruned network, which only the "
                "config saved with it rebuilds (its channel_widths, in the config.yaml scripts/compress.py writes beside it)"
            )
        lines.append(
            f"  {hint}"
            if hint
            else "  no zoo architecture matches these tensors; give the model flags it was trained with"
        )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
    return model
