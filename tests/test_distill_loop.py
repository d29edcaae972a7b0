"""The distillation loop on the shared trainer: learning, one teacher call per step, exact resume."""

import glob
import os

import pytest
import torch

from dkdm import logger
from dkdm.config import DistillConfig, ModelConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.distill.objective import ObjectiveError
from dkdm.models import create_model

T = 20


pytestmark = pytest.mark.usefixtures("one_thread")


class GaussTeacherNet(torch.nn.Module):
    """The Bayes-optimal network for data ~ N(0, 0.25 I): epsilon linear in x_t, mid-range variance."""

    def __init__(self, diffusion):
        super().__init__()
        self.register_buffer("abar", torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32))
        self.config = ModelConfig(arch="unet", image_size=8, in_channels=1, learn_sigma=True)

    def forward(self, x, t, y=None):
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * 0.25 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(x)], 1)


def tiny_teacher(seed=0, arch="vit"):
    torch.manual_seed(seed)
    if arch == "vit":
        m = create_model("digits-vit", hidden_size=64, depth=2, num_heads=4)
    else:
        m = create_model("digits-student", num_res_blocks=1, attention_resolutions="", dropout=0.0, channel_mult="1")
    with torch.no_grad():  # output layers start at zero; a teacher must say something
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def tiny_student(seed=1):
    torch.manual_seed(seed)
    return create_model("digits-vit", hidden_size=32, depth=2, num_heads=2)


def make_loop(run_dir, teacher=None, student=None, steps=T, teacher_key="", **overrides):
    train_kw = {
        "batch_size": 16,
        "lr": 1e-3,
        "max_steps": 10,
        "log_interval": 5,
        "save_interval": 0,
        "ema_rate": "0.99",
        "seed": 0,
        "log_dir": str(run_dir),
    }
    distill_kw = {"rho": 0.5, "teacher_batch": 64, "pool_cache_dir": str(run_dir / "cache")}
    for k, v in overrides.items():
        (train_kw if k in TrainConfig.__dataclass_fields__ else distill_kw)[k] = v
    d = create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=True)
    logger.configure(str(run_dir), format_strs=["log", "csv"])
    return DistillLoop(
        teacher if teacher is not None else tiny_teacher(),
        student if student is not None else tiny_student(),
        d,
        d,
        train=TrainConfig(**train_kw),
        distill=DistillConfig(**distill_kw),
        run_dir=str(run_dir),
        teacher_key=teacher_key,
    )


def _eps_mse(loop, x, t):
    with torch.no_grad():
        s = loop.trainer.model(x, t)[:, :1]
        te = loop.teacher_forward(x, t)[:, :1]
    return ((s - te) ** 2).mean().item()


def test_student_mse_to_teacher_falls_by_half(tmp_path):
    d = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    loop = make_loop(tmp_path, teacher=GaussTeacherNet(d), max_steps=300, log_interval=100)
    loop.prepare_pool(progress=False)
    g = torch.Generator().manual_seed(5)
    idx = torch.randperm(loop.pool.size, generator=g)[:128]
    x, t = loop.pool.x[idx].clone(), loop.pool.t[idx].clone()
    before = _eps_mse(loop, x, t)
    assert before > 1e-3
    loop.run(progress=False)
    after = _eps_mse(loop, x, t)
    assert after < 0.5 * before, (before, after)
    with open(tmp_path / "progress.csv") as f:
        header = f.readline().strip().split(",")
    for key in ("loss", "mse", "vb", "mse_q0", "vb_q3", "pool_t_q0", "pool_t_q3", "teacher_ms", "student_ms"):
        assert key in header, key


