"""Structural pruning of the zoo's UNet with torch-pruning, and pruned networks rebuilt from their config.

:func:`prune` removes output channels (and everything coupled to them: the next layers'
inputs, norms, skips, concatenations, the timestep-embedding projections) with
``torch_pruning.MetaPruner`` and its first-order Taylor importance ``|w * dL/dw|``, summed
over the coupled layers of each group; the gradients are whatever the caller accumulated
(Diff-Pruning's timestep-thresholded denoising loss: :mod:`dkdm.distill.compress`). The
final output convolution keeps its channels. Attention keeps its heads: its residual
channels are pruned (norm, qkv input, projection output) but not its qkv width.

GroupNorm: torch-pruning keeps a norm's group count; a norm whose groups held one channel
each (an 8x8 digits UNet's 32-channel layers) is pruned freely and keeps one channel per
group, so the kept channels are normalised exactly as before; other norms get the largest
group count not above the old one that divides their new width.

A pruned network is an ordinary ``ModelConfig`` whose ``channel_widths`` lists, for every
layer whose shape changed, ``name:out,in`` (convolutions, linears), ``name:channels,groups``
(norms) or ``name:rows,dim`` (embeddings), separated by ``;``. ``create_model`` builds the
unpruned network and narrows those layers (:func:`apply_widths`), so the state dict loads
strictly; without its config a pruned checkpoint does not fit (``load_checkpoint`` says so).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .layers import GroupNorm32
from .unet import AttentionBlock, UNetModel

__all__ = ["apply_widths", "parameter_count", "parse_widths", "prune", "widths_spec"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- the width spec


def _dims(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, _CONV):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_groups
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def widths_spec(model: nn.Module, base: nn.Module) -> str:
    """``channel_widths`` of ``model`` relative to ``base`` (the unpruned build of the same config)."""
    own = dict(model.named_modules())
    entries = []
    for name, module in base.named_modules():
        dims = _dims(module)
        if dims is None:
            continue
        new = _dims(own[name])
        if new != dims:
            entries.append(f"{name}:{new[0]},{new[1]}")
    return ";".join(entries)


def parse_widths(spec: str) -> dict[str, tuple[int, int]]:
    """``channel_widths`` text to ``{layer name: (a, b)}``; malformed text raises ``ValueError``."""
    out = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        name, _, dims = entry.partition(":")
        try:
            a, b = (int(v) for v in dims.split(","))
        except ValueError:
            raise ValueError(f"channel_widths entry {entry!r} is not name:int,int") from None
        out[name] = (a, b)
    return out


def _resized(module: nn.Module, a: int, b: int) -> nn.Module:
    if isinstance(module, _CONV):
        return type(module)(
            b,
            a,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=module.bias is not None,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(b, a, bias=module.bias is not None)
    if isinstance(module, nn.GroupNorm):
        return type(module)(b, a, eps=module.eps, affine=module.affine)
    if isinstance(module, nn.Embedding):
        return nn.Embedding(a, b)
    raise ValueError(f"channel_widths cannot resize a {type(module).__name__}")


def apply_widths(model: nn.Module, spec: str) -> nn.Module:
    """Narrow ``model``'s layers in place as ``spec`` (``channel_widths``) says; return it.

    New layers are freshly initialised: load the pruned state dict afterwards. An entry
    naming no layer of ``model`` raises ``ValueError``.
    """
    for name, (a, b) in parse_widths(spec).items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = parent.get_submodule(child)
        except AttributeError:
            raise ValueError(
                f"channel_widths names {name}, which this network does not have; the widths belong to "
                "another architecture (use the config saved with the pruned checkpoint unchanged)"
            ) from None
        setattr(parent, child, _resized(old, a, b))
    return model


# --------------------------------------------------------------------------- torch-pruning glue


def _tp():
    try:
        import torch_pruning
    except ImportError:
        raise ImportError("pruning needs torch-pruning: pip install torch-pruning (or the compress extra)") from None
    return torch_pruning


def _keep(n: int, idxs) -> torch.Tensor:
    drop = {int(i) for i in idxs}
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


def _pruners():
    tp = _tp()

    class AttentionPruner(tp.pruner.function.BasePruningFunc):
        """An attention block's residual channels: norm, qkv input and projection output (heads kept)."""

        def prune_out_channels(self, layer: AttentionBlock, idxs):
            k = _keep(layer.channels, idxs)
            layer.norm.weight, layer.norm.bias = _param(layer.norm.weight[k]), _param(layer.norm.bias[k])
            layer.norm.num_groups = _groups(layer.channels, layer.norm.num_groups, len(k))
            layer.norm.num_channels = len(k)
            layer.qkv.weight = _param(layer.qkv.weight[:, k])
            layer.qkv.in_channels = len(k)
            layer.proj_out.weight, layer.proj_out.bias = (
                _param(layer.proj_out.weight[k]),
                _param(layer.proj_out.bias[k]),
            )
            layer.proj_out.out_channels = len(k)
            layer.channels = len(k)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.channels

        get_in_channels = get_out_channels

    class NormPruner(tp.pruner.function.BasePruningFunc):
        """GroupNorm pruned channel by channel; its group count is fixed afterwards (see the module doc)."""

        def prune_out_channels(self, layer: nn.GroupNorm, idxs):
            k = _keep(layer.num_channels, idxs)
            layer.num_groups = _groups(layer.num_channels, layer.num_groups, len(k))
            layer.num_channels = len(k)
            layer.weight, layer.bias = _param(layer.weight[k]), _param(layer.bias[k])
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.num_channels

        get_in_channels = get_out_channels

    return {AttentionBlock: AttentionPruner(), GroupNorm32: NormPruner()}


