"""Input checks and graph lookup of the evaluator: no TensorFlow needed, nothing downloaded."""

import os
import subprocess
import sys

import numpy as np
import pytest

from evaluations import evaluator as ev
from evaluations import inception as inc
from evaluations.npz import NpzFormatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, size, seed):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.fixture
def batches(tmp_path):
    ref, sample = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    np.savez(ref, arr_0=_images(10, 24, seed=1))
    np.savez(sample, arr_0=_images(8, 24, seed=2))
    return ref, sample


@pytest.fixture
def graph_path(tmp_path):
    path = tmp_path / "g" / "some_graph.pb"
    path.parent.mkdir()
    path.write_bytes(b"not read by the lookup")
    return str(path)


def _save(path, arr=None, **kw):
    if arr is not None:
        kw["arr_0"] = arr
    np.savez(path, **kw)
    return str(path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: _save(d / "x.npz", images=np.zeros((8, 24, 24, 3), np.uint8)), "no array 'arr_0'"),
        (lambda d: _save(d / "x.npz", np.zeros((8, 24, 24, 3), np.complex64)), "dtype complex64"),
        (lambda d: _save(d / "x.npz", np.zeros((8, 24, 24, 3), bool)), "dtype bool"),
        (lambda d: _save(d / "x.npz", np.zeros((8, 3, 24, 24), np.uint8)), "NCHW"),
        (lambda d: _save(d / "x.npz", np.zeros((8, 24, 24, 1), np.uint8)), "single-channel"),
        (lambda d: _save(d / "x.npz", np.full((8, 24, 24, 3), -0.5, np.float32)), r"\[-1, 1\]"),
        (lambda d: _save(d / "x.npz", np.full((8, 24, 24, 3), 300.0, np.float32)), "outside|must lie in"),
        (lambda d: _save(d / "x.npz", np.full((8, 24, 24, 3), np.nan, np.float32)), "NaN"),
        (
            lambda d: _save(d / "x.npz", np.random.RandomState(0).rand(8, 24, 24, 3).astype(np.float32)),
            r"look like \[0, 1\] images.*\* 255",
        ),
        (lambda d: _save(d / "x.npz", np.zeros((8, 32, 32, 3), np.uint8)), "image sizes differ"),
        (lambda d: _save(d / "x.npz", np.zeros((1, 24, 24, 3), np.uint8)), "1 image"),
        (lambda d: str(np.save(d / "x.npy", np.zeros((8, 24, 24, 3), np.uint8))) and str(d / "x.npy"), "not an .npz"),
        (lambda d: (d / "x.npz").write_text("not a zip") and str(d / "x.npz"), "not an .npz"),
        (lambda d: str(d / "missing.npz"), "no such file"),
    ],
)
def test_bad_sample_batches_fail_before_tensorflow_runs(make, match, batches, tmp_path):
    bad = make(tmp_path)
    with pytest.raises(NpzFormatError, match=match):
        ev.validate_batches(batches[0], bad)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.random.RandomState(0).rand(10, 24, 24, 3).astype(np.float32), r"\[0, 1\] images"),
        (np.full((10, 24, 24, 3), 300.0, np.float32), "must lie in"),
        (np.full((10, 24, 24, 3), -0.5, np.float32), r"\[-1, 1\]"),
        (np.full((10, 24, 24, 3), np.inf, np.float64), "infinite"),
    ],
)
def test_bad_reference_values_are_refused_too(arr, match, batches, tmp_path):
    bad_ref = _save(tmp_path / "ref_bad.npz", arr)
    with pytest.raises(NpzFormatError, match=match) as e:
        ev.validate_batches(bad_ref, batches[1])
    assert "ref_bad.npz" in str(e.value)  # the message names the reference file, not the samples


def test_float_images_in_range_are_accepted(batches, tmp_path):
    path = _save(tmp_path / "f.npz", _images(8, 24, seed=3).astype(np.float32))
    _, sample_shape = ev.validate_batches(batches[0], path)
    assert sample_shape == (8, 24, 24, 3)


def test_cli_bad_input_is_one_line_and_nonzero(batches, tmp_path):
    bad = _save(tmp_path / "nchw.npz", np.zeros((8, 3, 24, 24), np.uint8))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluations", "evaluator.py"),
            batches[0],
            bad,
            "--inception_path",
            str(tmp_path / "nonexistent.pb"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().startswith("error:")
        and "NCHW" in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )


def test_missing_graph_message_names_file_url_and_place(batches, tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setenv("DKDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(inc.InceptionGraphNotFound) as e:
        ev.evaluate(*batches, allow_download=False, cache_dir=None)
    msg = str(e.value)
    assert inc.INCEPTION_V3_FILENAME in msg and inc.INCEPTION_V3_URL in msg and str(tmp_path / "cache") in msg
    with pytest.raises(inc.InceptionGraphNotFound, match="--inception_path"):
        inc.find_inception_graph(str(tmp_path / "typo.pb"))


def test_graph_lookup_order(graph_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DKDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(inc.ENV_VAR, graph_path)
    assert inc.find_inception_graph() == graph_path
    assert inc.find_inception_graph(graph_path) == graph_path
    monkeypatch.delenv(inc.ENV_VAR)
    os.makedirs(tmp_path / "cache")
    cached = tmp_path / "cache" / inc.INCEPTION_V3_FILENAME
    cached.write_bytes(b"x")
    assert inc.find_inception_graph(allow_download=False) == str(cached)
    local = tmp_path / inc.INCEPTION_V3_FILENAME
    local.write_bytes(b"x")
    assert inc.find_inception_graph(allow_download=False) == str(local)


def test_download_is_attempted_only_when_the_host_answers(tmp_path, monkeypatch):
    requests = pytest.importorskip("requests")
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setenv("DKDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    calls = []

    def no_network(url, **kw):
        calls.append((url, kw.get("timeout")))
        raise requests.ConnectionError("offline")

    def never(*a, **kw):
        raise AssertionError("download started although the host did not answer")

    monkeypatch.setattr(requests, "head", no_network)
    monkeypatch.setattr(requests, "get", never)
    with pytest.raises(inc.InceptionGraphNotFound, match="did not answer") as e:
        inc.find_inception_graph()
    assert calls == [(inc.INCEPTION_V3_URL, 10.0)]
    assert str(tmp_path / "cache" / inc.INCEPTION_V3_FILENAME) in str(e.value)
    assert not (tmp_path / "cache" / inc.INCEPTION_V3_FILENAME).exists()


def test_bad_input_is_reported_without_importing_tensorflow(batches, tmp_path):
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, images=np.zeros((8, 24, 24, 3), np.uint8))
    code = (
        "import sys; from evaluations import evaluator as ev; "
        f"rc = ev.main([{batches[0]!r}, {bad!r}]); "
        "assert rc == 1 and 'tensorflow' not in sys.modules and 'torch' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no array 'arr_0'" in proc.stderr
