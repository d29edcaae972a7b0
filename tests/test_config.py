import pytest
import yaml

from dkdm.config import (
    ConfigError,
    ConfigParser,
    DiffusionConfig,
    DistillConfig,
    ModelConfig,
    TrainConfig,
    dump_yaml,
    from_dict,
    load_yaml,
    to_dict,
    update,
)


def _parser():
    return ConfigParser("t", {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig})


def test_plain_flag_sets_every_group_that_has_the_field():
    args = _parser().parse(["--learn_sigma", "--num_channels", "64", "--diffusion.steps", "100"])
    model, diffusion = args.resolve("model"), args.resolve("diffusion")
    assert model.learn_sigma and diffusion.learn_sigma
    assert model.num_channels == 64 and diffusion.steps == 100
    assert args.resolve("train") == TrainConfig()


def test_bool_flags_take_guided_diffusion_spelling():
    args = _parser().parse(["--use_fp16", "False", "--use_scale_shift_norm", "false", "--class_cond", "1"])
    model = args.resolve("model")
    assert model.use_fp16 is False and model.use_scale_shift_norm is False and model.class_cond is True


def test_unknown_flag_names_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse(["--num_chanels", "3"])
    assert e.value.code == 2  # argparse's usage error, not a crash
    assert "did you mean '--num_channels'" in capsys.readouterr().err


def test_abbreviations_are_not_accepted(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse(["--num_chan", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown argument --num_chan" in err and "did you mean '--num_channels'" in err


def test_bad_value_type_is_a_config_error():
    with pytest.raises(ConfigError, match="expected int"):
        _parser().parse(["--num_channels", "many"])


def test_yaml_then_flags_with_prefixed_flag_winning(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"num_channels": 96, "dropout": 0.3}, "train": {"lr": 2e-4}}))
    args = _parser().parse(["--config", str(cfg), "--dropout", "0.1", "--model.dropout", "0.2"])
    model = args.resolve("model")
    assert model.num_channels == 96 and model.dropout == 0.2
    assert args.resolve("train").lr == 2e-4


def test_yaml_unknown_section_and_key(tmp_path):
    bad_section = tmp_path / "a.yaml"
    bad_section.write_text("modle: {num_channels: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        _parser().parse(["--config", str(bad_section)])
    bad_key = tmp_path / "b.yaml"
    bad_key.write_text("model: {num_channel: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'num_channels'"):
        _parser().parse(["--config", str(bad_key)])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(broken))


def test_two_groups_of_one_type_need_prefixes():
    parser = ConfigParser(
        "t",
        {"teacher": ModelConfig, "student": ModelConfig, "diffusion": DiffusionConfig, "distill": DistillConfig},
        plain=["student", "diffusion", "distill"],
    )
    args = parser.parse(["--teacher.num_channels", "128", "--num_channels", "32", "--rho", "0.2"])
    assert args.resolve("teacher").num_channels == 128
    assert args.resolve("student").num_channels == 32
    assert args.resolve("distill").rho == 0.2


def test_resolve_layers_overrides_on_a_preset():
    preset = ModelConfig(name="x", num_channels=64, num_res_blocks=3)
    args = _parser().parse(["--num_res_blocks", "2"])
    model = args.resolve("model", base=preset)
    assert (model.name, model.num_channels, model.num_res_blocks) == ("x", 64, 2)


def test_update_from_dict_and_dump_round_trip(tmp_path):
    model = from_dict(ModelConfig, {"num_channels": "32", "learn_sigma": "true"})
    assert model.num_channels == 32 and model.learn_sigma is True
    with pytest.raises(ConfigError, match="unknown field"):
        update(model, {"channels": 3})
    path = tmp_path / "run" / "config.yaml"
    dump_yaml({"model": model, "diffusion": DiffusionConfig(steps=100)}, str(path))
    data = load_yaml(str(path))
    assert from_dict(ModelConfig, data["model"]) == model
    assert data["diffusion"]["steps"] == 100


# ------------------------------------------------------------------ what a first mutation pass found unpinned


