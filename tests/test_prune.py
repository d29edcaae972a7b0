"""Data-free structural pruning (dkdm.models.prune, dkdm.distill.compress): rebuild, refusals, importance."""

import os
import sys

import pytest
import torch

from dkdm.diffusion import create_diffusion
from dkdm.distill.compress import diff_pruning_accumulator, prune_from_images
from dkdm.models import CheckpointError, create_model, get_config, load_checkpoint
from dkdm.models.compress import save_student
from dkdm.models.prune import parameter_count, parse_widths, prune
from dkdm.resolve import ConfigError, resolve, resolve_distillation

ROOT = __file__.rsplit("/tests/", 1)[0]


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher():
    torch.manual_seed(0)
    m = create_model("digits-teacher", dropout=0.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _diffusion():
    return create_diffusion(steps=20, noise_schedule="cosine", learn_sigma=True)


def _x0(n=8):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.fixture(scope="module")
def pruned():
    teacher = _teacher()
    cfg, sd, stats = prune_from_images(teacher, _diffusion(), _x0(), 0.3)
    return teacher, cfg, sd, stats


def test_pruned_network_rebuilds_from_its_config(tmp_path, pruned):
    teacher, cfg, sd, _ = pruned
    assert cfg.channel_widths and cfg.name == "digits-teacher-pruned30"
    n = sum(v.numel() for v in sd.values())
    assert n == parameter_count(cfg) < 0.7 * sum(p.numel() for p in teacher.parameters())
    paths = save_student(str(tmp_path / "s"), cfg, sd, {"method": "prune"})
    model = load_checkpoint(create_model(get_config(paths["config"])), paths["weights"]).eval()
    x, t = _x0(3), torch.tensor([0, 5, 19])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (3, 2, 8, 8) and torch.isfinite(out).all()
    widths = parse_widths(cfg.channel_widths)
    assert widths["out.2"][0] == 2  # the output keeps its channels
    with pytest.raises(FileExistsError, match="already holds a compressed student"):
        save_student(str(tmp_path / "s"), cfg, sd, {})


def test_kept_channels_are_copied_from_the_teacher(pruned):
    teacher, cfg, sd, _ = pruned
    tsd = teacher.state_dict()
    # the residual stream: input conv rows; the kept ones are a subset of the teacher's, in order
    w, tw = sd["input_blocks.0.0.weight"], tsd["input_blocks.0.0.weight"]
    idx = [next(i for i in range(tw.shape[0]) if torch.equal(tw[i], row)) for row in w]
    assert idx == sorted(idx) and len(set(idx)) == len(idx) == parse_widths(cfg.channel_widths)["input_blocks.0.0"][0]
    assert torch.equal(sd["input_blocks.0.0.bias"], tsd["input_blocks.0.0.bias"][idx])


def test_loading_without_the_config_is_refused_clearly(tmp_path, pruned):
    _, cfg, sd, _ = pruned
    paths = save_student(str(tmp_path / "s"), cfg, sd, {}, diffusion=d_cfg())
    with pytest.raises(CheckpointError, match="narrower than the model's: it is a pruned network"):
        load_checkpoint(create_model("digits-teacher"), paths["weights"])
    # the resolver: the config beside the checkpoint rebuilds it; without that config it is refused
    r = resolve(checkpoint=paths["weights"])
    assert r.model == cfg and r.build().state_dict().keys() == sd.keys()
    os.remove(paths["config"])
    with pytest.raises(ConfigError, match=r"no config\.yaml or \.json beside .*student\.pt says which network"):
        resolve(checkpoint=paths["weights"])
    with pytest.raises(ConfigError, match="pass --student.arch"):
        resolve_distillation({}, student_init=paths["weights"])
    # naming an unpruned architecture for it: the strict load says it is a pruned network
    _, student = resolve_distillation({"student": {"arch": "digits-teacher"}}, student_init=paths["weights"])
    with pytest.raises(CheckpointError, match="it is a pruned network"):
        student.build()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        prune(_teacher(), ratio, lambda m: None, (_x0(1), torch.zeros(1, dtype=torch.long)))


def _script(name):
    sys.path.insert(0, f"{ROOT}/scripts")
    try:
        return __import__(name)
    finally:
        sys.path.remove(f"{ROOT}/scripts")


def _compress(capsys, *args):
    """scripts/compress.py's main in this process: (exit code, stdout, stderr)."""
    code = _script("compress").main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pruning_ratio", "1.2"], "--pruning_ratio must lie strictly between 0 and 1, got 1.2"),
        (["--pruning_ratio", "0"], "--pruning_ratio must lie strictly between 0 and 1, got 0.0"),
        (["--pruning_ratio", "0.3", "--threshold", "1"], "--threshold must lie in [0, 1)"),
    ],
)
def test_script_refuses_bad_pruning_flags(tmp_path, capsys, flags, message):
    code, _, err = _compress(capsys, "--out", str(tmp_path / "o"), *flags)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_script_cuts_a_student_that_dkdm_train_resolves(tmp_path, capsys):
    out = tmp_path / "cut"
    code, stdout, err = _compress(capsys, "--out", str(out), "--remove", "middle_block,attention@2")
    assert code == 0, err
    assert f"--student_init {out}/student.pt" in stdout
    configs, _ = _script("dkdm_train").resolve(["--student_init", str(out / "student.pt")])
    assert configs["student"].mid_block == "none" and configs["student"].attention_resolutions == "4"
    assert configs["diffusion"].steps == 100  # the teacher's diffusion, recorded beside the student
    # a second cut into the same directory does not overwrite the first
    code, _, err = _compress(capsys, "--out", str(out), "--remove", "middle_block")
    assert code == 1 and "already holds a compressed student" in err


