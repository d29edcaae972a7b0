"""Step distillation on the shared loop: the objective interface, Luhman & Luhman, progressive, consistency.

Targets are pinned against float64 DDIM computed here from the schedule's formulas (not from the
code under test), with an analytic teacher that runs in any dtype.
"""

import math

import numpy as np
import pytest
import torch

from dkdm import logger
from dkdm.config import ConfigError, DistillConfig, ModelConfig, TrainConfig
from dkdm.diffusion import create_diffusion
from dkdm.distill.loop import DistillLoop
from dkdm.distill.objectives.dkdm import DKDMLoopObjective
from dkdm.models import create_model
from tests.subproc import script_env

T = 20


pytestmark = pytest.mark.usefixtures("one_thread")


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


def net_teacher(seed=0):
    """A tiny network teacher of the students' architecture (progressive and consistency start from its weights)."""
    torch.manual_seed(seed)
    m = create_model("digits-vit", hidden_size=32, depth=2, num_heads=2)
    with torch.no_grad():  # output layers start at zero; a teacher must say something
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


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
    with pytest.raises(
        ConfigError, match="--objective must be one of dkdm, luhman, progressive, tract, consistency, boot"
    ):
        DistillConfig(objective="sid")


def test_dkdm_is_one_implementation_of_the_interface(tmp_path):
    loop = make_loop(tmp_path, max_steps=2)
    assert isinstance(loop.method, DKDMLoopObjective) and loop.method.objective is loop.objective
    assert loop.method.uses_pool and loop.pool is not None and set(loop.trainer.extra_state) == {"pool"}
    loop.run(progress=False)
    assert loop.trainer.step == 2


def test_dkdm_loss_gives_the_student_each_samples_label_and_scale():
    seen = {}

    class Objective:
        def losses(self, model, x_t, t, teacher_out, kwargs):
            seen.update(kwargs)
            return {"loss": torch.zeros(x_t.shape[0])}

    method = DKDMLoopObjective(Objective())
    micro = {"x_t": torch.zeros(2, 1, 4, 4), "t": torch.tensor([3, 5]), "teacher_out": torch.zeros(2, 2, 4, 4)}
    method.loss_fn(None, {**micro, "y": torch.tensor([1, 2]), "w": torch.tensor([0.5, 2.0])})
    assert set(seen) == {"y", "w"} and seen["y"].tolist() == [1, 2] and seen["w"].tolist() == [0.5, 2.0]
    seen.clear()
    loss, terms = method.loss_fn(None, micro)  # unconditional: no keywords at all
    assert seen == {} and torch.equal(terms["t"], micro["t"]) and loss.item() == 0.0


# ---------------------------------------------------------------------- float64 references (formulas only)


def abar64(d):
    return np.cumprod(1.0 - np.asarray(d.betas, dtype=np.float64))


def ext(ab, s):
    """abar at an extended step (-1: the clean end, abar = 1)."""
    return 1.0 if s < 0 else float(ab[s])


def gauss_eps64(ab, x, t):
    a = ab[t]
    return math.sqrt(1 - a) * x / (a * 0.25 + 1 - a)


def ddim64(ab, x, t, s, clip=True):
    """One eta = 0 DDIM step of the Gaussian teacher from t to s, float64 numpy."""
    a = ab[t]
    x0 = (x - math.sqrt(1 - a) * gauss_eps64(ab, x, t)) / math.sqrt(a)
    if clip:
        x0 = np.clip(x0, -1, 1)
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    a_s = ext(ab, s)
    return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps


# ---------------------------------------------------------------------- Luhman & Luhman


def test_luhman_target_is_the_teachers_ddim_sample(tmp_path):
    d = diffusion()
    teacher = GaussTeacher(d)
    loop = make_loop(tmp_path, teacher=teacher, objective="luhman", luhman_steps=5)
    assert loop.pool is None and set(loop.trainer.extra_state) == {"pairs"}
    teacher.calls = 0
    batch = loop.next_batch()
    assert teacher.calls == 5 and loop.method.teacher_evals == 5  # K teacher calls of b samples per student step
    assert torch.equal(batch["t"], torch.full((16,), T - 1))
    # guided-diffusion's 5-of-20 respacing: steps {0, 5, 10, 14, 19}, then the clean end.
    ab, x = abar64(d), batch["x_t"].double().numpy()
    for t, s in [(19, 14), (14, 10), (10, 5), (5, 0), (0, -1)]:
        x = ddim64(ab, x, t, s)
    assert np.abs(batch["target"].double().numpy() - x).max() < 1e-4  # float32 run vs float64 formulas
    # ... and what sample.py's DDIM (the respaced diffusion's own loop) draws from the same noise.
    spaced = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, timestep_respacing="5")
    same = spaced.ddim_sample_loop(teacher, tuple(batch["x_t"].shape), noise=batch["x_t"])
    assert torch.allclose(same, batch["target"], atol=2e-5)


def test_luhman_student_learns(tmp_path):
    d = diffusion()
    loop = make_loop(tmp_path, objective="luhman", luhman_steps=4, max_steps=300, log_interval=100)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, 8, 8, generator=g)
    from dkdm.distill.objectives.luhman import teacher_ddim

    target = teacher_ddim(loop.teacher_forward, d, x, loop.method.grid)

    def err():
        with torch.no_grad():
            t = torch.full((64,), T - 1)
            return ((loop.method.param.x0(loop.trainer.model(x, t), x, t) - target) ** 2).mean().item()

    before = err()
    loop.run(progress=False)
    after = err()
    assert after < 0.3 * before, (before, after)


def test_luhman_refuses_an_epsilon_student(tmp_path):
    from dkdm.distill.objective import ObjectiveError

    with pytest.raises(ObjectiveError, match="use x0 or v"):
        make_loop(tmp_path, objective="luhman", parameterization="eps")


# ---------------------------------------------------------------------- exact resume, every objective


def _files(d, step):
    import glob
    import os

    return {os.path.basename(p): torch.load(p, weights_only=False) for p in glob.glob(str(d / f"*{step:06d}*.pt"))}


RESUME = {  # also each method's smallest working configuration for the tests below
    "luhman": ({"objective": "luhman", "luhman_steps": 3}, {"pairs"}),
    "progressive": (
        {"objective": "progressive", "progressive_start": 4, "progressive_end": 1, "round_steps": 3},
        {"pool", "rounds"},
    ),
    "consistency": ({"objective": "consistency", "cm_steps": 6, "cm_ema": 0.9}, {"pool", "target"}),
    "boot": ({"objective": "boot", "cm_steps": 6}, {"bootnoise"}),
    "tract": (
        {"objective": "tract", "tract_steps": "16,8,4,2", "round_steps": 3, "tract_ema": 0.8},
        {"pool", "rounds", "selfteacher"},
    ),
}


@pytest.mark.parametrize("name", sorted(RESUME))
def test_exact_resume(tmp_path, name):
    """Stopped at step 4 and resumed, a run ends with every file of step 9 equal to a straight run's."""
    from test_distill_loop import _assert_same

    kw, extra = RESUME[name]
    kw = {**kw, "save_interval": 4}
    straight = make_loop(tmp_path / "a", teacher=net_teacher(), student=tiny_student(), max_steps=9, **kw)
    assert set(straight.trainer.extra_state) == extra
    straight.run(progress=False)
    first = make_loop(tmp_path / "b", teacher=net_teacher(), student=tiny_student(), max_steps=4, **kw)
    first.run(progress=False)
    resumed = make_loop(tmp_path / "b", teacher=net_teacher(), student=tiny_student(seed=7), max_steps=9, **kw)
    assert resumed.trainer.step == 4
    resumed.run(progress=False)
    a, b = _files(tmp_path / "a", 9), _files(tmp_path / "b", 9)
    assert set(a) == set(b) and {f"{n}000009.pt" for n in extra} <= set(a)
    for key in ("log_dir", "pool_cache_dir"):
        for group in ("train", "distill"):
            a["opt000009.pt"]["config"].get(group, {}).pop(key, None)
            b["opt000009.pt"]["config"].get(group, {}).pop(key, None)
    for f in a:
        _assert_same(a[f], b[f], f)


# ---------------------------------------------------------------------- progressive distillation


