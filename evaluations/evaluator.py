"""ADM-compatible evaluation: Inception Score, FID, sFID, precision and recall of an image batch.

    python evaluations/evaluator.py ref.npz sample.npz [--inception_path P] [--json out.json]

Both files hold `arr_0`, NHWC RGB images in [0, 255] (uint8 as written by
`scripts/sample.py`, or ADM's reference batches). Features come from the same Inception-v3
graph, tensors, batching and formulas as guided-diffusion's `evaluations/evaluator.py`, so
the numbers are comparable with the paper's tables. Reference statistics stored in the
reference npz (`mu`, `sigma`, `mu_s`, `sigma_s`) are used as they are; otherwise the
reference features and statistics are cached, keyed by the file's path, size and mtime and
by the graph. TensorFlow (imported only after the inputs have been checked) runs on a GPU
when it sees one. This module never imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable

import numpy as np

if __package__ in (None, ""):  # run as a script: make `evaluations` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations import inception as inc
from evaluations.metrics import (
    FIDStatistics,
    ManifoldEstimator,
    compute_statistics,
    inception_score,
)
from evaluations.npz import (
    NpzFormatError,
    check_image_batch,
    check_value_range,
    inspect_npz,
    open_npz_array,
)

__all__ = ["Evaluator", "InceptionGraphError", "evaluate", "main", "validate_batches"]

NHOOD_SIZE = 3
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class InceptionGraphError(ValueError):
    """The graph file exists but is not a usable Inception graph."""


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow.compat.v1 as tf

    return tf


def _progress(iterable, total=None, desc=None):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=None, file=sys.stderr)


class TFDistanceBlock:
    """ADM's pairwise-distance block in TensorFlow: float16 first, float32 if that overflows.

    Matching ADM here matters for precision/recall: neighbour radii and membership tests
    are decided on these rounded distances.
    """

    def __init__(self, session):
        tf = _import_tf()
        self.session = session
        with session.graph.as_default():
            self._u = tf.placeholder(tf.float32, shape=[None, None])
            self._v = tf.placeholder(tf.float32, shape=[None, None])
            d16 = _tf_squared_distances(tf, tf.cast(self._u, tf.float16), tf.cast(self._v, tf.float16))
            self._dist = tf.cond(
                tf.reduce_all(tf.math.is_finite(d16)),
                lambda: tf.cast(d16, tf.float32),
                lambda: _tf_squared_distances(tf, self._u, self._v),
            )
            self._radii_1 = tf.placeholder(tf.float32, shape=[None, None])
            self._radii_2 = tf.placeholder(tf.float32, shape=[None, None])
            d = self._dist[..., None]
            self._in_1 = tf.reduce_any(d <= self._radii_2, axis=1)
            self._in_2 = tf.reduce_any(d <= self._radii_1[:, None], axis=0)

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Squared distances [len(u), len(v)] (float32)."""
        return self.session.run(self._dist, {self._u: u, self._v: v})

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        """Membership of each batch's rows in the other batch's balls (see metrics.DistanceBlock)."""
        return self.session.run(
            [self._in_1, self._in_2],
            {self._u: batch_1, self._v: batch_2, self._radii_1: radii_1, self._radii_2: radii_2},
        )


def _tf_squared_distances(tf, u, v):
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, transpose_b=True) + norm_v, 0.0)