def _groups(old_channels: int, old_groups: int, new_channels: int) -> int:
    """Group count after pruning: one channel per group stays so; else the largest divisor <= the old count."""
    if old_groups == old_channels:
        return new_channels
    return max(d for d in range(1, min(old_groups, new_channels) + 1) if new_channels % d == 0)


def prune(
    model: nn.Module,
    ratio: float,
    accumulate: Callable[[nn.Module], None],
    example_inputs: tuple[torch.Tensor, ...],
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Prune a copy of ``model`` (a zoo UNet) by ``ratio`` of its channels; return config and state dict.

    ``accumulate(copy)`` must fill the copy's ``.grad`` (it is called once, after the grads
    are zeroed); the Taylor importance of each coupled channel group is computed from them.
    ``ratio`` in (0, 1) is torch-pruning's per-group channel ratio (the parameter count falls
    roughly by ``1 - (1 - ratio)^2``). ``example_inputs`` (``(x, t)``) trace the network.
    ``create_model(config)`` rebuilds the result and loads the state dict strictly.
    """
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise ValueError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    if not isinstance(model, UNetModel):
        raise TypeError(f"pruning supports the zoo's UNet, not {type(model).__name__} (for a ViT, remove blocks)")
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("the network carries no .config (ModelConfig); build it with dkdm.models.create_model")
    if cfg.channel_widths:
        raise ValueError("the network is already pruned; prune its unpruned teacher with a larger ratio instead")
    tp = _tp()
    net = copy.deepcopy(model).float().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.MetaPruner(
        net,
        example_inputs=example_inputs,
        importance=tp.importance.TaylorImportance(),
        pruning_ratio=ratio,
        ignored_layers=[net.out[2]],
        customized_pruners=_pruners(),
        # Convolutions root the groups, so a residual block's hidden width is counted in its own
        # channels; rooted at the timestep projection (scale and shift for each channel, 2x wide)
        # the ratio would apply to twice the width and prune erratically. The embedding MLP stays.
        root_module_types=list(_CONV),
    )
    net.zero_grad(set_to_none=True)
    accumulate(net)
    if all(p.grad is None for p in net.parameters()):
        raise ValueError("accumulate() left no gradients; it must call backward() on a loss of the network")
    pruner.step()
    net.zero_grad(set_to_none=True)
    from .zoo import create_model

    with torch.device("meta"):
        base = create_model(cfg)
    new_cfg = dataclasses.replace(
        cfg, name=f"{cfg.name or 'unet'}-pruned{round(100 * ratio)}", channel_widths=widths_spec(net, base)
    )
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    rebuilt = create_model(new_cfg)  # the config alone must rebuild it
    from .checkpoints import load_checkpoint

    load_checkpoint(rebuilt, sd)
    return new_cfg, sd


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the (possibly pruned) network ``cfg`` describes."""
    from .zoo import create_model

    with torch.device("meta"):
        return sum(p.numel() for p in create_model(cfg).parameters())
