"""DKDM in latent space: the paper's latent configs resolve (Tab. 3 / supplement Tab. 7), a CompVis-layout
LDM teacher distils a student on latents with the first stage never called, and sample.py decodes the
student's latents into an ADM npz of images."""

import importlib.util
import os
import runpy

import numpy as np
import pytest
import torch

from dkdm.models import count_parameters, first_stage
from tests import ldm_layout as L
from tests.test_first_stage import TINY_FS, TINY_UNET, ldm_betas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "celebahq_256": (48, 9.6e-5, 410_000),
    "ffhq_256": (42, 8.4e-5, 640_000),
}


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dataset", list(CONFIGS))
def test_latent_paper_configs_resolve(dataset):
    cfgs, path = _script("dkdm_train").resolve(["--config", os.path.join(ROOT, "configs", dataset, "dkdm_89M.yaml")])
    t, s, d, td = cfgs["teacher"], cfgs["student"], cfgs["diffusion"], cfgs["teacher_diffusion"]
    train, distill = cfgs["train"], cfgs["distill"]
    assert path == f"teachers/{dataset.split('_')[0]}-ldm-vq-4.ckpt"
    assert (train.batch_size, train.lr, train.max_steps) == CONFIGS[dataset]
    assert distill.rho == 4.0 and distill.simple_only and distill.pool == "dynamic"
    for diff in (d, td):
        assert (diff.steps, diff.noise_schedule, diff.sigma_small) == (1000, "scaled_linear:0.0015,0.0195", True)
        assert not diff.learn_sigma and not diff.predict_xstart and not diff.predict_v
    assert (t.num_channels, t.channel_mult, t.attention_resolutions, t.num_head_channels) == (
        224,
        "1,2,3,4",
        "32,16,8",
        32,
    )
    assert (t.image_size, t.in_channels, s.image_size, s.in_channels) == (64, 3, 64, 3)
    assert s.num_channels == 128 and s.channel_mult == t.channel_mult
    assert count_parameters(t) == 274_056_163 and count_parameters(s) == 89_535_619


def _tiny_ckpt(tmp_path):
    sd = L.ldm_state_dict(L.unet_shapes(TINY_UNET), L.first_stage_shapes(TINY_FS), ema=True, betas=ldm_betas())
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": sd}, path)
    return str(path)


TINY = ["--image_size", "8", "--channel_mult", "1,2", "--attention_resolutions", "4"]


def test_latent_distillation_runs_without_the_first_stage_and_samples_decode(tmp_path, monkeypatch):
    path = _tiny_ckpt(tmp_path)
    calls = {"encode": 0, "decode": 0, "decode_uint8": 0, "load": 0}
    for name in ("encode", "decode", "decode_uint8"):
        orig = getattr(first_stage.FirstStage, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(first_stage.FirstStage, name, counted)
    orig_load = first_stage.load_first_stage

    def counted_load(*a, **kw):
        calls["load"] += 1
        return orig_load(*a, **kw)

    monkeypatch.setattr(first_stage, "load_first_stage", counted_load)
    run = tmp_path / "run"
    argv = ["--config", os.path.join(ROOT, "configs", "celebahq_256", "dkdm_89M.yaml"), "--teacher_path", path]
    for who in ("teacher", "student"):
        argv += [f"--{who}.{k[2:]}" if k.startswith("--") else k for k in TINY]
    argv += ["--teacher.num_channels", "32", "--student.num_channels", "32", "--teacher.use_ema"]
    argv += ["--batch_size", "4", "--rho", "0.01", "--warmup", "respaced", "--max_steps", "3", "--log_dir", str(run)]
    argv += ["--save_interval", "3", "--log_interval", "1", "--teacher_batch", "200"]
    _script("dkdm_train").main(argv)
    assert set(calls.values()) == {0}, f"the first stage was touched while distilling: {calls}"
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["student"]["first_stage"] == saved["teacher"]["first_stage"] == os.path.abspath(path)
    assert saved["teacher"]["use_ema"] and saved["distill"]["simple_only"]
    pool = torch.load(run / "pool000003.pt", weights_only=True)
    xs = [v for v in pool.values() if isinstance(v, torch.Tensor) and v.dim() == 4]
    assert xs and all(tuple(x.shape[1:]) == (3, 8, 8) for x in xs)  # latents, not 16x16 pixels

    main = runpy.run_path(os.path.join(ROOT, "scripts", "sample.py"))["main"]
    out = tmp_path / "s.npz"
    main(["--model_path", str(run / "ema_0.9999_000003.pt"), "--num_samples", "5", "--batch_size", "3"]
         + ["--use_ddim", "--timestep_respacing", "ddim5", "--output", str(out), "--decode_chunk", "2"])  # fmt: skip
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert calls["load"] == 1 and calls["decode_uint8"] == 2 and calls["encode"] == 0  # one call per shard


def _tiny_kl_folder(path, channels=1):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=8,
        scaling_factor=0.7,
    )
    ae.save_pretrained(path)
    return str(path)