class Evaluator:
    """Inception features, statistics and the five metrics, on one TensorFlow session.

    `graph_path` is the frozen Inception graph (see `inception.find_inception_graph`).
    Images go through the graph `batch_size` at a time, pool features through the softmax
    `softmax_batch_size` at a time, as in ADM.
    """

    def __init__(self, graph_path: str, batch_size: int = 64, softmax_batch_size: int = 512, session=None):
        tf = _import_tf()
        from google.protobuf.message import DecodeError

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.graph_path = graph_path
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        if session is None:
            # Soft placement lets the graph's CPU-only JPEG ops coexist with a GPU.
            config = tf.ConfigProto(allow_soft_placement=True)
            config.gpu_options.allow_growth = True
            session = tf.Session(graph=tf.Graph(), config=config)
        self.sess = session

        with open(graph_path, "rb") as f:
            data = f.read()
        self.graph_fingerprint = hashlib.sha256(data).hexdigest()
        graph_def = tf.GraphDef()
        try:
            graph_def.ParseFromString(data)
        except DecodeError as e:
            raise InceptionGraphError(f"{graph_path} is not a TensorFlow GraphDef ({e})") from None

        with self.sess.graph.as_default():
            self.image_input = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            self.softmax_input = tf.placeholder(tf.float32, shape=[None, None])
            try:
                pool, spatial, matmul = tf.import_graph_def(
                    graph_def,
                    input_map={inc.INPUT_NAME: self.image_input},
                    return_elements=[inc.FID_POOL_NAME, inc.FID_SPATIAL_NAME, inc.SOFTMAX_MATMUL_NAME],
                    name="inception",
                )
            except (ValueError, KeyError) as e:
                raise InceptionGraphError(
                    f"{graph_path} lacks the tensors the evaluator reads ({inc.INPUT_NAME}, "
                    f"{inc.FID_POOL_NAME}, {inc.FID_SPATIAL_NAME}, {inc.SOFTMAX_MATMUL_NAME}): {e}"
                ) from None
            self.pool_features = pool
            self.spatial_features = spatial[..., : inc.SPATIAL_CHANNELS]
            # IS uses the logits weights alone (no bias), exactly as ADM does.
            self.softmax = tf.nn.softmax(tf.matmul(self.softmax_input, matmul.inputs[1]))
        self.manifold_estimator = ManifoldEstimator(TFDistanceBlock(self.sess), nhood_sizes=(NHOOD_SIZE,))

    def compute_activations(
        self, batches: Iterable[np.ndarray], total: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pool [N, 2048], spatial [N, 2023]) features of NHWC image batches in [0, 255]."""
        pools, spatials = [], []
        for batch in _progress(batches, total=total):
            pool, spatial = self.sess.run(
                [self.pool_features, self.spatial_features], {self.image_input: batch.astype(np.float32)}
            )
            pools.append(pool.reshape([pool.shape[0], -1]))
            spatials.append(spatial.reshape([spatial.shape[0], -1]))
        return np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)

    def read_activations(self, npz_path: str) -> tuple[np.ndarray, np.ndarray]:
        """Features of `arr_0` in an npz, streamed `batch_size` images at a time."""
        with open_npz_array(npz_path, "arr_0") as reader:
            total = -(-len(reader) // self.batch_size)
            return self.compute_activations(reader.read_batches(self.batch_size), total=total)

    def read_statistics(
        self, npz_path: str, activations: tuple[np.ndarray, np.ndarray]
    ) -> tuple[FIDStatistics, FIDStatistics]:
        """(pool, spatial) statistics: those stored in the npz if any, else from `activations`."""
        stored = stored_statistics(npz_path)
        if stored is not None:
            return stored
        return tuple(FIDStatistics(*compute_statistics(a)) for a in activations)

    def compute_inception_score(self, activations: np.ndarray, split_size: int = 5000) -> float:
        """Inception Score of pool features: softmax of the graph's logits weights, splits of 5000."""
        probs = [
            self.sess.run(self.softmax, {self.softmax_input: activations[i : i + self.softmax_batch_size]})
            for i in range(0, len(activations), self.softmax_batch_size)
        ]
        return inception_score(np.concatenate(probs, axis=0), split_size=split_size)

    def compute_prec_recall(self, activations_ref: np.ndarray, activations_sample: np.ndarray) -> tuple[float, float]:
        """k = 3 manifold precision and recall of sample pool features against the reference."""
        est = self.manifold_estimator
        radii_ref = est.manifold_radii(activations_ref)
        radii_sample = est.manifold_radii(activations_sample)
        precision, recall = est.evaluate_pr(activations_ref, radii_ref, activations_sample, radii_sample)
        return float(precision[0]), float(recall[0])

    def reference(self, npz_path: str, cache_dir: str | None = None):
        """(pool features, pool stats, spatial stats, origin) of a reference batch, cached.

        `origin` says where the statistics came from: "npz", "computed" or "cache". With
        `cache_dir` None nothing is cached.
        """
        cache_file = None
        if cache_dir:
            st = os.stat(npz_path)
            key = f"{os.path.realpath(npz_path)}|{st.st_size}|{st.st_mtime_ns}|{self.graph_fingerprint}"
            digest = hashlib.sha256(key.encode()).hexdigest()[:24]
            cache_file = os.path.join(cache_dir, f"ref_{digest}.npz")
            if os.path.isfile(cache_file):
                try:
                    with np.load(cache_file) as c:
                        return (
                            c["pool"],
                            FIDStatistics(c["mu"], c["sigma"]),
                            FIDStatistics(c["mu_s"], c["sigma_s"]),
                            "cache",
                        )
                except (OSError, ValueError, KeyError):
                    pass  # unreadable cache entry: recompute and overwrite it

        _log("computing reference batch activations...")
        acts = self.read_activations(npz_path)
        _log("computing/reading reference batch statistics...")
        stored = stored_statistics(npz_path)
        stats, stats_s = stored if stored is not None else (FIDStatistics(*compute_statistics(a)) for a in acts)
        origin = "npz" if stored is not None else "computed"
        if cache_file is not None:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_file}.{os.getpid()}.tmp.npz"
            np.savez(tmp, pool=acts[0], mu=stats.mu, sigma=stats.sigma, mu_s=stats_s.mu, sigma_s=stats_s.sigma)
            os.replace(tmp, cache_file)
        return acts[0], stats, stats_s, origin


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stored_statistics(npz_path: str) -> tuple[FIDStatistics, FIDStatistics] | None:
    """The (pool, spatial) statistics an ADM reference batch carries, or None if it has none."""
    with np.load(npz_path, allow_pickle=False) as obj:
        present = [k for k in STAT_KEYS if k in obj.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            missing = sorted(set(STAT_KEYS) - set(present))
            raise NpzFormatError(
                f"{npz_path} carries {present} but not {missing}; a batch with precomputed "
                "statistics needs all of mu, sigma, mu_s, sigma_s"
            )
        return FIDStatistics(obj["mu"], obj["sigma"]), FIDStatistics(obj["mu_s"], obj["sigma_s"])


def validate_batches(ref_path: str, sample_path: str, min_images: int = NHOOD_SIZE + 1) -> tuple:
    """Check both batches (headers, then value ranges of non-uint8 arrays); return their shapes.

    Runs before TensorFlow is imported so a wrong file fails in a second, not after an
    hour of Inception passes.
    """
    infos = []
    for path in (ref_path, sample_path):
        if os.path.isfile(path) and not path.endswith(".npz"):
            # np.load would happily read a .npy too; say what format is expected.
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":
                    raise NpzFormatError(
                        f"{path} is not an .npz archive; save batches with np.savez(path, arr_0=images)"
                    )
        info = inspect_npz(path, "arr_0")
        check_image_batch(info, min_images=min_images)
        infos.append(info)
    ref, sample = infos
    if ref.shape[1:3] != sample.shape[1:3]:
        raise NpzFormatError(
            f"image sizes differ: {ref_path} has {ref.shape[1]}x{ref.shape[2]}, {sample_path} "
            f"has {sample.shape[1]}x{sample.shape[2]}; compare samples with the reference batch "
            "of the same resolution"
        )
    for info in infos:
        check_value_range(info.path, "arr_0")
    return ref.shape, sample.shape


def evaluate(
    ref_path: str,
    sample_path: str,
    *,
    inception_path: str | None = None,
    batch_size: int = 64,
    cache_dir: str | None = "default",
    allow_download: bool = True,
    evaluator: Evaluator | None = None,
) -> dict:
    """Validate the batches, find the graph, and return the five metrics plus provenance.

    `cache_dir="default"` caches reference features under the dkdm cache directory; None
    disables caching. An existing `evaluator` may be passed to reuse its session.
    """
    ref_shape, sample_shape = validate_batches(ref_path, sample_path)
    if evaluator is None:
        graph = inc.find_inception_graph(inception_path, allow_download=allow_download)
        _log("loading the Inception graph...")
        evaluator = Evaluator(graph, batch_size=batch_size)
    if cache_dir == "default":
        cache_dir = os.path.join(inc.cache_dir(), "ref_stats")

    ref_pool, ref_stats, ref_stats_s, origin = evaluator.reference(ref_path, cache_dir)
    _log("computing sample batch activations...")
    sample_acts = evaluator.read_activations(sample_path)
    _log("computing/reading sample batch statistics...")
    sample_stats, sample_stats_s = evaluator.read_statistics(sample_path, sample_acts)
    for name, ref, ours in (("mu/sigma", ref_stats, sample_stats), ("mu_s/sigma_s", ref_stats_s, sample_stats_s)):
        if np.shape(ref.mu) != np.shape(ours.mu):
            raise NpzFormatError(
                f"reference statistics {name} in {ref_path} have {np.shape(ref.mu)} features but "
                f"{evaluator.graph_path} gives {np.shape(ours.mu)}; they were computed with another graph"
            )

    _log("Computing evaluations...")
    precision, recall = evaluator.compute_prec_recall(ref_pool, sample_acts[0])
    return {
        "inception_score": evaluator.compute_inception_score(sample_acts[0]),
        "fid": sample_stats.frechet_distance(ref_stats),
        "sfid": sample_stats_s.frechet_distance(ref_stats_s),
        "precision": precision,
        "recall": recall,
        "ref_batch": os.path.abspath(ref_path),
        "sample_batch": os.path.abspath(sample_path),
        "num_ref": int(ref_shape[0]),
        "num_samples": int(sample_shape[0]),
        "image_size": [int(sample_shape[1]), int(sample_shape[2])],
        "reference_statistics": origin,
        "inception_path": os.path.abspath(evaluator.graph_path),
        "inception_sha256": evaluator.graph_fingerprint,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(
        description="IS, FID, sFID, precision and recall of sample_batch against ref_batch (ADM suite)."
    )
    p.add_argument("ref_batch", help="reference batch .npz (arr_0 NHWC uint8; optional mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample_batch", help="sample batch .npz (arr_0 NHWC uint8)")
    p.add_argument(
        "--inception_path", default=None, help=f"{inc.INCEPTION_V3_FILENAME} (else ${inc.ENV_VAR}, ./, the cache dir)"
    )
    p.add_argument("--json", default=None, metavar="OUT", help="also write the numbers to this JSON file")
    p.add_argument("--batch_size", type=int, default=64, help="images per Inception pass (ADM: 64)")
    p.add_argument(
        "--cache_dir", default="default", help="where reference features are cached (default: the dkdm cache dir)"
    )
    p.add_argument("--no_cache", action="store_true", help="do not read or write cached reference features")
    p.add_argument("--no_download", action="store_true", help="never download the Inception graph")
    args = p.parse_args(argv)
    try:
        res = evaluate(
            args.ref_batch,
            args.sample_batch,
            inception_path=args.inception_path,
            batch_size=args.batch_size,
            cache_dir=None if args.no_cache else args.cache_dir,
            allow_download=not args.no_download,
        )
    except (NpzFormatError, inc.InceptionGraphNotFound, InceptionGraphError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("Inception Score:", res["inception_score"])
    print("FID:", res["fid"])
    print("sFID:", res["sfid"])
    print("Precision:", res["precision"])
    print("Recall:", res["recall"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
