import csv
import os

import pytest
import torch

from dkdm import logger


@pytest.fixture(autouse=True)
def _fresh_logger():
    logger.reset()
    yield
    logger.reset()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_log_before_configure_goes_to_stdout(capsys):
    logger.log("hello", 3)
    logger.warn("careful")
    out = capsys.readouterr().out
    assert "hello 3" in out and "WARNING: careful" in out
    assert logger.get_dir() is None


def test_configure_writes_log_and_csv(tmp_path, capsys):
    run = tmp_path / "run" / "nested"
    logger.configure(str(run), format_strs="stdout,log,csv")
    assert logger.get_dir() == str(run) and run.is_dir()
    logger.log("starting")
    for v in (1.0, 2.0, torch.tensor(6.0)):
        logger.logkv_mean("loss", v)
    logger.logkv("step", 0)
    logger.logkv("lr", 1e-4)
    d0 = logger.dumpkvs()
    assert d0 == {"loss": pytest.approx(3.0), "step": 0, "lr": pytest.approx(1e-4)}
    # A key that appears only later widens the CSV without corrupting earlier rows.
    logger.logkv("step", 1)
    logger.logkv_mean("loss", torch.tensor([5.0]))
    logger.logkv_mean("grad_norm", 0.5)
    logger.dumpkvs()
    logger.logkv("step", 2)
    logger.dumpkvs()

    rows = read_csv(run / "progress.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert float(rows[0]["loss"]) == 3.0 and rows[0]["grad_norm"] == ""
    assert float(rows[1]["loss"]) == 5.0 and float(rows[1]["grad_norm"]) == 0.5
    assert rows[2]["loss"] == ""
    text = (run / "log.txt").read_text()
    assert "starting" in text and "| loss " in text and "| grad_norm" in text
    out = capsys.readouterr().out
    assert "| loss " in out


def test_resumed_run_appends(tmp_path):
    logger.configure(str(tmp_path), format_strs=["csv", "log"])
    logger.logkv("a", 1)
    logger.dumpkvs()
    logger.configure(str(tmp_path), format_strs=["csv", "log"])  # a resumed run
    logger.logkv("a", 2)
    logger.logkv("b", 3)
    logger.dumpkvs()
    rows = read_csv(tmp_path / "progress.csv")
    assert [(r["a"], r["b"]) for r in rows] == [("1", ""), ("2", "3")]


def test_logkv_mean_tensors_stay_on_device_until_dump(tmp_path):
    logger.configure(str(tmp_path), format_strs="csv")
    x = torch.tensor(2.0, requires_grad=True) * 1
    logger.logkv_mean("x", x)
    logger.logkv_mean("x", torch.tensor(4.0, dtype=torch.bfloat16))
    s = logger.get_current()._sum["x"]
    assert isinstance(s, torch.Tensor) and not s.requires_grad  # accumulated, not converted
    assert logger.dumpkvs()["x"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="scalar"):
        logger.logkv_mean("y", torch.ones(2))
    with pytest.raises(TypeError):
        logger.logkv_mean("y", "text")


def test_log_loss_dict_quartiles(tmp_path):
    logger.configure(str(tmp_path), format_strs="csv")
    T = 100
    # Quartile of t is floor(4 t / T): 0..24 -> q0, 25..49 -> q1, 50..74 -> q2, 75..99 -> q3.
    ts1 = torch.tensor([0, 24, 25, 99, 80])
    mse1 = torch.tensor([1.0, 3.0, 10.0, 7.0, 9.0])
    ts2 = torch.tensor([50, 10, 76])
    mse2 = torch.tensor([4.0, 2.0, 2.0])
    logger.log_loss_dict(T, ts1, {"mse": mse1, "t": ts1})
    logger.log_loss_dict(T, ts2, {"mse": mse2})
    out = logger.dumpkvs()
    assert out["mse"] == pytest.approx((mse1.mean().item() + mse2.mean().item()) / 2)
    assert out["mse_q0"] == pytest.approx((1 + 3 + 2) / 3)
    assert out["mse_q1"] == pytest.approx(10.0)
    assert out["mse_q2"] == pytest.approx(4.0)
    assert out["mse_q3"] == pytest.approx((7 + 9 + 2) / 3)
    assert "t" not in out and "t_q0" not in out
    # A quartile no sample fell into is left out rather than logged as 0 or NaN.
    logger.log_loss_dict(T, torch.tensor([1, 2]), {"vb": torch.tensor([1.0, 2.0])})
    out = logger.dumpkvs()
    assert out == {"vb": pytest.approx(1.5), "vb_q0": pytest.approx(1.5)}
    rows = read_csv(tmp_path / "progress.csv")
    assert float(rows[0]["mse_q3"]) == pytest.approx(6.0) and rows[1]["mse_q3"] == ""


def test_log_loss_dict_checks_lengths():
    with pytest.raises(ValueError, match="3 values but there are 2 timesteps"):
        logger.log_loss_dict(10, torch.tensor([1, 2]), {"loss": torch.ones(3)})


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown log format 'json'"):
        logger.configure(str(tmp_path), format_strs="csv,json")


def test_tensorboard_is_optional(tmp_path):
    logger.configure(str(tmp_path))  # default formats include tensorboard
    logger.logkv("a", 1.0)
    logger.dumpkvs()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (tmp_path / "tb").exists()
    else:
        assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