def test_nested_grids():
    from dkdm.distill.objectives import step_grid

    # t_j = floor(j T / n + 1/2) - 1 written out for T = 20: the 8-step grid holds the 4-step one at even j.
    assert step_grid(20, 8) == [-1, 2, 4, 7, 9, 12, 14, 17, 19]
    assert step_grid(20, 4) == [-1, 4, 9, 14, 19] == step_grid(20, 8)[::2]
    assert step_grid(20, 1) == [-1, 19]
    for T_, n in [(100, 64), (100, 50), (1000, 512), (4000, 1024)]:
        assert step_grid(T_, n // 2) == step_grid(T_, n)[::2]


def test_grid_bounds():
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives import respaced_grid, step_grid

    assert step_grid(20, 20) == [-1, *range(20)]  # one point per step: the most a chain holds
    for bad in (0, 21):
        with pytest.raises(ObjectiveError, match="needs 1 <= steps <= T = 20"):
            step_grid(20, bad)
    d = diffusion()
    assert respaced_grid(d, 1) == [-1, 0] and respaced_grid(d, 20) == [-1, *range(20)]
    for bad in (0, 21):
        with pytest.raises(ObjectiveError, match=f"{bad} DDIM steps on a chain of T = 20: choose 1 <= steps <= 20"):
            respaced_grid(d, bad)


def test_same_chain_check_refuses_respaced_foreign_and_previous_x_diffusions():
    from dkdm.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.base import check_same_chain

    full = create_diffusion(steps=100, noise_schedule="linear")
    check_same_chain(full, create_diffusion(steps=100, noise_schedule="linear", timestep_respacing="100"), "x")
    spaced = create_diffusion(steps=100, noise_schedule="linear", timestep_respacing="10")
    with pytest.raises(ObjectiveError, match="x: the teacher diffusion is respaced; train on the full chain"):
        check_same_chain(spaced, full, "x")
    with pytest.raises(ObjectiveError, match="x: the student diffusion is respaced"):
        check_same_chain(full, spaced, "x")
    prev = GaussianDiffusion(
        betas=full.betas,
        model_mean_type=ModelMeanType.PREVIOUS_X,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    with pytest.raises(ObjectiveError, match=r"x: the student predicts x_\(t-1\) \(PREVIOUS_X\)"):
        check_same_chain(full, prev, "x")
    with pytest.raises(ObjectiveError, match="teacher and student diffusions differ"):
        check_same_chain(full, create_diffusion(steps=100, noise_schedule="cosine"), "x")
    with pytest.raises(ObjectiveError, match=r"T 100 vs 50"):
        check_same_chain(full, create_diffusion(steps=50, noise_schedule="linear"), "x")

    def with_betas(betas):
        return GaussianDiffusion(
            betas=betas,
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE,
        )

    check_same_chain(full, with_betas(full.betas.astype(np.float32).astype(np.float64)), "x")  # float32 rounding: same
    with pytest.raises(ObjectiveError, match="differ"):  # 3e-6 relative, past rtol 1e-6
        check_same_chain(full, with_betas(full.betas * (1 + 3e-6)), "x")
    nudged = full.betas.copy()
    nudged[0] += 5e-9  # beta_0 = 1e-4: past atol 1e-9 + rtol 1e-6 * 1e-4
    with pytest.raises(ObjectiveError, match="differ"):
        check_same_chain(full, with_betas(nudged), "x")


def test_grid_projector_table_and_refusals():
    from dkdm.distill.objectives.base import GridProjector

    proj = GridProjector(10, [2, 5, 9], torch.device("cpu"))
    t = torch.arange(10)
    # nearest grid point of each step; ties (step 7: 2 from both 5 and 9) go to the lower point
    assert proj.index(t).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert proj.points[proj.index(t)].tolist() == [2, 2, 2, 2, 5, 5, 5, 5, 9, 9]
    for bad in ([2, 2, 5], [5, 2], [-1, 3]):
        with pytest.raises(ValueError, match="ascending and >= 0"):
            GridProjector(10, bad, torch.device("cpu"))


def test_parameterization_needs_a_positive_sigma_data():
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.base import Parameterization

    for bad in (0.0, -0.5):
        with pytest.raises(ObjectiveError, match=f"--sigma_data must be positive, got {bad}"):
            Parameterization("skip-x0", diffusion(), sigma_data=bad)


def test_student_init_from_the_teacher_names_the_first_mismatch():
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.base import init_student

    teacher, student = net_teacher(), create_model("digits-vit", hidden_size=48, depth=2, num_heads=2)
    first = next(k for k, v in student.state_dict().items() if teacher.state_dict()[k].shape != v.shape)
    with pytest.raises(ObjectiveError, match=rf"tensors differ, e\.g\. {first}\); give the student"):
        init_student(student, teacher, "teacher")
    same = tiny_student()
    assert init_student(same, teacher, "teacher") == "student: initialised from the teacher's weights"
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), teacher.state_dict().values()))
    assert init_student(same, teacher, "") == init_student(same, teacher, "random") == "student: initialised as built"


def test_progressive_two_step_target_against_float64(tmp_path):
    d = diffusion()
    loop = make_loop(
        tmp_path,
        objective="progressive",
        progressive_start=4,
        progressive_end=1,
        round_steps=5,
        max_steps=15,
        student=tiny_student(),
        student_init="random",
    )
    obj = loop.method
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 1, 8, 8, generator=g)
    j = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1])
    u, target = obj.target(loop, 0, z, j)
    fine = [-1, 2, 4, 7, 9, 12, 14, 17, 19]  # the teacher's 8-step grid (see test_nested_grids)
    assert u.tolist() == [fine[2 * k] for k in j.tolist()]
    ab = abar64(d)
    for i, k in enumerate(j.tolist()):
        t, mid, end = fine[2 * k], fine[2 * k - 1], fine[2 * k - 2]
        z0 = z[i].double().numpy()
        z2 = ddim64(ab, ddim64(ab, z0, t, mid), mid, end)
        a, s = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        a2, s2 = math.sqrt(ext(ab, end)), math.sqrt(1 - ext(ab, end))
        want = (z2 - s2 / s * z0) / (a2 - s2 / s * a)
        assert np.abs(target[i].double().numpy() - want).max() < 1e-4, (k, np.abs(target[i].numpy() - want).max())
        # the defining property: one DDIM step of the student from (z, t) with x_0 = target lands on z2
        eps = (z0 - a * want) / s
        assert np.abs(a2 * want + s2 * eps - z2).max() < 1e-9


def test_progressive_batch_is_on_the_grid_and_weighted(tmp_path):
    loop = make_loop(
        tmp_path,
        objective="progressive",
        progressive_start=4,
        progressive_end=1,
        round_steps=5,
        max_steps=15,
        teacher=net_teacher(),
        student=tiny_student(),
    )
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    assert set(batch["t"].tolist()) <= {4, 9, 14, 19}
    loss, terms = loop.loss_fn(loop.trainer.model, batch)
    ab = abar64(diffusion())
    snr = torch.tensor([ab[t] / (1 - ab[t]) for t in batch["t"].tolist()], dtype=torch.float32)
    assert torch.allclose(terms["loss"], terms["mse"] * snr.clamp(min=1))  # Salimans & Ho: max(SNR, 1)
    assert torch.allclose(loss, terms["loss"].mean())


def test_progressive_rounds_hand_over_and_write_checkpoints(tmp_path):
    import os

    loop = make_loop(
        tmp_path,
        objective="progressive",
        progressive_start=4,
        progressive_end=1,
        round_steps=3,
        max_steps=9,
        teacher=net_teacher(),
        student=tiny_student(),
    )
    # initialised from the teacher's weights
    t_sd = loop.teacher.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in loop.trainer.model.state_dict().items())
    loop.run(progress=False)
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith("round"))
    assert names == ["round00_4steps.pt", "round01_2steps.pt", "round02_1steps.pt", "rounds000009.pt"]
    r1 = torch.load(tmp_path / "round01_2steps.pt")
    # round 2's teacher is round 1's final student; the last round's file is the final model
    assert all(torch.equal(v, r1[k]) for k, v in loop.method.rounds.net.state_dict().items())
    final = torch.load(tmp_path / "round02_1steps.pt")
    assert all(torch.equal(v, final[k]) for k, v in loop.trainer.model.state_dict().items())
    assert loop.method.rounds.round == 2