def test_data_based_latent_training_encodes_the_dataset_once(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from dkdm.data.latents import LatentSource

    calls = {"encode": 0, "decode": 0}
    for name in calls:
        orig = getattr(AutoencoderKL, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(AutoencoderKL, name, counted)
    folder = _tiny_kl_folder(tmp_path / "ae")
    main = runpy.run_path(os.path.join(ROOT, "scripts", "image_train.py"))["main"]
    run = tmp_path / "run"
    argv = ["--first_stage", folder, "--image_size", "4", "--in_channels", "2", "--channel_mult", "1,2"]
    argv += ["--attention_resolutions", "2", "--batch_size", "8", "--log_dir", str(run), "--save_interval", "4"]
    main([*argv, "--max_steps", "4"])
    assert calls == {"encode": 8, "decode": 0}  # 1,797 digits in chunks of 256, once, whatever the step count
    main([*argv, "--max_steps", "8"])  # resumed: the cache is read, nothing encoded again
    assert calls == {"encode": 8, "decode": 0}
    (cache,) = (run / "latent_cache").iterdir()
    enc = torch.load(cache, weights_only=True)
    assert enc["mean"].shape == (1797, 2, 4, 4) and enc["std"].shape == (1797, 2, 4, 4)
    stage = first_stage.load_first_stage(folder)
    x, _ = __import__("dkdm.data", fromlist=["load_digits"]).load_digits()
    post = stage.ae.encode(x[:5]).latent_dist
    torch.testing.assert_close(enc["mean"][:5], post.mean * 0.7, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc["std"][:5], post.std * 0.7, rtol=1e-5, atol=1e-6)
    src = LatentSource(enc["mean"], enc["std"], None)
    a, _ = src.batch(np.arange(3), np.zeros(3, dtype=bool))
    b, _ = src.batch(np.arange(3), np.zeros(3, dtype=bool))
    assert not torch.equal(a, b)  # a fresh posterior sample each time, around the cached mean


ASSETS = os.path.join(ROOT, "dkdm", "assets")
LATENT_TEACHER = os.path.join(ASSETS, "digits_latent_teacher.pt")


@pytest.mark.skipif(not os.path.isfile(LATENT_TEACHER), reason="latent digits assets not built")
def test_shipped_latent_digits_assets():
    """The shipped first stage reconstructs digits, the latent teacher resolves from its provenance into
    the first stage's latent space, and its decoded samples are digits."""
    import json

    from sklearn.linear_model import LogisticRegression

    from dkdm.data import load_digits
    from dkdm.resolve import resolve

    files = [LATENT_TEACHER, LATENT_TEACHER[:-3] + ".json", os.path.join(ASSETS, "digits_autoencoder.json")]
    files += [
        os.path.join(ASSETS, "digits_autoencoder", n) for n in os.listdir(os.path.join(ASSETS, "digits_autoencoder"))
    ]
    assert sum(os.path.getsize(f) for f in files) <= 5 * 2**20
    with open(os.path.join(ASSETS, "digits_autoencoder.json")) as f:
        ae_info = json.load(f)
    assert "train_digits_autoencoder.py" in ae_info["command"]
    with open(LATENT_TEACHER[:-3] + ".json") as f:
        info = json.load(f)
    assert "image_train.py" in info["command"] and info["model"]["first_stage"] == "digits_autoencoder"
    net = resolve({}, {"timestep_respacing": "10"}, checkpoint=LATENT_TEACHER)
    assert net.space.latent and net.space.shape == (2, 4, 4)
    stage = net.space.load_first_stage()
    assert stage.kind == "kl" and stage.scale_factor == pytest.approx(ae_info["scaling_factor"])
    images, labels = load_digits(8)
    rec = stage.decode(stage.encode(images, sample=False))
    assert torch.mean((rec - images) ** 2).item() == pytest.approx(ae_info["reconstruction_mse_mode"], rel=1e-3)
    assert ae_info["reconstruction_mse_mode"] < 0.05
    model = net.build().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        z = net.create_diffusion().p_sample_loop(model, (96, 2, 4, 4), clip_denoised=False)
    # The sampled latents have the data's scale (per channel within 2x of the real encodings); the
    # first shipped teacher's cosine schedule blew up to a std of ~50, which decoded digits hid.
    real = stage.encode(images, sample=False)
    ratio = z.std(dim=(0, 2, 3)) / real.std(dim=(0, 2, 3))
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio
    x = stage.decode(z)
    clf = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1).numpy(), labels.numpy())
    proba = clf.predict_proba(x.reshape(96, -1).numpy())
    assert (proba.max(axis=1) >= 0.5).mean() >= 0.8
    assert len(set(np.argmax(proba, axis=1).tolist())) >= 9


