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


def _adm_float16_distances(u, v):
    """ADM's float16 squared distances written out scalar by scalar: every element-wise result
    rounded to float16, the two reductions accumulated in float32 and rounded once, then
    clamped at 0."""
    f16, f32 = np.float16, np.float32

    def reduce(a, b):
        acc = f32(0)
        for x, y in zip(a, b):
            acc = f32(acc + x * y)
        return acc

    u, v = u.astype(f16), v.astype(f16)
    out = np.zeros((len(u), len(v)), np.float32)
    for i, a in enumerate(u):
        for j, b in enumerate(v):
            norm_a = f16(reduce([f32(x * x) for x in a], np.ones(len(a), f32)))
            norm_b = f16(reduce([f32(x * x) for x in b], np.ones(len(b), f32)))
            prod = f16(reduce(a.astype(f32), b.astype(f32)))
            out[i, j] = max(f16(f16(norm_a - f16(prod * f16(2))) + norm_b), f16(0))
    return out


def test_float16_distances_round_each_op_as_adm_does():
    # Each row is built so that one shortcut changes the answer: 45.25^2 + 1 + 2^-24 is a float32
    # tie that float16 rounds down (float64 sums would round up); 1 + 2^-12 is 1 in float16;
    # 32 * 64 + 1 + 2^-24 is the same tie inside the product; the last row against itself rounds
    # to -0.000977 before the clamp at 0; the last row's entries are not float16 numbers, and
    # distances from them come out differently unless they are rounded first.
    u = np.array(
        [[45.25, 1, 2**-12], [1 + 2**-12, 0, 0], [32, 1, 2**-12], [0.09, 0.02, 0.83], [0.204, 0.878, 0.027]],
        np.float32,
    )
    v = np.array([[0, 0, 0], [64, 1, 2**-12], [0.09, 0.02, 0.83]], np.float32)
    want = _adm_float16_distances(u, v)
    assert want[0, 0] == 2048 and want[1, 0] == 1 and want[3, 2] == 0
    got = metrics.pairwise_distances(u, v)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(metrics.pairwise_distances(v, u), _adm_float16_distances(v, u))  # rounding is not symmetric


def test_the_float16_overflow_that_selects_float32_is_silent():
    import warnings

    u = np.full((3, 4), 300.0, np.float32)  # 300^2 overflows float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = metrics.pairwise_distances(u, u * 0.5)
    assert np.array_equal(d, np.full((3, 3), 4 * 150.0**2, np.float32))


def test_a_point_on_a_balls_boundary_is_inside_it():
    # 1-D integers (exact in float16): ref 0..3, samples -3..-6, k = 3. The ball of ref 0 has
    # radius 9 and sample -3 lies at distance 9 from it; the ball of sample -3 has radius 9 and
    # ref 0 lies on it. No other point is in any ball of the other set.
    ref = np.arange(4, dtype=np.float32)[:, None]
    sample = -np.arange(3, 7, dtype=np.float32)[:, None]
    assert metrics.precision_recall(ref, sample) == (0.25, 0.25)


class _SpyBlock(metrics.NumpyDistanceBlock):
    def __init__(self):
        self.shapes = []

    def pairwise_distances(self, u, v):
        self.shapes.append(("d", len(u), len(v)))
        return super().pairwise_distances(u, v)

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        self.shapes.append(("lt", len(batch_1), len(batch_2)))
        return super().less_thans(batch_1, radii_1, batch_2, radii_2)


def test_precision_recall_passes_every_setting_to_the_estimator():
    rng = np.random.RandomState(9)
    ref, sample = rng.randn(30, 4).astype(np.float32), (rng.randn(20, 4) * 0.7).astype(np.float32)
    spy = _SpyBlock()
    got = metrics.precision_recall(ref, sample, k=5, row_batch_size=16, col_batch_size=12, distance_block=spy)
    assert ("d", 16, 12) in spy.shapes and ("lt", 14, 8) in spy.shapes  # the blocks asked for
    assert max(r for _, r, _ in spy.shapes) == 16 and max(c for _, _, c in spy.shapes) == 12
    est = metrics.ManifoldEstimator(nhood_sizes=(5,))
    r_ref, r_sample = est.manifold_radii(ref), est.manifold_radii(sample)
    precision, recall = est.evaluate_pr(ref, r_ref, sample, r_sample)
    assert got == (precision[0], recall[0]) != metrics.precision_recall(ref, sample, k=3)
    clamped = metrics.ManifoldEstimator(nhood_sizes=(5,), clamp_to_percentile=50)
    p2, r2 = clamped.evaluate_pr(ref, clamped.manifold_radii(ref), sample, clamped.manifold_radii(sample))
    assert metrics.precision_recall(ref, sample, k=5, clamp_to_percentile=50) == (p2[0], r2[0]) != got


