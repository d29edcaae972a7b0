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
    assert per_rank_batch(64, 4) == 16
    with pytest.raises(DataError, match="cannot be split evenly over 3"):
        per_rank_batch(64, 3)
    with pytest.raises(DataError, match="positive"):
        per_rank_batch(0, 1)


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
    with pytest.raises(DataError, match="no labels"):
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