def test_step_distillation_of_a_latent_teacher_does_not_clip_latents(tmp_path):
    path = _tiny_ckpt(tmp_path)
    argv = ["--config", os.path.join(ROOT, "configs", "celebahq_256", "dkdm_89M.yaml"), "--teacher_path", path]
    for who in ("teacher", "student"):
        argv += [f"--{who}.{k[2:]}" if k.startswith("--") else k for k in TINY]
    argv += ["--teacher.num_channels", "32", "--student.num_channels", "32", "--batch_size", "4", "--rho", "0.01"]
    argv += ["--objective", "progressive", "--max_steps", "1", "--log_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="works on latents, which have no such range; set --step_clip false"):
        _script("dkdm_train").main(argv)


def test_cnn_and_vit_teach_each_other_on_latents(tmp_path):
    """Paper Table 5 on latents: the shipped latent UNet teaches a ViT (DiT's layout), which then teaches a UNet;
    both students inherit the first stage and sample.py decodes their latents."""
    import yaml

    train = _script("dkdm_train").main
    common = ["--max_steps", "2", "--rho", "0.05", "--warmup", "respaced", "--batch_size", "8", "--save_interval", "2"]
    vit = tmp_path / "vit"
    train(["--teacher_path", os.path.join(ROOT, "dkdm", "assets", "digits_latent_teacher.pt"), "--student.arch", "vit",
           "--student.image_size", "4", "--student.in_channels", "2", "--student.patch_size", "1",
           "--student.hidden_size", "32", "--student.depth", "2", "--student.num_heads", "2", *common,
           "--log_dir", str(vit)])  # fmt: skip
    unet = tmp_path / "unet"
    train(["--teacher_path", str(vit / "ema_0.995_000002.pt"), "--student.image_size", "4", "--student.in_channels",
           "2", "--student.channel_mult", "1,2", "--student.attention_resolutions", "2", *common,
           "--log_dir", str(unet)])  # fmt: skip
    for run, teacher, student in ((vit, "unet", "vit"), (unet, "vit", "unet")):
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["teacher"]["arch"], saved["student"]["arch"]) == (teacher, student)
        assert saved["student"]["first_stage"] == saved["teacher"]["first_stage"] != ""
        pool = torch.load(run / "pool000002.pt", weights_only=True)
        assert any(isinstance(v, torch.Tensor) and tuple(v.shape[1:]) == (2, 4, 4) for v in pool.values())
    main = runpy.run_path(os.path.join(ROOT, "scripts", "sample.py"))["main"]
    out = tmp_path / "vit.npz"
    main(["--model_path", str(vit / "ema_0.995_000002.pt"), "--num_samples", "6", "--batch_size", "3",
          "--timestep_respacing", "5", "--output", str(out)])  # fmt: skip
    assert np.load(out)["arr_0"].shape == (6, 8, 8, 1)  # decoded 8x8 digits, not 4x4x2 latents