def test_progressive_refusals(tmp_path):
    from dkdm.config import ConfigError
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.progressive import round_schedule

    assert round_schedule(32, 1, 100) == [32, 16, 8, 4, 2, 1]
    with pytest.raises(
        ObjectiveError,
        match="halve the step count from --progressive_start 32: 32, 16, 8, 4, 2, 1; "
        "--progressive_end 3 is not on that schedule",
    ):
        round_schedule(32, 3, 100)
    with pytest.raises(ObjectiveError, match="2 x 64 = 128 DDIM steps but the chain has T = 100"):
        round_schedule(64, 1, 100)
    kw = {"objective": "progressive", "progressive_start": 4, "round_steps": 3, "teacher": net_teacher()}
    with pytest.raises(ObjectiveError, match="set --max_steps 9"):
        make_loop(tmp_path / "a", max_steps=0, **kw)
    with pytest.raises(ObjectiveError, match="past the last round"):
        make_loop(tmp_path / "a", max_steps=12, **kw)
    with pytest.raises(ObjectiveError, match="use v or x0"):
        make_loop(tmp_path / "a", max_steps=9, parameterization="eps", **kw)
    with pytest.raises(ObjectiveError, match="teacher's architecture"):
        make_loop(tmp_path / "a", max_steps=9, **{**kw, "teacher": GaussTeacher(diffusion())})
    # resuming with another round schedule: the run directory's config refuses, naming the field ...
    make_loop(tmp_path / "b", max_steps=4, save_interval=4, **kw).run(progress=False)
    with pytest.raises(ConfigError, match="distill.round_steps: 3 there, 2 now"):
        make_loop(tmp_path / "b", max_steps=6, **{**kw, "round_steps": 2})
    # ... and so does the checkpoint's round state when resumed from elsewhere
    other = make_loop(tmp_path / "c", max_steps=6, **{**kw, "round_steps": 2, "teacher": net_teacher()})
    with pytest.raises(ObjectiveError, match=r"trained on the rounds \[4, 2, 1\] of 3 steps each"):
        other.method.rounds.load_state_dict(torch.load(tmp_path / "b" / "rounds000004.pt"))


# ---------------------------------------------------------------------- TRACT


def test_tract_schedule_and_refusals(tmp_path):
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.tract import tract_schedule

    assert tract_schedule("64,8,1", 100) == ([8, 1], [64, 8])
    with pytest.raises(ObjectiveError, match="64 -> 10 does not"):
        tract_schedule("64,10,1", 100)
    with pytest.raises(ObjectiveError, match="exceed the chain's T = 100"):
        tract_schedule("128,8,1", 100)
    with pytest.raises(ObjectiveError, match="at least one phase"):
        tract_schedule("64", 100)
    with pytest.raises(ObjectiveError, match="set --max_steps 6"):
        make_loop(tmp_path, objective="tract", tract_steps="8,4,1", round_steps=3, max_steps=0, teacher=net_teacher())


def test_tract_target_one_teacher_step_then_the_self_teacher(tmp_path):
    d = diffusion()
    loop = make_loop(
        tmp_path,
        objective="tract",
        tract_steps="8,2,1",
        round_steps=5,
        max_steps=10,
        student=tiny_student(),
        student_init="random",
    )
    obj = loop.method
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    i = torch.arange(1, 9)
    v, target = obj.target(loop, 0, z, i)
    fine = [-1, 2, 4, 7, 9, 12, 14, 17, 19]  # the teacher's 8-step grid; 2 segments of 4 steps
    assert v.tolist() == fine[1:]
    ab, net = abar64(d), obj.self_teacher.net
    for k in range(8):
        ii = k + 1
        t, prev, end = fine[ii], fine[ii - 1], fine[((ii - 1) // 4) * 4]
        z0 = z[k].double().numpy()
        z1 = ddim64(ab, z0, t, prev)
        if prev == end:  # the teacher's step reaches the segment's end: no self-teacher
            z2 = z1
        else:  # the self-teacher (a v network) jumps from prev to the segment's end
            with torch.no_grad():
                vh = net(torch.from_numpy(z1).float()[None], torch.tensor([prev]))[0, :1].double().numpy()
            x0 = np.clip(math.sqrt(ab[prev]) * z1 - math.sqrt(1 - ab[prev]) * vh, -1, 1)
            eps = (z1 - math.sqrt(ab[prev]) * x0) / math.sqrt(1 - ab[prev])
            z2 = math.sqrt(ext(ab, end)) * x0 + math.sqrt(1 - ext(ab, end)) * eps
        a, s = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        a2, s2 = math.sqrt(ext(ab, end)), math.sqrt(1 - ext(ab, end))
        want = (z2 - s2 / s * z0) / (a2 - s2 / s * a)
        assert np.abs(target[k].double().numpy() - want).max() < 2e-4, (ii, np.abs(target[k].numpy() - want).max())


# ---------------------------------------------------------------------- BOOT


def test_boot_target_is_one_teacher_step_from_the_students_own_trajectory(tmp_path):
    d = diffusion()
    teacher = GaussTeacher(d)

    class BigSignal(torch.nn.Module):  # a student whose signal is far from 0, so the boundary matters
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))
            self.config = ModelConfig(arch="unet", image_size=8, in_channels=1, learn_sigma=True)

        def forward(self, x, t):
            return torch.cat([self.w * x + 3.0 + t.view(-1, 1, 1, 1) / 10, torch.zeros_like(x)], 1)

    loop = make_loop(tmp_path, objective="boot", cm_steps=6, teacher=teacher, student=BigSignal(), batch_size=48)
    assert loop.pool is None
    teacher.calls = 0
    batch = loop.next_batch()
    assert teacher.calls == 1
    grid, ab = [0, 2, 6, 9, 12, 16, 19], abar64(d)
    eps = batch["x_t"]
    net = loop.trainer.model.eval()
    for i in range(48):
        s = int(batch["t"][i])
        t = grid[grid.index(s) + 1]
        e = eps[i].double().numpy()
        if t == T - 1:  # the boundary: the trajectory starts at the noise itself
            x_t = e
        else:
            with torch.no_grad():
                y = net(eps[i : i + 1], torch.tensor([t]))[0, :1].double().numpy()
            x_t = math.sqrt(ab[t]) * y + math.sqrt(1 - ab[t]) * e
        x_s = ddim64(ab, x_t, t, s)
        want = (x_s - math.sqrt(1 - ab[s]) * e) / math.sqrt(ab[s])
        got = batch["target"][i].double().numpy()
        assert math.sqrt(ab[s]) * np.abs(got - want).max() < 1e-4, (t, s)
    assert (batch["t"] == 16).any() and (batch["t"] < 16).any()  # boundary rows and bootstrapped rows both drawn


def test_boot_student_learns(tmp_path):
    d = diffusion()
    loop = make_loop(tmp_path, objective="boot", cm_steps=4, max_steps=300, log_interval=100, lr=2e-3)
    from dkdm.distill.objectives.boot import boot_sample
    from dkdm.distill.objectives.consistency import consistency_grid

    eps = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    grid, ab, x = consistency_grid(T, 4), abar64(d), eps.double().numpy()
    for i in range(len(grid) - 1, 0, -1):  # the teacher's DDIM trajectory on the same grid
        x = ddim64(ab, x, grid[i], grid[i - 1])
    ref = torch.from_numpy(x).float()

    def err():
        return ((boot_sample(loop.trainer.model.eval(), d, eps) - ref) ** 2).mean().item()

    before = err()
    loop.run(progress=False)
    after = err()
    assert after < 0.3 * before, (before, after)


def test_each_head_reads_as_x0_by_its_float64_formula():
    """x0 as is; v: alpha x - sigma v; eps: (x - sigma eps) / alpha; only the first C channels of a 2C output."""
    from dkdm.distill.objectives import Parameterization

    d = diffusion()
    ab = torch.as_tensor(abar64(d), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 7, 12, T - 1])
    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    want = {"x0": out[:, :1], "v": a * x - s * out[:, :1], "eps": (x - s * out[:, :1]) / a}
    for head, ref in want.items():
        got = Parameterization(head, d).x0(out, x, t)
        assert got.dtype == torch.float64 and torch.allclose(got, ref, rtol=1e-10, atol=1e-10), head


