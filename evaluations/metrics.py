"""The maths of the ADM evaluation suite, with numpy and scipy only.

Everything here works on feature arrays that someone else computed (the Inception graph in
`evaluations/evaluator.py`, or a small torch classifier for the digits default), so it
imports neither TensorFlow nor torch. The formulas, dtypes, batching and corner-case
handling follow guided-diffusion's `evaluations/evaluator.py` so that the same features
give the same numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import scipy
from scipy import linalg

__all__ = [
    "DistanceBlock",
    "FIDStatistics",
    "ManifoldEstimator",
    "NumpyDistanceBlock",
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "pairwise_distances",
    "precision_recall",
]

# scipy 1.16 deprecated `disp` (and with it the (sqrtm, errest) tuple); older releases print
# to stdout on singular input unless disp=False. Either way we only want the matrix.
_SQRTM_HAS_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    if _SQRTM_HAS_DISP:
        return linalg.sqrtm(a, disp=False)[0]
    return linalg.sqrtm(a)


class FIDStatistics:
    """Mean and covariance of a feature set, the sufficient statistics of FID.

    Mirrors ADM's class of the same name: `a.frechet_distance(b)` is the Frechet distance
    between the Gaussians fitted to two feature sets.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = mu
        self.sigma = sigma

    @classmethod
    def from_features(cls, features: np.ndarray) -> FIDStatistics:
        """Fit the statistics to an [N, D] feature array (N >= 2)."""
        return cls(*compute_statistics(features))

    def frechet_distance(self, other: FIDStatistics, eps: float = 1e-6) -> float:
        """Frechet distance between these statistics and `other` (see `frechet_distance`)."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return `(mu, sigma)`: the mean over rows and the unbiased covariance of [N, D] features.

    The dtypes follow ADM (the mean keeps the features' dtype, `np.cov` gives float64), as
    both enter the FID formula. At least two rows are needed for a covariance.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(
            f"a covariance needs at least 2 feature vectors, got {features.shape[0]}; evaluate more images"
        )
    mu = np.mean(features, axis=0)
    sigma = np.cov(features, rowvar=False)
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as ADM computes FID.

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)). When the
    matrix square root of the product is not finite (a near-singular product), `eps` is
    added to both diagonals and the root taken again, with a warning; a small imaginary
    part from round-off is dropped, a large one (diagonal beyond 1e-3) raises ValueError.
    """
    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}; the two "
            "statistics come from different feature extractors"
        )
    if sigma1.shape != sigma2.shape:
        raise ValueError(
            f"covariances have different shapes: {sigma1.shape} vs {sigma2.shape}; the two "
            "statistics come from different feature extractors"
        )

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real

    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of [N, classes] class probabilities, averaged over splits of `split_size`.

    Per split: exp(mean_i KL(p(y|x_i) || p(y))) with p(y) the split's mean prediction; the
    score is the plain mean over splits (the last split may be shorter), computed in the
    probabilities' own dtype as ADM does. Zero probabilities contribute 0 (the limit of
    p log p) where ADM's formula would give NaN.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or 0 in probs.shape:
        raise ValueError(f"probs must be a non-empty [N, classes] array, got shape {probs.shape}")
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.where(part > 0, kl, np.zeros((), dtype=kl.dtype))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
    """|u_i - v_j|^2 via norms and one matrix product, each op's result rounded to `dtype`.

    Reductions accumulate in float32 and round once (TF's half matmul on CPU does exactly
    this; its half reduce_sum differs in the last bit for about one norm in five);
    element-wise steps use numpy's own `dtype` arithmetic, which rounds after every op.
    Overflow (float16 squares beyond 65504, and inf - inf after it) gives inf / nan quietly:
    the caller reads it as the signal to redo the block in float32.
    """
    f32 = np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        u = u.astype(dtype)
        v = v.astype(dtype)
        norm_u = np.sum(np.square(u).astype(f32), axis=1).astype(dtype).reshape(-1, 1)
        norm_v = np.sum(np.square(v).astype(f32), axis=1).astype(dtype).reshape(1, -1)
        prod = np.matmul(u.astype(f32), v.astype(f32).T).astype(dtype)
        d = norm_u - prod * dtype(2) + norm_v
    return np.maximum(d, dtype(0))


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(u), len(v)] as float32, the way ADM computes them.

    ADM's distance block works in float16 first and falls back to float32 only when some
    float16 distance overflows; this reproduces that choice in numpy. Rounding of the
    float16 norms is not bit-identical to TensorFlow's kernels, so precision/recall from
    this backend agree with ADM's to about 1e-3 to 1e-2, not exactly; the TF evaluator
    passes its own distance block for an exact match.
    """
    d16 = _squared_distances(u, v, np.float16)  # overflows quietly to inf / nan
    if np.all(np.isfinite(d16)):
        return d16.astype(np.float32)
    return _squared_distances(u, v, np.float32)


class DistanceBlock(Protocol):
    """What `ManifoldEstimator` needs from a distance backend (numpy here, TF in the evaluator)."""

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray: ...

    def less_thans(
        self, batch_1: np.ndarray, radii_1: np.ndarray, batch_2: np.ndarray, radii_2: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


class NumpyDistanceBlock:
    """Distance backend in numpy, numerically following ADM's TensorFlow `DistanceBlock`."""

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Squared distances between the rows of `u` and of `v` (float32)."""
        return pairwise_distances(u, v)

    def less_thans(
        self, batch_1: np.ndarray, radii_1: np.ndarray, batch_2: np.ndarray, radii_2: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which rows of batch_1 lie inside some ball of batch_2 ([B1, K]), and vice versa ([B2, K])."""
        dist = pairwise_distances(batch_1, batch_2)[..., None]
        batch_1_in = np.any(dist <= radii_2[None], axis=1)
        batch_2_in = np.any(dist <= radii_1[:, None], axis=0)
        return batch_1_in, batch_2_in