def test_one_teacher_call_per_step_feeds_target_and_pool(tmp_path):
    loop = make_loop(tmp_path)
    loop.prepare_pool(progress=False)
    calls = []
    real = loop.teacher.forward

    def counting(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    loop.teacher.forward = counting
    x0, t0 = loop.pool.x.clone(), loop.pool.t.clone()
    batch = loop.next_batch()
    assert len(calls) == 1
    assert torch.equal(batch["teacher_out"], calls[0])
    changed = (loop.pool.t != t0).nonzero().flatten()
    assert changed.numel() == 16  # exactly the drawn batch advanced
    # The batch holds the samples before the step; the pool holds them after it.
    assert torch.equal(torch.sort(batch["t"]).values, torch.sort(t0[changed]).values)
    assert not torch.equal(loop.pool.x[changed], x0[changed])


def test_discard_runs_the_teacher_more_often(tmp_path):
    loop = make_loop(tmp_path, discard_prob=0.5)
    loop.prepare_pool(progress=False)
    n = 0
    real = loop.teacher.forward

    def counting(*a, **k):
        nonlocal n
        n += 1
        return real(*a, **k)

    loop.teacher.forward = counting
    for _ in range(40):
        loop.next_batch()
    assert 60 < n < 110  # about 1 / (1 - p) = 2 teacher batches per student batch


def _files(d):
    return {os.path.basename(p): torch.load(p, weights_only=False) for p in glob.glob(str(d / "*000010*.pt"))}


def _assert_same(a, b, where):
    """Every tensor, number and string of two checkpoint files equal (recursively)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy arrays of generator states
        assert a.dtype == b.dtype and (a == b).all(), where
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_exact_resume_including_the_pool(tmp_path, precision):
    """A run stopped at step 5 and resumed ends with every file of step 10 equal to a straight run's."""
    teacher = tiny_teacher()
    kw = {"save_interval": 5, "precision": precision}
    straight = make_loop(tmp_path / "a", teacher=teacher, student=tiny_student(), max_steps=10, **kw)
    straight.run(progress=False)

    first = make_loop(tmp_path / "b", teacher=teacher, student=tiny_student(), max_steps=5, **kw)
    first.run(progress=False)
    resumed = make_loop(tmp_path / "b", teacher=teacher, student=tiny_student(seed=7), max_steps=10, **kw)
    assert resumed.trainer.step == 5 and resumed.pool.prepared
    resumed.run(progress=False)

    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(a) == set(b) == {"model000010.pt", "ema_0.99_000010.pt", "pool000010.pt", "opt000010.pt"}
    for name in a:
        if name == "opt000010.pt":  # the saved config names the run's own directories
            for key in ("log_dir", "pool_cache_dir"):
                for group in ("train", "distill"):
                    a[name]["config"].get(group, {}).pop(key, None)
                    b[name]["config"].get(group, {}).pop(key, None)
        _assert_same(a[name], b[name], name)
    if precision == "fp16":  # the loss scaler really ran and its state was resumed, not reset
        scale = a["opt000010.pt"]["precision"]["scaler"]["scale"]
        assert a["opt000010.pt"]["precision"]["mode"] == "fp16" and float(scale) > 0
    model = a["model000010.pt"]
    assert all(v.dtype == torch.float32 for v in model.values() if v.is_floating_point())  # fp32 master weights


def test_pool_cache_shared_by_runs(tmp_path):
    teacher = tiny_teacher()
    one = make_loop(tmp_path / "one", teacher=teacher, pool_cache_dir=str(tmp_path / "cache"))
    one.prepare_pool(progress=False)
    two = make_loop(tmp_path / "two", teacher=teacher, pool_cache_dir=str(tmp_path / "cache"))
    two.prepare_pool(progress=False)
    assert two.pool.prep_stats == {"cached": 1.0}
    assert torch.equal(one.pool.x, two.pool.x)


def test_mismatched_shapes_and_precision_refused(tmp_path):
    student = create_model("digits-vit", hidden_size=32, depth=1, num_heads=2, image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        make_loop(tmp_path, student=student)
    with pytest.raises(ValueError, match="teacher_precision"):
        make_loop(tmp_path, teacher_precision="fp8")


def test_bf16_teacher(tmp_path):
    loop = make_loop(tmp_path, teacher_precision="bf16")
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    assert batch["teacher_out"].dtype == torch.float32
    loss, terms = loop.loss_fn(loop.trainer.ddp_model, batch)
    assert torch.isfinite(loss) and set(terms) >= {"loss", "mse", "vb", "t"}


def test_teacher_id_is_pinned_and_tells_configs_apart():
    """The pool cache is found again by teacher_id: a changed encoding orphans every cache, and a
    teacher whose weights match but whose config differs must not share one."""
    from dkdm.distill.loop import teacher_id

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.arange(4.0).view(2, 2))
        net.bias.copy_(torch.tensor([0.5, -0.5]))
    cfg = ModelConfig(arch="unet", image_size=8, in_channels=1)
    # A field added to ModelConfig changes this too: old caches are then prepared again (never
    # misread). Change the value only on purpose.
    assert teacher_id(net, cfg) == "f0f89bfe170de1dd97fde70dfd978e3445e9163d4e806e6fbc8e2f275a924670"
    assert teacher_id(net, None) != teacher_id(net, cfg) != teacher_id(net, ModelConfig(arch="unet", image_size=16))
    assert teacher_id(net.state_dict(), cfg) == teacher_id(net, cfg)


def test_step_timer_logs_milliseconds_of_cpu_spans_and_reads_cuda_events_in_order(monkeypatch):
    from dkdm.distill import loop as loop_mod

    clock = iter([10.0, 10.25, 11.0, 11.5])
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: next(clock))
    logged = []
    monkeypatch.setattr(loop_mod.logger, "logkv_mean", lambda k, v: logged.append((k, v)))
    timer = loop_mod._Timer(torch.device("cpu"))
    timer.mark("a")
    timer.mark("b")
    timer.span("ab_ms", "a", "b")
    timer.span("missing_ms", "a", "nowhere")  # an end not marked yet: nothing logged
    timer.mark("a")
    timer.mark("b")
    timer.span("ab_ms", "a", "b")
    assert logged == [("ab_ms", 250.0), ("ab_ms", 500.0)]

    # The CUDA path without a GPU: events are read only once complete, oldest first, never waited on.
    class Event:
        def __init__(self, ms, done):
            self.ms, self.done = ms, done

        def query(self):
            return self.done

        def elapsed_time(self, end):
            return end.ms - self.ms

    logged.clear()
    made = []

    class FakeCudaEvent(Event):  # what mark() records on a CUDA device: a timing event, recorded there
        def __init__(self, enable_timing=False):
            super().__init__(len(made), True)
            self.timing, self.recorded = enable_timing, False
            made.append(self)

        def record(self):
            self.recorded = True

    monkeypatch.setattr(loop_mod.torch.cuda, "Event", FakeCudaEvent)
    timer = loop_mod._Timer(torch.device("cuda"))  # builds without a GPU: only the device type is read
    assert timer.cuda is True
    timer.mark("a")
    timer.mark("b")
    timer.span("ab_ms", "a", "b")
    assert logged == [] and all(e.timing and e.recorded for e in made)  # queued, not read at once
    timer.flush()
    assert logged == [("ab_ms", 1)]
    logged.clear()
    timer.pending = [("k1", Event(0, True), Event(3, True)), ("k2", Event(5, True), Event(9, False))]
    timer.pending.append(("k3", Event(10, True), Event(12, True)))
    timer.flush()
    assert logged == [("k1", 3)] and [p[0] for p in timer.pending] == ["k2", "k3"]  # k3 waits behind k2
    timer.pending = [("old", Event(0, False), Event(1, False))] * 70
    timer.flush()
    assert len(timer.pending) == 64  # a bound on events never completed (a dead stream)


