"""scripts/sample.py and dkdm.sampling: determinism, resume, the npz format, refusals."""

import json
import os
import runpy

import numpy as np
import pytest
import torch
import yaml

from dkdm import sampling
from dkdm.config import ConfigError, DiffusionConfig, ModelConfig, SampleConfig, to_dict
from dkdm.data.arrays import npz_name
from dkdm.diffusion import create_diffusion
from dkdm.models import create_model
from dkdm.resolve import EMBEDDED_TEACHER
from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = runpy.run_path(os.path.join(ROOT, "scripts", "sample.py"))["main"]
TINY = ModelConfig(
    arch="unet",
    image_size=8,
    in_channels=1,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1",
    attention_resolutions="",
    learn_sigma=True,
    num_heads=1,
)
DIFF = DiffusionConfig(steps=4, noise_schedule="cosine", learn_sigma=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run_dir(root, model_cfg=TINY, seed=0):
    """A run directory as the Trainer leaves it: an EMA checkpoint and config.yaml."""
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(model_cfg)
    with torch.no_grad():  # ADM zero-initialises output layers; a trained net is not a constant
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    path = os.path.join(root, "ema_0.9999_000010.pt")
    torch.save(model.state_dict(), path)
    with open(os.path.join(root, "config.yaml"), "w") as f:
        yaml.safe_dump({"model": to_dict(model_cfg), "diffusion": to_dict(DIFF), "train": {}}, f)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _run_dir(str(tmp_path_factory.mktemp("run")))


@pytest.fixture
def counter(monkeypatch):
    """Counts draw_shard calls; ``fail_after`` makes the n-th call raise (an interrupted run)."""
    state = {"calls": 0, "fail_after": None}
    original = sampling.draw_shard

    def counted(*args, **kwargs):
        if state["fail_after"] is not None and state["calls"] >= state["fail_after"]:
            raise KeyboardInterrupt("simulated interruption")
        state["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sampling, "draw_shard", counted)
    return state


def _sample(ckpt, out, *flags):
    MAIN(["--model_path", ckpt, "--num_samples", "20", "--batch_size", "8", "--output", str(out), *flags])


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_npz_format_name_and_grid(ckpt, tmp_path, counter):
    _sample(ckpt, tmp_path)  # a folder: guided-diffusion's file name inside it
    path = tmp_path / "samples_20x8x8x1.npz"
    arrays = _load(path)
    assert list(arrays) == ["arr_0"]  # unconditional: no labels
    x = arrays["arr_0"]
    assert x.dtype == np.uint8 and x.shape == (20, 8, 8, 1)  # NHWC, the model's one channel
    assert x.std() > 0
    assert counter["calls"] == 3  # 8 + 8 + a partial batch of 4
    assert (tmp_path / "samples_20x8x8x1.png").stat().st_size > 0
    assert not (tmp_path / "samples_20x8x8x1.shards").exists()  # merged, then tidied away


def test_same_seed_same_bytes_other_seed_other_images(ckpt, tmp_path):
    _sample(ckpt, tmp_path / "a.npz", "--seed", "3")
    _sample(ckpt, tmp_path / "b.npz", "--seed", "3")
    _sample(ckpt, tmp_path / "c.npz", "--seed", "4")
    a, b, c = (_load(tmp_path / f"{n}.npz")["arr_0"] for n in "abc")
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_class_conditional_labels(tmp_path):
    cond = _run_dir(str(tmp_path / "run"), ModelConfig(**{**to_dict(TINY), "class_cond": True, "num_classes": 10}))
    _sample(cond, tmp_path / "s.npz")
    arrays = _load(tmp_path / "s.npz")
    assert list(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_1"].shape == (20,) and arrays["arr_1"].dtype == np.int64
    assert arrays["arr_1"].min() >= 0 and arrays["arr_1"].max() < 10 and len(set(arrays["arr_1"].tolist())) > 1


def test_resume_keeps_finished_shards_and_gives_the_same_result(ckpt, tmp_path, counter):
    _sample(ckpt, tmp_path / "straight.npz")
    counter["calls"], counter["fail_after"] = 0, 2
    with pytest.raises(KeyboardInterrupt):
        _sample(ckpt, tmp_path / "resumed.npz", "--keep_shards")
    shards = tmp_path / "resumed.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json", "shard_000000.npz", "shard_000001.npz"]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.glob("shard_*")}
    counter["calls"], counter["fail_after"] = 0, None
    _sample(ckpt, tmp_path / "resumed.npz", "--keep_shards")
    assert counter["calls"] == 1  # only the missing shard was drawn
    for name, (mtime, data) in before.items():
        assert (shards / name).stat().st_mtime_ns == mtime and (shards / name).read_bytes() == data
    assert _load(tmp_path / "resumed.npz")["arr_0"].tobytes() == _load(tmp_path / "straight.npz")["arr_0"].tobytes()


def test_shards_of_another_run_are_refused(ckpt, tmp_path, counter):
    counter["fail_after"] = 1
    with pytest.raises(KeyboardInterrupt):
        _sample(ckpt, tmp_path / "s.npz", "--seed", "0")
    shard = tmp_path / "s.shards" / "shard_000000.npz"
    data = shard.read_bytes()
    counter["calls"], counter["fail_after"] = 0, None
    for flags, word in (
        (["--seed", "1"], "seed"),
        (["--timestep_respacing", "2"], "timestep_respacing"),
        (["--batch_size", "4"], "batch_size"),
    ):
        with pytest.raises(sampling.SamplingError, match=f"different sampling run.*{word}"):
            _sample(ckpt, tmp_path / "s.npz", *flags)
    assert counter["calls"] == 0 and shard.read_bytes() == data
    assert not (tmp_path / "s.npz").exists()


def test_a_refused_call_does_not_bind_its_output(ckpt, tmp_path, counter):
    """Bad settings are refused before a manifest exists; a manifest without shards binds nothing."""
    out = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="timestep_respacing|steps"):
        _sample(ckpt, out, "--timestep_respacing", "1000")  # more steps than the diffusion's 4
    with pytest.raises(sampling.SamplingError, match="precision"):
        _sample(ckpt, out, "--precision", "fp8")
    assert not (tmp_path / "s.shards" / sampling.MANIFEST).exists() and counter["calls"] == 0
    # A manifest left by a run that stopped before its first shard does not block other settings.
    (tmp_path / "s.shards").mkdir()
    (tmp_path / "s.shards" / sampling.MANIFEST).write_text('{"seed": 123}')
    _sample(ckpt, out, "--timestep_respacing", "2")
    assert _load(out)["arr_0"].shape == (20, 8, 8, 1) and counter["calls"] == 3


