"""The TensorFlow evaluator end to end, through a small synthetic stand-in for ADM's Inception graph.

The real `classify_image_graph_def.pb` is 95 MB and needs the network, so the tests build a
frozen graph with the same tensor names and shapes (JPEG-decoder-like input, ExpandDims,
bilinear resize, `mixed_6/conv` [1, 17, 17, C], `pool_3` [1, 1, 1, 2048], a reshape with a
hard-coded batch of 1 and `softmax/logits/MatMul` against a [2048, 1008] weight) and random
fixed weights.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from evaluations import evaluator as ev
from evaluations import inception as inc
from evaluations.metrics import compute_statistics, frechet_distance, inception_score
from evaluations.npz import NpzFormatError
from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_HW = 17


def build_synthetic_inception_graph(path: str, seed: int = 0, resize: int = 35, pool_dim: int = POOL_DIM) -> str:
    """Write a small frozen graph shaped like ADM's Inception-v3 graph to `path`.

    With the defaults the evaluator's tensors have the real graph's shapes (mixed_6/conv
    [1, 17, 17, C], pool_3 [1, 1, 1, 2048]); smaller `resize` / `pool_dim` give a graph whose
    2048-dimensional FID does not dominate a test's run time.
    """
    tf1 = tf.compat.v1
    rng = np.random.RandomState(seed)
    hw = (resize - 3) // 2 + 1  # after the first stride-2 conv: 35 -> 17 like the real 299 -> 17
    hw2 = (hw - 3) // 2 + 1
    channels = 32 if hw > 8 else 8

    def const(shape, scale, name):
        return tf1.constant(rng.randn(*shape).astype(np.float32) * scale, name=name)

    g = tf1.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.uint8, [None, None, 3], name="DecodeJpeg")
        x = tf1.expand_dims(tf1.cast(x, tf.float32, name="Cast"), 0, name="ExpandDims")
        x = tf1.image.resize_bilinear(x, [resize, resize], name="ResizeBilinear")
        x = tf1.multiply(tf1.subtract(x, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        x = tf1.nn.relu(tf1.nn.conv2d(x, const([3, 3, 3, 16], 0.4, "conv/w"), [1, 2, 2, 1], "VALID"))
        spatial = tf1.nn.conv2d(
            x, const([1, 1, 16, channels], 0.3, "mixed_6/w"), [1, 1, 1, 1], "SAME", name="mixed_6/conv"
        )
        x = tf1.nn.relu(spatial)
        x = tf1.nn.relu(tf1.nn.conv2d(x, const([3, 3, channels, 64], 0.1, "mixed_10/w"), [1, 2, 2, 1], "VALID"))
        x = tf1.nn.relu(tf1.nn.conv2d(x, const([1, 1, 64, pool_dim], 0.15, "mixed_10/join/w"), [1, 1, 1, 1], "SAME"))
        pool = tf1.nn.avg_pool(x, [1, hw2, hw2, 1], [1, 1, 1, 1], "VALID", name="pool_3")
        flat = tf1.reshape(pool, [1, pool_dim], name="pool_3/_reshape")  # batch 1 baked in, as in the real graph
        logits = tf1.matmul(flat, const([pool_dim, NUM_CLASSES], 0.2, "softmax/weights"), name="softmax/logits/MatMul")
        logits = tf1.nn.bias_add(logits, const([NUM_CLASSES], 1.0, "softmax/biases"), name="softmax/logits")
        tf1.nn.softmax(logits, name="softmax")
    with open(path, "wb") as f:
        f.write(g.as_graph_def().SerializeToString())
    return path


def _images(n, size, seed, lo=0, hi=256):
    """Smooth-ish random images: a colour gradient plus noise, so features vary between sets."""
    rng = np.random.RandomState(seed)
    base = rng.randint(lo, hi, size=(n, 1, 1, 3)).astype(np.float32)
    noise = rng.randn(n, size, size, 3) * 40
    ramp = np.linspace(-60, 60, size)[None, :, None, None] * rng.randn(n, 1, 1, 1)
    return np.clip(base + noise + ramp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def full_graph_path(tmp_path_factory):
    """Real tensor shapes (2048 pool features); used where no 2048 x 2048 sqrtm is needed."""
    return build_synthetic_inception_graph(str(tmp_path_factory.mktemp("graph") / inc.INCEPTION_V3_FILENAME))


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory):
    """Same names and structure, 32 pool / 63 spatial features, so FIDs take milliseconds."""
    return build_synthetic_inception_graph(str(tmp_path_factory.mktemp("small") / "small.pb"), resize=7, pool_dim=32)


@pytest.fixture(scope="module")
def evaluator(graph_path):
    return ev.Evaluator(graph_path, batch_size=16)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    ref, sample = str(d / "ref.npz"), str(d / "sample.npz")
    np.savez(ref, arr_0=_images(100, 24, seed=1))
    np.savez(sample, arr_0=_images(90, 24, seed=2, lo=40, hi=200))
    return ref, sample


def test_features_have_adm_shapes_and_batching_does_not_matter(full_graph_path, batches):
    full = ev.Evaluator(full_graph_path, batch_size=16)
    pool, spatial = full.read_activations(batches[1])
    assert pool.shape == (90, POOL_DIM) and spatial.shape == (90, SPATIAL_HW * SPATIAL_HW * 7)
    other = ev.Evaluator(full_graph_path, batch_size=7).read_activations(batches[1])
    np.testing.assert_allclose(other[0], pool, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other[1], spatial, rtol=1e-5, atol=1e-5)
    # Any input size goes through the graph's own resize: a one-image batch at another size works.
    one, _ = full.compute_activations([np.full((1, 50, 50, 3), 128, np.uint8)])
    assert one.shape == (1, POOL_DIM) and np.isfinite(one).all()
    assert 1.0 < full.compute_inception_score(pool) < NUM_CLASSES
    precision, recall = full.compute_prec_recall(pool[:45], pool[45:])
    assert 0 < precision <= 1 and 0 < recall <= 1


def test_inception_score_uses_softmax_weights_without_bias(evaluator, batches, graph_path):
    pool, _ = evaluator.read_activations(batches[1])
    g = tf.compat.v1.Graph()
    with g.as_default():
        gd = tf.compat.v1.GraphDef()
        with open(graph_path, "rb") as f:
            gd.ParseFromString(f.read())
        (w,) = tf.compat.v1.import_graph_def(gd, return_elements=["softmax/weights:0"], name="")
        w = tf.compat.v1.Session(graph=g).run(w)
    logits = pool.astype(np.float64) @ w
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = inception_score(probs, split_size=5000)
    assert evaluator.compute_inception_score(pool) == pytest.approx(expected, rel=1e-4)
    assert expected > 1.0


def test_full_pipeline_matches_the_maths(evaluator, batches, tmp_path):
    ref, sample = batches
    res = ev.evaluate(ref, sample, evaluator=evaluator, cache_dir=None)
    ref_pool, ref_sp = evaluator.read_activations(ref)
    s_pool, s_sp = evaluator.read_activations(sample)
    assert res["fid"] == pytest.approx(
        frechet_distance(*compute_statistics(s_pool), *compute_statistics(ref_pool)), rel=1e-6
    )
    assert res["sfid"] == pytest.approx(
        frechet_distance(*compute_statistics(s_sp), *compute_statistics(ref_sp)), rel=1e-6
    )
    assert res["fid"] > 1e-3 and res["sfid"] > 1e-3
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    assert res["reference_statistics"] == "computed" and res["num_samples"] == 90

    # A batch against itself: FID ~ 0, precision = recall = 1.
    same = ev.evaluate(ref, ref, evaluator=evaluator, cache_dir=None)
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0


def test_reference_statistics_from_npz_are_used(evaluator, batches, tmp_path):
    ref, sample = batches
    ref_pool, ref_sp = evaluator.read_activations(ref)
    mu, sigma = compute_statistics(ref_pool)
    mu_s, sigma_s = compute_statistics(ref_sp)
    shifted = str(tmp_path / "ref_with_stats.npz")
    # Shift the stored mean: if the evaluator recomputed the statistics the FID would not move.
    with np.load(ref) as f:
        np.savez(shifted, arr_0=f["arr_0"], mu=mu + 1.0, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    plain = ev.evaluate(ref, sample, evaluator=evaluator, cache_dir=None)
    stored = ev.evaluate(shifted, sample, evaluator=evaluator, cache_dir=None)
    assert stored["reference_statistics"] == "npz"
    s_pool, _ = evaluator.read_activations(sample)
    expected = frechet_distance(*compute_statistics(s_pool), mu + 1.0, sigma)
    assert stored["fid"] == pytest.approx(expected, rel=1e-6)
    assert stored["fid"] > plain["fid"] + 10  # |shift|^2 = 32 more
    assert stored["sfid"] == pytest.approx(plain["sfid"], rel=1e-6)
    assert stored["precision"] == plain["precision"]

    partial = str(tmp_path / "partial.npz")
    with np.load(ref) as f:
        np.savez(partial, arr_0=f["arr_0"], mu=mu)
    with pytest.raises(NpzFormatError, match="sigma"):
        ev.evaluate(partial, sample, evaluator=evaluator, cache_dir=None)


def test_reference_cache_is_written_and_reused(evaluator, batches, tmp_path, monkeypatch):
    ref, sample = batches
    cache = str(tmp_path / "cache")
    first = ev.evaluate(ref, sample, evaluator=evaluator, cache_dir=cache)
    assert first["reference_statistics"] == "computed" and len(os.listdir(cache)) == 1

    def boom(path):
        raise AssertionError(f"reference recomputed: {path}")

    monkeypatch.setattr(
        evaluator, "read_activations", lambda p: boom(p) if p == ref else ev.Evaluator.read_activations(evaluator, p)
    )
    second = ev.evaluate(ref, sample, evaluator=evaluator, cache_dir=cache)
    assert second["reference_statistics"] == "cache"
    for k in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert second[k] == first[k]


def test_cli_prints_adm_lines_and_writes_json(graph_path, batches, tmp_path):
    ref, sample = batches
    out = tmp_path / "out.json"
    env = script_env(DKDM_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluations", "evaluator.py"),
            ref,
            sample,
            "--inception_path",
            graph_path,
            "--json",
            str(out),
            "--batch_size",
            "32",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert list(lines) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    res = json.loads(out.read_text())
    assert float(lines["FID"]) == res["fid"] and float(lines["Recall"]) == res["recall"]
    assert res["inception_score"] > 1 and res["fid"] > 0 and res["num_ref"] == 100


def test_a_graph_without_the_tensors_is_a_clear_error(tmp_path):
    g = tf.compat.v1.Graph()
    with g.as_default():
        tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
    path = tmp_path / "wrong.pb"
    path.write_bytes(g.as_graph_def().SerializeToString())
    with pytest.raises(ev.InceptionGraphError, match="pool_3"):
        ev.Evaluator(str(path))
    path.write_bytes(b"\xff\x00garbage" * 10)
    with pytest.raises(ev.InceptionGraphError):
        ev.Evaluator(str(path))