def _shipped_teacher():
    import json

    from dkdm.config import ModelConfig

    with open(f"{ROOT}/dkdm/assets/digits_teacher.json") as f:
        meta = json.load(f)
    net = create_model(get_config(ModelConfig(**meta["model"])))
    return load_checkpoint(net, f"{ROOT}/dkdm/assets/digits_teacher.pt").eval()


def test_diff_pruning_sums_gradients_until_the_threshold():
    # the shipped teacher on its own 100-step cosine schedule: its epsilon loss falls with t,
    # so the threshold stops the sum partway (a random network's losses need not fall)
    d, x0 = create_diffusion(steps=100, noise_schedule="cosine", learn_sigma=True), _x0(4)
    net = _shipped_teacher()
    stats = {}
    acc = diff_pruning_accumulator(d, x0, threshold=0.3, stride=5, stats=stats, seed=1)
    net.zero_grad()
    acc(net)
    steps, losses = stats["steps"], stats["losses"]
    # it stops at the first step whose loss is below threshold x the largest so far, and not before
    assert steps == list(range(0, 5 * len(steps), 5)) and 3 <= len(steps) < 20
    assert losses[-1] < 0.3 * max(losses) and all(v >= 0.3 * max(losses[: i + 1]) for i, v in enumerate(losses[:-1]))
    # independent: the same losses recomputed in float64 and their summed gradient
    ref = _shipped_teacher().double()
    ref.time_embed.register_forward_pre_hook(lambda m, a: (a[0].double(),))  # the sinusoid is built in float32
    ref.dtype = torch.float64  # the torso runs in the dtype the network records
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).double()
    abar = torch.as_tensor(d.alphas_cumprod, dtype=torch.float64)
    total = 0
    for step, loss in zip(steps, losses):
        x_t = abar[step].sqrt() * x0.double() + (1 - abar[step]).sqrt() * noise
        eps = ref(x_t, torch.full((4,), step))[:, :1]
        term = ((eps - noise) ** 2).mean()
        assert abs(term.item() - loss) < 1e-5 * max(1.0, loss)
        total = total + term
    total.backward()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad.double(), q.grad, rtol=1e-4, atol=1e-7), name
    # threshold 0 sums every step
    every = {}
    diff_pruning_accumulator(d, x0, threshold=0.0, stride=25, stats=every)(_shipped_teacher())
    assert every["steps"] == [0, 25, 50, 75]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="threshold must lie in"):
            diff_pruning_accumulator(d, x0, threshold=bad)


def test_taylor_importance_prunes_the_dead_channels():
    # zero a quarter of every residual block's hidden channels everywhere they act: their
    # Taylor importance is 0, so a 0.25 pruning must remove exactly those (and keep the rest)
    teacher = _teacher()
    dead = {}
    with torch.no_grad():
        for name, m in teacher.named_modules():
            if type(m).__name__ != "ResBlock":
                continue
            width = m.in_layers[2].out_channels
            idx = torch.randperm(width, generator=torch.Generator().manual_seed(len(dead)))[: width // 4]
            dead[name] = set(idx.tolist())
            m.in_layers[2].weight[idx] = 0
            m.in_layers[2].bias[idx] = 0
            m.out_layers[0].weight[idx] = 0
            m.out_layers[0].bias[idx] = 0
            emb = m.emb_layers[1]
            for half in range(emb.out_features // width):
                emb.weight[idx + half * width] = 0
                emb.bias[idx + half * width] = 0
            m.out_layers[3].weight[:, idx] = 0
    _, sd, _ = prune_from_images(teacher, _diffusion(), _x0(), 0.25)
    tsd = teacher.state_dict()
    for name, idx in dead.items():
        # the block's input channels were pruned too, so rows are matched by their (unique) biases
        w, tw = sd[f"{name}.in_layers.2.bias"], tsd[f"{name}.in_layers.2.bias"]
        assert w.shape[0] == tw.shape[0] - len(idx), name
        kept = [next(i for i in range(tw.shape[0]) if tw[i] == v) for v in w]
        assert set(kept) == set(range(tw.shape[0])) - idx, name


def test_dkdm_train_starts_from_the_pruned_student(tmp_path, pruned):
    _, cfg, sd, _ = pruned
    paths = save_student(str(tmp_path / "s"), cfg, sd, {}, diffusion=d_cfg())
    configs, _ = _script("dkdm_train").resolve(["--student_init", paths["weights"], "--max_steps", "1"])
    assert configs["student"] == cfg and configs["distill"].student_init == paths["weights"]
    # the student learns the teacher's diffusion (as without --student_init)
    assert configs["diffusion"].steps == configs["teacher_diffusion"].steps
    from dkdm.resolve import build_network

    net = build_network(configs["student"], configs["distill"].student_init)
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k


def d_cfg():
    from dkdm.config import DiffusionConfig

    return DiffusionConfig(steps=100, noise_schedule="cosine", learn_sigma=True)
