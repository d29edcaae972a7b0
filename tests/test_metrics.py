"""evaluations.metrics and evaluations.npz against independent computations (numpy/scipy only)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from evaluations import metrics
from evaluations.npz import inspect_npz, open_npz_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_imports_without_tensorflow_or_torch():
    code = (
        "import sys; import evaluations.metrics, evaluations.npz, evaluations.inception; "
        "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_fid_of_identical_statistics_is_zero():
    rng = np.random.RandomState(0)
    mu, sigma = metrics.compute_statistics(rng.randn(200, 16))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.RandomState(1)
    m1, m2 = rng.randn(32), rng.randn(32)
    s1, s2 = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    stats = metrics.FIDStatistics(m1, np.diag(s1))
    assert stats.frechet_distance(metrics.FIDStatistics(m2, np.diag(s2))) == pytest.approx(expected, rel=1e-10)


def test_fid_of_full_gaussians_matches_eigen_formula():
    # For commuting-free full covariances: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), via eigh.
    rng = np.random.RandomState(2)
    a, b = rng.randn(10, 10), rng.randn(10, 10)
    s1, s2 = a @ a.T + np.eye(10), b @ b.T + np.eye(10)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sum(np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)))
    m1, m2 = rng.randn(10), rng.randn(10)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_singular_product_retries_with_eps(monkeypatch):
    # When sqrtm of the product is not finite, ADM retries on (sigma1 + eps I)(sigma2 + eps I).
    seen = []
    real = metrics._sqrtm

    def flaky(a):
        seen.append(a)
        return np.full_like(a, np.inf) if len(seen) == 1 else real(a)

    monkeypatch.setattr(metrics, "_sqrtm", flaky)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 0.5])
    with pytest.warns(UserWarning, match="singular product"):
        d = metrics.frechet_distance(np.zeros(2), s1, np.ones(2), s2, eps=1e-3)
    np.testing.assert_allclose(seen[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
    e1, e2 = np.diag(s1) + 1e-3, np.diag(s2) + 1e-3
    assert d == pytest.approx(2 + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(e1 * e2)), rel=1e-12)


def test_fid_large_imaginary_part_is_an_error(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.eye(len(a)) * (1 + 0.5j))
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


def test_fid_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="different"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_compute_statistics_matches_numpy_and_needs_two_rows():
    x = np.random.RandomState(3).randn(50, 6).astype(np.float32)
    mu, sigma = metrics.compute_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, xc.T @ xc / 49, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.compute_statistics(x[:1])


def test_inception_score_uniform_is_one_and_confident_over_k_is_k():
    assert metrics.inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0, abs=1e-6)
    k, n = 7, 70
    onehot = np.eye(10)[np.arange(n) % k]
    assert metrics.inception_score(onehot) == pytest.approx(k, rel=1e-6)
    # Nearly confident float32 predictions, as a softmax gives: close to k.
    soft = (onehot * 0.999 + 0.001 / 10).astype(np.float32)
    assert metrics.inception_score(soft) == pytest.approx(k, rel=0.02)


def test_inception_score_splits_are_averaged():
    # First split confident over 4 classes (IS 4), second uniform (IS 1): mean 2.5.
    a = np.eye(4)[np.arange(8) % 4]
    b = np.full((8, 4), 0.25)
    assert metrics.inception_score(np.concatenate([a, b]), split_size=8) == pytest.approx(2.5)
    assert metrics.inception_score(np.concatenate([a, b]), split_size=16) < 2.5


def test_pairwise_distances_match_exact_distances():
    rng = np.random.RandomState(4)
    u, v = rng.rand(30, 64).astype(np.float32), rng.rand(20, 64).astype(np.float32)
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    d = metrics.pairwise_distances(u, v)
    assert d.dtype == np.float32 and d.shape == (30, 20)
    np.testing.assert_allclose(d, exact, rtol=0.02, atol=0.05)  # float16 path, as ADM
    big = u * 100  # squared norms overflow float16: the float32 path is taken
    np.testing.assert_allclose(metrics.pairwise_distances(big, v * 100), exact * 1e4, rtol=1e-4)


def test_manifold_radii_are_kth_neighbour_distances_across_blocks():
    rng = np.random.RandomState(5)
    x = rng.rand(50, 8).astype(np.float32) * 4
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]  # index 0 is the point itself
    for rows, cols in ((10000, 10000), (7, 11)):
        est = metrics.ManifoldEstimator(row_batch_size=rows, col_batch_size=cols)
        np.testing.assert_allclose(est.manifold_radii(x)[:, 0], expected, rtol=0.02, atol=0.02)


def test_precision_recall_of_a_set_against_itself_is_one():
    x = np.random.RandomState(6).randn(80, 32).astype(np.float32)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x, row_batch_size=13, col_batch_size=17) == (1.0, 1.0)


def test_precision_recall_against_brute_force():
    rng = np.random.RandomState(7)
    ref = rng.randn(60, 5)
    sample = rng.randn(45, 5) * 0.5 + 1.0  # narrower and shifted: high precision, low recall

    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, 3]

    cross = ((ref[:, None] - sample[None]) ** 2).sum(-1)  # [ref, sample]
    precision = np.mean(np.any(cross <= radii(ref)[:, None], axis=0))
    recall = np.mean(np.any(cross <= radii(sample)[None], axis=1))
    got = metrics.precision_recall(
        ref.astype(np.float32), sample.astype(np.float32), row_batch_size=16, col_batch_size=9
    )
    assert got == pytest.approx((precision, recall), abs=2 / 45)
    assert got[0] > got[1]


def test_clamp_to_percentile_drops_the_largest_balls():
    x = np.random.RandomState(8).randn(40, 4).astype(np.float32)
    est = metrics.ManifoldEstimator(clamp_to_percentile=50)
    r = est.manifold_radii(x)
    assert (r == 0).sum() == 20


def test_too_few_points_for_knn_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 4"):
        metrics.precision_recall(np.zeros((3, 2), np.float32), np.zeros((5, 2), np.float32))


def test_npz_reader_streams_batches(tmp_path):
    arr = np.random.RandomState(9).randint(0, 256, (23, 5, 4, 3)).astype(np.uint8)
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, arr_0=arr, other=np.zeros(2))
        info = inspect_npz(path)
        assert info.shape == arr.shape and info.dtype == np.uint8 and set(info.keys) == {"arr_0", "other"}
        with open_npz_array(path) as reader:
            got = list(reader.read_batches(10))
        assert [len(b) for b in got] == [10, 10, 3]
        np.testing.assert_array_equal(np.concatenate(got), arr)
    fortran = str(tmp_path / "f.npz")
    np.savez(fortran, arr_0=np.asfortranarray(arr))
    with open_npz_array(fortran) as reader:
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(4))), arr)