class ManifoldEstimator:
    """k-NN manifold estimate of a feature set (Kynkaanniemi et al. 2019), as ADM batches it.

    Each feature vector gets a ball whose radius is the squared distance to its k-th nearest
    neighbour within its own set (the vector itself counts as the 0-th); a vector of the
    other set is "on the manifold" when it falls inside at least one ball. Distances are
    computed in row x column blocks of `row_batch_size` x `col_batch_size` so memory stays
    bounded; `clamp_to_percentile` zeroes radii above that percentile.
    """

    def __init__(
        self,
        distance_block: DistanceBlock | None = None,
        row_batch_size: int = 10000,
        col_batch_size: int = 10000,
        nhood_sizes: Sequence[int] = (3,),
        clamp_to_percentile: float | None = None,
        eps: float = 1e-5,
    ):
        self.distance_block = distance_block if distance_block is not None else NumpyDistanceBlock()
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.num_nhoods = len(self.nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """Radii [N, len(nhood_sizes)] (float32): squared distance to the k-th neighbour."""
        num = len(features)
        kmax = max(self.nhood_sizes)
        if num <= kmax:
            raise ValueError(
                f"{num} feature vectors are too few for a {kmax}-nearest-neighbour manifold; "
                f"evaluate at least {kmax + 1} images"
            )
        radii = np.zeros([num, self.num_nhoods], dtype=np.float32)
        rows = min(self.row_batch_size, num)
        distance_batch = np.zeros([rows, num], dtype=np.float32)
        kth = np.arange(kmax + 1)
        for begin1 in range(0, num, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num)
            dist = self._distances(features[begin1:end1], features, distance_batch)
            part = np.partition(dist, kth, axis=1)
            radii[begin1:end1] = part[:, self.nhood_sizes]

        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def _distances(self, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Distances of ``rows`` to all ``cols``, filled into ``out`` in ADM's column batches."""
        for begin in range(0, cols.shape[0], self.col_batch_size):
            end = min(begin + self.col_batch_size, cols.shape[0])
            out[: rows.shape[0], begin:end] = self.distance_block.pairwise_distances(rows, cols[begin:end])
        return out[: rows.shape[0]]

    def evaluate(self, features: np.ndarray, radii: np.ndarray, eval_features: np.ndarray) -> dict:
        """Per-vector manifold membership, realism score and nearest reference of `eval_features`.

        Returns ADM's dict: `fraction` (share of eval vectors inside the manifold of
        `features`), `batch_predictions` [N, K], `max_realism_score` [N], `nearest_indices` [N].
        """
        num_eval = eval_features.shape[0]
        num_ref = radii.shape[0]
        distance_batch = np.zeros([min(self.row_batch_size, num_eval), num_ref], dtype=np.float32)
        predictions = np.zeros([num_eval, self.num_nhoods], dtype=np.int32)
        realism = np.zeros([num_eval], dtype=np.float32)
        nearest = np.zeros([num_eval], dtype=np.int32)
        for begin1 in range(0, num_eval, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num_eval)
            dist = self._distances(eval_features[begin1:end1], features, distance_batch)
            predictions[begin1:end1] = np.any(dist[:, :, None] <= radii, axis=1).astype(np.int32)
            realism[begin1:end1] = np.max(radii[:, 0] / (dist + self.eps), axis=1)
            nearest[begin1:end1] = np.argmin(dist, axis=1)
        return {
            "fraction": float(np.mean(predictions)),
            "batch_predictions": predictions,
            "max_realism_score": realism,
            "nearest_indices": nearest,
        }

    def evaluate_pr(
        self,
        features_1: np.ndarray,
        radii_1: np.ndarray,
        features_2: np.ndarray,
        radii_2: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) arrays over neighbourhood sizes, set 1 being the reference.

        Precision is the share of set-2 vectors inside the manifold of set 1, recall the
        share of set-1 vectors inside the manifold of set 2.
        """
        status_1 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        status_2 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = begin_1 + self.row_batch_size
            batch_1 = features_1[begin_1:end_1]
            for begin_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = begin_2 + self.col_batch_size
                batch_1_in, batch_2_in = self.distance_block.less_thans(
                    batch_1, radii_1[begin_1:end_1], features_2[begin_2:end_2], radii_2[begin_2:end_2]
                )
                status_1[begin_1:end_1] |= batch_1_in
                status_2[begin_2:end_2] |= batch_2_in
        return (
            np.mean(status_2.astype(np.float64), axis=0),
            np.mean(status_1.astype(np.float64), axis=0),
        )


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = 3,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    clamp_to_percentile: float | None = None,
    distance_block: DistanceBlock | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of samples against references.

    Precision: share of samples inside the reference manifold; recall: share of references
    inside the sample manifold; both with k-th-neighbour radii (k = 3 in ADM). The keyword
    arguments are ADM's `ManifoldEstimator` settings (its `eps` enters only the realism
    score, not these two); `distance_block` swaps the numpy distance backend (the TF
    evaluator passes its own to match ADM bit for bit).
    """
    est = ManifoldEstimator(
        distance_block=distance_block,
        row_batch_size=row_batch_size,
        col_batch_size=col_batch_size,
        nhood_sizes=(k,),
        clamp_to_percentile=clamp_to_percentile,
    )
    radii_ref = est.manifold_radii(ref_features)
    radii_sample = est.manifold_radii(sample_features)
    precision, recall = est.evaluate_pr(ref_features, radii_ref, sample_features, radii_sample)
    return float(precision[0]), float(recall[0])
