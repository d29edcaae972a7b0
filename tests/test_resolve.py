"""The one resolver: every kind of description, the precedence order, one owner of learn_sigma."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from dkdm.config import ConfigError, ConfigParser, DiffusionConfig, ModelConfig, to_dict
from dkdm.models import create_model, get_config
from dkdm.resolve import (
    DEFAULT_STUDENT,
    EMBEDDED_TEACHER,
    SampleSpace,
    configs_beside,
    resolve,
    resolve_distillation,
)
from tests.subproc import script_env

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ModelConfig(
    arch="unet",
    image_size=8,
    in_channels=1,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=32,
)
DIFF = DiffusionConfig(steps=4, noise_schedule="cosine")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(tmp_path, model=TINY, diffusion=DIFF, group="model"):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({group: to_dict(model), "diffusion": to_dict(diffusion)}))
    torch.save(create_model(model).state_dict(), run / "model000010.pt")
    return str(run / "model000010.pt")


# ------------------------------------------------------------------ each kind of description


def test_zoo_name():
    r = resolve({"arch": "cifar10-14M"})
    assert r.model == get_config("cifar10-14M") and r.source == "cifar10-14M"
    assert r.diffusion == DiffusionConfig(
        learn_sigma=True
    )  # the zoo network learns its variance, so its diffusion does
    assert r.space == SampleSpace((3, 32, 32), 0)


def test_model_yaml(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump({"model": to_dict(TINY)}))
    r = resolve({"arch": str(path)})
    assert r.model == TINY and r.space.shape == (1, 8, 8)


def test_family_and_flags():
    r = resolve({"arch": "vit", "image_size": 16, "hidden_size": 64, "depth": 2, "class_cond": True, "num_classes": 7})
    assert (r.model.arch, r.model.image_size, r.model.hidden_size, r.model.depth) == ("vit", 16, 64, 2)
    assert r.source == "flags" and r.space == SampleSpace((3, 16, 16), 7)
    assert resolve(default=DEFAULT_STUDENT).model == get_config(DEFAULT_STUDENT)  # nothing given: the zoo default


def test_checkpoint_with_its_run_config(tmp_path):
    path = _run_dir(tmp_path)
    r = resolve({}, {"timestep_respacing": "2"}, checkpoint=path)
    assert r.model == TINY and r.source.endswith("config.yaml") and r.checkpoint == path
    assert r.diffusion == DiffusionConfig(steps=4, noise_schedule="cosine", timestep_respacing="2")
    net = r.build()  # weights loaded strictly
    ref = torch.load(path)
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())


def test_checkpoint_of_a_distillation_run_is_its_student(tmp_path):
    big = ModelConfig(**{**to_dict(TINY), "num_channels": 64})
    run = tmp_path / "dkdm"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "teacher": to_dict(big),
                "student": to_dict(TINY),
                "diffusion": to_dict(DIFF),
                "teacher_diffusion": to_dict(DiffusionConfig(steps=1000)),
            }
        )
    )
    torch.save(create_model(TINY).state_dict(), run / "ema_0.999_000100.pt")
    r = resolve({}, {}, checkpoint=str(run / "ema_0.999_000100.pt"))
    assert r.model == TINY and r.diffusion == DIFF


def test_checkpoint_without_config_names_the_flags(tmp_path):
    orphan = tmp_path / "orphan.pt"
    torch.save(create_model(TINY).state_dict(), orphan)
    with pytest.raises(ConfigError, match=r"pass --arch .*diffusion flags"):
        resolve({}, {}, checkpoint=str(orphan))
    with pytest.raises(ConfigError, match=r"pass --teacher\.arch"):
        resolve({}, {}, checkpoint=str(orphan), prefix="teacher.")
    with pytest.raises(ConfigError, match=r"checkpoint not found: .*nope\.pt"):
        resolve({}, {}, checkpoint=str(tmp_path / "nope.pt"))
    # The network alone is not enough: nothing records the diffusion either.
    fields = {k: v for k, v in to_dict(TINY).items() if k != "name"}
    with pytest.raises(ConfigError, match=r"records the diffusion.*--diffusion\.steps and --diffusion\.noise_schedule"):
        resolve(fields, {}, checkpoint=str(orphan))
    # With both it resolves, and the weights load.
    r = resolve(fields, {"steps": 4, "noise_schedule": "cosine"}, checkpoint=str(orphan))
    assert r.diffusion.steps == 4 and r.build() is not None


@pytest.mark.skipif(not os.path.isfile(EMBEDDED_TEACHER), reason="embedded teacher not built")
def test_the_embedded_teacher_from_its_provenance():
    with open(os.path.splitext(EMBEDDED_TEACHER)[0] + ".json") as f:
        meta = json.load(f)
    r = resolve({}, {}, checkpoint=EMBEDDED_TEACHER)
    model, diffusion = to_dict(r.model), to_dict(r.diffusion)
    assert {k: model[k] for k in meta["model"]} == meta["model"]  # fields added since take their defaults
    assert {k: diffusion[k] for k in meta["diffusion"]} == meta["diffusion"]
    assert r.source.endswith("digits_teacher.json") and r.space == SampleSpace((1, 8, 8), 0)
    r.build()


def test_a_provenance_json_may_nest_its_configs(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"config": {"model": to_dict(TINY), "diffusion": to_dict(DIFF)}}))
    assert configs_beside(str(tmp_path / "t.pt"))[:2] == (to_dict(TINY), to_dict(DIFF))
    (tmp_path / "u.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        configs_beside(str(tmp_path / "u.pt"))


# ------------------------------------------------------------------ precedence


def test_precedence_flags_over_yaml_over_checkpoint_config_over_zoo(tmp_path):
    path = _run_dir(tmp_path, model=dataclass_replace(TINY, dropout=0.1))
    # The config beside the checkpoint beats the zoo default.
    assert resolve({}, {}, checkpoint=path, default="digits-teacher").model.channel_mult == "1,2"
    # YAML beats the config beside the checkpoint, flags beat YAML (ConfigParser merges the two).
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"dropout": 0.2, "num_res_blocks": 1}, "diffusion": {"steps": 8}}))
    args = ConfigParser("t", {"model": ModelConfig, "diffusion": DiffusionConfig}).parse(
        ["--config", str(exp), "--dropout", "0.3"]
    )
    r = resolve(args.overrides["model"], args.overrides["diffusion"], checkpoint=path)
    assert r.model.dropout == 0.3  # flag over YAML
    assert r.diffusion.steps == 8  # YAML over the recorded diffusion
    assert r.model.channel_mult == "1,2" and r.diffusion.noise_schedule == "cosine"  # recorded over zoo/defaults
    # An arch naming a zoo entry replaces the recorded network as the base; a family only renames the family.
    assert resolve({"arch": "digits-student"}, {}, checkpoint=path).model.name == "digits-student"
    assert resolve({"arch": "unet"}, {}, checkpoint=path).model.channel_mult == "1,2"


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ------------------------------------------------------------------ one learn_sigma


@pytest.mark.parametrize(
    "model_over, diffusion_over",
    [({"learn_sigma": True}, {}), ({}, {"learn_sigma": True}), ({"learn_sigma": "true"}, {"learn_sigma": True})],
)
def test_learn_sigma_set_once_anywhere_gives_one_network_and_diffusion(model_over, diffusion_over):
    r = resolve({"arch": "digits-student", **model_over}, diffusion_over)
    assert r.model.learn_sigma and r.diffusion.learn_sigma
    net = r.build()
    out = net(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert out.shape[1] == 2  # the output channels follow the same value
    assert r.create_diffusion().model_var_type.name == "LEARNED_RANGE"


def test_learn_sigma_follows_the_recorded_network_and_a_conflict_is_refused(tmp_path):
    path = _run_dir(tmp_path, model=dataclass_replace(TINY, learn_sigma=True), diffusion=DIFF)  # diffusion says False
    r = resolve({}, {}, checkpoint=path)
    assert r.model.learn_sigma and r.diffusion.learn_sigma
    with pytest.raises(ConfigError, match=r"--model\.learn_sigma True and --diffusion\.learn_sigma False"):
        resolve({"learn_sigma": True}, {"learn_sigma": False}, checkpoint=path)
    with pytest.raises(ConfigError, match=r"--teacher\.learn_sigma False and --teacher_diffusion\.learn_sigma True"):
        resolve(
            {"learn_sigma": False},
            {"learn_sigma": True},
            checkpoint=path,
            prefix="teacher.",
            dprefix="teacher_diffusion.",
        )


def test_learn_sigma_in_every_script_is_one_value(tmp_path):
    dkdm_train, image_train = _script("dkdm_train"), _script("image_train")
    c, _ = dkdm_train.resolve(["--diffusion.learn_sigma", "false"])
    assert not c["student"].learn_sigma and not c["diffusion"].learn_sigma
    assert c["teacher"].learn_sigma and c["teacher_diffusion"].learn_sigma  # the teacher's is its own
    with pytest.raises(ConfigError, match="disagree"):
        dkdm_train.resolve(["--student.learn_sigma", "true", "--diffusion.learn_sigma", "false"])
    with pytest.raises(ConfigError, match="disagree"):
        image_train.main(["--model.learn_sigma", "true", "--diffusion.learn_sigma", "false", "--max_steps", "1"])


# ------------------------------------------------------------------ distillation pair


@pytest.mark.skipif(not os.path.isfile(EMBEDDED_TEACHER), reason="embedded teacher not built")
def test_distillation_pair_from_the_embedded_teacher():
    teacher, student = resolve_distillation({"student": {"arch": "digits-vit"}})
    recorded = resolve({}, {}, checkpoint=EMBEDDED_TEACHER)
    assert teacher.model == recorded.model and teacher.checkpoint == EMBEDDED_TEACHER
    assert student.model == get_config("digits-vit")
    # The student learns the teacher's recorded process; the teacher's own is never respaced.
    assert student.diffusion.steps == recorded.diffusion.steps
    assert student.diffusion.noise_schedule == recorded.diffusion.noise_schedule
    t, _ = resolve_distillation({"diffusion": {"timestep_respacing": "10"}})
    assert t.diffusion.timestep_respacing == "" and not t.diffusion.use_kl
    with pytest.raises(ConfigError, match="--teacher_path"):
        resolve_distillation({"teacher": {"arch": "cifar10-57M"}})


def test_a_teacher_checkpoint_with_its_run_config_needs_no_flags(tmp_path):
    path = _run_dir(tmp_path, model=TINY, diffusion=DiffusionConfig(steps=40, noise_schedule="cosine"))
    teacher, student = resolve_distillation({"student": {"arch": "digits-student"}}, path)
    assert teacher.model == TINY and teacher.diffusion.steps == 40 and student.diffusion.steps == 40
    orphan = tmp_path / "orphan.pt"
    torch.save(create_model(TINY).state_dict(), orphan)
    with pytest.raises(ConfigError, match=r"--teacher\.arch"):
        resolve_distillation({"diffusion": {"steps": 40}}, str(orphan))
    with pytest.raises(ConfigError, match="records the diffusion"):
        resolve_distillation({"teacher": {"arch": "digits-teacher"}}, str(orphan))


@pytest.mark.parametrize("old, new", [("--student_arch", "--student.arch"), ("--teacher_arch", "--teacher.arch")])
def test_retired_architecture_flags_name_their_replacement(old, new):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "dkdm_train.py"), old, "digits-vit"],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 2 and f"{old} is now spelled {new}" in p.stderr


# ------------------------------------------------------------------ what the mutation run found unpinned


def test_errors_name_where_the_bad_value_came_from(tmp_path):
    from dkdm.resolve import recorded_diffusion

    cases = [
        (lambda: resolve({"learn_sigma": "maybe"}, prefix="student."), "student.learn_sigma"),
        (lambda: resolve({}, {"learn_sigma": "maybe"}, dprefix="teacher_diffusion."), "teacher_diffusion.learn_sigma"),
        (lambda: resolve({"learn_sigma": "maybe"}), "model.learn_sigma"),
        (lambda: resolve({"widht": 3}, prefix="teacher."), "teacher: unknown field 'widht'"),
        (lambda: resolve({"widht": 3}), "model: unknown field 'widht'"),
        (lambda: resolve({}, {"stepz": 3}, dprefix="teacher_diffusion."), "teacher_diffusion: unknown field 'stepz'"),
        (lambda: resolve({}, {"stepz": 3}), "diffusion: unknown field 'stepz'"),
        (lambda: resolve({}, {"stepz": 3}, dprefix=""), "diffusion: unknown field 'stepz'"),
        (lambda: resolve({}, {}, diffusion_changes={"stepz": 3}), "diffusion: unknown field 'stepz'"),
    ]
    for call, where in cases:
        with pytest.raises(ConfigError, match=re.escape(where)):
            call()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({}, run / "model000001.pt")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"widht": 3}, "diffusion": {"steps": 4}}))
    with pytest.raises(ConfigError, match=re.escape(f"{run / 'config.yaml'}: unknown field 'widht'")):
        resolve(checkpoint=str(run / "model000001.pt"))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(TINY), "diffusion": {"stepz": 4}}))
    for call in (
        lambda: resolve(checkpoint=str(run / "model000001.pt")),
        lambda: recorded_diffusion(str(run / "model000001.pt")),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"{run / 'config.yaml'}: unknown field 'stepz'")):
            call()


def test_a_hand_written_config_may_name_a_zoo_entry(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({}, run / "model000001.pt")
    data = {"model": {"arch": "digits-student", "dropout": 0.25}, "diffusion": {"steps": 4}, "notes": {"x": 1}}
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    r = resolve(checkpoint=str(run / "model000001.pt"))
    assert r.model == dataclass_replace(get_config("digits-student"), dropout=0.25)
    data["model"]["widht"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=re.escape(f"{run / 'config.yaml'}: unknown field 'widht'")):
        resolve(checkpoint=str(run / "model000001.pt"))
    (run / "config.yaml").write_text(yaml.safe_dump({"notes": {"x": 1}}))  # names neither group
    assert configs_beside(str(run / "model000001.pt")) == (None, None, str(run / "config.yaml"))


def test_a_family_flag_changes_the_recorded_networks_family(tmp_path):
    path = _run_dir(tmp_path)
    assert resolve({"arch": "vit"}, checkpoint=path).model.arch == "vit"
    assert resolve({}, checkpoint=path).model.arch == "unet"


def test_without_a_checkpoint_nothing_beside_the_working_directory_is_read(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(TINY), "diffusion": to_dict(DIFF)}))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # "" would be a file of this folder, whose config.yaml is one up
    r = resolve({}, {})
    assert (r.model, r.diffusion, r.source) == (ModelConfig(), DiffusionConfig(), "defaults")


def test_the_missing_diffusion_refusal_names_the_checkpoint(tmp_path):
    orphan = tmp_path / "orphan.pt"
    torch.save({}, orphan)
    with pytest.raises(
        ConfigError, match=rf"^nothing beside {re.escape(str(orphan))} records .* --teacher_diffusion\.steps"
    ):
        resolve({"arch": "digits-teacher"}, checkpoint=str(orphan), dprefix="teacher_diffusion.")
    with pytest.raises(
        ConfigError, match=rf"^nothing beside {re.escape(str(orphan))} records .* --steps and --noise_schedule"
    ):
        resolve_distillation({"teacher": {"arch": "digits-teacher"}}, str(orphan))


def test_a_teacher_without_a_record_takes_its_process_from_the_teacher_diffusion_flags(tmp_path):
    orphan = tmp_path / "orphan.pt"
    torch.save(create_model("digits-teacher").state_dict(), orphan)
    over = {"teacher": {"arch": "digits-teacher"}, "teacher_diffusion": {"steps": 12, "noise_schedule": "linear"}}
    teacher, student = resolve_distillation(over, str(orphan))
    assert (teacher.diffusion.steps, teacher.diffusion.noise_schedule) == (12, "linear")
    assert student.model == get_config(DEFAULT_STUDENT) and student.source == DEFAULT_STUDENT
    over["diffusion"] = {"use_kl": True, "timestep_respacing": "4"}  # the student's; the teacher is only
    teacher, student = resolve_distillation(over, str(orphan))  # evaluated: no KL term, no respacing
    assert not teacher.diffusion.use_kl and teacher.diffusion.timestep_respacing == ""
    assert student.diffusion.use_kl and student.diffusion.timestep_respacing == "4"
    with pytest.raises(ConfigError, match="teacher_diffusion: unknown field 'stepz'"):
        resolve_distillation({"teacher_diffusion": {"stepz": 3}})
    _run_dir(tmp_path)  # a teacher not written yet: its run's record describes teacher and student alike
    teacher, student = resolve_distillation({}, str(tmp_path / "run" / "model000020.pt"))
    assert teacher.diffusion.steps == student.diffusion.steps == DIFF.steps and teacher.model == TINY


def test_a_latent_teachers_student_takes_its_first_stage_and_keeps_its_own_record():
    latent = os.path.join(os.path.dirname(EMBEDDED_TEACHER), "digits_latent_teacher.pt")
    teacher, student = resolve_distillation(
        {"student": {"arch": "digits-student", "in_channels": 4, "image_size": 8}}, latent
    )
    assert teacher.model.first_stage and student.model.first_stage == teacher.model.first_stage
    assert student.model.first_stage_scale == teacher.model.first_stage_scale
    assert (student.checkpoint, student.source) == ("", "digits-student")
    teacher, student = resolve_distillation({}, latent)  # no student group at all
    assert student.model.first_stage == teacher.model.first_stage
    with pytest.raises(ConfigError) as e:
        resolve_distillation({"student": {"first_stage": "elsewhere"}}, latent)
    assert str(e.value) == (
        f"the student's first stage (elsewhere) is not the teacher's ({teacher.model.first_stage}); "
        "a student learns in its teacher's space"
    )
    with pytest.raises(ConfigError) as e:
        resolve_distillation({"student": {"first_stage": "ae"}})  # the embedded teacher works on pixels
    assert str(e.value).startswith("the student's first stage (ae) is not the teacher's (none: pixels);")


def test_sample_space_keeps_the_first_stage_scale():
    space = SampleSpace.of(dataclass_replace(TINY, first_stage="ae", first_stage_scale=0.3))
    assert space == SampleSpace((1, 8, 8), 0, "ae", 0.3)


def test_first_stage_is_found_locally_then_in_the_assets_with_its_scale(tmp_path, monkeypatch):
    import dkdm.models.first_stage as fs

    calls = []

    class Stage:
        latent_channels = 1

    monkeypatch.setattr(fs, "load_first_stage", lambda path, **kw: calls.append((path, kw)) or Stage())
    assets = os.path.dirname(EMBEDDED_TEACHER)
    SampleSpace((1, 8, 8), 0, "digits_autoencoder", 0.0).load_first_stage(chunk_size=3)
    assert calls[-1] == (os.path.join(assets, "digits_autoencoder"), {"scale_factor": None, "chunk_size": 3})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_autoencoder").mkdir()  # a local folder of the same name wins
    SampleSpace((1, 8, 8), 0, "digits_autoencoder", 0.3).load_first_stage()
    assert calls[-1] == ("digits_autoencoder", {"scale_factor": 0.3})
    SampleSpace((1, 8, 8), 0, "nowhere", 0.0).load_first_stage()  # found nowhere: the loader names it as given
    assert calls[-1] == ("nowhere", {"scale_factor": None})


def test_a_network_without_a_checkpoint_is_built_fresh_and_nothing_beside_describes_nothing(tmp_path):
    from dkdm.resolve import build_network

    net = build_network(TINY)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in create_model(TINY).parameters())
    torch.save({}, tmp_path / "lonely.pt")
    assert configs_beside(str(tmp_path / "lonely.pt")) == (None, None, "")
