"""The GPU path proven on a CPU: the steady-state DKDM step and the samplers never wait on the device.

On a GPU, a training step that reads a value back to the host (``.item()``, ``.tolist()``, a
Python ``if`` on a tensor), copies a tensor to the CPU, or computes a shape from data
(``nonzero``, a boolean mask) stalls until the device has finished all queued work. On this
CPU-only machine nothing stalls, so the test looks at the operators themselves: a
``TorchDispatchMode`` sees every aten op after autograd (``_local_scalar_dense`` is what
``item``/``float``/``bool`` become; ``nonzero``, ``masked_select``, ``unique``, index ops with a
boolean index have data-dependent output shapes) and a ``TorchFunctionMode`` sees the Python
calls that leave the device without any aten op on a CPU tensor (``.cpu()``, ``.numpy()``,
``.tolist()``, ``.to("cpu")``, which are no-ops here but device-to-host copies on a GPU; a move
to a ``torch.device`` object cannot be told from a no-op here and is not flagged).
Tensors that live on the host in a GPU run too (the foreach AdamW's step counters) are exempt.

Each case runs a warm-up step first (lazy state creation may look at values once), then
several steps -- through one on which the pool's timestep histogram is logged -- and fails
naming every offending operator. ``test_the_detector_sees_...`` shows it is not blind.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dkdm import logger
from dkdm.config import DistillConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.models import create_model
from dkdm.sampling import _Precision
from dkdm.training.compile import to_channels_last

T = 10

# Operators that read a device value on the host or size their output from data.
HOST_READS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::equal",
        "aten::allclose",
        "aten::nonzero",
        "aten::nonzero_numpy",
        "aten::argwhere",
        "aten::masked_select",
        "aten::unique",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::bincount",
        "aten::histc",
    }
)
INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
# Python-level calls whose whole purpose is to bring data to the host.
HOST_METHODS = {"cpu", "numpy", "tolist", "item", "__array__", "__float__", "__int__", "__bool__", "__index__"}


def _names_cpu(value) -> bool:
    # Only the spelled-out host: here every torch.device is the CPU, and ``x.to(other.device)``
    # (torch's own clipping does it) stays on the device in a GPU run. A ``torch.device("cpu")``
    # built in the hot path escapes this check; tests/test_pool.py covers it on CUDA.
    return isinstance(value, str) and value.split(":")[0] == "cpu"


class _DispatchSide(TorchDispatchMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        first = args[0] if args else None
        exempt = isinstance(first, torch.Tensor) and first.data_ptr() in self.owner.host
        if name in HOST_READS and not exempt:
            self.owner.seen.append(name)
        elif name in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self.owner.seen.append(f"{name} (boolean mask)")
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.owner.seen.append(f"{name} (no output_size)")
        return func(*args, **kwargs)


class _FunctionSide(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        this = args[0] if args else None
        exempt = isinstance(this, torch.Tensor) and this.data_ptr() in self.owner.host
        if isinstance(this, torch.Tensor) and not exempt:
            if name in HOST_METHODS:
                self.owner.seen.append(f"Tensor.{name}")
            elif name in ("to", "copy_", "_to") and (
                any(_names_cpu(a) for a in args[1:]) or _names_cpu(kwargs.get("device"))
            ):
                self.owner.seen.append(f"Tensor.{name}(cpu)")
        return func(*args, **kwargs)


class SyncDetector:
    """Context manager recording every host read, copy to the CPU or data-dependent shape.

    ``host_tensors`` are tensors that live on the host in a GPU run too; reading them is free.
    """

    def __init__(self, host_tensors=()):
        self.host = {t.data_ptr() for t in host_tensors}
        self.seen: list[str] = []
        self._modes = [_FunctionSide(self), _DispatchSide(self)]

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def _host_resident(opt):
    """The foreach AdamW's ``step`` counters stay on the CPU even for CUDA parameters (torch's design)."""
    return [
        st["step"]
        for st in opt.state.values()
        if "step" in st and st["step"].device.type == "cpu" and not opt.defaults.get("fused")
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # output layers start at zero; a teacher must say something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _unet(seed=0, **kw):
    torch.manual_seed(seed)
    m = create_model(
        "digits-student",
        **{
            "num_res_blocks": 1,
            "attention_resolutions": "4",
            "dropout": 0.0,
            "channel_mult": "1,2",
            "num_channels": 32,
            **kw,
        },
    )
    return _perturbed(m, seed)


def _vit(seed=1, **kw):
    torch.manual_seed(seed)
    return create_model("digits-vit", hidden_size=32, depth=2, num_heads=2, **kw)


def _loop(tmp_path, teacher, student, class_cond=False, **overrides):
    train_kw = {"batch_size": 8, "lr": 1e-3, "max_steps": 100, "log_interval": 3, "save_interval": 0}
    train_kw.update({"ema_rate": "0.99,0.9", "grad_clip": 1.0, "seed": 0, "log_dir": str(tmp_path)})
    distill_kw = {"rho": 0.2, "teacher_batch": 32, "pool_cache_dir": ""}
    for k, v in overrides.items():
        (train_kw if k in TrainConfig.__dataclass_fields__ else distill_kw)[k] = v
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    logger.configure(str(tmp_path), format_strs=["log"])
    loop = DistillLoop(
        teacher,
        student,
        d,
        d,
        train=TrainConfig(**train_kw),
        distill=DistillConfig(**distill_kw),
        run_dir=str(tmp_path),
    )
    loop.pool.prepared = True  # its contents do not change which operators a step runs
    return loop


def _steady_state_reads(loop, steps=3):
    """Host reads in ``steps`` DKDM steps after one warm-up step (the logger accumulating, no dump)."""
    trainer = loop.trainer
    trainer.run_step(loop.next_batch, loop.loss_fn)
    with SyncDetector(_host_resident(trainer.opt)) as det:
        for _ in range(steps):
            trainer.run_step(loop.next_batch, loop.loss_fn)
    trainer.dump_logs()  # the dump is where the one host copy belongs; it must still work
    return det.seen


# (student precision, teacher precision): fp16 runs the GradScaler and the fused AdamW.
PRECISIONS = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "bf16")]


@pytest.mark.parametrize(("precision", "teacher_precision"), PRECISIONS)
def test_the_dkdm_step_never_waits_on_the_device(tmp_path, precision, teacher_precision):
    """UNet teacher -> ViT student: draw, gather, teacher, pool update, loss, backward, AdamW, EMA, logging."""
    loop = _loop(tmp_path, _unet(), _vit(), precision=precision, teacher_precision=teacher_precision, microbatch=4)
    before = [p.detach().clone() for p in loop.trainer.params]
    t_before = loop.pool.t.clone()
    assert _steady_state_reads(loop) == []
    # The steps really ran in that precision and changed the student and the pool.
    assert any(not torch.equal(a, b) for a, b in zip(before, loop.trainer.params))
    assert not torch.equal(t_before, loop.pool.t)
    assert (
        loop.trainer.precision.mode == precision
        and loop.teacher_dtype
        == {
            "fp32": None,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
        }[teacher_precision]
    )
    if precision == "fp16":
        assert loop.trainer.precision.scaler.is_enabled() and loop.trainer.opt.defaults["fused"]


@pytest.mark.parametrize("variant", ["dynamic", "shuffled", "iterative"])
def test_class_conditional_unet_student_and_every_pool_variant(tmp_path, variant):
    """Labels in the pool (redrawn on restart), a UNet student, and the ablation's pool variants."""
    teacher = _unet(class_cond=True, num_classes=10)
    student = _unet(seed=3, class_cond=True, num_classes=10, num_channels=32, attention_resolutions="")
    loop = _loop(tmp_path, teacher, student, class_cond=True, pool=variant, discard_prob=0.3)
    assert loop.pool.y is not None
    assert _steady_state_reads(loop, steps=2) == []


