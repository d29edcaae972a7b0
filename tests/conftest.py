import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests run on CPU with few threads; keep them reproducible and polite to a 2-core box.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# A CPU suite also on a machine with GPUs (scripts the tests start inherit it); the CUDA tests
# ask for the GPU with the ``on_cuda`` fixture.
os.environ["DKDM_DEVICE"] = "cpu"


@pytest.fixture
def on_cuda(monkeypatch):
    """The library's device is the GPU for this test (skipped where torch sees none)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("DKDM_DEVICE", "cuda")


@pytest.fixture(autouse=True)
def _environment():
    """Each test gets the environment the session started with: setup_dist writes the launch
    variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) into os.environ under a simulated SLURM or
    mpiexec, and a leftover RANK would make a later test's processes think torchrun started them."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A test that ran a script in this process (runpy) joined a one-process gloo group; leave it.
    A group outliving its test is inherited, threads gone, by any process forked later (mutmut's
    workers are), and destroying it there waits forever on its workers' condition variables."""
    yield
    mod = sys.modules.get("dkdm.dist")
    if mod is not None:
        mod.cleanup()


@pytest.fixture(autouse=True)
def _default_logger():
    """Each test starts with the stdout-only logger: one that ``logger.configure``-d a run directory
    without stdout (the sync tests do) would otherwise swallow what a later test's script prints."""
    yield
    mod = sys.modules.get("dkdm.logger")
    if mod is not None:
        mod.reset()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    two threads on a shared 2-core box oversubscribe badly, and these models are tiny anyway."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np

    np.random.seed(0)
    try:  # the evaluation tests run in a TensorFlow-only environment too
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.manual_seed(0)
    yield
