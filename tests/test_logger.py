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


def test_table_layout_is_fixed(tmp_path):
    """The stdout / log.txt table, character for character: widths, rule, truncation, number format."""
    out = logger.HumanOutput(str(tmp_path / "t.txt"))
    key40 = "k" * 40
    key41 = "x" * 41
    out.writekvs({"lr": 1e-4, "step": 7, key40: 0.5, key41: "text"}, step=0)
    out.writekvs({}, step=1)  # an empty dump writes nothing
    out.close()
    lines = (tmp_path / "t.txt").read_text().splitlines()
    kw, vw = 40, 8  # a 40-character key is kept whole; floats are "%-8.3g"
    rule = "-" * (kw + vw + 7)
    assert lines == [
        rule,
        f"| {key40} | 0.5      |",
        f"| {'lr':<{kw}} | 0.0001   |",
        f"| {'step':<{kw}} | 7        |",
        f"| {'x' * 37 + '...':<{kw}} | text     |",
        rule,
    ]


def test_human_output_targets(tmp_path, capsys):
    import io

    stream = io.StringIO()
    logger.HumanOutput(stream).writeline("to the stream")
    assert stream.getvalue() == "to the stream\n" and capsys.readouterr().out == ""
    logger.HumanOutput(None).writeline("to stdout")  # whatever sys.stdout is at write time
    assert capsys.readouterr().out == "to stdout\n"
    f = logger.HumanOutput(str(tmp_path / "a.txt"))
    f.writeline("to the file")
    f.close()
    f.close()  # twice is harmless
    assert (tmp_path / "a.txt").read_text() == "to the file\n" and capsys.readouterr().out == ""


def test_widened_csv_rows_keep_the_header_width(tmp_path):
    path = tmp_path / "progress.csv"
    out = logger.CSVOutput(str(path))
    out.writekvs({"a": 1}, 0)
    out.writekvs({"a": 2}, 1)
    out.writekvs({"a": 3, "b": 4, "c": 5}, 2)  # two new columns: earlier rows padded to three cells
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b", "c"], ["1", "", ""], ["2", "", ""], ["3", "4", "5"]]
    assert logger.CSVOutput(str(path)).keys == ["a", "b", "c"]  # a resumed run reads the header back


class _Recorder:
    def __init__(self):
        self.dumps = []

    def writekvs(self, kvs, step):
        self.dumps.append((dict(kvs), step))

    def writeline(self, text):
        pass

    def close(self):
        pass


def test_outputs_get_the_logged_step_or_the_dump_count():
    rec = _Recorder()
    log = logger.Logger(None, [rec, None])  # None (an uninstalled optional output) is dropped
    assert log.outputs == [rec]
    log.logkv("loss", 1.0)
    log.dumpkvs()
    log.logkv("loss", 2.0)
    log.dumpkvs()
    log.logkv("step", 40)
    log.dumpkvs()
    log.logkv("step", "forty")  # not a number: the dump count again
    log.dumpkvs()
    assert [s for _, s in rec.dumps] == [0, 1, 40, 3] and log.num_dumps == 4


def test_booleans_are_passed_through_not_averaged():
    rec = _Recorder()
    log = logger.Logger(None, [rec])
    log.logkv("flag", True)
    log.logkv("name", "run")
    log.logkv("n", 3)
    out = log.dumpkvs()
    assert out["flag"] is True and out["name"] == "run" and out["n"] == 3 and isinstance(out["n"], int)