def _sampling_reads(diffusion, model, loop_name, precision, **kw):
    net = _Precision(model, precision)
    shape = (2, 1, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), SyncDetector() as det:
        out = getattr(diffusion, loop_name)(net, shape, noise=noise, clip_denoised=True, **kw)
    assert out.shape == shape and torch.isfinite(out).all()
    return det.seen


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    ("loop_name", "respacing", "extra"),
    [("p_sample_loop", "", {}), ("p_sample_loop", "5", {}), ("ddim_sample_loop", "ddim5", {"eta": 0.5})],
)
def test_the_sampling_loops_never_wait_on_the_device(loop_name, respacing, extra, precision):
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, timestep_respacing=respacing)
    model = _unet(image_size=8)
    assert _sampling_reads(d, model.eval(), loop_name, precision, **extra) == []


def test_the_detector_sees_every_kind_of_host_read(tmp_path):
    """Not blind: each sync-forcing idiom is named, and one inside the DKDM step fails the step."""
    x = torch.randn(6)
    idioms = {
        "aten::_local_scalar_dense": lambda: x.sum().item(),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.cpu": lambda: x.cpu(),
        "Tensor.numpy": lambda: x.numpy(),
        "Tensor.to(cpu)": lambda: x.to("cpu"),
        "aten::nonzero": lambda: (x > 0).nonzero(),
        "aten::index (boolean mask)": lambda: x[x > 0],
        "aten::masked_select": lambda: x.masked_select(x > 0),
        "Tensor.__bool__": lambda: bool(x.sum() > 0),
    }
    for want, idiom in idioms.items():
        with SyncDetector() as det:
            idiom()
        assert want in det.seen, (want, det.seen)
    with SyncDetector() as det:  # fixed-shape on-device equivalents are fine
        torch.where(x > 0, x, torch.zeros_like(x)).sum()
        x.index_select(0, torch.tensor([0, 2]))
    assert det.seen == []

    loop = _loop(tmp_path, _unet(), _vit())
    real = loop.loss_fn

    def loss_fn_with_a_read(model, micro):
        loss, terms = real(model, micro)
        loss.detach().item()  # the wart: a log line's value read in the step
        return loss, terms

    trainer = loop.trainer
    trainer.run_step(loop.next_batch, loss_fn_with_a_read)
    with SyncDetector(_host_resident(trainer.opt)) as det:
        trainer.run_step(loop.next_batch, loss_fn_with_a_read)
    assert "aten::_local_scalar_dense" in det.seen


