"""Where the Inception-v3 graph ADM uses lives, and how to get it.

The file is `classify_image_graph_def.pb` (about 95 MB), the frozen TensorFlow graph that
ADM's suite and TTUR's FID code use. It is looked up in this order: an explicit path
(`--inception_path`), the `DKDM_INCEPTION_PATH` environment variable, the current
directory (where ADM's own script keeps it), and the cache directory
(`$DKDM_CACHE_DIR`, else `$XDG_CACHE_HOME/dkdm`, else `~/.cache/dkdm`). When none has it,
it is downloaded into the cache directory from ADM's URL, but only if that host answers
quickly; otherwise `InceptionGraphNotFound` says what to fetch and where to put it.
No TensorFlow here.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "ENV_VAR",
    "FID_POOL_NAME",
    "FID_SPATIAL_NAME",
    "INCEPTION_V3_FILENAME",
    "INCEPTION_V3_URL",
    "INPUT_NAME",
    "SOFTMAX_MATMUL_NAME",
    "SPATIAL_CHANNELS",
    "InceptionGraphNotFound",
    "cache_dir",
    "download_inception_graph",
    "find_inception_graph",
]

INCEPTION_V3_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
)
INCEPTION_V3_FILENAME = "classify_image_graph_def.pb"
ENV_VAR = "DKDM_INCEPTION_PATH"

# Tensor names inside the graph. Images are fed in place of the graph's ExpandDims output
# (float32 NHWC in [0, 255]), so the graph's own bilinear resize to 299 x 299 and
# normalisation apply to any input size.
INPUT_NAME = "ExpandDims:0"
FID_POOL_NAME = "pool_3:0"
FID_SPATIAL_NAME = "mixed_6/conv:0"
SOFTMAX_MATMUL_NAME = "softmax/logits/MatMul"
# sFID keeps the first 7 channels of mixed_6/conv (17 x 17 x 7 = 2023 features).
SPATIAL_CHANNELS = 7


class InceptionGraphNotFound(FileNotFoundError):
    """The Inception graph is not on disk and could not be downloaded."""


def cache_dir() -> str:
    """Directory for downloaded graphs and cached reference statistics."""
    if os.environ.get("DKDM_CACHE_DIR"):
        return os.environ["DKDM_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dkdm")


def _not_found(reason: str) -> InceptionGraphNotFound:
    target = os.path.join(cache_dir(), INCEPTION_V3_FILENAME)
    return InceptionGraphNotFound(
        f"{reason}. The evaluator needs the Inception-v3 graph {INCEPTION_V3_FILENAME} "
        f"(about 95 MB) from {INCEPTION_V3_URL} ; download it and put it at {target}, "
        f"or pass --inception_path FILE, or set {ENV_VAR}=FILE"
    )


def find_inception_graph(path: str | None = None, *, allow_download: bool = True) -> str:
    """Return the path of the Inception graph, downloading it only if nothing local exists.

    An explicit `path` (or the environment variable) that does not exist is an error in
    itself rather than a reason to look elsewhere, so a typo never silently evaluates with
    another file.
    """
    for explicit, origin in ((path, "--inception_path"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if explicit:
            explicit = os.path.expanduser(explicit)
            if not os.path.isfile(explicit):
                raise _not_found(f"{origin} points to {explicit}, which does not exist")
            return explicit
    for candidate in (
        os.path.join(os.getcwd(), INCEPTION_V3_FILENAME),
        os.path.join(cache_dir(), INCEPTION_V3_FILENAME),
    ):
        if os.path.isfile(candidate):
            return candidate
    if not allow_download:
        raise _not_found(f"{INCEPTION_V3_FILENAME} was not found and downloading is disabled")
    return download_inception_graph(os.path.join(cache_dir(), INCEPTION_V3_FILENAME))


def download_inception_graph(dest: str, timeout: float = 10.0) -> str:
    """Download ADM's graph to `dest` (atomically) if the host answers within `timeout` seconds."""
    try:
        import requests
    except ImportError:
        raise _not_found(
            f"{INCEPTION_V3_FILENAME} is not on disk and `requests` is not installed to download it"
        ) from None
    try:
        head = requests.head(INCEPTION_V3_URL, timeout=timeout, allow_redirects=True)
        head.raise_for_status()
    except requests.RequestException as e:
        raise _not_found(
            f"{INCEPTION_V3_FILENAME} is not on disk and the download host did not answer ({type(e).__name__})"
        ) from None

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.{os.getpid()}.tmp"
    print(f"downloading {INCEPTION_V3_URL} to {dest} ...", file=sys.stderr)
    try:
        with requests.get(INCEPTION_V3_URL, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            with open(tmp, "wb") as f:
                f.writelines(r.iter_content(chunk_size=1 << 20))
        os.replace(tmp, dest)
    except (requests.RequestException, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _not_found(f"downloading {INCEPTION_V3_FILENAME} failed ({e})") from None
    return dest