def test_latent_models_on_schedules_unsafe_without_clipping_are_warned(monkeypatch):
    """Cosine over 100 steps multiplies the eps error by ~2000 into an unclipped x_0 (what broke the
    first digits latent teacher); LDM's and Stable Diffusion's schedules pass; pixel models clip."""
    from dkdm import logger
    from dkdm.diffusion.schedules import latent_schedule_warning, unclipped_x0_gain
    from dkdm.resolve import resolve

    assert unclipped_x0_gain([0.5, 0.5]) == pytest.approx(2.0)
    assert latent_schedule_warning("scaled_linear:0.00085,0.012", 1000) is None
    assert latent_schedule_warning("scaled_linear:0.0015,0.0195", 1000) is None
    assert latent_schedule_warning("linear", 1000) is None
    assert "2,029" in latent_schedule_warning("cosine", 100)
    said = []
    monkeypatch.setattr(logger, "warn", lambda *a: said.append(" ".join(map(str, a))))
    resolve({}, {}, checkpoint=LATENT_TEACHER).create_diffusion()  # the shipped one: scaled_linear over 100
    assert said == []
    resolve({}, {"noise_schedule": "cosine"}, checkpoint=LATENT_TEACHER).create_diffusion()
    assert len(said) == 1 and "without clipping x_0" in said[0]
    resolve({}, {"noise_schedule": "cosine"}, checkpoint=os.path.join(ASSETS, "digits_teacher.pt")).create_diffusion()
    assert len(said) == 1  # pixels


def _npz(path, images, labels=None):
    from dkdm.data.arrays import save_npz

    save_npz(str(path), images, labels)
    return str(path)