def test_unwritable_output_fails_before_sampling(ckpt, tmp_path, counter):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(sampling.SamplingError, match="cannot write"):
        _sample(ckpt, blocker / "x.npz")
    assert counter["calls"] == 0


def test_missing_or_bad_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        _sample(str(tmp_path / "nope.pt"), tmp_path / "x.npz", "--arch", "digits-student")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        _sample(str(bad), tmp_path / "x.npz", "--arch", "digits-student", "--steps", "4")
    orphan = tmp_path / "orphan.pt"
    torch.save(create_model(TINY).state_dict(), orphan)
    with pytest.raises(ConfigError, match="pass --arch"):  # nothing says which network it is
        _sample(str(orphan), tmp_path / "x.npz")


def test_rank_split_does_not_change_the_images(ckpt, tmp_path):
    model = create_model(TINY)
    model.load_state_dict(torch.load(ckpt))
    diffusion = create_diffusion(DIFF)
    cfg = SampleConfig(num_samples=20, batch_size=8, seed=5)
    merged = []
    for world in (1, 3):
        store = sampling.ShardStore(str(tmp_path / f"w{world}"), {"world": "any"})
        store.prepare()
        for rank in range(world):  # the ranks of a world, one after another
            sampling.draw_shards(model, diffusion, store, cfg, (1, 8, 8), rank=rank, world_size=world)
        merged.append(store.merge(sampling.shard_sizes(20, 8))[0])
    assert merged[0].tobytes() == merged[1].tobytes()


