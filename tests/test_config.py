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