# --------------------------------------------------------------------------- what the loop hands on


class _Bf16Net(torch.nn.Module):
    """A network returning its autocast dtype, as foreign networks do (the zoo's cast back themselves)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = torch.nn.Conv2d(config.in_channels, 2 * config.in_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x)


def test_teacher_outputs_come_back_float32_under_a_half_precision_teacher(tmp_path):
    cfg = ModelConfig(arch="unet", image_size=8, in_channels=1, learn_sigma=True)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 19])
    for precision in ("bf16", "fp16"):
        loop = make_loop(tmp_path / precision, teacher=_Bf16Net(cfg), teacher_precision=precision)
        with torch.autocast("cpu", dtype=loop.teacher_dtype):
            assert loop.teacher(x, t).dtype == loop.teacher_dtype  # the network itself stays in half
        for out in (loop.teacher_forward(x, t), loop.run_net(loop.teacher, loop.teacher_diffusion, x, t)):
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, loop.teacher(x, t), atol=0.05, rtol=0.05)
    fp32 = make_loop(tmp_path / "fp32", teacher=_Bf16Net(cfg))
    assert torch.equal(fp32.teacher_forward(x, t), fp32.teacher(x, t))


def test_the_loop_hands_its_configs_to_the_pool_and_the_objective(tmp_path):
    loop = make_loop(
        tmp_path,
        pool="shuffled",
        warmup="respaced",
        warmup_jumps=4,
        warmup_exact=3,
        seed=7,
        clip_teacher_mean=True,
    )
    pool = loop.pool
    assert (pool.variant, pool.warmup, pool.warmup_grid, pool.warmup_exact) == ("shuffled", "respaced", 5, 3)
    assert (pool.seed, pool.rank, pool.world_size) == (7, 0, 1) and pool.clip_denoised is True
    assert pool.pool_device == pool.device == torch.device("cpu")
    assert loop.objective.clip_teacher_mean is True and make_loop(tmp_path / "b").objective.clip_teacher_mean is False
    assert not any(p.requires_grad for p in loop.teacher.parameters())  # frozen, whatever it came with
    big = make_loop(tmp_path / "big", rho=4.0, batch_size=64).pool  # 5,120 samples of 264 bytes
    assert (big.size, big.memory["pool"], big.memory["per_sample"]) == (5120, 1351680, 264)
    with open(tmp_path / "big" / "log.txt") as f:  # the pool's size in the log, in MiB
        assert "pool: dynamic, 5120 samples per rank (rho=4.0, b=64), 1.3 MiB on cpu, 264 bytes per sample" in f.read()
    with pytest.raises(ObjectiveError, match="--simple_only trains the mean only"):
        make_loop(tmp_path / "c", simple_only=True)  # the student learns its variance


def test_a_latent_teacher_keeps_the_pool_unclipped_and_refuses_step_clipping(tmp_path):
    latent = ModelConfig(arch="unet", image_size=8, in_channels=1, learn_sigma=True, first_stage="vae.safetensors")
    teacher = GaussTeacherNet(create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True))
    teacher.config = latent
    loop = make_loop(tmp_path / "dkdm", teacher=teacher)  # DKDM distils a latent teacher as it is
    assert loop.latent is True and loop.pool.clip_denoised is False
    assert make_loop(tmp_path / "pixel").pool.clip_denoised is True
    with pytest.raises(ValueError, match="this teacher works on latents, which have no such range; set --step_clip"):
        make_loop(tmp_path / "luhman", teacher=teacher, objective="luhman")
    assert (
        make_loop(tmp_path / "ok", teacher=teacher, objective="luhman", step_clip=False, luhman_steps=4).latent is True
    )


def test_a_teacher_without_a_config_takes_the_students_shape(tmp_path):
    class Bare(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, y=None):
            return self.net(x, t)

    loop = make_loop(tmp_path, teacher=Bare(tiny_teacher()))
    assert loop.sample_shape == (1, 8, 8)
    loop.prepare_pool(progress=False)  # its cache key has no model config to add
    assert loop.pool.prepared
    with pytest.raises(ValueError) as e:
        make_loop(tmp_path / "b", teacher=Bare(tiny_teacher()), student=Bare(tiny_student()))
    assert str(e.value) == "cannot tell the sample shape: neither network carries a .config (ModelConfig)"


def test_step_methods_other_than_progressive_refuse_a_class_conditional_teacher(tmp_path):
    cond = {"class_cond": True, "num_classes": 5}
    torch.manual_seed(0)
    teacher = create_model("digits-vit", hidden_size=32, depth=1, num_heads=2, **cond)
    student = create_model("digits-vit", hidden_size=32, depth=1, num_heads=2, **cond)
    with pytest.raises(ObjectiveError, match="--objective luhman distills unconditional teachers only"):
        make_loop(tmp_path, teacher=teacher, student=student, objective="luhman")


def test_prepare_pool_passes_the_cache_key_folder_and_checkpoint_period(tmp_path):
    from dkdm.distill.loop import teacher_id

    def calls(loop):
        seen = []
        loop.pool.prepare = lambda fn, **kw: seen.append(kw)
        loop.prepare_pool(progress=False)
        return seen

    loop = make_loop(tmp_path / "a", pool_cache_dir="", prep_checkpoint_s=7.5)
    (kw,) = calls(loop)
    assert kw == {
        "teacher_id": teacher_id(loop.teacher, loop.teacher.config),
        "cache_dir": str(tmp_path / "a" / "pool_cache"),
        "checkpoint_every_s": 7.5,
        "progress": False,
    }
    assert calls(make_loop(tmp_path / "b"))[0]["cache_dir"] == str(tmp_path / "b" / "cache")
    assert calls(make_loop(tmp_path / "c", teacher_key="sha-of-the-file"))[0]["teacher_id"] == "sha-of-the-file"
    # A guided pool is another pool; a w-conditioned student's pool carries its w range in its own key.
    torch.manual_seed(0)
    null = {"class_cond": True, "num_classes": 5, "class_dropout_prob": 0.1}
    guided_teacher = create_model("digits-vit", hidden_size=32, depth=1, num_heads=2, **null)
    plain = create_model("digits-vit", hidden_size=32, depth=1, num_heads=2, class_cond=True, num_classes=5)
    guided = make_loop(tmp_path / "d", teacher=guided_teacher, student=plain, guidance_scale=2.0, teacher_key="k")
    assert calls(guided)[0]["teacher_id"] == "k|guidance_scale=2.0"
    wcond = create_model(
        "digits-vit", hidden_size=32, depth=1, num_heads=2, guidance_cond=True, class_cond=True, num_classes=5
    )
    ranged = make_loop(tmp_path / "e", teacher=guided_teacher, student=wcond, w_min=0.0, w_max=3.0, teacher_key="k")
    assert calls(ranged)[0]["teacher_id"] == "k"


def test_pool_step_logs_the_pools_t_quartiles_at_the_log_steps(tmp_path, monkeypatch):
    from dkdm.distill import loop as loop_mod

    loop = make_loop(tmp_path, log_interval=3)
    loop.prepare_pool(progress=False)
    logged = {}
    monkeypatch.setattr(loop_mod.logger, "logkv_mean", lambda k, v: logged.__setitem__(k, v))
    for step in range(6):
        logged.clear()
        loop.trainer.step = step
        loop.pool_step()
        quartiles = [logged.get(f"pool_t_q{i}") for i in range(5)]
        if step in (2, 5):  # the steps whose end the trainer logs
            want = loop.pool.t_histogram(4)
            assert quartiles[:4] == [want[i] for i in range(4)] and quartiles[4] is None
        else:
            assert quartiles == [None] * 5
    loop.train_cfg.log_interval = 1
    logged.clear()
    loop.pool_step()
    assert "pool_t_q0" in logged