# ---------------------------------------------------------------------- consistency distillation


def test_consistency_boundary_is_exact():
    from dkdm.distill.objectives import Parameterization

    d = diffusion()
    x = torch.randn(6, 1, 8, 8)
    out = 10 * torch.randn(6, 2, 8, 8)  # whatever the network says
    for spec in ("skip-v", "skip-x0", "skip-eps"):
        p = Parameterization(spec, d, sigma_data=0.5)
        assert torch.equal(p.x0(out, x, torch.zeros(6, dtype=torch.long)), x), spec
        assert not torch.allclose(p.x0(out, x, torch.full((6,), 5)), x), spec
    # at high noise the skip form is (nearly) the head's x_0: v-head x_0 = alpha x - sigma v
    ab = abar64(d)
    p = Parameterization("skip-v", d, sigma_data=0.5)
    t = T - 1
    head = math.sqrt(ab[t]) * x - math.sqrt(1 - ab[t]) * out[:, :1]
    ve, ve0 = math.sqrt((1 - ab[t]) / ab[t]), math.sqrt((1 - ab[0]) / ab[0])
    c_skip = 0.25 / ((ve - ve0) ** 2 + 0.25)
    c_out = (ve - ve0) / math.sqrt((ve - ve0) ** 2 + 0.25)
    assert torch.allclose(p.x0(out, x, torch.full((6,), t)), c_skip * x + c_out * head, atol=1e-5)


def test_consistency_target_is_one_teacher_ddim_step_then_the_target_network(tmp_path):
    d = diffusion()
    teacher = GaussTeacher(d)
    loop = make_loop(
        tmp_path, objective="consistency", cm_steps=6, teacher=teacher, student=tiny_student(), student_init="random"
    )
    loop.prepare_pool(progress=False)
    teacher.calls = 0
    batch = loop.next_batch()
    assert teacher.calls == 2  # one pool evaluation, one ODE step
    grid = [0, 2, 6, 9, 12, 16, 19]  # s_0 = 0, then floor(j 20/6 + 1/2) - 1
    assert loop.method.grid == grid
    ab = abar64(d)
    net = loop.method.target_net.net
    for i in range(16):
        t1 = int(batch["t"][i])
        t0 = grid[grid.index(t1) - 1]
        z_prev = ddim64(ab, batch["x_t"][i].double().numpy(), t1, t0)
        zt = torch.from_numpy(z_prev).float()[None]
        with torch.no_grad():
            v = net(zt, torch.tensor([t0]))[0, :1].double().numpy()
        a, s = math.sqrt(ab[t0]), math.sqrt(1 - ab[t0])
        ve, ve0 = s / a, math.sqrt((1 - ab[0]) / ab[0])
        c_skip = 0.25 / ((ve - ve0) ** 2 + 0.25)
        c_out = (ve - ve0) / math.sqrt((ve - ve0) ** 2 + 0.25)
        want = c_skip * z_prev + c_out * (a * z_prev - s * v)
        assert np.abs(batch["target"][i].double().numpy() - want).max() < 1e-4, t1


def test_consistency_target_network_is_an_ema(tmp_path):
    loop = make_loop(
        tmp_path,
        objective="consistency",
        cm_steps=6,
        cm_ema=0.9,
        teacher=net_teacher(),
        student=tiny_student(),
        max_steps=2,
    )
    loop.prepare_pool(progress=False)
    theta0 = [p.detach().clone() for p in loop.trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(theta0, loop.method.target_net.net.parameters()))
    loop.trainer.run_step(loop.next_batch, loop.loss_fn)
    theta1 = [p.detach().clone() for p in loop.trainer.model.parameters()]
    loop.next_batch()  # applies the update for the step just taken
    for a, b, tgt in zip(theta0, theta1, loop.method.target_net.net.parameters()):
        assert torch.allclose(tgt, 0.9 * a + 0.1 * b, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))


def test_consistency_refuses_a_student_without_the_skip_form(tmp_path):
    from dkdm.distill.objective import ObjectiveError

    with pytest.raises(ObjectiveError, match="needs the skip/out parameterisation.*use skip-v"):
        make_loop(tmp_path, objective="consistency", parameterization="v", teacher=net_teacher())
    with pytest.raises(ObjectiveError, match="--cm_steps 15"):
        make_loop(tmp_path, objective="consistency", cm_steps=15, teacher=net_teacher())


# ---------------------------------------------------------------------- sampling the students


class X0Teacher(torch.nn.Module):
    """The Gaussian teacher's x_0 prediction as an output (an 'x0' student that is exactly right)."""

    def __init__(self, d):
        super().__init__()
        self.eps = GaussTeacher(d)

    def forward(self, x, t):  # in float64: (x - sigma eps) / alpha cancels badly at t = T-1 in float32
        x64, ab = x.double(), self.eps.abar64[t].view(-1, 1, 1, 1)
        return ((x64 - (1 - ab).sqrt() * self.eps(x64, t)[:, :1]) / ab.sqrt()).float()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_k_step_ddim_sampler_against_float64(steps):
    from dkdm.distill.objectives import Parameterization, step_grid
    from dkdm.distill.objectives.sampling import ddim_student_sample

    d = diffusion()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = ddim_student_sample(X0Teacher(d), Parameterization("x0", d), d, noise, steps)
    grid, ab, x = step_grid(T, steps), abar64(d), noise.double().numpy()
    for i in range(steps, 0, -1):
        x = ddim64(ab, x, grid[i], grid[i - 1])
    assert np.abs(got.double().numpy() - x).max() < 1e-4


def test_multistep_consistency_sampling():
    from dkdm.distill.objectives import Parameterization
    from dkdm.distill.objectives.sampling import consistency_sample, consistency_times

    d = diffusion()
    assert consistency_times(T, 6, 1) == [19] and consistency_times(T, 6, 2) == [19, 9]
    assert consistency_times(T, 6, 6) == [19, 16, 12, 9, 6, 2]
    c = torch.linspace(-0.9, 0.9, 64).view(1, 1, 8, 8)

    def const(x, t):  # an x0 head that always says c
        return c.expand(x.shape[0], -1, -1, -1)

    p = Parameterization("skip-x0", d)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    got = consistency_sample(const, p, d, noise, [19, 9], torch.Generator().manual_seed(5))
    ab = abar64(d)
    ve = np.sqrt((1 - ab) / ab)

    def f(x, t):
        dd = ve[t] - ve[0]
        return 0.25 / (dd**2 + 0.25) * x + dd / math.sqrt(dd**2 + 0.25) * c.double().numpy()

    x = np.clip(f(noise.double().numpy(), 19), -1, 1)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5)).double().numpy()
    a9, a0 = math.sqrt(ab[9]), math.sqrt(ab[0])
    x = np.clip(f(a9 / a0 * x + a9 * math.sqrt(ve[9] ** 2 - ve[0] ** 2) * z, 9), -1, 1)
    assert np.abs(got.double().numpy() - x).max() < 1e-5


def test_step_sampler_refusals():
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.sampling import StepSampler

    d = diffusion()
    with pytest.raises(ObjectiveError, match="deterministic sampler; --eta 0.5 asks for a stochastic one"):
        StepSampler(d, {"objective": "progressive", "progressive_start": 4}).ddim_sample_loop(
            None, (1, 1, 8, 8), eta=0.5
        )
    with pytest.raises(ObjectiveError, match="trained on 4, 2, 1 steps; 8 is not among them"):
        StepSampler(d, {"objective": "progressive", "progressive_start": 4}, steps=8)
    with pytest.raises(ObjectiveError, match="tract student was trained on 4, 1 steps; 2 is not among them"):
        StepSampler(d, {"objective": "tract", "tract_steps": "8,4,1"}, steps=2)
    assert StepSampler(d, {"objective": "tract", "tract_steps": "8,4,1"}).steps == 1
    with pytest.raises(ObjectiveError, match="luhman student samples in one step, not 2"):
        StepSampler(d, {"objective": "luhman"}, steps=2)
    with pytest.raises(ObjectiveError, match="samples in 1..6 steps, not 7"):
        StepSampler(d, {"objective": "consistency", "cm_steps": 6}, steps=7)


