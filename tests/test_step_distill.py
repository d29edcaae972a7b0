"""Step distillation on the shared loop: the objective interface, Luhman & Luhman, progressive, consistency.

Targets are pinned against float64 DDIM computed here from the schedule's formulas (not from the
code under test), with an analytic teacher that runs in any dtype.
"""

import pytest
import torch

from dkdm import logger
from dkdm.config import ConfigError, DistillConfig, ModelConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.distill.objectives.dkdm import DKDMLoopObjective
from dkdm.models import create_model

T = 20


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class GaussTeacher(torch.nn.Module):
    """Bayes-optimal epsilon for data ~ N(0, 0.25 I), learned-range variance channels 0; any dtype."""

    def __init__(self, diffusion):
        super().__init__()
        self.abar64 = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        self.config = ModelConfig(arch="unet", image_size=8, in_channels=1, learn_sigma=True)
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        ab = self.abar64.to(x.dtype)[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * x / (ab * 0.25 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(x)], 1)


def diffusion(steps=T):
    return create_diffusion(steps=steps, noise_schedule="cosine", learn_sigma=True)


def tiny_student(seed=1):
    torch.manual_seed(seed)
    return create_model("digits-vit", hidden_size=32, depth=2, num_heads=2)


def make_loop(run_dir, teacher=None, student=None, **overrides):
    train_kw = {
        "batch_size": 16,
        "lr": 1e-3,
        "max_steps": 10,
        "log_interval": 5,
        "save_interval": 0,
        "ema_rate": "0.99",
        "seed": 0,
        "log_dir": str(run_dir),
    }
    distill_kw = {"rho": 0.5, "teacher_batch": 64, "pool_cache_dir": str(run_dir / "cache")}
    for k, v in overrides.items():
        (train_kw if k in TrainConfig.__dataclass_fields__ else distill_kw)[k] = v
    d = diffusion()
    logger.configure(str(run_dir), format_strs=["log", "csv"])
    return DistillLoop(
        teacher if teacher is not None else GaussTeacher(d),
        student if student is not None else tiny_student(),
        d,
        d,
        train=TrainConfig(**train_kw),
        distill=DistillConfig(**distill_kw),
        run_dir=str(run_dir),
    )


# ---------------------------------------------------------------------- the interface


def test_unknown_objective_is_one_clear_line():
    with pytest.raises(ConfigError, match="--objective must be one of dkdm, luhman, progressive, consistency"):
        DistillConfig(objective="tract")


def test_dkdm_is_one_implementation_of_the_interface(tmp_path):
    loop = make_loop(tmp_path, max_steps=2)
    assert isinstance(loop.method, DKDMLoopObjective) and loop.method.objective is loop.objective
    assert loop.method.uses_pool and loop.pool is not None and set(loop.trainer.extra_state) == {"pool"}
    loop.run(progress=False)
    assert loop.trainer.step == 2