def test_a_kill_while_shards_are_removed_leaves_a_resumable_directory(tmp_path, monkeypatch):
    """remove() deletes the manifest last, so at every point a kill could stop it, any shard left
    still has its manifest (a rerun resumes instead of refusing shards of unknown settings)."""
    store = sampling.ShardStore(str(tmp_path / "s.shards"), {"seed": 1})
    store.prepare()
    for i in range(5):
        store.write(i, np.zeros((2, 4, 4, 1), np.uint8), None)
    order = []
    real_remove = os.remove

    def recording_remove(path):
        order.append(os.path.basename(path))
        names = set(os.listdir(store.directory)) - {os.path.basename(path)}
        assert sampling.MANIFEST in names or not any(n.startswith("shard_") for n in names), order
        real_remove(path)

    monkeypatch.setattr(sampling.os, "remove", recording_remove)
    store.remove()
    assert order[-1] == sampling.MANIFEST and len(order) == 6
    assert not os.path.exists(store.directory)


def test_shard_plan_and_seeds():
    assert sampling.shard_sizes(20, 8) == [8, 8, 4]
    assert sampling.shard_sizes(16, 8) == [8, 8]
    seeds = {sampling.shard_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150
    assert npz_name(50000, 32, 32, 3) == "samples_50000x32x32x3.npz"


@pytest.mark.skipif(not os.path.isfile(EMBEDDED_TEACHER), reason="embedded teacher not built")
def test_no_flags_samples_the_embedded_teacher(tmp_path):
    MAIN(["--num_samples", "6", "--batch_size", "6", "--timestep_respacing", "4", "--output", str(tmp_path / "x.npz")])
    assert _load(tmp_path / "x.npz")["arr_0"].shape == (6, 8, 8, 1)


@pytest.mark.slow
@pytest.mark.mpi
def test_mpiexec_two_ranks_match_one_process(ckpt, tmp_path):
    import subprocess
    import sys

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpiexec not installed")
    script = os.path.join(ROOT, "scripts", "sample.py")
    common = ["--model_path", ckpt, "--num_samples", "20", "--batch_size", "8"]
    subprocess.run(
        [mpiexec, "-n", "2", sys.executable, script, *common, "--output", str(tmp_path / "m.npz")],
        check=True,
        timeout=300,
        capture_output=True,
        env=script_env(),
    )
    _sample(ckpt, tmp_path / "s.npz")
    assert _load(tmp_path / "m.npz")["arr_0"].tobytes() == _load(tmp_path / "s.npz")["arr_0"].tobytes()


def test_ddim_with_eta_and_bf16_are_deterministic_too(ckpt, tmp_path):
    flags = ["--use_ddim", "--eta", "0.5", "--timestep_respacing", "ddim2", "--precision", "bf16"]
    _sample(ckpt, tmp_path / "a.npz", *flags)
    _sample(ckpt, tmp_path / "b.npz", *flags)
    _sample(ckpt, tmp_path / "c.npz", *flags[:-2])
    a, b, c = (_load(tmp_path / f"{n}.npz")["arr_0"] for n in "abc")
    assert a.tobytes() == b.tobytes() and a.shape == (20, 8, 8, 1)
    assert not np.array_equal(a, c)  # bf16 really changed the arithmetic


# --------------------------------------------------------------------------- draw_shard / draw_shards in process


class _SpyDiffusion:
    """Records what draw_shard hands the sampling loop and returns the noise (plus one global-RNG draw)."""

    def __init__(self):
        self.calls = []

    def _loop(self, kind, model, shape, noise=None, clip_denoised=True, model_kwargs=None, **extra):
        step_noise = torch.randn(1)  # the per-step noise comes from the global generator draw_shard seeds
        self.calls.append(
            {"kind": kind, "shape": shape, "noise": noise, "clip": clip_denoised, "kw": model_kwargs, **extra}
        )
        self.calls[-1]["step_noise"] = step_noise
        return noise.clamp(-1, 1)

    def p_sample_loop(self, *args, **kw):
        return self._loop("p", *args, **kw)

    def ddim_sample_loop(self, *args, **kw):
        return self._loop("ddim", *args, **kw)


def test_draw_shard_hands_the_loop_its_seeded_noise_labels_sampler_and_clipping():
    model, shape = torch.nn.Identity(), (1, 4, 4)
    spy = _SpyDiffusion()
    state = torch.get_rng_state()
    images, labels = sampling.draw_shard(model, spy, 64, shape, 123, SampleConfig(), num_classes=2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    call = spy.calls[-1]
    gen = torch.Generator().manual_seed(123)  # noise, then labels, from one CPU generator
    assert torch.equal(call["noise"], torch.randn((64, *shape), generator=gen))
    want_labels = torch.randint(0, 2, (64,), generator=gen)
    assert torch.equal(call["kw"]["y"], want_labels) and labels.tolist() == want_labels.tolist()
    assert set(labels.tolist()) == {0, 1}
    torch.manual_seed(123 ^ 0x5DEECE66D)
    assert torch.equal(call["step_noise"], torch.randn(1))
    assert (call["kind"], call["shape"], call["clip"]) == ("p", (64, *shape), True) and "eta" not in call
    assert images.dtype == np.uint8 and images.shape == (64, 4, 4, 1)
    # no classes: no labels; DDIM with its eta; clipping off when asked, and for latents (decode).
    _, none = sampling.draw_shard(model, spy, 4, shape, 1, SampleConfig())
    assert none is None and spy.calls[-1]["kw"] == {}
    sampling.draw_shard(model, spy, 4, shape, 1, SampleConfig(use_ddim=True, eta=0.5, clip_denoised=False))
    assert (spy.calls[-1]["kind"], spy.calls[-1]["eta"], spy.calls[-1]["clip"]) == ("ddim", 0.5, False)
    decoded = sampling.draw_shard(model, spy, 4, shape, 1, SampleConfig(), decode=lambda x: torch.full((4, 2, 2, 3), 7))
    assert spy.calls[-1]["clip"] is False and decoded[0].tolist() == np.full((4, 2, 2, 3), 7).tolist()


def test_draw_shards_counts_partitions_and_skips(tmp_path, monkeypatch):
    ticks = iter(range(0, 1000, 3))  # each timed shard takes 3 fake seconds
    monkeypatch.setattr(sampling.time, "perf_counter", lambda: float(next(ticks)))
    cfg = SampleConfig(num_samples=10, batch_size=4)  # shards of 4, 4, 2
    store = sampling.ShardStore(str(tmp_path / "shards"), {"format": 1})
    store.prepare()
    seen = []
    odd = sampling.draw_shards(
        torch.nn.Identity(),
        _SpyDiffusion(),
        store,
        cfg,
        (1, 2, 2),
        rank=1,
        world_size=2,
        on_shard=lambda n, drawn: seen.append((n, drawn)),
    )
    assert (odd.shards_drawn, odd.images_drawn, odd.shards_skipped, odd.seconds) == (1, 4, 0, 3.0)
    assert seen == [(4, True)] and store.done(1, 4) and not store.done(0, 4)
    seen.clear()
    decoded = []
    stats = sampling.draw_shards(
        torch.nn.Identity(),
        _SpyDiffusion(),
        store,
        cfg,
        (1, 2, 2),
        on_shard=lambda n, drawn: seen.append((n, drawn)),
        decode=lambda x: decoded.append(x.shape[0]) or torch.zeros(x.shape[0], 2, 2, 1, dtype=torch.uint8),
    )
    assert (stats.shards_drawn, stats.images_drawn, stats.shards_skipped, stats.seconds) == (2, 6, 1, 6.0)
    assert seen == [(4, True), (4, False), (2, True)] and decoded == [4, 2]
    assert stats.images_per_second == 1.0
    again = sampling.draw_shards(torch.nn.Identity(), _SpyDiffusion(), store, cfg, (1, 2, 2))
    assert (again.shards_drawn, again.images_drawn, again.shards_skipped, again.images_per_second) == (0, 0, 3, 0.0)


def test_shard_seeds_sizes_and_folder_names_are_pinned():
    """Shard seeds decide every image of a run and a resumed run reuses the shards on disk:
    a changed derivation would mix two streams in one npz. Change these values only on purpose."""
    assert sampling.shard_seed(0, 0) == 6375474604893067239
    assert sampling.shard_seed(2**40 + 5, 3) == 5855351189448092085
    assert sampling.shard_seed(7, 10**6) == 7917814428551886168
    assert sampling.shard_sizes(1, 1) == [1] and sampling.shard_sizes(10, 4) == [4, 4, 2]
    for n, b in ((0, 4), (4, 0)):
        with pytest.raises(
            sampling.SamplingError, match=f"num_samples and batch_size must be positive, got {n} and {b}"
        ):
            sampling.shard_sizes(n, b)
    assert sampling.shard_dir_for("/x/s.npz") == "/x/s.shards" and sampling.shard_dir_for("/x/run") == "/x/run.shards"


def test_manifest_names_what_decides_the_pixels():
    model, diff, cfg = (
        ModelConfig(arch="unet", image_size=8),
        DiffusionConfig(),
        SampleConfig(num_samples=4, batch_size=2),
    )
    m = sampling.make_manifest(model, diff, cfg, "abc", "cpu")
    assert {"format", "sample", "model", "diffusion", "checkpoint_sha256", "device_type"} <= set(m)
    assert m["model"] == to_dict(model) and m["diffusion"] == to_dict(diff)
    assert (m["checkpoint_sha256"], m["device_type"], m["format"]) == ("abc", "cpu", sampling.MANIFEST_FORMAT)
    assert m["sample"]["seed"] == cfg.seed and m["sample"]["batch_size"] == 2


def test_shard_store_refusals_list_the_differences_and_the_manifest_is_stable(tmp_path, monkeypatch):
    first = {f"k{i}": i for i in reversed(range(8))}  # written sorted whatever the insertion order
    store = sampling.ShardStore(str(tmp_path / "s"), first)
    opened = []
    real_open = open
    with monkeypatch.context() as m:  # sampling's own open() only, for prepare() only
        m.setattr(
            sampling,
            "open",
            lambda path, *a, **kw: opened.append(str(path)) or real_open(path, *a, **kw),
            raising=False,
        )
        store.prepare()
    probe = next(p for p in opened if ".probe-" in p)
    assert probe.startswith(str(tmp_path / "s") + os.sep)  # the write probe goes into the shard folder
    text = (tmp_path / "s" / sampling.MANIFEST).read_text()
    assert text == json.dumps(first, indent=2, sort_keys=True) + "\n"  # readable, and the same bytes every time
    assert not [n for n in os.listdir(tmp_path / "s") if n.startswith(".probe")]
    store.write(0, np.zeros((1, 2, 2, 1), np.uint8), None)
    other = dict(first, k0=10, k1=11, k2=12, k3=13, k4=14, k5=15, k6=16)
    with pytest.raises(sampling.SamplingError) as e:
        sampling.ShardStore(str(tmp_path / "s"), other).prepare()
    listed = str(e.value).split("(", 1)[1].split(")")[0].split("; ")
    assert listed == [f"k{i}: {i} there, {i + 10} now" for i in range(6)]  # the first six of seven
    (tmp_path / "s" / sampling.MANIFEST).write_text("{not json")
    with pytest.raises(sampling.SamplingError, match=r"different sampling run \(unreadable manifest\)"):
        sampling.ShardStore(str(tmp_path / "s"), first).prepare()
    orphan = tmp_path / "o"
    orphan.mkdir()
    (orphan / "shard_000000.npz").write_bytes(b"")
    with pytest.raises(sampling.SamplingError, match="holds 1 shard\\(s\\) but no manifest"):
        sampling.ShardStore(str(orphan), first).prepare()
    store.remove()
    assert not (tmp_path / "s").exists()
    (tmp_path / "bare").mkdir()  # a folder without a manifest (a killed remove) is removed too
    sampling.ShardStore(str(tmp_path / "bare"), first).remove()
    assert not (tmp_path / "bare").exists()


def test_finish_merges_in_order_draws_the_grid_and_drops_the_shards_by_default(tmp_path):
    cfg = SampleConfig(num_samples=3, batch_size=2)
    store = sampling.ShardStore(str(tmp_path / "s.shards"), {"format": 1})
    store.prepare()
    store.write(0, np.full((2, 2, 2, 1), 1, np.uint8), None)
    store.write(1, np.full((1, 2, 2, 1), 2, np.uint8), None)
    images, labels = sampling.finish(store, cfg, str(tmp_path / "s.npz"))
    assert images[:, 0, 0, 0].tolist() == [1, 1, 2] and labels is None
    assert np.array_equal(_load(tmp_path / "s.npz")["arr_0"], images)
    assert (tmp_path / "s.png").is_file() and not (tmp_path / "s.shards").exists()


def test_sampling_precision_hands_back_float32():
    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x, t, **kw):
            return self.conv(x)

    x, t = torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    net = Half()
    with torch.no_grad():
        out = sampling._Precision(net, "bf16")(x, t)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, net(x, t), atol=0.05, rtol=0.05)
        assert torch.equal(sampling._Precision(net, "fp32")(x, t), net(x, t))