def test_dump_averages_over_ranks(monkeypatch):
    """Two ranks simulated in one process: keys are united, sums and counts all-reduced."""
    import torch.distributed as tdist

    from dkdm import dist

    peer = {"loss": (6.0, 2), "only_peer": (5.0, 1)}  # what the other rank logged
    reduced = []

    def all_reduce(packed, op=None):
        keys = sorted({"loss", "only_here", "only_peer", "step"})
        for i, k in enumerate(keys):
            s, c = peer.get(k, (0.0, 0))
            packed[2 * i] += s
            packed[2 * i + 1] += c
        reduced.append(packed.clone())

    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda keys: [keys, ["loss", "only_peer"]])
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: {"note": "from rank 0"})
    monkeypatch.setattr(dist, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    rec = _Recorder()
    log = logger.Logger(None, [rec])
    log.logkv_mean("loss", 1.0)
    log.logkv_mean("loss", torch.tensor(3.0))
    log.logkv_mean("only_here", 2.0)
    log.logkv("step", 10)
    out = log.dumpkvs()
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64 and reduced[0].numel() == 8
    assert out["loss"] == pytest.approx((1 + 3 + 6) / 4)
    assert out["only_here"] == pytest.approx(2.0) and out["only_peer"] == pytest.approx(5.0)
    assert out["step"] == 10 and isinstance(out["step"], int)  # an int counter stays an int
    assert out["note"] == "from rank 0"  # non-numbers come from rank 0
    assert rec.dumps[0][1] == 10


def test_other_ranks_write_nothing(tmp_path, monkeypatch, capsys):
    from dkdm import dist

    monkeypatch.setattr(dist, "launch_rank", lambda: 1)
    logger.configure(str(tmp_path / "run"), format_strs="stdout,log,csv")
    logger.logkv("a", 1.0)
    logger.log("not shown")
    assert logger.dumpkvs() == {"a": 1.0}  # still a full participant of the collective
    assert not (tmp_path / "run").exists() and capsys.readouterr().out == ""


def test_tensorboard_output_goes_under_tb(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(logger, "TensorBoardOutput", lambda d: made.append(d) or _Recorder())
    assert isinstance(logger.make_output("tensorboard", str(tmp_path)), _Recorder)
    assert made == [os.path.join(str(tmp_path), "tb")]

    def broken(d):
        raise RuntimeError("no tensorboard")

    monkeypatch.setattr(logger, "TensorBoardOutput", broken)
    assert logger.make_output("tensorboard", str(tmp_path)) is None  # optional: never stops a run


def test_logkv_and_logkv_mean_replace_each_other():
    log = logger.Logger(None, [])
    log.logkv_mean("a", 1.0)
    log.logkv("a", 5)  # a last value replaces the running mean ...
    log.logkv("b", 7)
    log.logkv_mean("b", 2.0)  # ... and a mean replaces a last value
    log.logkv_mean("b", 4.0)
    out = log.dumpkvs()
    assert out == {"a": 5, "b": 3.0}
    assert isinstance(out["a"], int) and isinstance(out["b"], float)  # a mean is a float, even 3.0


def test_only_int_counters_come_back_as_ints():
    log = logger.Logger(None, [])
    log.logkv("step", 4)
    log.logkv("lr", 2.0)
    log.logkv("flag", False)
    log.logkv_mean("loss", 1.0)
    log.logkv_mean("loss", 3.0)
    out = log.dumpkvs()
    assert [type(out[k]) for k in ("step", "lr", "flag", "loss")] == [int, float, bool, float]


def test_logging_refusals_name_the_key():
    log = logger.Logger(None, [])
    with pytest.raises(ValueError, match=r"logged value 'grad' must be a scalar, got a tensor of shape \(2,\)"):
        log.logkv_mean("grad", torch.ones(2))
    with pytest.raises(TypeError, match=r"logkv_mean\('name'\) needs a number or a one-element tensor, got str"):
        log.logkv_mean("name", "x")


def test_loss_dict_keys_after_the_timesteps_are_logged_and_stray_timesteps_clamped():
    log = logger.Logger(None, [])
    ts = torch.tensor([-3, 0, 99, 100, 250])  # outside [0, T) goes to the nearest quartile
    log.log_loss_dict(100, ts, {"t": ts, "mse": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])})
    out = log.dumpkvs()
    assert out == {"mse": 3.0, "mse_q0": 1.5, "mse_q3": 4.0}
