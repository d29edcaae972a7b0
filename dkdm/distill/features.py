"""Feature distillation from the teacher call the DKDM step already makes (BK-SDM's feature KD).

Forward hooks on named stages of the teacher and the student record their outputs: the
teacher's during the one teacher forward of :meth:`DistillLoop.next_batch` (no extra call),
the student's during the objective's student forward. The loss adds
``weight * mean over stages of mean_flat((student - teacher)^2)`` per sample to the DKDM
objective (BK-SDM's "output + feature KD", with ``L*_simple + L*_vlb`` as the output term).

Stage names (:func:`stages` lists a network's): for the UNet ``down{L}`` (output of level
``L``'s last residual block on the way down, before its downsampler), ``mid`` (the middle
block, when there is one) and ``up{L}`` (output of level ``L``'s last block on the way up,
after its upsampler); for the ViT ``block{K}``. Shapes must match: there is no learned
projection, because its weights would have to live in the student's state dict (or beside
it in the optimizer and checkpoints). A student cut from its teacher
(:mod:`dkdm.models.compress`) has the teacher's stage widths; another student is refused
with the two shapes named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from dkdm.diffusion.losses import mean_flat
from dkdm.models.compress import unet_layout
from dkdm.models.unet import UNetModel
from dkdm.models.vit import ViT

__all__ = ["FeatureKD", "stages"]

PREFIX = "teacher_feat."


def stages(model: nn.Module) -> dict[str, nn.Module]:
    """A network's named stages (see the module docstring), in forward order."""
    model = getattr(model, "module", model)  # DDP
    if isinstance(model, ViT):
        return {f"block{k}": b for k, b in enumerate(model.blocks)}
    if not isinstance(model, UNetModel):
        return {}
    down, up = unet_layout(model.level_res_blocks)
    out: dict[str, nn.Module] = {}
    for level, n in enumerate(model.level_res_blocks):
        out[f"down{level}"] = model.input_blocks[down.index(("res", level, n - 1))]
    if len(model.middle_block):
        out["mid"] = model.middle_block
    for level in reversed(range(len(model.level_res_blocks))):
        last = max(k for k, (_, lv, _) in enumerate(up) if lv == level)
        out[f"up{level}"] = model.output_blocks[last]
    return out


class FeatureKD:
    """Hooks on ``layers`` of ``teacher`` and ``student`` and the weighted feature MSE.

    ``layers`` is a list (or comma-separated string) of stage names; empty means every stage
    both networks have. An unknown name raises ``ValueError`` listing the available ones.
    Call :meth:`remove` to take the hooks off.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[str] | str, weight: float) -> None:
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        if weight <= 0:
            raise ValueError(f"feature KD weight must be positive, got {weight} (0 turns feature KD off)")
        t_stages, s_stages = stages(teacher), stages(student)
        names = list(layers) or [n for n in t_stages if n in s_stages]
        for who, have in (("teacher", t_stages), ("student", s_stages)):
            bad = [n for n in names if n not in have]
            if bad:
                raise ValueError(
                    f"feature KD layer(s) {', '.join(bad)} not in the {who}; available: "
                    f"{', '.join(have) or 'none (only the zoo UNet and ViT have named stages)'}"
                )
        if not names:
            raise ValueError("feature KD: teacher and student share no stage; name the layers with feature_kd_layers")
        self.layers = names
        self.weight = float(weight)
        self._capture_teacher = False
        self._teacher: dict[str, Tensor] = {}
        self._student: dict[str, Tensor] = {}
        self._handles = []
        for n in names:
            self._handles.append(t_stages[n].register_forward_hook(self._hook(self._teacher, n, teacher=True)))
            self._handles.append(s_stages[n].register_forward_hook(self._hook(self._student, n, teacher=False)))

    def _hook(self, store: dict[str, Tensor], name: str, teacher: bool):
        def hook(module: nn.Module, args, output: Tensor) -> None:
            if teacher and not self._capture_teacher:
                return
            store[name] = output.detach().float() if teacher else output

        return hook

    @contextlib.contextmanager
    def teacher_call(self) -> Iterator[None]:
        """Record the teacher's stage outputs during the enclosed (single) teacher forward."""
        self._teacher.clear()
        self._capture_teacher = True
        try:
            yield
        finally:
            self._capture_teacher = False

    def teacher_targets(self) -> dict[str, Tensor]:
        """The recorded teacher features as batch entries (``teacher_feat.<stage>``)."""
        missing = [n for n in self.layers if n not in self._teacher]
        if missing:
            raise RuntimeError(f"the teacher forward did not reach stage(s) {', '.join(missing)}")
        return {PREFIX + n: self._teacher[n] for n in self.layers}

    def terms(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-sample feature MSE (mean over the stages) of the student's last forward against ``batch``."""
        total = None
        for n in self.layers:
            s, t = self._student.pop(n, None), batch[PREFIX + n]
            if s is None:
                raise RuntimeError(f"the student forward did not reach stage {n}")
            if s.shape != t.shape:
                raise ValueError(
                    f"feature KD stage {n}: the student's output {tuple(s.shape[1:])} differs from the teacher's "
                    f"{tuple(t.shape[1:])}; feature KD needs equal shapes (a student cut from the teacher by "
                    "dkdm.models.compress has them); choose other feature_kd_layers or set feature_kd_weight 0"
                )
            term = mean_flat((s.float() - t) ** 2)
            total = term if total is None else total + term
        return total / len(self.layers)

    def remove(self) -> None:
        """Take the hooks off both networks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
