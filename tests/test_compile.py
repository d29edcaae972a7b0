"""``--compile``: torch.compile in place for training, distillation and sampling.

The default suite uses the ``aot_eager`` backend (dynamo and AOTAutograd trace forward and
backward, no code generation: seconds); the slow test compiles with inductor, the backend a
user gets by default.
"""

import os

import numpy as np
import pytest
import torch

from dkdm import logger
from dkdm.config import ConfigError, SampleConfig, TrainConfig
from dkdm.training.compile import FirstCallClock, compile_in_place
from tests.test_sample import MAIN, _load, _run_dir
from tests.test_training import Tiny, make, noisy_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _reset():
    yield
    logger.reset()
    torch._dynamo.reset()


def _log(run_dir: str) -> str:
    with open(os.path.join(run_dir, "log.txt")) as f:
        return f.read()


def test_unknown_backends_are_refused():
    with pytest.raises(ConfigError, match="--compile_backend must be one of inductor"):
        TrainConfig(compile_backend="tensorrt")
    with pytest.raises(ConfigError, match="--compile_backend"):
        SampleConfig(compile_backend="xla")
    with pytest.raises(ConfigError, match="--compile_backend"):
        compile_in_place(Tiny(), "nope")


def test_compiled_training_matches_eager_and_keeps_the_checkpoint_keys(tmp_path):
    """Same steps, same weights (aot_eager runs eager kernels), same files; the first step's time
    (where compilation happens) is logged once."""
    eager = make(tmp_path, "eager", max_steps=4)

    def stream():
        return {"x": torch.randn(8, 4)}

    eager.run(stream, noisy_loss)
    logger.reset()
    compiled = make(tmp_path, "compiled", max_steps=4, compile=True, compile_backend="aot_eager")
    assert compiled.model._compiled_call_impl is not None
    compiled.run(stream, noisy_loss)
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    assert a.keys() == b.keys()  # no "_orig_mod." prefix: checkpoints load into an eager net
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    saved = torch.load(os.path.join(compiled.run_dir, "model000004.pt"), weights_only=True)
    Tiny().load_state_dict(saved, strict=True)
    log = _log(compiled.run_dir)
    assert log.count("torch.compile (aot_eager): the first step took") == 1
    assert "torch.compile" not in _log(eager.run_dir)


def test_first_call_clock_times_only_the_first_call(monkeypatch):
    lines = []
    monkeypatch.setattr(logger, "log", lambda *a: lines.append(" ".join(map(str, a))))
    clock = FirstCallClock("batch", "inductor")
    with clock:
        pass
    first = clock.seconds
    clock.start()
    clock.stop()
    with pytest.raises(RuntimeError), clock:
        raise RuntimeError("a later failure changes nothing")
    assert first is not None and clock.seconds == first and len(lines) == 1
    assert lines[0].startswith("torch.compile (inductor): the first batch took")


def test_distillation_compiles_teacher_and_student(tmp_path):
    from dkdm.config import DistillConfig
    from dkdm.diffusion import create_diffusion
    from dkdm.distill.loop import DistillLoop
    from dkdm.models import create_model, get_config

    run_dir = str(tmp_path / "d")
    logger.configure(run_dir, format_strs=["log"])
    torch.manual_seed(0)
    teacher, student = create_model(get_config("digits-teacher")), create_model(get_config("digits-student"))
    diffusion = create_diffusion(steps=10, noise_schedule="cosine", learn_sigma=True)
    train = TrainConfig(batch_size=4, max_steps=2, log_interval=1, save_interval=2, compile=True)
    train.compile_backend = "aot_eager"
    loop = DistillLoop(
        teacher,
        student,
        diffusion,
        diffusion,
        train=train,
        distill=DistillConfig(rho=0.2, teacher_batch=8),
        run_dir=run_dir,
    )
    assert loop.teacher._compiled_call_impl is not None and student._compiled_call_impl is not None
    loop.run()
    assert "the first step took" in _log(run_dir)
    assert os.path.isfile(os.path.join(run_dir, "model000002.pt"))


def test_compiled_sampling_gives_the_eager_images_and_binds_its_shards(tmp_path):
    ckpt = _run_dir(str(tmp_path / "run"))
    eager, compiled = tmp_path / "eager.npz", tmp_path / "compiled.npz"
    base = ["--model_path", ckpt, "--num_samples", "12", "--batch_size", "6", "--keep_shards", "true"]
    MAIN([*base, "--output", str(eager)])
    MAIN([*base, "--output", str(compiled), "--compile", "true", "--compile_backend", "aot_eager"])
    np.testing.assert_array_equal(_load(eager)["arr_0"], _load(compiled)["arr_0"])
    with open(str(compiled)[:-4] + ".shards/manifest.json") as f:
        assert '"compile_backend": "aot_eager"' in f.read()
    with open(str(eager)[:-4] + ".shards/manifest.json") as f:
        assert "compile" not in f.read()  # eager manifests are what they were before the switch


@pytest.mark.slow
def test_inductor_sampling_stays_within_rounding_of_eager(tmp_path):
    """The backend users get: generated kernels round differently, so pixels may move by one level."""
    ckpt = _run_dir(str(tmp_path / "run"))
    eager, compiled = tmp_path / "eager.npz", tmp_path / "compiled.npz"
    base = ["--model_path", ckpt, "--num_samples", "8", "--batch_size", "8"]
    MAIN([*base, "--output", str(eager)])
    MAIN([*base, "--output", str(compiled), "--compile", "true"])
    diff = np.abs(_load(eager)["arr_0"].astype(int) - _load(compiled)["arr_0"].astype(int))
    assert diff.max() <= 1


def test_resuming_with_the_switch_flipped_is_refused(tmp_path):
    """Compiled kernels round differently, so a run keeps the setting it started with."""

    def stream():
        return {"x": torch.randn(8, 4)}

    make(tmp_path, "run", max_steps=2).run(stream, noisy_loss)
    logger.reset()
    with pytest.raises(ConfigError, match=r"train\.compile: False there, True now"):
        make(tmp_path, "run", max_steps=4, compile=True, compile_backend="aot_eager")
