"""The trainer in one process: EMA, microbatches, precision, lr anneal, checkpoints, faults."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dkdm import logger
from dkdm.config import ConfigError, TrainConfig, load_yaml
from dkdm.fileio import TMP_MARK
from dkdm.training import (
    Precision,
    Trainer,
    atomic_save,
    find_resume_checkpoint,
    parse_ema_rates,
)
from dkdm.training import checkpoint as ckpt


class Tiny(nn.Module):
    """A two-layer net with a buffer, standing in for a diffusion model."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 4)
        self.register_buffer("counter", torch.zeros(()))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Pool:
    """Per-rank extra state: a tensor that changes every step, as the distillation pool does."""

    def __init__(self):
        self.x = torch.zeros(3)

    def state_dict(self):
        return {"x": self.x.clone()}

    def load_state_dict(self, state):
        self.x = state["x"].clone()


class Stream:
    """An endless, resumable data stream: batch k is a pure function of k."""

    def __init__(self, batch=8):
        self.k, self.batch = 0, batch

    def __call__(self):
        g = torch.Generator().manual_seed(1000 + self.k)
        self.k += 1
        return {"x": torch.randn(self.batch, 4, generator=g)}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def noisy_loss(model, batch):
    # Global-RNG noise, like diffusion.training_losses: resume must restore the generator.
    x = batch["x"]
    noise = torch.randn_like(x)
    per = ((model(x + 0.1 * noise) - x) ** 2).mean(dim=1)
    return per.mean(), {"loss": per, "mse": per}


def plain_loss(model, batch):
    per = ((model(batch["x"]) - batch["x"]) ** 2).mean(dim=1)
    return per.mean(), {"loss": per}


def make(tmp_path, name="run", model=None, pool=None, stream=None, **kw):
    defaults = {
        "lr": 1e-2,
        "batch_size": 8,
        "ema_rate": "0.9,0.5",
        "log_interval": 2,
        "save_interval": 2,
        "max_steps": 6,
    }
    cfg = TrainConfig(**{**defaults, **kw})
    torch.manual_seed(0)
    model = model or Tiny()
    extra = {"pool": pool} if pool is not None else {}
    loop = {"data": stream} if stream is not None else {}
    run_dir = str(tmp_path / name)
    logger.configure(run_dir, format_strs=["log", "csv"])
    return Trainer(model, cfg=cfg, run_dir=run_dir, config_to_save={"train": cfg}, extra_state=extra, loop_state=loop)


@pytest.fixture(autouse=True)
def _reset_logger():
    yield
    logger.reset()


def run_pool_training(tmp_path, name, **kw):
    pool, stream = Pool(), Stream()
    tr = make(tmp_path, name, pool=pool, stream=stream, **kw)

    def next_batch():
        pool.x += torch.randn(3)  # extra state that evolves with the RNG
        return stream()

    tr.run(next_batch, noisy_loss)
    return tr, pool


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_parse_ema_rates():
    assert parse_ema_rates("0.9999,0.999") == ["0.9999", "0.999"]
    assert parse_ema_rates("") == []
    assert parse_ema_rates("0") == ["0"]  # rate 0: the EMA is the live weights, allowed
    for bad, words in (("1.5", r"in \[0, 1\)"), ("1.0", r"in \[0, 1\)"), ("abc", "not a number"), ("0.9,0.9", "twice")):
        with pytest.raises(ValueError, match=words):
            parse_ema_rates(bad)


def test_ema_follows_the_recurrence(tmp_path):
    tr = make(tmp_path, max_steps=3, save_interval=0)
    expected = {r: [p.detach().clone() for p in tr.params] for r in tr.ema_rates}
    stream = Stream()
    for _ in range(3):
        tr.run_step(stream, plain_loss)
        for r in tr.ema_rates:
            d = float(r)
            expected[r] = [d * e + (1 - d) * p.detach() for e, p in zip(expected[r], tr.params)]
    for r in tr.ema_rates:
        for e, got in zip(expected[r], tr.ema[r]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-7)
    # The two rates really differ and are not the live weights.
    assert not torch.allclose(tr.ema["0.9"][0], tr.ema["0.5"][0])
    assert not torch.allclose(tr.ema["0.5"][0], tr.params[0])