def test_winograd_steps_and_loops_never_wait_on_the_device(tmp_path, monkeypatch):
    """``--teacher_winograd --winograd`` (CPU only, but the same rule): the Winograd forward, its
    backward and the filter transforms' cache keys add no host read to a step or a sampling loop."""
    from dkdm.models import winograd
    from dkdm.models.winograd import Winograd3x3, _WinogradGrad, use_winograd

    applied, inferred = [], []
    real, real_call = _WinogradGrad.apply, Winograd3x3.__call__
    monkeypatch.setattr(_WinogradGrad, "apply", lambda x, *a: applied.append(1) or real(x, *a))
    monkeypatch.setattr(Winograd3x3, "__call__", lambda self, x: inferred.append(1) or real_call(self, x))
    student = _unet(seed=3, num_channels=32, attention_resolutions="")
    loop = _loop(tmp_path, _unet(), student, batch_size=16, teacher_winograd=True, winograd=True)
    assert _steady_state_reads(loop) == [] and applied and inferred  # 16 images of 8x8: 64 tiles
    model = _unet(image_size=8).eval()
    assert use_winograd(model) > 0
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, timestep_respacing="ddim5")
    inferred.clear()
    monkeypatch.setattr(winograd, "MIN_TILES", 1)  # the loop's 2 images of 8x8 (8 tiles) take the path too
    assert _sampling_reads(d, model, "ddim_sample_loop", "fp32") == [] and inferred


def test_channels_last_steps_and_loops_never_wait_on_the_device(tmp_path, monkeypatch):
    """``--teacher_channels_last --channels_last``: the attention blocks' token-major path (its
    norm, products over the tokens and strided heads) adds no host read to a step or a loop."""
    from dkdm.models.unet import AttentionBlock

    seen = []
    real = AttentionBlock._forward_tokens
    monkeypatch.setattr(AttentionBlock, "_forward_tokens", lambda self, x: seen.append(1) or real(self, x))
    loop = _loop(tmp_path, _unet(), _unet(seed=3), teacher_channels_last=True, channels_last=True)
    assert _steady_state_reads(loop) == [] and seen
    model = to_channels_last(_unet(image_size=8).eval())
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, timestep_respacing="5")
    seen.clear()
    assert _sampling_reads(d, model, "p_sample_loop", "fp32") == [] and seen
