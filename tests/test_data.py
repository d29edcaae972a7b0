import os

import numpy as np
import pytest
import torch
from PIL import Image

from dkdm.data import DataError, load_data, load_digits, per_rank_batch, read_npz
from dkdm.data.images import center_crop_arr


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ca), (xb, cb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert ca.keys() == cb.keys()
        for k in ca:
            assert torch.equal(ca[k], cb[k])


# --------------------------------------------------------------------------- digits


def test_digits_shape_range_labels():
    from sklearn.datasets import load_digits as sk

    x, y = load_digits()
    ref = sk()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    # 0..16 mapped linearly: pixel v becomes v / 8 - 1.
    assert torch.allclose(x[:, 0], torch.from_numpy(ref.images).float() / 8 - 1)
    assert torch.equal(y, torch.from_numpy(ref.target))
    assert set(y.tolist()) == set(range(10))


@pytest.mark.parametrize("size", [4, 16])
def test_digits_resized(size):
    x8, _ = load_digits()
    x, _ = load_digits(size)
    assert x.shape == (1797, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1
    # Area shrink preserves the mean brightness; bilinear growth nearly so.
    assert torch.allclose(x.mean((1, 2, 3)), x8.mean((1, 2, 3)), atol=0.06)


def test_digits_stream_matches_dataset():
    x_all, y_all = load_digits()
    s = load_data(batch_size=50, image_size=8, class_cond=True, rank=0, world_size=1)
    for k in range(3):
        idx, flip = s.plan(k)
        x, cond = next(s)
        assert x.shape == (50, 1, 8, 8)
        assert not flip.any()  # digits are never mirrored
        assert torch.equal(x, x_all[idx]) and torch.equal(cond["y"], y_all[idx])
    assert "y" not in next(load_data(batch_size=4, image_size=8, rank=0, world_size=1))[1]


def test_epochs_visit_every_example_once_and_reshuffle():
    s = load_data(batch_size=7, image_size=8, rank=1, world_size=4, seed=3)
    n = len(range(1, 1797, 4))
    first = np.concatenate([s.plan(k)[0] for k in range(-(-2 * n // 7))])
    e0, e1 = first[:n], first[n : 2 * n]
    assert sorted(e0.tolist()) == list(range(1, 1797, 4))
    assert sorted(e1.tolist()) == list(range(1, 1797, 4))
    assert not np.array_equal(e0, e1)


def test_deterministic_is_fixed_order():
    s = load_data(batch_size=5, image_size=8, deterministic=True, rank=0, world_size=2)
    assert s.plan(0)[0].tolist() == [0, 2, 4, 6, 8]


def test_sharding_is_disjoint_and_covers():
    world = 3
    seen = []
    for r in range(world):
        s = load_data(batch_size=599, image_size=8, rank=r, world_size=world)
        seen.append(set(s.plan(0)[0].tolist()))  # 599 = this rank's whole shard
    assert sum(len(p) for p in seen) == 1797
    assert set().union(*seen) == set(range(1797))


def test_seed_changes_stream():
    a = load_data(batch_size=8, image_size=8, seed=0, rank=0, world_size=1).plan(0)[0]
    b = load_data(batch_size=8, image_size=8, seed=1, rank=0, world_size=1).plan(0)[0]
    assert not np.array_equal(a, b)


def test_digits_resume_is_bitwise():
    kw = {
        "batch_size": 256,
        "image_size": 8,
        "class_cond": True,
        "rank": 0,
        "world_size": 1,
        "seed": 5,
    }
    ref = load_data(**kw)
    full = take(ref, 12)  # crosses an epoch boundary (1797 / 256 ~ 7)
    a = load_data(**kw)
    take(a, 5)
    state = a.state_dict()
    b = load_data(**kw)
    b.load_state_dict(state)
    assert_same_batches(take(b, 7), full[5:])


# --------------------------------------------------------------------------- npz


def write_npz(path, n=23, size=8, channels=3, labels=True, compressed=False, seed=0):
    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    y = rng.randint(0, 5, size=n)
    save = np.savez_compressed if compressed else np.savez
    save(path, arr, y) if labels else save(path, arr)
    return arr, y


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path, compressed):
    path = str(tmp_path / "d.npz")
    arr, y = write_npz(path, compressed=compressed)
    images, _ = read_npz(path, want_labels=True)
    assert isinstance(images, np.memmap) != compressed  # stored members are memory-mapped
    s = load_data(
        data_dir=path,
        batch_size=23,
        image_size=8,
        class_cond=True,
        random_flip=False,
        deterministic=True,
        rank=0,
        world_size=1,
    )
    x, cond = next(s)
    expect = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(x, expect)
    assert torch.equal(cond["y"], torch.from_numpy(y))


def test_npz_flips_mirror_exactly(tmp_path):
    path = str(tmp_path / "d.npz")
    arr, _ = write_npz(path, labels=False)
    s = load_data(data_dir=path, batch_size=40, image_size=8, rank=0, world_size=1)
    idx, flip = s.plan(0)
    x, _ = next(s)
    assert 0 < flip.sum() < len(flip)
    base = torch.from_numpy(arr[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    for i in range(len(idx)):
        assert torch.equal(x[i], base[i].flip(-1) if flip[i] else base[i])


def test_npz_resume_is_bitwise_and_worker_independent(tmp_path):
    path = str(tmp_path / "d.npz")
    write_npz(path, n=30, size=12)  # 12 -> 8 goes through decoding in DataLoader workers
    kw = {
        "data_dir": path,
        "batch_size": 8,
        "image_size": 8,
        "class_cond": True,
        "rank": 1,
        "world_size": 2,
        "seed": 2,
    }
    ref = take(load_data(num_workers=0, **kw), 6)
    assert ref[0][0].shape == (8, 3, 8, 8)
    a = load_data(num_workers=2, **kw)
    assert_same_batches(take(a, 3), ref[:3])
    state = a.state_dict()
    b = load_data(num_workers=2, **kw)
    b.load_state_dict(state)
    assert_same_batches(take(b, 3), ref[3:])
    # Same-size npz (sliced in process) resumes as well.
    path2 = str(tmp_path / "e.npz")
    write_npz(path2, n=30, size=8)
    kw2 = {**kw, "data_dir": path2}
    ref2 = take(load_data(**kw2), 9)
    c = load_data(**kw2)
    take(c, 4)
    d = load_data(**kw2)
    d.load_state_dict(c.state_dict())
    assert_same_batches(take(d, 5), ref2[4:])


def test_npz_grayscale_keeps_one_channel(tmp_path):
    path = str(tmp_path / "g.npz")
    write_npz(path, size=16, channels=1, labels=False)
    x, _ = next(
        load_data(
            data_dir=path,
            batch_size=4,
            image_size=8,
            num_workers=0,
            rank=0,
            world_size=1,
        )
    )
    assert x.shape == (4, 1, 8, 8)


# --------------------------------------------------------------------------- image folders


def make_folder(root):
    """Solid-colour images of uneven sizes in nested folders; the colour encodes the class."""
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
    files = {}
    for i, (cls, sub) in enumerate([("cat", ""), ("dog", "a"), ("emu", "a/b"), ("cat", "a/b"), ("dog", "")]):
        d = os.path.join(root, sub)
        os.makedirs(d, exist_ok=True)
        ext = ".png" if i % 2 == 0 else ".jpg"
        p = os.path.join(d, f"{cls}_{i}{ext}")
        Image.new("RGB", (20 + i, 13), colours[cls]).save(p, quality=100)
        files[p] = cls
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    return files, colours


def test_image_folder_round_trip(tmp_path):
    files, colours = make_folder(str(tmp_path))
    s = load_data(
        data_dir=str(tmp_path),
        batch_size=5,
        image_size=8,
        class_cond=True,
        deterministic=True,
        random_flip=False,
        num_workers=0,
        rank=0,
        world_size=1,
    )
    x, cond = next(s)
    assert x.shape == (5, 3, 8, 8)
    classes = sorted(colours)  # labels index the sorted prefixes
    names = [classes[i] for i in cond["y"].tolist()]
    assert sorted(names) == sorted(files.values())
    for img, name in zip(x, names):
        rgb = torch.tensor(colours[name]).float() / 127.5 - 1
        assert torch.allclose(img.mean((1, 2)), rgb, atol=0.03)  # jpg is lossy


def test_image_folder_flip_and_crop(tmp_path):
    # Left half black, right half white, 40x16: crop to the centre, shrink to 8.
    a = np.zeros((16, 40, 3), np.uint8)
    a[:, 20:] = 255
    Image.fromarray(a).save(tmp_path / "x_0.png")
    crop = center_crop_arr(Image.fromarray(a), 8)
    assert crop.shape == (8, 8, 3)
    assert crop[:, 0].max() < 60 and crop[:, -1].min() > 200
    seen = set()
    s = load_data(
        data_dir=str(tmp_path),
        batch_size=1,
        image_size=8,
        num_workers=0,
        rank=0,
        world_size=1,
    )
    for _ in range(16):
        (_,), (flip,) = s.plan(s.state_dict()["batches"])
        x, _ = next(s)
        left_dark = bool(x[0, :, :, 0].mean() < 0)
        assert left_dark != flip
        seen.add(flip)
    assert seen == {True, False}


def test_image_folder_resume_with_workers(tmp_path):
    make_folder(str(tmp_path))
    kw = {
        "data_dir": str(tmp_path),
        "batch_size": 3,
        "image_size": 8,
        "class_cond": True,
        "rank": 0,
        "world_size": 1,
    }
    ref = take(load_data(num_workers=0, **kw), 5)
    a = load_data(num_workers=2, **kw)
    take(a, 2)
    b = load_data(num_workers=2, **kw)
    b.load_state_dict(a.state_dict())
    assert_same_batches(take(b, 3), ref[2:])


# --------------------------------------------------------------------------- bad input


def test_per_rank_batch():
    assert per_rank_batch(64, 4) == 16 and per_rank_batch(1, 1) == 1
    with pytest.raises(DataError, match="cannot be split evenly over 3"):
        per_rank_batch(64, 3)
    with pytest.raises(DataError, match="batch size must be positive, got 0"):
        per_rank_batch(0, 1)
    with pytest.raises(DataError, match="world size must be positive, got 0"):
        per_rank_batch(4, 0)
    # The hint names the nearest multiples on either side, or the world size when below it.
    with pytest.raises(DataError, match=r"use a multiple of 4 \(e\.g\. 8 or 12\)$"):
        per_rank_batch(10, 4)
    with pytest.raises(DataError, match=r"use a multiple of 4 \(e\.g\. 4\)$"):
        per_rank_batch(3, 4)


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(data_dir=str(tmp_path / "nope"), batch_size=2, image_size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=2, image_size=8)


def test_unreadable_image(tmp_path):
    (tmp_path / "a_0.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="cannot read image"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads everything")
def test_unreadable_dir(tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0)
    try:
        with pytest.raises(DataError, match="not readable"):
            load_data(data_dir=str(d), batch_size=2, image_size=8)
    finally:
        d.chmod(0o755)


def test_bad_npz(tmp_path):
    p = str(tmp_path / "x.npz")
    np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="no 'arr_0'.*images"):
        load_data(data_dir=p, batch_size=2, image_size=8)
    np.savez(p, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="dtype float32, expected uint8"):
        load_data(data_dir=p, batch_size=2, image_size=8)
    np.savez(p, np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="N x C x H x W; transpose"):
        load_data(data_dir=p, batch_size=2, image_size=8)
    np.savez(p, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"has no labels \(arr_1\) but class_cond is on"):
        load_data(data_dir=p, batch_size=2, image_size=8, class_cond=True)
    np.savez(p, np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(DataError, match="arr_1"):
        load_data(data_dir=p, batch_size=2, image_size=8)
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .* as an npz"):
        load_data(data_dir=str(tmp_path / "broken.npz"), batch_size=2, image_size=8)


def test_bad_arguments():
    with pytest.raises(DataError, match="batch_size"):
        load_data(batch_size=0, image_size=8)
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_data(dataset="cifar", batch_size=2, image_size=8)
    with pytest.raises(DataError, match="fewer than the 4 processes"):
        from dkdm.data.images import ArraySource, DataStream

        DataStream(
            ArraySource(torch.zeros(3, 1, 2, 2), None, uint8=False),
            batch_size=1,
            class_cond=False,
            shuffle=True,
            random_flip=False,
            seed=0,
            rank=3,
            world_size=4,
            num_workers=0,
        )


# --------------------------------------------------------------------------- pieces, exactly


def _adm_center_crop(image, size):
    """ADM's centre crop, written out step by step as the reference."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.BICUBIC)
    a = np.asarray(image)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top : top + size, left : left + size]


@pytest.mark.parametrize("wh", [(300, 200), (128, 190), (127, 70), (40, 97)])
def test_center_crop_matches_adm(wh):
    rng = np.random.default_rng(sum(wh))
    image = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    got = center_crop_arr(image, 64 if min(wh) > 64 else 32)
    want = _adm_center_crop(image, 64 if min(wh) > 64 else 32)
    assert got.shape == want.shape and got.shape[:2] in ((64, 64), (32, 32))
    np.testing.assert_array_equal(got, want)


def test_center_crop_halves_with_a_box_filter_at_exactly_twice():
    # 128 px is exactly twice 64: one box halving first (a bicubic resize straight to 64 differs).
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8))
    want = np.asarray(image.resize((64, 64), resample=Image.BOX))
    np.testing.assert_array_equal(center_crop_arr(image, 64), want)


def test_epoch_seeds_use_all_64_bits():
    from dkdm.data.images import _epoch_seed

    seeds = [_epoch_seed(0, r, e) for r in range(4) for e in range(8)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**64 for s in seeds)
    assert max(seeds) >= 2**32  # not a 32-bit seed
    assert any(s >> 32 != s & 0xFFFFFFFF for s in seeds)  # two independent halves
    assert _epoch_seed(-1, 0, 0) == _epoch_seed(2**63 - 1, 0, 0)  # any Python int is a seed


def test_to_uint8_is_adm_rounding():
    from dkdm.data.arrays import to_uint8

    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 1.5]).reshape(1, 1, 1, 7)
    got = to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (1, 1, 7, 1)
    # (x + 1) * 127.5, rounded half to even, clamped: 63.75 -> 64, 127.5 -> 128, 254.87 -> 255
    assert got.reshape(-1).tolist() == [0, 0, 64, 128, 255, 255, 255]
    nchw = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(to_uint8(nchw), to_uint8(nchw).reshape(2, 4, 5, 3))  # NHWC out
    assert to_uint8(nchw)[1, 2, 3, 0] == round((float(nchw[1, 0, 2, 3]) + 1) * 127.5)


def test_save_npz_names_its_arrays(tmp_path):
    from dkdm.data.arrays import save_npz

    images = np.zeros((2, 4, 4, 3), np.uint8)
    save_npz(str(tmp_path / "a.npz"), images)
    save_npz(str(tmp_path / "b.npz"), images, np.array([3, 1]))
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == ["arr_0"] and b.files == ["arr_0", "arr_1"]
        assert b["arr_1"].tolist() == [3, 1]


def test_save_grid_layout(tmp_path):
    from dkdm.data.arrays import save_grid

    images = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(3)])  # 3 images, 2x3
    save_grid(images, str(tmp_path / "g.png"), nrow=2, min_side=1)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L"
        g = np.asarray(im)
    # Two columns, two rows, a 2-pixel border around and between the tiles.
    assert g.shape == (2 * (2 + 2) + 2, 2 * (3 + 2) + 2)
    want = np.zeros_like(g)
    for i in range(3):
        r, k = divmod(i, 2)
        want[2 + r * 4 : 2 + r * 4 + 2, 2 + k * 5 : 2 + k * 5 + 3] = 10 * (i + 1)
    np.testing.assert_array_equal(g, want)
    # Upscaled by whole pixels (nearest) until the longer side reaches min_side.
    for min_side, k in ((25, 3), (20, 2), (10, 1)):
        save_grid(images, str(tmp_path / "big.png"), nrow=2, min_side=min_side)
        with Image.open(tmp_path / "big.png") as im:
            np.testing.assert_array_equal(np.asarray(im), want.repeat(k, 0).repeat(k, 1))
    # The default min_side is 256: a grid exactly 256 high stays at its size.
    tall = np.zeros((9, 125, 3, 1), np.uint8)  # two rows of 125 px: 2 * 127 + 2 = 256
    save_grid(tall, str(tmp_path / "tall.png"))
    with Image.open(tmp_path / "tall.png") as im:
        assert im.size == (8 * 5 + 2, 256)
    # Defaults: an 8 x 8 grid of the first 64 images, at least 256 px; colour stays RGB.
    many = np.random.default_rng(0).integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    save_grid(many, str(tmp_path / "d.png"))
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode == "RGB" and im.size == (82 * 4, 82 * 4)
        d = np.asarray(im)[::4, ::4]
    np.testing.assert_array_equal(d[2:10, 2:10], many[0])
    np.testing.assert_array_equal(d[72:80, 72:80], many[63])


def test_load_digits_sizes_and_refusals():
    x1, _ = load_digits(1)  # one pixel: the mean of each digit
    x8, _ = load_digits(8)
    assert x1.shape[1:] == (1, 1, 1)
    torch.testing.assert_close(x1.reshape(-1), x8.mean(dim=(1, 2, 3)))
    for bad in (0, -3, 8.0, "8"):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            load_digits(bad)


def _save_npz(path, *arrays):
    np.savez(str(path), *arrays)
    return str(path)


def test_npz_edges_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 1, 1, 1), dtype=np.uint8)  # a single one-pixel image
    images, labels = read_npz(_save_npz(tmp_path / "one.npz", one), want_labels=False)
    assert images.tolist() == one.tolist() and labels is None
    # A Fortran-ordered array (np.savez records it so) is mapped with its own order.
    f = np.asfortranarray(rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8))
    images, _ = read_npz(_save_npz(tmp_path / "f.npz", f), want_labels=False)
    np.testing.assert_array_equal(images, f)
    # Memory-mapped read-only: a stray write cannot change the dataset file.
    c = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    images, _ = read_npz(_save_npz(tmp_path / "c.npz", c), want_labels=False)
    assert isinstance(images, np.memmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, c)


def test_npz_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match=r"has no 'arr_0' \(it holds nothing\)"):
        read_npz(_save_npz(tmp_path / "empty.npz"), want_labels=False)
    with pytest.raises(DataError, match="arr_0 holds no images"):
        read_npz(_save_npz(tmp_path / "none.npz", np.zeros((0, 8, 8, 3), np.uint8)), want_labels=False)
    with pytest.raises(DataError, match=r"N x C x H x W; transpose"):  # one channel first
        read_npz(_save_npz(tmp_path / "nchw.npz", np.zeros((2, 1, 8, 8), np.uint8)), want_labels=False)
    with pytest.raises(DataError, match=r"shape \(2, 3, 8\), expected N x H x W x C with C = 1 or 3$"):
        read_npz(_save_npz(tmp_path / "3d.npz", np.zeros((2, 3, 8), np.uint8)), want_labels=False)
    with pytest.raises(DataError, match="must be 2 integers, got int64 of shape"):
        read_npz(_save_npz(tmp_path / "l.npz", np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3, np.int64)), False)


def test_stream_state_records_its_arguments_and_warns_on_change(capsys):
    a = load_data(batch_size=4, image_size=8, seed=3)
    state = a.state_dict()
    assert state == {
        "batches": 0,
        "batch_size": 4,
        "world_size": 1,
        "num_examples": 1797,
        "seed": 3,
        "shuffle": True,
    }
    assert (a.num_workers, a.random_flip) == (2, False)  # digits are never flipped
    take(a, 2)
    b = load_data(batch_size=4, image_size=8, seed=3)
    b.load_state_dict(a.state_dict())
    assert "WARNING" not in capsys.readouterr().out  # same stream: resumed silently
    c = load_data(batch_size=8, image_size=8, seed=3)
    c.load_state_dict(a.state_dict())
    out = capsys.readouterr().out
    assert "data stream resumed with different batch_size (4 -> 8); continuing after batch 2" in out
    assert "seed" not in out


def test_load_data_defaults_and_refusals():
    assert_same_batches(
        take(load_data(batch_size=2, image_size=8), 2), take(load_data(batch_size=2, image_size=8, seed=0), 2)
    )
    x, _ = next(load_data(batch_size=2, image_size=1))
    assert x.shape == (2, 1, 1, 1)
    for bad in (0, 8.0):
        with pytest.raises(DataError, match="image_size must be a positive integer"):
            load_data(batch_size=2, image_size=bad)
    with pytest.raises(DataError, match="rank 2 is outside a world of 2 processes"):
        load_data(batch_size=2, image_size=8, rank=2, world_size=2)
    with pytest.raises(DataError, match="rank -1 is outside"):
        load_data(batch_size=2, image_size=8, rank=-1, world_size=2)


def test_image_folder_colour_modes_and_symlinks(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "c0_rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "a" / "c1_rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "a" / "c1_pal.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.fromarray(rgb).save(other / "c2_linked.png")
    os.symlink(other, root / "b")  # a linked folder is followed
    s = load_data(
        data_dir=str(root),
        batch_size=4,
        image_size=8,
        deterministic=True,
        random_flip=False,
        class_cond=True,
        num_workers=0,  # decoded in this process
    )
    x, cond = next(s)
    assert x.shape == (4, 3, 8, 8)
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    for i in (0, 2, 3):  # RGB, RGBA (sorted after the palette) and the linked file: the same pixels
        torch.testing.assert_close(x[i], want, rtol=0, atol=1e-6)
    assert cond["y"].tolist() == [0, 1, 1, 2]


def test_grayscale_npz_resized_keeps_one_channel(tmp_path):
    g = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    x, _ = next(load_data(data_dir=_save_npz(tmp_path / "g.npz", g), batch_size=3, image_size=8, deterministic=True))
    assert x.shape == (3, 1, 8, 8)
    ref = center_crop_arr(Image.fromarray(g[0, ..., 0]), 8)
    flipped = torch.from_numpy(ref.copy()).float() / 127.5 - 1
    assert torch.allclose(x[0, 0], flipped, atol=1e-6) or torch.allclose(x[0, 0], flipped.flip(-1), atol=1e-6)


def test_read_images_reads_every_kind(tmp_path):
    import pickle

    from dkdm.data.arrays import read_images

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": list(range(n))}))
    images, labels = read_images(str(folder))  # the training split by default
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == [0, 1] * 5
    import tarfile

    for suffix in (".tar.gz", ".tgz", ".tar"):
        archive = tmp_path / f"cifar{suffix}"
        with tarfile.open(archive, "w:gz" if suffix != ".tar" else "w") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        images, labels = read_images(str(archive), split="test")
        assert images.shape == (3, 32, 32, 3) and labels.tolist() == [0, 1, 2], suffix
    big = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images, labels = read_images(_save_npz(tmp_path / "big.npz", big, np.array([1, 0])), image_size=8)
    assert images.shape == (2, 8, 8, 3) and labels.tolist() == [1, 0]
    np.testing.assert_array_equal(images[1], center_crop_arr(Image.fromarray(big[1]), 8))
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(big[0]).save(pics / "cat_1.png")
    images, labels = read_images(str(pics))
    assert images.shape == (1, 16, 16, 3) and labels is None  # no labels unless asked


def test_npz_sources_fast_path_flips_and_label_range(tmp_path):
    from dkdm.data.images import open_source

    rng = np.random.default_rng(0)
    square = _save_npz(tmp_path / "sq.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.arange(4))
    source, flips_ok = open_source("", square, 8, False)
    assert source.direct and flips_ok  # at size already: sliced in the main process, flippable
    wide = rng.integers(0, 256, (2, 8, 16, 3), dtype=np.uint8)  # 8 high, 16 wide
    source, flips_ok = open_source("", _save_npz(tmp_path / "wide.npz", wide), 8, False)
    assert not source.direct and flips_ok
    tall = rng.integers(0, 256, (2, 16, 8, 3), dtype=np.uint8)  # 16 high, 8 wide: cropped too
    tall_source, _ = open_source("", _save_npz(tmp_path / "tall.npz", tall), 8, False)
    assert not tall_source.direct and tall_source[(0, False)][0].shape == (3, 8, 8)
    np.testing.assert_array_equal(
        ((source[(1, False)][0].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8),
        center_crop_arr(Image.fromarray(wide[1]), 8),
    )
    assert load_data(data_dir=str(tmp_path / "wide.npz"), batch_size=2, image_size=8).random_flip
    with pytest.raises(DataError, match=r"labels run from 0 to 3, outside \[0, 3\)"):
        load_data(data_dir=square, batch_size=2, image_size=8, class_cond=True, num_classes=3)
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(wide[0]).save(plain / "photo.png")  # no class prefix: fine without class_cond
    x, cond = next(load_data(data_dir=str(plain), batch_size=1, image_size=8))
    assert x.shape == (1, 3, 8, 8) and cond == {}


def test_read_cifar_python_reads_the_training_split_by_default(tmp_path):
    import pickle

    from dkdm.data.arrays import read_cifar_python

    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 1) for i in range(1, 6)] + [("test_batch", 2)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        (tmp_path / name).write_bytes(pickle.dumps({"data": data, "labels": [7] * n}))  # str keys too
    images, labels = read_cifar_python(str(tmp_path))
    assert images.shape == (5, 32, 32, 3) and labels.tolist() == [7] * 5
    with pytest.raises(DataError, match="split must be 'train' or 'test', got 'val'"):
        read_cifar_python(str(tmp_path), split="val")