def test_microbatches_give_the_full_batch_gradient(tmp_path):
    batch = Stream()()
    full = make(tmp_path, "full", max_steps=1)
    micro = make(tmp_path, "micro", microbatch=3)  # 3 + 3 + 2: uneven on purpose
    calls = []

    def counting_loss(model, b):
        calls.append(b["x"].shape[0])
        return plain_loss(model, b)

    full.run_step(lambda: batch, plain_loss)
    micro.run_step(lambda: batch, counting_loss)
    assert calls == [3, 3, 2]
    for p, q in zip(full.params, micro.params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(full.params[0], make(tmp_path, "fresh").params[0])


def test_microbatch_gradients_are_the_full_batch_mean_gradient(tmp_path):
    """The accumulated gradient itself (Adam's step hides a constant factor on every microbatch's loss):
    each microbatch's mean loss weighted by its share n / b, per-sample 1-D entries sliced with it."""
    x = Stream()()["x"]
    weight = torch.linspace(0.5, 2.0, 8)  # a per-sample [B] entry, as DKDM's t

    def weighted_loss(model, b):
        per = b["weight"] * ((model(b["x"]) - b["x"]) ** 2).mean(dim=1)
        return per.mean(), {"loss": per}

    torch.manual_seed(0)
    ref = Tiny()
    weighted_loss(ref, {"x": x, "weight": weight})[0].backward()
    for micro in (0, 3, 5):
        tr = make(tmp_path, f"m{micro}", microbatch=micro, max_steps=1)
        tr.run_step(lambda: {"x": x, "weight": weight}, weighted_loss)
        for p, q in zip(ref.parameters(), tr.model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_precision_modes_loss_scale_and_its_state():
    from dkdm.training.precision import Precision, growth_interval_from_rate

    # guided-diffusion's fp16_scale_growth (added to log2 scale per good step) as GradScaler's interval.
    assert [growth_interval_from_rate(r) for r in (1e-3, 1.0, 0.4, 0.0, -1.0)] == [1000, 1, 2, 2000, 2000]
    assert Precision("fp16", "cpu").scaler.get_growth_interval() == 2000  # GradScaler's, guided-diffusion's 1e-3
    assert Precision("fp16", "cpu", growth_interval=7).scaler.get_growth_interval() == 7
    fp32, fp16, bf16 = (Precision(m, "cpu") for m in ("fp32", "fp16", "bf16"))
    assert (fp32.dtype, fp16.dtype, bf16.dtype) == (torch.float32, torch.float16, torch.bfloat16)
    assert fp32.loss_scale() == 1.0 and bf16.loss_scale() == 1.0 and fp16.loss_scale() == 2.0**20
    fp16.scaler.scale(torch.ones(()))  # the scale tensor exists once something was scaled
    fp16.scaler.update(new_scale=1024.0)
    state = fp16.state_dict()
    resumed = Precision("fp16", "cpu")
    resumed.load_state_dict(state)
    assert resumed.loss_scale() == 1024.0
    for foreign in ({**state, "mode": "bf16"}, {"mode": "fp16", "scaler": {}}):  # another mode's, or none: ignored
        fresh = Precision("fp16", "cpu")
        fresh.load_state_dict(foreign)
        assert fresh.loss_scale() == 2.0**20


def test_lr_anneal_and_stop(tmp_path):
    tr = make(tmp_path, lr=0.1, lr_anneal_steps=4, max_steps=0, save_interval=0)
    seen = []
    stream = Stream()

    def loss_fn(model, b):
        seen.append(tr.current_lr())
        return plain_loss(model, b)

    assert tr.run(stream, loss_fn) == 4
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert os.path.isfile(ckpt.opt_path(tr.run_dir, 4))  # saved at the end
    tr2 = make(tmp_path, "b", lr_anneal_steps=10, max_steps=3, save_interval=0)
    assert tr2.run(Stream(), plain_loss) == 3


def test_grad_clip_scales_to_max_norm():
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    prec = Precision("fp32", torch.device("cpu"))
    (model(torch.randn(8, 4)) * 100).sum().backward()
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    norm = prec.unscale_and_clip(opt, list(model.parameters()), 0.5)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm == pytest.approx(before.item())
    assert before > 1.0 and after == pytest.approx(0.5, rel=1e-4)


def test_fp16_skips_overflowing_steps_and_shrinks_the_scale(tmp_path):
    tr = make(tmp_path, precision="fp16", ema_rate="")
    scale = tr.precision.loss_scale()
    before = [p.detach().clone() for p in tr.params]

    def overflow(model, b):
        out = model(b["x"])
        assert out.dtype == torch.float16  # autocast is on
        per = (out.float() * 1e30).pow(2).mean(dim=1)  # gradients overflow once scaled
        return per.mean(), {"loss": torch.zeros_like(per)}

    tr.run_step(Stream(), overflow)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.params)), "overflowing step must be skipped"
    assert tr.precision.loss_scale() == scale / 2
    # The scale keeps halving until the gradients fit fp16, then steps are taken.
    for _ in range(30):
        tr.run_step(Stream(), plain_loss)
        if not torch.equal(before[0], tr.params[0]):
            break
    assert not torch.equal(before[0], tr.params[0])
    assert torch.isfinite(tr.params[0]).all()
    assert all(p.dtype == torch.float32 for p in tr.params)  # fp32 master weights


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator that reads a tensor's value back to the host (``.item()`` and friends)."""

    READS = frozenset(
        {
            "aten::_local_scalar_dense",
            "aten::nonzero",
            "aten::masked_select",
            "aten::unique",
            "aten::_unique2",
            "aten::equal",
            "aten::is_nonzero",
        }
    )

    def __init__(self, host_tensors=()):
        super().__init__()
        self.seen = []
        self.host = {t.data_ptr() for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS and not (
            args and getattr(args[0], "data_ptr", None) and args[0].data_ptr() in self.host
        ):
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _host_resident(opt):
    """The foreach AdamW keeps its ``step`` counters on the CPU even for CUDA parameters (torch's
    design), so reading them costs no device sync; on this CPU-only machine they are the only
    tensors whose reads are not a device-to-host wait on a GPU."""
    return [
        st["step"]
        for st in opt.state.values()
        if "step" in st and st["step"].device.type == "cpu" and not opt.defaults.get("fused")
    ]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_training_step_reads_nothing_back_to_the_host(tmp_path, precision):
    """fp16 included: the fused AdamW takes GradScaler's overflow flag on the device."""
    tr = make(tmp_path, precision=precision, grad_clip=1.0, ema_rate="0.9")
    stream = Stream()
    tr.run_step(stream, noisy_loss)  # warm-up: lazy state creation may look at values once
    with _HostReads(_host_resident(tr.opt)) as reads:
        for _ in range(3):
            tr.run_step(stream, noisy_loss)
    assert reads.seen == [], reads.seen
    # The detector is not blind: GradScaler with the foreach AdamW reads found_inf with .item().
    if precision == "fp16":
        tr.opt = torch.optim.AdamW(tr.params, lr=1e-3, fused=False)
        tr.run_step(stream, noisy_loss)
        with _HostReads(_host_resident(tr.opt)) as reads:
            tr.run_step(stream, noisy_loss)
        assert "aten::_local_scalar_dense" in reads.seen


def test_fused_adamw_matches_the_foreach_one():
    """The fp16 path's fused AdamW computes the same update (to float rounding) as the default one."""
    torch.manual_seed(0)
    params = {k: [torch.randn(64, 32, requires_grad=True) for _ in range(2)] for k in ("fused", "foreach")}
    for a, b in zip(params["fused"], params["foreach"]):
        b.data.copy_(a.data)
    opts = {
        k: torch.optim.AdamW(v, lr=1e-2, weight_decay=0.01, fused=(k == "fused") or None) for k, v in params.items()
    }
    for step in range(20):
        grads = [torch.randn(64, 32, generator=torch.Generator().manual_seed(step * 10 + i)) for i in range(2)]
        for k, opt in opts.items():
            for p, g in zip(params[k], grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params["fused"], params["foreach"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, params["fused"][0] * 0)  # they moved


def test_bf16_autocast_trains(tmp_path):
    tr = make(tmp_path, precision="bf16")
    before = tr.params[0].detach().clone()
    dtypes = []

    def loss_fn(model, b):
        out = model(b["x"])
        dtypes.append(out.dtype)
        per = ((out.float() - b["x"]) ** 2).mean(dim=1)
        return per.mean(), {"loss": per}

    tr.run_step(Stream(), loss_fn)
    assert dtypes == [torch.bfloat16]
    assert not torch.equal(before, tr.params[0])
    with pytest.raises(ValueError, match="precision"):
        make(tmp_path, precision="fp8")


def test_checkpoint_layout_and_logs(tmp_path):
    tr, _ = run_pool_training(tmp_path, "run", max_steps=4)
    d = tr.run_dir
    names = set(os.listdir(d))
    for step in (2, 4):
        for f in (
            f"model{step:06d}.pt",
            f"ema_0.9_{step:06d}.pt",
            f"ema_0.5_{step:06d}.pt",
            f"opt{step:06d}.pt",
            f"pool{step:06d}.pt",
        ):
            assert f in names, f
    assert {"config.yaml", "log.txt", "progress.csv"} <= names
    assert not [n for n in names if n.startswith(".")], "no temporary files left"
    assert load_yaml(os.path.join(d, "config.yaml"))["train"]["ema_rate"] == "0.9,0.5"
    # Model and EMA files are plain state dicts that load strictly into the bare network.
    sd = torch.load(os.path.join(d, "model000004.pt"), weights_only=True)
    assert_same_state(sd, {k: v.cpu() for k, v in tr.model.state_dict().items()})
    fresh = Tiny()
    fresh.load_state_dict(torch.load(os.path.join(d, "ema_0.9_000004.pt"), weights_only=True), strict=True)
    torch.testing.assert_close(fresh.a.weight, tr.ema["0.9"][0])
    state = ckpt.load_file(os.path.join(d, "opt000004.pt"))
    assert state["step"] == 4 and state["samples"] == 32 and len(state["rank_states"]) == 1
    assert state["rank_states"][0]["loop"]["data"] == {"k": 4}
    assert state["config"]["train"]["max_steps"] == 4
    import csv

    with open(os.path.join(d, "progress.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for key in ("loss", "mse", "grad_norm", "param_norm", "lr", "samples", "step_time"):
        assert float(rows[-1][key]) == float(rows[-1][key]), key  # present and not NaN
    assert find_resume_checkpoint(d) == os.path.join(d, "model000004.pt")


def test_resume_is_bitwise_exact(tmp_path):
    straight, straight_pool = run_pool_training(tmp_path, "straight", max_steps=6)
    run_pool_training(tmp_path, "split", max_steps=4)  # stops right after its save at 4
    resumed, resumed_pool = run_pool_training(tmp_path, "split", max_steps=6)  # auto-resume from 4
    assert resumed.step == 6
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    for r in straight.ema_rates:
        assert all(torch.equal(a, b) for a, b in zip(straight.ema[r], resumed.ema[r]))
    assert torch.equal(straight_pool.x, resumed_pool.x)
    a, b = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    for i in a:
        assert_same_state(a[i], b[i])


def test_explicit_resume_checkpoint_into_another_dir(tmp_path):
    first, _ = run_pool_training(tmp_path, "first", max_steps=4)
    path = os.path.join(first.run_dir, "model000002.pt")
    tr = make(tmp_path, "second", pool=Pool(), stream=Stream(), max_steps=4, resume_checkpoint=path)
    assert tr.step == 2
    # The weights of step 2, not of step 4.
    sd = torch.load(path, weights_only=True)
    assert torch.equal(tr.model.a.weight, sd["a.weight"])
    tr.run(Stream(), noisy_loss)  # trains steps 3 and 4 in "second", saves at 4
    # Relaunching the same command (after a crash, say) continues from "second"'s own newest save.
    again = make(tmp_path, "second", pool=Pool(), stream=Stream(), max_steps=6, resume_checkpoint=path)
    assert again.step == 4
    # Naming a checkpoint inside the run directory rolls back to it.
    back = make(tmp_path, "first", pool=Pool(), stream=Stream(), max_steps=6, resume_checkpoint=path)
    assert back.step == 2
    # A checkpoint without optimizer file resumes weights and step only.
    os.remove(os.path.join(first.run_dir, "opt000002.pt"))
    tr = make(tmp_path, "third", max_steps=4, resume_checkpoint=path)
    assert tr.step == 2 and torch.equal(tr.model.a.weight, sd["a.weight"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make(tmp_path, "fourth", resume_checkpoint=str(tmp_path / "nope" / "model000001.pt"))


def test_auto_resume_skips_incomplete_checkpoints(tmp_path):
    tr, _ = run_pool_training(tmp_path, "run", max_steps=4)
    os.remove(ckpt.opt_path(tr.run_dir, 4))  # as if killed before the marker was written
    assert find_resume_checkpoint(tr.run_dir) == ckpt.model_path(tr.run_dir, 2)
    again = make(tmp_path, "run", pool=Pool(), stream=Stream(), max_steps=4)
    assert again.step == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = make(tmp_path, max_steps=10, log_interval=3, save_interval=4)
    stream = Stream()

    def loss_fn(model, b):
        loss, terms = plain_loss(model, b)
        if tr.step == 4:  # the fifth step
            loss = loss * float("nan")
        return loss, terms

    saved = {}
    orig_save = tr.save

    def save_and_snapshot():
        orig_save()
        for f in os.listdir(tr.run_dir):
            if f.endswith(".pt"):
                saved[f] = read_bytes(os.path.join(tr.run_dir, f))

    tr.save = save_and_snapshot
    with pytest.raises(FloatingPointError, match="step 5") as err:
        tr.run(stream, loss_fn)
    assert "model000004.pt" in str(err.value)
    assert tr.step == 6  # noticed at the log of step 6, before anything was written
    files = {f for f in os.listdir(tr.run_dir) if f.endswith(".pt")}
    assert files == {"model000004.pt", "ema_0.9_000004.pt", "ema_0.5_000004.pt", "opt000004.pt"}
    for f in files:
        assert read_bytes(os.path.join(tr.run_dir, f)) == saved[f]


def test_nan_loss_at_the_first_step_is_caught_before_any_save(tmp_path):
    tr = make(tmp_path, max_steps=4, log_interval=2, save_interval=2)

    def loss_fn(model, b):
        loss, terms = plain_loss(model, b)
        return (loss * float("nan") if tr.step == 0 else loss), terms

    with pytest.raises(FloatingPointError, match=r"step 1\b.*none was written"):
        tr.run(Stream(), loss_fn)
    assert not [f for f in os.listdir(tr.run_dir) if f.endswith(".pt")]


def test_failed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    tr = make(tmp_path, pool=Pool(), stream=Stream(), max_steps=4)
    stream = Stream()
    tr.run_step(stream, noisy_loss)
    tr.run_step(stream, noisy_loss)
    tr.save()
    before = {f: read_bytes(os.path.join(tr.run_dir, f)) for f in os.listdir(tr.run_dir) if f.endswith(".pt")}
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # model and pool written, the first EMA fails half-way
            f.write(b"partial bytes")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    tr.run_step(stream, noisy_loss)
    tr.run_step(stream, noisy_loss)
    with pytest.raises(
        OSError, match="disk full while writing .*ema.*checkpoint of step 4 is incomplete.*step 2.* is intact"
    ):
        tr.save()
    monkeypatch.setattr(torch, "save", real_save)
    names = os.listdir(tr.run_dir)
    assert not [n for n in names if n.startswith(".")], "temporary file removed"
    assert "opt000004.pt" not in names
    for f, data in before.items():
        assert read_bytes(os.path.join(tr.run_dir, f)) == data
    assert find_resume_checkpoint(tr.run_dir) == ckpt.model_path(tr.run_dir, 2)
    again = make(tmp_path, pool=Pool(), stream=Stream(), max_steps=4)
    assert again.step == 2
    assert torch.equal(again.model.a.weight, torch.load(ckpt.model_path(tr.run_dir, 2))["a.weight"])


def test_atomic_save_replaces_or_keeps(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    atomic_save({"v": 1}, path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]


def test_stale_temporaries_are_removed_and_bad_files_named(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    (d / f".model000002.pt{TMP_MARK}{int(dead.stdout)}").write_bytes(b"junk")
    (d / "opt000002.pt").write_bytes(b"junk")
    make(tmp_path, "run", max_steps=2, resume_checkpoint="")  # opt without model: not complete
    assert not [n for n in os.listdir(d) if n.startswith(".")]
    with pytest.raises(ValueError, match="opt000002.pt"):
        ckpt.load_file(str(d / "opt000002.pt"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_step_never_waits_for_the_host(tmp_path, precision, on_cuda):
    tr = make(tmp_path, precision=precision, grad_clip=1.0)
    batch = {"x": torch.randn(8, 4, device="cuda")}
    tr.run_step(lambda: batch, noisy_loss)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tr.run_step(lambda: batch, noisy_loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tr.step == 4


def test_the_trainers_adamw_is_the_fused_kernel_with_the_for_loops_update():
    """make_adamw (every trainer's optimiser) makes the same updates as torch's for-loop AdamW, to
    float32 rounding, weight decay included; and it is the fused kernel (one pass per tensor)."""
    from dkdm.training.trainer import make_adamw

    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(33, 7)), nn.Parameter(torch.randn(5))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    start = [p.detach().clone() for p in a]
    fused = make_adamw(a, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for params, opt in ((a, fused), (b, loop)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q, p0 in zip(a, b, start):
        assert (p - p0).abs().mean() > 5e-3  # they moved (Adam steps are about lr each)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        # The fused kernel alone leaves the version counters where they were; caches keyed on
        # them (the Winograd layers' filter transforms) must see each step.
        assert p._version == 5


# --------------------------------------------------------------------------- the trainer's contract
# What a run directory records and refuses, what is logged, what a batch may hold. Each test
# here came from a mutation-testing survivor of dkdm/training/trainer.py (mutation_trainer.md).


def _log_text(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return f.read()


def _csv_rows(run_dir):
    import csv

    with open(os.path.join(run_dir, "progress.csv")) as f:
        return list(csv.DictReader(f))


def _rewrite_opt(path, edit):
    state = ckpt.load_file(path)
    edit(state)
    torch.save(state, path)


def test_resume_refuses_a_changed_config_and_records_the_allowed_changes(tmp_path):
    tr = make(tmp_path, max_steps=2)
    tr.run(Stream(), plain_loss)
    d = tr.run_dir
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 there, 0\.02 now") as e:
        make(tmp_path, max_steps=2, lr=2e-2)
    assert "max_steps" in str(e.value) and "--log_dir" in str(e.value)
    # back to the field's default is a change too (not mistaken for a field the file lacks)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 there, 0\.0001 now"):
        make(tmp_path, max_steps=2, lr=TrainConfig().lr)
    assert load_yaml(os.path.join(d, "config.yaml"))["train"]["lr"] == 0.01
    assert make(tmp_path, max_steps=4).step == 2  # a change that is allowed
    assert load_yaml(os.path.join(d, "config.yaml"))["train"]["max_steps"] == 4
    assert load_yaml(os.path.join(d, "config.step000002.yaml"))["train"]["max_steps"] == 2
    assert (
        "resuming at step 2 with train.max_steps 2 -> 4; the previous config is kept as config.step000002.yaml"
        in _log_text(d)
    )
    make(tmp_path, max_steps=5)  # another change at the same step keeps both earlier files
    assert load_yaml(os.path.join(d, "config.step000002.1.yaml"))["train"]["max_steps"] == 4
    make(tmp_path, max_steps=6)
    assert load_yaml(os.path.join(d, "config.step000002.2.yaml"))["train"]["max_steps"] == 5
    make(tmp_path, max_steps=6)  # no change: nothing more is kept
    assert sorted(n for n in os.listdir(d) if n.startswith("config")) == [
        "config.step000002.1.yaml",
        "config.step000002.2.yaml",
        "config.step000002.yaml",
        "config.yaml",
    ]


def test_a_field_the_saved_config_lacks_counts_as_changed_only_off_its_default(tmp_path):
    tr = make(tmp_path, max_steps=2)
    tr.run(Stream(), plain_loss)
    path = os.path.join(tr.run_dir, "config.yaml")
    saved = load_yaml(path)
    del saved["train"]["grad_clip"]  # as written by a version before the field existed
    from dkdm.config import dump_yaml

    dump_yaml(saved, path)
    assert make(tmp_path, max_steps=2).step == 2  # grad_clip at its default: the same run
    assert not [n for n in os.listdir(tr.run_dir) if n.startswith("config.step")]
    dump_yaml(saved, path)
    with pytest.raises(ConfigError, match=r"train\.grad_clip: None there, 1\.0 now"):
        make(tmp_path, max_steps=2, grad_clip=1.0)
    # a field after the missing one (keys are compared in order) is still checked
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 there, 0\.02 now"):
        make(tmp_path, max_steps=2, lr=2e-2)


def test_a_config_group_without_defaults_counts_every_missing_field_as_changed(tmp_path):
    def build(extra):
        cfg = TrainConfig(lr=1e-2, batch_size=8, ema_rate="", max_steps=2)
        run_dir = str(tmp_path / "run")
        logger.configure(run_dir, format_strs=["log"])
        groups = {"train": cfg, "data": {"path": "a", **extra}}  # a plain dict: no defaults to compare with
        return Trainer(Tiny(), cfg=cfg, run_dir=run_dir, config_to_save=groups)

    build({}).run(Stream(), plain_loss)
    with pytest.raises(ConfigError, match=r"data\.labels: None there, 'y' now"):
        build({"labels": "y"})


def test_config_is_checked_only_against_a_run_being_continued(tmp_path):
    # A directory with a config but no checkpoint (stopped before its first save) starts afresh.
    make(tmp_path, "fresh", max_steps=2)
    tr = make(tmp_path, "fresh", max_steps=2, lr=2e-2)
    assert tr.step == 0 and load_yaml(os.path.join(tr.run_dir, "config.yaml"))["train"]["lr"] == 0.02
    # Starting from another run's checkpoint (fine-tuning) may change anything.
    first = make(tmp_path, "first", max_steps=2)
    first.run(Stream(), plain_loss)
    other = make(tmp_path, "tuned", max_steps=4, lr=3e-2, resume_checkpoint=ckpt.model_path(first.run_dir, 2))
    assert other.step == 2


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import json
    import socket

    from dkdm import fileio

    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / fileio.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "x"}))
        with pytest.raises(fileio.RunDirectoryLocked, match=f"in use by process {holder.pid}"):
            make(tmp_path, "run")
        assert sorted(os.listdir(d)) == sorted([fileio.LOCK_NAME, "log.txt"])  # nothing written
    finally:
        holder.kill()
        holder.wait()
    make(tmp_path, "run")
    assert f"removed a stale lock of process {holder.pid} (no longer running)" in _log_text(str(d))


def test_resume_without_optimizer_state_reseeds_by_step_and_says_so(tmp_path):
    fresh = make(tmp_path, "fresh", seed=5)
    state = torch.get_rng_state()
    ckpt.seed_all(5)
    assert torch.equal(state, torch.get_rng_state()) and fresh.step == 0
    first = make(tmp_path, "first", max_steps=2, seed=5)
    first.run(Stream(), plain_loss)
    os.remove(ckpt.opt_path(first.run_dir, 2))
    tr = make(tmp_path, "second", max_steps=4, seed=5, resume_checkpoint=ckpt.model_path(first.run_dir, 2))
    state = torch.get_rng_state()
    ckpt.seed_all(5 + 1_000_003 * 2)  # not step 0's stream again
    assert torch.equal(state, torch.get_rng_state()) and tr.step == 2
    assert "no opt000002.pt: optimizer, RNG and data stream start afresh at step 2" in _log_text(tr.run_dir)


def test_resume_reads_samples_and_rank_states_and_checks_the_ema_files(tmp_path):
    first = make(tmp_path, "first", max_steps=2)
    first.run(Stream(), plain_loss)
    d = first.run_dir
    state = ckpt.load_file(ckpt.opt_path(d, 2))
    assert (state["format"], state["ema_rates"], state["extra_state"], state["world_size"]) == (
        1,
        ["0.9", "0.5"],
        [],
        1,
    )
    assert first.samples == 16 and isinstance(first.samples, int)
    resumed = make(tmp_path, "first", max_steps=4)
    assert resumed.samples == 16
    resumed.run_step(Stream(), lambda model, batch: (model(batch["x"]).sum() * float("nan"), {}))
    with pytest.raises(FloatingPointError, match=r"at step 3; .*last good checkpoint: .*model000002\.pt"):
        resumed.dump_logs()
    _rewrite_opt(ckpt.opt_path(d, 2), lambda s: s.pop("samples"))  # written before the count existed
    assert make(tmp_path, "first", max_steps=4).samples == 0
    _rewrite_opt(ckpt.opt_path(d, 2), lambda s: s.pop("rank_states"))
    make(tmp_path, "first", max_steps=4)
    assert "the checkpoint was written by 0 processes, this run has 1" in _log_text(d)
    ema = ckpt.ema_path(d, "0.9", 2)
    sd = torch.load(ema, weights_only=True)
    torch.save({k: v.half() for k, v in sd.items()}, ema)  # a converted file: the EMA stays fp32
    tr = make(tmp_path, "first", max_steps=4)
    assert all(p.dtype == torch.float32 for p in tr.ema["0.9"])
    torch.testing.assert_close(tr.ema["0.9"][0], sd["a.weight"].half().float())
    torch.save({k: v for k, v in sd.items() if k != "b.bias"}, ema)
    with pytest.raises(ValueError, match=r"ema_0\.9_000002\.pt lacks 1 parameters, e\.g\. b\.bias"):
        make(tmp_path, "first", max_steps=4)


class _Odd:
    """State that needs more than tensors and plain data to unpickle (weights_only refuses it)."""

    def __init__(self, value):
        self.value = value


class OddStream(Stream):
    def state_dict(self):
        return {"k": self.k, "odd": _Odd(1)}


class OddPool(Pool):
    def state_dict(self):
        return {"x": self.x.clone(), "odd": _Odd(2)}


@pytest.mark.parametrize("odd", ["opt", "pool"])
def test_trust_checkpoints_lets_resume_read_state_beyond_plain_data(tmp_path, odd):
    from dkdm.training.checkpoint import UntrustedFileError

    pool, stream = (Pool(), OddStream()) if odd == "opt" else (OddPool(), Stream())
    make(tmp_path, pool=pool, stream=stream, max_steps=2).run(stream, plain_loss)
    with pytest.raises(UntrustedFileError, match=rf"{odd}000002\.pt holds .*--trust_checkpoints"):
        make(tmp_path, pool=Pool(), stream=Stream(), max_steps=4)
    assert make(tmp_path, pool=Pool(), stream=Stream(), max_steps=4, trust_checkpoints=True).step == 2


def test_step_time_is_the_wall_time_per_step_between_dumps(tmp_path, monkeypatch):
    import types

    from dkdm.training import trainer as trainer_module

    clock = [100.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    tr = make(tmp_path, max_steps=6, log_interval=3, save_interval=0)
    stream = Stream()

    def next_batch():
        clock[0] += 1.5  # every step takes 1.5 s
        return stream()

    tr.run(next_batch, plain_loss)
    rows = _csv_rows(tr.run_dir)
    assert [(int(r["step"]), float(r["step_time"])) for r in rows] == [(3, 1.5), (6, 1.5)]
    tr = make(tmp_path, "every", max_steps=2, log_interval=1, save_interval=0)
    tr.run(next_batch, plain_loss)
    assert [float(r["step_time"]) for r in _csv_rows(tr.run_dir)] == [1.5, 1.5]


def test_every_step_logs_and_saves_at_interval_one_and_interval_zero_means_never(tmp_path):
    tr = make(tmp_path, "every", max_steps=3, log_interval=1, save_interval=1)
    tr.run(Stream(), plain_loss)
    assert [int(r["step"]) for r in _csv_rows(tr.run_dir)] == [1, 2, 3]
    assert all(os.path.isfile(ckpt.opt_path(tr.run_dir, s)) for s in (1, 2, 3))
    tr = make(tmp_path, "never", max_steps=3, log_interval=0, save_interval=0)
    tr.run(Stream(), plain_loss)  # one dump and one save, at the end
    assert [int(r["step"]) for r in _csv_rows(tr.run_dir)] == [3]
    assert sorted(n for n in os.listdir(tr.run_dir) if n.startswith("opt")) == ["opt000003.pt"]


def test_a_finished_run_relaunched_says_so_and_writes_nothing(tmp_path):
    make(tmp_path, max_steps=1).run(Stream(), plain_loss)
    d = str(tmp_path / "run")
    before = sorted(os.listdir(d))
    tr = make(tmp_path, max_steps=1)
    assert tr.run(Stream(), plain_loss) == 1
    assert "already finished at step 1 (max_steps 1" in _log_text(d)
    assert sorted(os.listdir(d)) == before


def test_logged_terms_quartiles_and_the_loss_column(tmp_path):
    import types

    def with_t(model, batch):
        per = ((model(batch["x"]) - batch["x"]) ** 2).mean(dim=1)
        t = torch.arange(per.shape[0]) * 12  # 0..84 of 100 steps: every quartile
        return per.mean(), {"loss": per, "t": t}

    run_dir = str(tmp_path / "q")
    logger.configure(run_dir, format_strs=["log", "csv"])
    cfg = TrainConfig(lr=1e-2, batch_size=8, ema_rate="", log_interval=1, max_steps=1)
    tr = Trainer(Tiny(), types.SimpleNamespace(num_timesteps=100), cfg=cfg, run_dir=run_dir)
    tr.run(Stream(), with_t)
    row = _csv_rows(run_dir)[0]
    assert {"loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"} <= set(row) and "t" not in row
    # without the diffusion's step count: plain means, and still no "t" column
    run_dir = str(tmp_path / "plain")
    logger.configure(run_dir, format_strs=["log", "csv"])
    Trainer(Tiny(), cfg=cfg, run_dir=run_dir).run(Stream(), with_t)
    row = _csv_rows(run_dir)[0]
    assert "loss" in row and "t" not in row and "loss_q0" not in row

    def doubled(model, batch):  # the objective's scalar and the terms it reports differ
        per = ((model(batch["x"]) - batch["x"]) ** 2).mean(dim=1)
        return 2 * per.mean(), {"loss": per}

    def no_loss_term(model, batch):
        per = ((model(batch["x"]) - batch["x"]) ** 2).mean(dim=1)
        return 2 * per.mean(), {"mse": per}

    def first_row(name, fn):
        run_dir = str(tmp_path / name)
        logger.configure(run_dir, format_strs=["log", "csv"])
        torch.manual_seed(0)
        Trainer(Tiny(), cfg=cfg, run_dir=run_dir).run(Stream(), fn)
        return _csv_rows(run_dir)[0]

    reference = float(first_row("reference", plain_loss)["loss"])
    # a "loss" term is what the column shows, not the objective's scalar (twice it here)
    assert float(first_row("doubled", doubled)["loss"]) == pytest.approx(reference, rel=1e-6)
    row = first_row("scalar", no_loss_term)  # no "loss" term: the column is the scalar
    assert float(row["loss"]) == pytest.approx(2 * float(row["mse"]), rel=1e-6)


def test_fp16_logs_its_loss_scale_with_the_configured_growth(tmp_path):
    tr = make(tmp_path, "fp16", precision="fp16", fp16_scale_growth=0.01, max_steps=1, log_interval=1)
    assert tr.precision.scaler.get_growth_interval() == 100
    tr.run(Stream(), plain_loss)
    assert float(_csv_rows(tr.run_dir)[0]["loss_scale"]) == tr.precision.loss_scale() <= 2.0**20
    tr = make(tmp_path, "fp32", max_steps=1, log_interval=1)
    tr.run(Stream(), plain_loss)
    assert "loss_scale" not in _csv_rows(tr.run_dir)[0]


def test_batches_may_hold_scalars_and_are_split_into_microbatches(tmp_path):
    seen = []

    def loss_fn(model, batch):
        seen.append((batch["x"].shape[0], batch["w"], batch["scale"]))
        return plain_loss(model, batch)

    stream = Stream()

    def next_batch():
        return {**stream(), "w": torch.tensor(0.5), "scale": 3.0}  # a 0-dim tensor and a number pass whole

    tr = make(tmp_path, "mb4", microbatch=4, max_steps=1)
    tr.run(next_batch, loss_fn)
    assert [(n, float(w), s) for n, w, s in seen] == [(4, 0.5, 3.0), (4, 0.5, 3.0)]
    seen.clear()
    make(tmp_path, "mb1", microbatch=1, max_steps=1).run(next_batch, loss_fn)
    assert [n for n, _, _ in seen] == [1] * 8
    tr = make(tmp_path, "bad", max_steps=1)
    with pytest.raises(ValueError, match=r"sharing their first dimension, got sizes \[6, 8\]"):
        tr.run_step(lambda: {**stream(), "y": torch.zeros(6, dtype=torch.long)}, plain_loss)


def test_constructor_checks_extra_state_names_precision_of_weights_and_saved_config(tmp_path):
    for bad in ("model", "opt", "ema_pool", "not-a-name"):
        with pytest.raises(ValueError, match=f"extra_state name '{bad}' must be an identifier"):
            Trainer(Tiny(), cfg=TrainConfig(batch_size=8), run_dir=str(tmp_path / "names"), extra_state={bad: Pool()})
    run_dir = str(tmp_path / "half")
    logger.configure(run_dir, format_strs=["log"])
    tr = Trainer(Tiny().half(), cfg=TrainConfig(batch_size=8), run_dir=run_dir)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert "not all fp32; converting" in _log_text(run_dir)
    fp32 = make(tmp_path, "fp32")
    assert "not all fp32" not in _log_text(fp32.run_dir)
    # config_to_save: the train group by default, every group given otherwise
    run_dir = str(tmp_path / "default_cfg")
    Trainer(Tiny(), cfg=TrainConfig(batch_size=8, lr=0.5), run_dir=run_dir)
    assert load_yaml(os.path.join(run_dir, "config.yaml"))["train"]["lr"] == 0.5
    run_dir = str(tmp_path / "groups")
    cfg = TrainConfig(batch_size=8)
    Trainer(Tiny(), cfg=cfg, run_dir=run_dir, config_to_save={"train": cfg, "model": {"arch": "tiny"}})
    assert load_yaml(os.path.join(run_dir, "config.yaml"))["model"] == {"arch": "tiny"}


def test_a_failed_save_keeps_the_errno_and_names_the_last_complete_checkpoint(tmp_path, monkeypatch):
    import errno

    from dkdm.fileio import DiskFullError

    def full(*a, **k):
        raise DiskFullError(errno.ENOSPC, "disk full while writing x")

    tr = make(tmp_path, max_steps=4)
    monkeypatch.setattr(ckpt, "atomic_save", full)
    with pytest.raises(DiskFullError, match=r"last complete checkpoint \(none yet\)") as e:
        tr.save()
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    tr.save()  # step 0 saved (an explicit save before training)
    monkeypatch.setattr(ckpt, "atomic_save", full)
    tr.step = 1
    with pytest.raises(DiskFullError, match=r"last complete checkpoint \(step 0\) is intact"):
        tr.save()
    monkeypatch.undo()
    tr.run_step(Stream(), lambda model, batch: (model(batch["x"]).sum() * float("nan"), {}))
    with pytest.raises(FloatingPointError, match=r"at step 2; .*last good checkpoint: .*model000000\.pt"):
        tr.dump_logs()


def test_batches_from_stream_checks_the_first_batch_and_moves_every_entry():
    from dkdm.training import batches_from_stream

    def stream(shape):
        while True:
            yield torch.zeros(2, *shape), {"y": torch.tensor([1, 2])}

    nb = batches_from_stream(stream((1, 4, 4)), torch.device("cpu"), expect=(1, 4, 4))
    b = nb()
    assert set(b) == {"x", "y"} and b["x"].shape == (2, 1, 4, 4) and b["y"].tolist() == [1, 2]
    nb = batches_from_stream(stream((3, 4, 4)), torch.device("cpu"), expect=(1, 4, 4))
    with pytest.raises(ValueError, match=r"images of shape \(3, 4, 4\) \(C, H, W\) but the model expects \(1, 4, 4\)"):
        nb()
    assert batches_from_stream(stream((3, 4, 4)), torch.device("cpu"))()["x"].shape == (2, 3, 4, 4)  # no check


def test_diffusion_loss_fn_weights_the_terms_and_feeds_the_sampler():
    from dkdm.training import diffusion_loss_fn

    calls = {}

    class Sampler:
        def sample(self, n, device):
            calls["sample"] = (n, device)
            return torch.tensor([3, 7]), torch.tensor([2.0, 0.5])

        def update_with_local_losses(self, t, losses):
            calls["update"] = (t.tolist(), losses.tolist())

    class Diffusion:
        def training_losses(self, model, x, t, model_kwargs=None):
            calls["kwargs"] = model_kwargs
            return {"loss": torch.tensor([1.0, 4.0]), "mse": torch.tensor([1.0, 2.0])}

    loss, terms = diffusion_loss_fn(Diffusion(), Sampler())(None, {"x": torch.zeros(2, 1), "y": torch.tensor([5, 6])})
    assert calls["sample"] == (2, torch.device("cpu"))
    assert list(calls["kwargs"]) == ["y"] and calls["kwargs"]["y"].tolist() == [5, 6]
    assert calls["update"] == ([3, 7], [1.0, 4.0])  # the unweighted losses
    assert terms["loss"].tolist() == [2.0, 2.0] and terms["mse"].tolist() == [2.0, 1.0]
    assert terms["t"].tolist() == [3, 7] and float(loss) == 2.0