def test_fid_retry_uses_the_default_eps_and_the_statistics_pass_theirs(monkeypatch):
    real = metrics._sqrtm
    calls = []

    def once_singular(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) % 2 == 1 else real(a)

    monkeypatch.setattr(metrics, "_sqrtm", once_singular)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 0.5])
    a, b = metrics.FIDStatistics(np.zeros(2), s1), metrics.FIDStatistics(np.ones(2), s2)
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        metrics.frechet_distance(np.zeros(2), s1, np.ones(2), s2)
    np.testing.assert_array_equal(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    for eps, want in ((None, 1e-6), (0.25, 0.25)):
        with pytest.warns(UserWarning):
            a.frechet_distance(b) if eps is None else a.frechet_distance(b, eps=eps)
        np.testing.assert_array_equal(calls[-1], (s1 + want * np.eye(2)) @ (s2 + want * np.eye(2)))


def test_fid_imaginary_error_gives_the_largest_imaginary_part(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.diag([1 + 0.5j, 1 - 0.25j]))
    with pytest.raises(ValueError, match=r"^Imaginary component 0\.5$"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


def test_compute_statistics_takes_two_rows_and_names_the_count():
    mu, sigma = metrics.compute_statistics(np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]]))
    np.testing.assert_array_equal(mu, [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(sigma, [[2, 2, 4], [2, 2, 4], [4, 4, 8]])  # columns are the variables
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1;"):
        metrics.compute_statistics(np.zeros((1, 5)))


def test_inception_score_in_the_probabilities_dtype_and_adm_split():
    rng = np.random.RandomState(10)
    probs = rng.dirichlet(np.full(10, 0.3), size=10_000).astype(np.float32)
    probs[:5000] = rng.dirichlet(np.full(10, 3.0), size=5000)  # the two default splits differ

    def adm(part):  # ADM's formula, in the array's own dtype
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        return np.exp(np.mean(np.sum(kl, 1)))

    assert metrics.inception_score(probs) == float(np.mean([adm(probs[:5000]), adm(probs[5000:])]))
    assert metrics.inception_score(probs[:1]) == pytest.approx(1.0)  # one image: its own marginal
    for bad in (np.full(10, 0.1), np.zeros((0, 10)), np.zeros((4, 0))):
        with pytest.raises(ValueError, match="non-empty"):
            metrics.inception_score(bad)


def test_inception_score_of_zero_probabilities_is_quiet():
    import warnings

    probs = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log(0) and 0 * -inf are handled, not warned about
        assert metrics.inception_score(probs) == pytest.approx(np.exp(np.log(6 / 2) * 4 / 6 + np.log(6) * 2 / 6))


def test_manifold_radii_float32_per_neighbourhood_and_clamped_at_a_sample():
    x = np.random.RandomState(11).randn(41, 3)
    est = metrics.ManifoldEstimator(nhood_sizes=(1, 5), clamp_to_percentile=50)
    r = est.manifold_radii(x)
    assert r.dtype == np.float32 and r.shape == (41, 2)
    assert ((r == 0).sum(0) == [20, 20]).all()  # each column's own median is a radius: it stays


@pytest.mark.parametrize("rows", [10000, 2])
def test_evaluate_gives_adms_per_vector_results(rows):
    # 1-D integers, exact in float16: ref radii (k = 3) are 49, 36, 16, 49, 196.
    ref = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]], np.float32)
    spy = _SpyBlock()
    est = metrics.ManifoldEstimator(distance_block=spy, row_batch_size=rows)
    radii = est.manifold_radii(ref)
    assert radii[:, 0].tolist() == [49, 36, 16, 49, 196]
    evals = np.array([[0.0], [2.0], [-7.0], [29.0], [30.0]], np.float32)  # -7 and 29 lie on a ball's edge
    spy.shapes.clear()
    out = est.evaluate(ref, radii, evals)
    assert spy.shapes == ([("d", 5, 5)] if rows > 5 else [("d", 2, 5), ("d", 2, 5), ("d", 1, 5)])  # row blocks
    dist = ((evals - ref.T) ** 2).astype(np.float32)
    realism = np.max(radii[:, 0] / (dist + np.float32(1e-5)), axis=1)  # float32 throughout, as ADM
    assert out["max_realism_score"].dtype == np.float32 and np.array_equal(out["max_realism_score"], realism)
    assert out["nearest_indices"].dtype == np.int32 and out["nearest_indices"].tolist() == [0, 1, 0, 4, 4]
    assert out["batch_predictions"].dtype == np.int32 and out["batch_predictions"].tolist() == [[1], [1], [1], [1], [0]]
    assert out["fraction"] == 0.8 and sorted(out) == [
        "batch_predictions",
        "fraction",
        "max_realism_score",
        "nearest_indices",
    ]