def test_load_latent_data_encodes_once_and_streams_the_posterior(tmp_path):
    """The latent stream on its own: what is encoded, where it is cached, how batches are drawn."""
    from dkdm.data.latents import cache_key, load_latent_data
    from dkdm.resolve import SampleSpace

    folder = _tiny_kl_folder(tmp_path / "ae")
    space = SampleSpace((2, 4, 4), 10, folder, 0.0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(20) % 10
    data = _npz(tmp_path / "d.npz", images, labels)
    kw = {"dataset": "", "data_dir": data, "batch_size": 4, "class_cond": True, "deterministic": True, "seed": 0}
    kw["cache_dir"] = str(tmp_path / "cache" / "nested")  # made if missing
    stream, info = load_latent_data(space, **kw)
    key = cache_key(space, "", data, 8)  # the pixel size the first stage decodes to
    assert info["path"] == os.path.join(kw["cache_dir"], f"latents-{key}.pt") and os.path.isfile(info["path"])
    assert info["cached"] is False and info["seconds"] > 0
    enc = torch.load(info["path"], weights_only=True)
    stage = space.load_first_stage()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    post = stage.ae.encode(x).latent_dist
    torch.testing.assert_close(enc["mean"], post.mean * 0.7, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc["std"], post.std * 0.7, rtol=1e-5, atol=1e-6)
    assert enc["labels"].tolist() == labels.tolist()
    # In order (deterministic), no flips, one process; each batch a fresh sample mean + std * eps.
    assert (stream.shuffle, stream.random_flip, stream.world_size, stream.num_workers) == (False, False, 1, 0)
    torch.manual_seed(5)
    xb, cond = next(stream)
    torch.manual_seed(5)
    want = enc["mean"][:4] + enc["std"][:4] * torch.randn_like(enc["mean"][:4])
    torch.testing.assert_close(xb, want, rtol=0, atol=0)
    assert cond["y"].tolist() == labels[:4].tolist()
    # Read back, not encoded again; a shuffled stream when not deterministic.
    again, info2 = load_latent_data(space, **{**kw, "deterministic": False})
    assert info2 == {"cached": True, "path": info["path"], "seconds": 0.0} and again.shuffle is True


def test_latent_encoding_of_a_decoded_source_and_no_labels(tmp_path):
    """Images that need resizing go through the decoding source (item by item), unlabelled here."""
    from dkdm.data.images import open_source
    from dkdm.data.latents import encode_dataset

    folder = _tiny_kl_folder(tmp_path / "ae")
    stage = first_stage.load_first_stage(folder)
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    source, _ = open_source("", _npz(tmp_path / "big.npz", images), 8, False)
    assert not source.direct
    enc = encode_dataset(source, stage, chunk=2)  # chunks of 2: 2 + 2 + 1
    x = torch.stack([source[(i, False)][0] for i in range(5)])
    torch.testing.assert_close(enc["mean"], stage.ae.encode(x).latent_dist.mean * 0.7, rtol=1e-5, atol=1e-6)
    assert enc["labels"] is None and enc["std"].shape == enc["mean"].shape == (5, 2, 4, 4)


def test_latent_cache_key_follows_what_decides_the_encodings(tmp_path):
    from dkdm.data.latents import cache_key
    from dkdm.resolve import SampleSpace

    folder = _tiny_kl_folder(tmp_path / "ae")
    data = _npz(tmp_path / "d.npz", np.zeros((2, 8, 8, 1), np.uint8))
    space = SampleSpace((2, 4, 4), 0, folder, 0.0)
    key = cache_key(space, "", data, 8)
    assert len(key) == 16 and key == cache_key(space, "", data, 8)
    changed = {
        cache_key(space, "", data, 16),  # another pixel size
        cache_key(SampleSpace((2, 4, 4), 0, folder, 0.5), "", data, 8),  # another scale
        cache_key(space, "digits", "", 8),  # a named dataset instead of the file
    }
    assert key not in changed and len(changed) == 3
    assert cache_key(space, "digits", "", 8) != cache_key(space, "other", "", 8)
    with open(os.path.join(folder, "config.json"), "a") as f:
        f.write(" ")  # the first stage's files are hashed (all of them, by name)
    assert cache_key(space, "", data, 8) != key
    key2 = cache_key(space, "", data, 8)
    os.utime(data, (1, 1))  # the data file's modification time is part of it
    assert cache_key(space, "", data, 8) != key2


def test_a_vq_first_stage_encodes_to_its_latents_without_a_posterior():
    from dkdm.data.images import ArraySource
    from dkdm.data.latents import encode_dataset
    from tests.test_first_stage import rand_sd

    fs = first_stage.from_compvis_state_dict(rand_sd(L.first_stage_shapes(TINY_FS, "vq")))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    enc = encode_dataset(ArraySource(images, np.array([2, 0, 1]), uint8=False), fs)
    assert enc["std"] is None and enc["labels"].tolist() == [2, 0, 1]
    torch.testing.assert_close(enc["mean"], fs.ae.encode(images).latents * fs.scale_factor)


class _Smuggled:
    """Stands for anything but tensors in a pickle: a cache file must never unpickle one."""


def test_latent_cache_is_shared_checked_and_read_as_tensors_only(tmp_path):
    import time

    from PIL import Image

    from dkdm.data.latents import cache_key, load_latent_data
    from dkdm.resolve import SampleSpace

    folder = _tiny_kl_folder(tmp_path / "ae", channels=3)  # image folders decode to RGB
    space = SampleSpace((2, 4, 4), 2, folder, 0.0)
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    for name in ("cat_0.png", "dog_0.png", "dog_1.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(pics / name)
    cache = tmp_path / "cache"
    kw = {"batch_size": 3, "deterministic": True, "seed": 0, "cache_dir": str(cache)}
    t0 = time.perf_counter()
    stream, info = load_latent_data(space, dataset="", data_dir=str(pics), class_cond=True, **kw)
    assert 0 < info["seconds"] < time.perf_counter() - t0
    _, cond = next(stream)
    assert cond["y"].tolist() == [0, 1, 1]  # classes from the file names, as for pixels
    # A second dataset in the same (existing) cache folder; a built-in one is keyed by its name.
    grey = _tiny_kl_folder(tmp_path / "ae1")
    digits = SampleSpace((2, 4, 4), 0, grey, 0.0)
    _, info2 = load_latent_data(digits, dataset="digits", data_dir="", class_cond=False, **kw)
    assert not info2["cached"] and info2["path"].endswith(f"latents-{cache_key(digits, 'digits', '', 8)}.pt")
    assert len(os.listdir(cache)) == 2
    # A cache file replaced by a pickle carrying objects is refused, not unpickled.
    enc = torch.load(info["path"], weights_only=True)
    torch.save({**enc, "extra": _Smuggled()}, info["path"])
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        load_latent_data(space, dataset="", data_dir=str(pics), class_cond=True, **kw)