class _Loud(torch.nn.Module):
    """A student whose x_0 leaves [-1, 1] by far, so clipping shows in every sampler."""

    def forward(self, x, t, y=None):
        return 3.0 * x + 0.01 * t.view(-1, 1, 1, 1).float()


def test_step_sampler_reads_a_config_object_as_its_yaml_dict():
    """sample.py builds the sampler from config.yaml (a dict); a DistillConfig must give the same sampler."""
    from dkdm.config import to_dict
    from dkdm.distill.objectives.sampling import StepSampler

    d = diffusion(40)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for kw in (
        {"objective": "progressive", "progressive_start": 8, "progressive_end": 2, "parameterization": "x0"},
        {"objective": "tract", "tract_steps": "16,4,2"},
        {"objective": "consistency", "cm_steps": 6, "sigma_data": 0.3},
        {"objective": "luhman", "parameterization": "v"},
        {"objective": "boot"},
    ):
        cfg = DistillConfig(**kw)
        a, b = StepSampler(d, cfg), StepSampler(d, to_dict(cfg))
        assert (
            (a.objective, a.steps, a.param.spec)
            == (b.objective, b.steps, b.param.spec)
            == (
                kw["objective"],
                {"progressive": 2, "tract": 2}.get(kw["objective"], 1),
                kw.get("parameterization")
                or {"consistency": "skip-v", "progressive": "v", "tract": "v"}.get(kw["objective"], "x0"),
            )
        )
        torch.manual_seed(0)
        x_a = a.sample(_Loud(), noise)
        torch.manual_seed(0)
        assert torch.equal(x_a, b.sample(_Loud(), noise))
    # sigma_data reaches the skip/out parameterisation: another sigma_data, another sampler.
    c3, c5 = (
        StepSampler(d, DistillConfig(objective="consistency", cm_steps=6, sigma_data=v), steps=6) for v in (0.3, 0.5)
    )
    torch.manual_seed(0)
    x3 = c3.sample(_Loud(), noise, clip=False)
    torch.manual_seed(0)
    assert (x3 - c5.sample(_Loud(), noise, clip=False)).abs().max() > 1e-2
    assert c3.times == c5.times