def test_distill_config_accepts_every_documented_value_and_refuses_near_misses():
    for objective in ("dkdm", "luhman", "progressive", "tract", "consistency", "boot"):
        assert DistillConfig(objective=objective).objective == objective
    for dev in ("", "auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert DistillConfig(pool_device=dev).pool_device == dev
    for precision in ("fp32", "fp16", "bf16"):
        assert DistillConfig(teacher_precision=precision).teacher_precision == precision
    for dev in ("cudax", "cuda:", "cuda:a", "CUDA:0", "gpu"):
        with pytest.raises(ConfigError, match=f"--pool_device must be auto .* got '{dev}'"):
            DistillConfig(pool_device=dev)


@pytest.mark.parametrize(
    "value, want",
    [(w, True) for w in ("1", "true", "yes", "y", "on", "YES", " On ")]
    + [(w, False) for w in ("0", "false", "no", "n", "off", "NO", "Off")],
)
def test_bool_words_in_any_case(value, want):
    assert update(ModelConfig(), {"learn_sigma": value}).learn_sigma is want


def test_coercion_by_type_and_where_it_is_named():
    assert update(ModelConfig(), {"name": None}).name == ""  # YAML's empty value for a string field
    assert update(ModelConfig(), {"name": 7}).name == "7"
    assert update(ModelConfig(), {"num_channels": 64.0}).num_channels == 64
    with pytest.raises(ConfigError, match=r"^ModelConfig\.num_channels: expected int, got 64\.5$"):
        update(ModelConfig(), {"num_channels": 64.5})
    with pytest.raises(ConfigError, match=r"^ModelConfig: unknown field 'widht'"):
        update(ModelConfig(), {"widht": 1})
    from dkdm.config import _coerce

    assert _coerce("3", "int", "x") == 3 and _coerce("1.5", "float", "x") == 1.5 and _coerce(4, "str", "x") == "4"


def test_unknown_arguments_and_flag_values_are_named(capsys):
    with pytest.raises(SystemExit):
        _parser().parse(["stray", "--num_chanels=3"])
    assert "unknown argument --num_chanels=3 (did you mean '--num_channels'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse(["stray"])
    assert "unknown argument stray" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^--model\.num_channels: expected int"):
        _parser().parse(["--model.num_channels", "many"])


def test_yaml_values_are_checked_naming_the_file_and_group(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"lr": "fast"}}))
    with pytest.raises(ConfigError, match=rf"^{cfg}: train\.lr: expected float"):
        _parser().parse(["--config", str(cfg)])
    args = _parser().parse([])
    args.overrides["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float"):
        args.resolve("train")


def test_differences_compare_leaves_and_dump_keeps_field_order(tmp_path):
    from dkdm.config import differences

    assert differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, 5: 1}) == [("5", None, 1), ("a.c", 2, 3)]
    assert differences({"a": {"b": 1}}, {"a": 4}) == [("a", {"b": 1}, 4)]
    path = tmp_path / "c.yaml"
    dump_yaml({"train": TrainConfig(), "model": ModelConfig()}, str(path))
    text = path.read_text()
    assert text.index("train:") < text.index("model:")
    assert list(load_yaml(str(path))["model"]) == list(to_dict(ModelConfig()))


def test_help_describes_every_flag_once_with_its_own_default():
    p = ConfigParser(
        "the description", {"model": ModelConfig, "diffusion": DiffusionConfig}, renamed={"old": "--model.arch"}
    )
    h = " ".join(p.parser.format_help().split())  # argparse wraps lines by the terminal's width
    assert (
        h.startswith("usage: ")
        and "[--config FILE.yaml] [--field VALUE | --group.field VALUE ...] the description" in h
    )
    assert "--config CONFIG experiment YAML with one mapping per group (model, diffusion); may be given several" in h
    assert "--model.arch V model: arch (default 'unet')" in h and "(default: None)" not in h
    assert "--model.learn_sigma [V] model: learn_sigma (default False)" in h  # a bool flag alone means true
    assert "--learn_sigma [V] sets model.learn_sigma, diffusion.learn_sigma" in h
    assert "--dropout V sets model.dropout" in h and "now spelled --model.arch" in h
    p.add_argument("--out", default="x.npz", help="where the images go")
    assert "--out OUT where the images go (default: x.npz)" in " ".join(p.parser.format_help().split())
    with pytest.raises(SystemExit):
        p.parse(["--model.dropout"])  # a value is needed: only bools take none
    assert p.parse(["--model.learn_sigma"]).resolve("model").learn_sigma is True


def test_groups_sharing_a_type_get_no_plain_flags_by_default(capsys):
    parser = ConfigParser("t", {"teacher": ModelConfig, "student": ModelConfig, "diffusion": DiffusionConfig})
    assert parser.parse(["--steps", "9"]).resolve("diffusion").steps == 9  # its type is its own
    with pytest.raises(SystemExit):
        parser.parse(["--num_channels", "32"])  # teacher or student? only --teacher./--student. exist
    assert "unknown argument --num_channels" in capsys.readouterr().err


def test_a_prefixed_flag_wins_over_the_plain_one_whatever_their_names():
    args = _parser().parse(["--diffusion.steps", "7", "--steps", "9"])  # 'diffusion__steps' sorts before 'steps'
    assert args.resolve("diffusion").steps == 7


def test_extras_suggestions_types_and_batch_bounds(tmp_path, capsys):
    parser = _parser()
    parser.add_argument("--out", default="x.npz")
    args = parser.parse(["--out", "y.npz"])
    assert args.extras == {"config": [], "out": "y.npz"}
    with pytest.raises(SystemExit):
        parser.parse(["--lrr=0.000100000"])  # the name before '=' is what is compared
    assert "unknown argument --lrr=0.000100000 (did you mean '--lr'?)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"unknown field 'numch' \(did you mean 'num_channels'\?\)"):
        update(ModelConfig(), {"numch": 1})  # similarity 0.59: suggested from 0.5 on
    from dkdm.config import _coerce

    assert _coerce("3", int, "x") == 3 and _coerce("yes", bool, "x") is True  # a type as well as its name
    assert TrainConfig(batch_size=1).batch_size == 1
    assert TrainConfig(max_steps=10, lr_anneal_steps=10).max_steps == 10  # annealed to 0 at the last step