def test_step_sampler_defaults():
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives import Parameterization
    from dkdm.distill.objectives.sampling import StepSampler, consistency_times

    d = diffusion(100)
    with pytest.raises(ObjectiveError) as e:
        StepSampler(d, {})
    assert str(e.value) == "objective 'dkdm' has no step sampler; sample it with the diffusion"
    cm = StepSampler(d, {"objective": "consistency"})
    assert (cm.steps, cm.times) == (1, consistency_times(100, 18, 1))
    out, x, t = torch.randn(2, 2, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([5, 60])
    assert torch.equal(cm.param.x0(out, x, t), Parameterization("skip-v", d, 0.5).x0(out, x, t))  # sigma_data 0.5
    with pytest.raises(ObjectiveError, match="a boot student samples in one step, not 2"):
        StepSampler(d, {"objective": "boot"}, steps=2)
    assert StepSampler(d, {"objective": "consistency"}, steps=3).times == consistency_times(100, 18, 3)
    assert StepSampler(d, {"objective": "tract"}).steps == 1  # rounds 64, 8, 1
    assert StepSampler(d, {"objective": "tract"}, steps=8).steps == 8
    assert StepSampler(d, {"objective": "progressive"}).steps == 1  # rounds 32 ... 1
    assert StepSampler(d, {"objective": "progressive", "progressive_start": 16, "progressive_end": 4}).steps == 4
    assert StepSampler(d, {"objective": "progressive", "progressive_start": 16}, round_steps=8).steps == 8
    assert StepSampler(d, {"objective": "luhman"}).steps == StepSampler(d, {"objective": "boot"}).steps == 1


@pytest.mark.parametrize("objective", ["progressive", "consistency", "boot", "luhman"])
def test_step_sampler_loops_pass_noise_and_clipping_through(objective):
    from dkdm.distill.objectives.sampling import StepSampler

    d = diffusion()
    cfg = {"objective": objective, "progressive_start": 4, "cm_steps": 6}
    sampler = StepSampler(d, cfg, steps=2 if objective in ("progressive", "consistency") else 0)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    def draw(fn, *args, **kw):
        torch.manual_seed(9)  # consistency's renoising draws from the global generator
        return fn(_Loud(), *args, **kw)

    clipped, raw = draw(sampler.sample, noise, True), draw(sampler.sample, noise, False)
    assert clipped.abs().max() <= 1 and not torch.equal(clipped, raw)
    assert torch.equal(draw(sampler.sample, noise), clipped)  # clipping is the default
    for loop in (sampler.p_sample_loop, sampler.ddim_sample_loop):
        assert torch.equal(draw(loop, noise.shape, noise), clipped)
        assert torch.equal(draw(loop, noise.shape, noise, clip_denoised=False), raw)
    if objective != "consistency":  # no noise given: the loop draws it from the global generator, of the shape
        torch.manual_seed(11)
        drawn = torch.randn(noise.shape)
        for loop in (sampler.p_sample_loop, sampler.ddim_sample_loop):
            torch.manual_seed(11)
            assert torch.equal(loop(_Loud(), noise.shape, clip_denoised=False), sampler.sample(_Loud(), drawn, False))
    if objective == "boot":
        from dkdm.distill.objectives.boot import boot_sample

        assert torch.equal(clipped, boot_sample(_Loud(), d, noise, True))
    if objective == "consistency":
        from dkdm.distill.objectives.sampling import consistency_sample

        torch.manual_seed(9)
        want = consistency_sample(_Loud(), sampler.param, d, noise, sampler.times, None, True)
        assert sampler.times == [19, 9] and torch.equal(clipped, want)


# ---------------------------------------------------------------------- the scripts


def _script(name, *args):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = script_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(root, "scripts", name), *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_progressive_from_dkdm_train_then_sample(tmp_path):
    """The embedded digits teacher, two rounds of two steps each, then sample.py on the 1-step round checkpoint."""
    run = tmp_path / "run"
    common = ["--objective", "progressive", "--progressive_start", "2", "--round_steps", "2", "--lr_anneal_steps", "0"]
    common += ["--pool", "iterative", "--batch_size", "8", "--log_dir", str(run)]
    p = _script("dkdm_train.py", *common, "--max_steps", "4")
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "--student.arch" in p.stderr, p.stderr[-2000:]
    p = _script("dkdm_train.py", *common, "--max_steps", "4", "--student.arch", "digits-teacher")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "3 teacher evaluations per student sample per step" in p.stdout
    assert (run / "round00_2steps.pt").exists() and (run / "round01_1steps.pt").exists()
    out = tmp_path / "s.npz"
    p = _script("sample.py", "--model_path", str(run / "round01_1steps.pt"), "--num_samples", "8", "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 step(s) of the progressive student's deterministic sampler" in p.stdout
    with np.load(out) as z:
        assert z["arr_0"].shape == (8, 8, 8, 1)
    p = _script(
        "sample.py",
        "--model_path",
        str(run / "round01_1steps.pt"),
        "--num_samples",
        "8",
        "--output",
        str(tmp_path / "t.npz"),
        "--use_ddim",
        "--eta",
        "0.5",
    )
    assert p.returncode == 1 and "deterministic sampler; --eta 0.5" in p.stderr, p.stderr[-2000:]


def test_unreachable_round_schedule_is_one_line_from_dkdm_train(tmp_path):
    p = _script(
        "dkdm_train.py",
        *("--objective", "progressive", "--student.arch", "digits-teacher", "--progressive_start", "8"),
        *("--progressive_end", "3", "--round_steps", "2", "--max_steps", "8", "--log_dir", str(tmp_path / "run")),
    )
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert "8, 4, 2, 1; --progressive_end 3 is not on that schedule" in p.stderr, p.stderr


@pytest.mark.parametrize("name", ["luhman", "progressive", "tract", "consistency", "boot"])
def test_digits_presets_resolve(name):
    import importlib.util
    import os

    from dkdm.distill.objectives.progressive import round_schedule

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("dkdm_train_script", os.path.join(root, "scripts", "dkdm_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfgs, _ = mod.resolve(["--config", os.path.join(root, "configs", "digits", f"step_{name}.yaml")])
    distill, train = cfgs["distill"], cfgs["train"]
    assert distill.objective == name and cfgs["student"] == cfgs["teacher"]  # the teacher's architecture
    assert cfgs["diffusion"] == cfgs["teacher_diffusion"]
    if name in ("progressive", "tract"):
        from dkdm.distill.objectives.tract import tract_schedule

        T_ = cfgs["diffusion"].steps
        if name == "tract":
            sched = tract_schedule(distill.tract_steps, T_)[0]
        else:
            sched = round_schedule(distill.progressive_start, distill.progressive_end, T_)
        assert train.max_steps == len(sched) * distill.round_steps and train.lr_anneal_steps == 0


def test_progressive_under_mpiexec(tmp_path):
    import os
    import subprocess
    import sys

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpiexec (pip install mpich) not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run"
    cmd = [
        mpiexec,
        "-n",
        "2",
        sys.executable,
        os.path.join(root, "scripts", "dkdm_train.py"),
        "--objective",
        "progressive",
        "--student.arch",
        "digits-teacher",
        "--progressive_start",
        "2",
        "--round_steps",
        "2",
        "--max_steps",
        "3",
        "--lr_anneal_steps",
        "0",
        "--pool",
        "iterative",
        "--batch_size",
        "8",
        "--log_dir",
        str(run),
    ]
    env = script_env(OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = torch.load(run / "rounds000003.pt"), torch.load(run / "rounds000003_rank1.pt")
    assert a["round"] == b["round"] == 1  # both ranks handed over to round 1 with the same teacher weights
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])
    pa, pb = (
        torch.load(run / "pool000003.pt", weights_only=False),
        torch.load(run / "pool000003_rank1.pt", weights_only=False),
    )
    assert not torch.equal(pa["x"], pb["x"])  # each rank its own pool
    assert (run / "round00_2steps.pt").exists()


@pytest.mark.parametrize("name", sorted(RESUME))
def test_bf16_steps_are_finite(tmp_path, name):
    kw = dict(RESUME[name][0])
    loop = make_loop(tmp_path, teacher=net_teacher(), max_steps=2, precision="bf16", teacher_precision="bf16", **kw)
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    assert all(v.dtype in (torch.float32, torch.long) for v in batch.values())
    with loop.trainer.precision.autocast():
        loss, terms = loop.loss_fn(loop.trainer.ddp_model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and "loss" in terms


# ---------------------------------------------------------------------- guided progressive (Meng et al.)


def w_cond_net(seed):
    """A tiny class-conditional, w-conditioned UNet whose zero-initialised layers (output, w embedding) are perturbed."""
    torch.manual_seed(seed)
    m = create_model("digits-student", class_cond=True, num_classes=10, guidance_cond=True, dropout=0.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_guided_progressive_target_uses_each_samples_label_and_w(tmp_path):
    """Meng et al.'s stage two: a w-conditioned teacher distilled progressively; the pool's y and w reach every call."""
    d = diffusion()
    teacher = w_cond_net(0)
    loop = make_loop(
        tmp_path,
        teacher=teacher,
        student=w_cond_net(1),
        objective="progressive",
        progressive_start=4,
        progressive_end=1,
        round_steps=5,
        max_steps=15,
        w_min=0.0,
        w_max=4.0,
    )
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    y, w = batch["y"], batch["w"]
    assert y.shape == w.shape == (16,) and 0 <= float(w.min()) and float(w.max()) <= 4 and len(set(w.tolist())) > 1
    # The target again from the teacher's epsilon and float64 DDIM formulas (round 0: the teacher, 8-step grid).
    ab = abar64(d)
    fine = [-1, 2, 4, 7, 9, 12, 14, 17, 19]
    z, u = batch["x_t"], batch["t"]
    for i in range(16):
        k = fine.index(int(u[i])) // 2
        t, mid, end = fine[2 * k], fine[2 * k - 1], fine[2 * k - 2]

        def step(x, a_t, s, i=i):
            with torch.no_grad():
                eps = teacher(torch.from_numpy(x).float()[None], torch.tensor([a_t]), y=y[i : i + 1], w=w[i : i + 1])
            eps = eps[0, :1].double().numpy()
            a = ab[a_t]
            x0 = np.clip((x - math.sqrt(1 - a) * eps) / math.sqrt(a), -1, 1)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            return math.sqrt(ext(ab, s)) * x0 + math.sqrt(1 - ext(ab, s)) * eps

        z0 = z[i].double().numpy()
        z2 = step(step(z0, t, mid), mid, end)
        a, s = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        a2, s2 = math.sqrt(ext(ab, end)), math.sqrt(1 - ext(ab, end))
        want = (z2 - s2 / s * z0) / (a2 - s2 / s * a)
        assert np.abs(batch["target"][i].double().numpy() - want).max() < 1e-4
    # w reaches the student's loss too: other scales, other predictions.
    _, terms = loop.loss_fn(loop.trainer.model, batch)
    _, other = loop.loss_fn(loop.trainer.model, {**batch, "w": 4.0 - batch["w"]})
    assert not torch.allclose(terms["mse"], other["mse"])
    loop.trainer.run_step(loop.next_batch, loop.loss_fn)  # a full step with the conditioning


def test_guided_progressive_from_a_guided_teacher_and_the_conditional_sampler(tmp_path):
    """A guided (null-class) teacher at one w, a plain conditional student; its sampler passes the labels."""
    torch.manual_seed(0)
    teacher = create_model("digits-student", class_cond=True, num_classes=10, class_dropout_prob=0.1)
    student = create_model("digits-student", class_cond=True, num_classes=10)
    loop = make_loop(
        tmp_path,
        teacher=teacher,
        student=student,
        objective="progressive",
        progressive_start=2,
        progressive_end=1,
        round_steps=2,
        max_steps=4,
        guidance_scale=3.0,
        student_init="random",
    )
    loop.prepare_pool(progress=False)
    calls = []
    handle = teacher.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[0]), with_kwargs=True)
    batch = loop.next_batch()
    handle.remove()
    assert "y" in batch and "w" not in batch
    assert calls == [32, 32, 32]  # pool step + two target steps, each one doubled (cond, null) call of 16
    from dkdm.distill.objectives.sampling import StepSampler

    sampler = StepSampler(diffusion(), {"objective": "progressive", "progressive_start": 2}, steps=1)
    noise = torch.randn(4, 1, 8, 8)
    net = w_cond_net(2).eval()
    with torch.no_grad():
        a = sampler.p_sample_loop(lambda x, t, **kw: net(x, t, w=torch.ones(4), **kw), (4, 1, 8, 8), noise=noise,
                                  model_kwargs={"y": torch.tensor([0, 1, 2, 3])})  # fmt: skip
        b = sampler.p_sample_loop(lambda x, t, **kw: net(x, t, w=torch.ones(4), **kw), (4, 1, 8, 8), noise=noise,
                                  model_kwargs={"y": torch.tensor([5, 6, 7, 8])})  # fmt: skip
    assert not torch.allclose(a, b)  # the labels reached the student
    cm = StepSampler(diffusion(), {"objective": "consistency", "cm_steps": 4}, steps=1)
    with pytest.raises(Exception, match="unconditional; it takes no labels"):
        cm.p_sample_loop(net, (4, 1, 8, 8), noise=noise, model_kwargs={"y": torch.tensor([0, 1, 2, 3])})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["luhman", "tract", "consistency", "boot"])
def test_each_digits_preset_runs_under_mpiexec(tmp_path, name):
    """Every method's digits preset, a few steps on two ranks (progressive has its own test above)."""
    import os
    import subprocess
    import sys

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpiexec (pip install mpich) not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path / "run"
    extra = {"tract": ["--round_steps", "2"]}.get(name, [])  # 2 phases x 2 steps, so that step 3 is in the run
    cmd = [mpiexec, "-n", "2", sys.executable, os.path.join(root, "scripts", "dkdm_train.py"),
           "--config", os.path.join(root, "configs", "digits", f"step_{name}.yaml"), *extra, "--max_steps", "3",
           "--save_interval", "3", "--batch_size", "8", "--rho", "0.05", "--warmup", "respaced", "--log_dir", str(run)]  # fmt: skip
    env = script_env(OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "model000003.pt").exists() and (run / "ema_0.995_000003.pt").exists()


# ---------------------------------------------------------------------- what each method's loss and checks are


def _abar_ext(d):
    return np.concatenate([[1.0], np.asarray(d.alphas_cumprod, dtype=np.float64)])


@pytest.mark.parametrize("name", [*sorted(RESUME), "luhman-v"])
def test_each_methods_loss_is_its_formula(tmp_path, name):
    """The loss on a real batch against the formula written here in float64 (weights, squares, keys)."""
    kw = dict(RESUME[name][0]) if name != "luhman-v" else {**RESUME["luhman"][0], "parameterization": "v"}
    name = name.split("-")[0]
    loop = make_loop(tmp_path, teacher=net_teacher(), student=tiny_student(), max_steps=3, **kw)
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    student, method = loop.trainer.model, loop.method
    with torch.no_grad():
        loss, terms = method.loss_fn(student, batch)
        x, t, target = batch["x_t"], batch["t"], batch["target"].double()
        ab = torch.from_numpy(_abar_ext(loop.student_diffusion))[t + 1]
        if name == "boot":
            err = ((method.signal(student, x, t).double() - target) ** 2).mean((1, 2, 3))
            want, keys = err * ab, {"loss": err * ab, "signal_mse": err, "t": t}
        else:
            if name == "consistency":
                pred = method.consistency_fn(student, x, t)
            else:
                pred = method.param.x0(student(x, loop.student_diffusion.model_timesteps(t)), x, t)
            mse = ((pred.double() - target) ** 2).mean((1, 2, 3))
            if name in ("progressive", "tract"):
                w = torch.clamp(ab / (1 - ab), min=1.0)
                want, keys = w * mse, {"loss": w * mse, "mse": mse, "t": t}
            elif name == "consistency":
                want, keys = mse, {"loss": mse, "t": t}
            else:
                want, keys = mse, {"loss": mse, "mse": mse}
    assert set(terms) == set(keys)
    for k, v in keys.items():
        torch.testing.assert_close(terms[k].double(), v.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), want.mean(), rtol=1e-5, atol=1e-7)
    assert float(want.mean()) > 0


def test_progressive_snr_plus_one_weighting(tmp_path):
    kw = {**RESUME["progressive"][0], "step_weighting": "snr_plus_one"}
    loop = make_loop(tmp_path, teacher=net_teacher(), student=tiny_student(), max_steps=3, **kw)
    loop.prepare_pool(progress=False)
    batch = loop.next_batch()
    with torch.no_grad():
        _, terms = loop.method.loss_fn(loop.trainer.model, batch)
    ab = torch.from_numpy(_abar_ext(loop.student_diffusion))[batch["t"] + 1]
    torch.testing.assert_close(terms["loss"].double(), (ab / (1 - ab) + 1) * terms["mse"].double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["luhman", "boot"])
def test_pair_noise_comes_from_the_methods_own_seeded_stream(tmp_path, name):
    """Pairs drawn from noise must not depend on the global RNG (it is not checkpointed: resume would differ)."""
    kw = RESUME[name][0]
    draws = []
    for i, global_seed in enumerate((1, 2)):
        loop = make_loop(tmp_path / str(i), teacher=net_teacher(), student=tiny_student(), max_steps=3, **kw)
        torch.manual_seed(global_seed)
        draws.append(loop.next_batch())
    assert torch.equal(draws[0]["x_t"], draws[1]["x_t"]) and torch.equal(draws[0]["t"], draws[1]["t"])


@pytest.mark.parametrize("name", sorted(RESUME))
def test_each_method_refuses_another_chain_and_names_itself(tmp_path, name):
    from dkdm.distill.objective import ObjectiveError

    d = diffusion(40)
    other = create_diffusion(steps=40, noise_schedule="linear", learn_sigma=True)
    logger.configure(str(tmp_path), format_strs=["log"])
    with pytest.raises(ObjectiveError, match=f"--objective {name}[ :,]"):
        DistillLoop(
            net_teacher(),
            tiny_student(),
            d,
            other,
            train=TrainConfig(batch_size=16, max_steps=9, save_interval=0, log_dir=str(tmp_path)),
            distill=DistillConfig(pool_cache_dir=str(tmp_path / "c"), **RESUME[name][0]),
            run_dir=str(tmp_path),
        )


def test_frozen_copies_do_not_train_and_student_init_reaches_every_method(tmp_path):
    teacher = net_teacher()
    frozen = {"progressive": "rounds", "tract": "selfteacher", "consistency": "target"}
    for name, slot in frozen.items():
        loop = make_loop(tmp_path / name, teacher=teacher, student=tiny_student(), max_steps=9, **RESUME[name][0])
        net = loop.trainer.extra_state[slot].net
        assert not any(p.requires_grad for p in net.parameters()), name
    for name in ("luhman", "boot", "dkdm"):
        kw = RESUME[name][0] if name != "dkdm" else {}
        loop = make_loop(
            tmp_path / f"{name}-init", teacher=teacher, student=tiny_student(), student_init="teacher", **kw
        )
        for (k, a), b in zip(loop.student.state_dict().items(), teacher.state_dict().values()):
            assert torch.equal(a, b), (name, k)
        random = make_loop(tmp_path / f"{name}-random", teacher=teacher, student=tiny_student(), **kw).student
        assert not torch.equal(
            random.state_dict()["final_layer.linear.weight"], teacher.state_dict()["final_layer.linear.weight"]
        )


def test_schedules_and_ranges_accept_their_edges():
    from dkdm.distill.objective import ObjectiveError
    from dkdm.distill.objectives.consistency import consistency_grid
    from dkdm.distill.objectives.progressive import round_schedule
    from dkdm.distill.objectives.tract import tract_schedule

    assert round_schedule(1, 1, 2) == [1] and round_schedule(4, 4, 8) == [4] and round_schedule(8, 2, 16) == [8, 4, 2]
    for start, end in ((0, 1), (4, 0), (2, 4)):
        with pytest.raises(ObjectiveError, match="both must be >= 1 and end <= start"):
            round_schedule(start, end, 20)
    with pytest.raises(ObjectiveError) as e:
        round_schedule(8, 1, 15)
    assert str(e.value).endswith("2 x 8 = 16 DDIM steps but the chain has T = 15; use --progressive_start <= 7")
    assert tract_schedule("4,1", 4) == ([1], [4]) and tract_schedule("20,4,2", 20) == ([4, 2], [20, 4])
    for spec in ("4", "21,1", "4,4", "4,3"):
        with pytest.raises(ObjectiveError):
            tract_schedule(spec, 20)
    with pytest.raises(ObjectiveError, match="the teacher's 21 steps exceed the chain's T = 20"):
        tract_schedule("21,7,1", 20)
    assert consistency_grid(20, 1) == [0, 19] and len(consistency_grid(30, 20)) == 21
    for n, t in ((0, 20), (21, 30)):
        with pytest.raises(ObjectiveError, match=f"--cm_steps {n}: .* needs 1 <= N <= 2T/3 = {2 * t // 3} on"):
            consistency_grid(t, n)


def test_round_steps_and_emas_accept_their_edges(tmp_path):
    from dkdm.distill.objective import ObjectiveError

    prog = {"objective": "progressive", "progressive_start": 4, "progressive_end": 1}
    assert make_loop(tmp_path / "a", teacher=net_teacher(), round_steps=1, max_steps=3, **prog).method.round_steps == 1
    with pytest.raises(ObjectiveError, match="--round_steps must be at least 1, got 0"):
        make_loop(tmp_path / "b", teacher=net_teacher(), round_steps=0, max_steps=3, **prog)
    tract = {"objective": "tract", "tract_steps": "16,8,4,2", "round_steps": 3, "max_steps": 9}
    assert make_loop(tmp_path / "c", teacher=net_teacher(), tract_ema=0.0, **tract).method.name == "tract"
    with pytest.raises(ObjectiveError, match=r"--tract_ema must lie in \[0, 1\), got 1.0"):
        make_loop(tmp_path / "d", teacher=net_teacher(), tract_ema=1.0, **tract)
    cm = {"objective": "consistency", "cm_steps": 6}
    assert make_loop(tmp_path / "e", teacher=net_teacher(), cm_ema=0.0, **cm).method.name == "consistency"
    with pytest.raises(ObjectiveError, match=r"--cm_ema must lie in \[0, 1\), got 1.0"):
        make_loop(tmp_path / "f", teacher=net_teacher(), cm_ema=1.0, **cm)


@pytest.mark.parametrize("name", sorted(RESUME))
@pytest.mark.parametrize("clip", [True, False])
def test_step_clip_reaches_every_teacher_x0(tmp_path, name, clip):
    """--step_clip decides whether the teacher's x_0 is clipped in every target (the pool keeps its own rule)."""
    loop = make_loop(
        tmp_path, teacher=net_teacher(), student=tiny_student(), max_steps=9, step_clip=clip, **RESUME[name][0]
    )
    loop.prepare_pool(progress=False)
    if loop.pool is not None:  # the pool keeps its own rule (pixels: clip); mark its calls to tell them apart
        loop.pool.clip_denoised = pool_rule = object()
    d, seen = loop.teacher_diffusion, []
    real = d.p_mean_variance_from_output

    def spy(*args, **kw):
        if loop.pool is None or kw.get("clip_denoised") is not pool_rule:
            seen.append(kw.get("clip_denoised", "the default"))
        return real(*args, **kw)

    d.p_mean_variance_from_output = spy
    loop.next_batch()
    assert seen and all(v is clip for v in seen), seen


@pytest.mark.parametrize("clip", [True, False])
def test_later_rounds_and_the_self_teacher_clip_their_x0_as_asked(tmp_path, clip):
    prog = make_loop(
        tmp_path / "p",
        teacher=net_teacher(),
        student=tiny_student(),
        max_steps=9,
        step_clip=clip,
        **RESUME["progressive"][0],
    )
    m = prog.method
    z = 4 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((6,), 10, dtype=torch.long)
    with torch.no_grad():
        raw = m.param.x0(prog.run_net(m.rounds.net, prog.student_diffusion, z, t).float(), z, t)
    assert raw.min() < -1 and raw.max() > 1  # both bounds matter here
    got = m.teacher_x0(prog, 1, z, t)  # round 1's teacher: round 0's student
    torch.testing.assert_close(got, raw.clamp(-1, 1) if clip else raw, rtol=0, atol=0)

    # TRACT's self-teacher: the target's only clip once the teacher's x_0 is fixed.
    tract = make_loop(
        tmp_path / "t", teacher=net_teacher(), student=tiny_student(), max_steps=9, step_clip=clip, **RESUME["tract"][0]
    )
    tm = tract.method
    tm.teacher_x0 = lambda loop, r, zz, tt, cond=None: torch.zeros_like(zz)
    i = torch.full((6,), 4, dtype=torch.long)  # teacher-grid index 4, mid-segment in the first phase (16 -> 8)
    with torch.no_grad():
        _, target = tm.target(tract, 0, z, i)
        fine, prev = tm.grids[0]["fine"], tm.grids[0]["fine"][i - 1]
        z1 = tm.sch.ddim(z, fine[i], torch.zeros_like(z), prev)  # the self-teacher's input
        x0 = tm.param.x0(tract.run_net(tm.self_teacher.net, tract.student_diffusion, z1, prev).float(), z1, prev)
        tm.clip = False  # the same target with the self-teacher's x_0 left unclipped
        _, raw_target = tm.target(tract, 0, z, i)
    assert x0.min() < -1 or x0.max() > 1  # so clipping it changes the target
    assert torch.equal(target, raw_target) != clip


@pytest.mark.parametrize("name", ["progressive", "tract", "consistency"])
def test_pool_samples_move_to_the_nearest_point_of_the_methods_grid(tmp_path, name):
    """Progressive: the student's grid; TRACT: its teacher's; consistency: its own grid above 0."""
    from dkdm.distill.objectives import step_grid
    from dkdm.distill.objectives.consistency import consistency_grid

    loop = make_loop(tmp_path, teacher=net_teacher(), student=tiny_student(), max_steps=9, **RESUME[name][0])
    t = torch.arange(T)
    x = torch.randn(T, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loop.pool_step = lambda: ({"x_t": x, "t": t}, loop.teacher_forward(x, t))
    got = loop.method.next_batch(loop)["t"]
    if name == "progressive":
        points = step_grid(T, 8)[2::2]  # round 0: 4 student steps, its teacher 8
    elif name == "tract":
        points = step_grid(T, 16)[1:]  # phase 0: 16 -> 8; samples go to the teacher's 16-step grid
    else:
        points = consistency_grid(T, 6)[1:]
    pts = np.asarray(points)
    want = pts[np.abs(np.arange(T)[:, None] - pts[None, :]).argmin(axis=1)]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("name", ["luhman", "progressive", "consistency"])
def test_sigma_data_reaches_a_skip_parameterised_student(tmp_path, name):
    from dkdm.distill.objectives import Parameterization

    kw = {**RESUME[name][0], "parameterization": "skip-v", "sigma_data": 0.3}
    loop = make_loop(tmp_path, teacher=net_teacher(), student=tiny_student(), max_steps=9, **kw)
    d = loop.student_diffusion
    out, x, t = torch.randn(3, 2, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([2, 9, 17])
    want = Parameterization("skip-v", d, 0.3).x0(out, x, t)
    assert torch.equal(loop.method.param.x0(out, x, t), want)
    assert not torch.allclose(Parameterization("skip-v", d, 0.5).x0(out, x, t), want)


@pytest.mark.parametrize(
    "name, flags",
    [("tract", "--tract_steps/--round_steps"), ("progressive", "--progressive_start/--progressive_end/--round_steps")],
)
def test_round_resume_refusal_names_the_methods_own_flags(tmp_path, name, flags):
    from dkdm.distill.objective import ObjectiveError

    loop = make_loop(tmp_path, teacher=net_teacher(), student=tiny_student(), max_steps=9, **RESUME[name][0])
    saved = {"schedule": [64, 32, 16], "round_steps": 3, "round": 0, "teacher": None}
    with pytest.raises(ObjectiveError) as e:
        loop.method.rounds.load_state_dict(saved)
    assert str(e.value).endswith(f"Resume with the saved {flags}, or give a new --log_dir")


def test_boot_takes_an_explicit_x0_head_only(tmp_path):
    from dkdm.distill.objective import ObjectiveError

    kw = RESUME["boot"][0]
    assert make_loop(tmp_path / "a", parameterization="x0", **kw).method.name == "boot"
    with pytest.raises(ObjectiveError, match="--parameterization v"):
        make_loop(tmp_path / "b", parameterization="v", **kw)


def test_later_rounds_give_their_teacher_each_samples_label_and_scale(tmp_path):
    """Round r > 0's teacher is the last round's (w-conditioned, class-conditional) student: it takes y and w."""
    torch.manual_seed(0)
    vit = {"hidden_size": 32, "depth": 1, "num_heads": 2, "class_cond": True, "num_classes": 5}
    teacher = create_model("digits-vit", class_dropout_prob=0.1, **vit)
    student = create_model("digits-vit", guidance_cond=True, **vit)
    kw = {**RESUME["progressive"][0], "w_min": 1.0, "w_max": 3.0, "max_steps": 9, "student_init": "random"}
    loop = make_loop(tmp_path, teacher=teacher, student=student, **kw)
    seen = {}
    net = loop.method.rounds.net
    net.register_forward_hook(lambda mod, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    z, t = torch.randn(3, 1, 8, 8), torch.tensor([3, 8, 15])
    cond = {"y": torch.tensor([0, 4, 2]), "w": torch.tensor([1.5, 2.0, 2.5])}
    loop.method.teacher_x0(loop, 1, z, t, cond)
    assert torch.equal(seen["y"], cond["y"]) and torch.equal(seen["w"], cond["w"])
