"""benchmarks/mutation_summary.py: mutant names to files and functions, and the survivors' rules."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary():
    spec = importlib.util.spec_from_file_location(
        "mutation_summary", os.path.join(ROOT, "benchmarks", "mutation_summary.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutant_names_map_to_files_and_functions_packages_included():
    ms = _summary()
    assert ms.module_and_function("dkdm.distill.loop.x_teacher_id__mutmut_8") == ("dkdm/distill/loop.py", "teacher_id")
    assert ms.module_and_function("dkdm.distill.loop.xǁ_Timerǁ__init____mutmut_1") == (
        "dkdm/distill/loop.py",
        "_Timer.__init__",
    )
    assert ms.module_and_function("dkdm.distill.objectives.x_build_objective__mutmut_7") == (
        "dkdm/distill/objectives/__init__.py",
        "build_objective",
    )


def test_every_rule_is_well_formed_and_the_first_match_explains(tmp_path):
    ms = _summary()
    rules = ms.load_rules(os.path.join(ROOT, "benchmarks", "mutation_equivalent.yaml"))
    assert rules and all(r["reason"].strip() for r in rules)
    toy = [
        {"reason": "first", "mutant": "pkg.mod.x_f__mutmut_*", "change": r"^\+ a = None$"},
        {"reason": "second", "change": r"(?m)^\+ a = None$"},
    ]
    assert ms.explain("pkg.mod.x_f__mutmut_3", "+ a = None", toy) == "first"
    assert ms.explain("pkg.mod.x_g__mutmut_3", "- a = 1\n+ a = None", toy) == "second"
    assert ms.explain("pkg.mod.x_g__mutmut_3", "+ a = 2", toy) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("- reason: no pattern\n")
    with pytest.raises(SystemExit, match="needs a reason and a mutant glob"):
        ms.load_rules(str(bad))


# Survivors of a committed record that a later commit killed or removed, so no rule needs to explain
# them any more: (record, mutant) -> what happened.
_SINCE_RESOLVED = {
    (
        "mutation_step_methods.json",
        "dkdm.distill.objectives.progressive.x_round_schedule__mutmut_40",
    ): "killed: the refusal's bound is pinned to the message's end (`<= 7`, not `<= 7.5`)",
    (
        "mutation_step_methods.json",
        "dkdm.distill.objectives.progressive.xǁ_Roundsǁ__init____mutmut_8",
    ): "removed: _Rounds takes its method's schedule flags, with no default of its own",
}


def test_every_committed_records_survivors_are_still_explained():
    """Narrowing a rule must not leave a survivor a committed record explained without a reason."""
    import glob
    import json

    ms = _summary()
    rules = ms.load_rules(os.path.join(ROOT, "benchmarks", "mutation_equivalent.yaml"))
    records = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "mutation*.json")))
    assert len(records) >= 8
    lost = []
    for path in records:
        with open(path) as f:
            survivors = json.load(f)["survivors"]
        for s in survivors:
            key = (os.path.basename(path), s["mutant"])
            if s["explanation"] is None:  # the record itself says unexplained (the second run's trainer)
                continue
            if key not in _SINCE_RESOLVED and ms.explain(s["mutant"], s["change"], rules) is None:
                lost.append(key)
    assert lost == []


def _toy_run(tmp_path, test_body):
    """A mutmut run directory whose only 'mutant' is read at import time, as the zoo's recipes are."""
    (tmp_path / "setup.cfg").write_text("[mutmut]\npytest_add_cli_args_test_selection =\n    tests/test_toy.py\n")
    (tmp_path / "mutants" / "tests").mkdir(parents=True)
    (tmp_path / "mutants" / "toy.py").write_text(
        "import os\nVALUE = 2 if os.environ.get('MUTANT_UNDER_TEST') == 'toy.x_table__mutmut_1' else 1\n"
    )
    (tmp_path / "mutants" / "tests" / "test_toy.py").write_text(f"import toy\n\n\ndef test_value():\n    {test_body}\n")
    return str(tmp_path)


def test_import_time_survivors_are_rerun_each_in_a_fresh_process(tmp_path):
    ms = _summary()
    run = _toy_run(tmp_path, "assert toy.VALUE == 1")
    assert ms.test_selection(run) == ["tests/test_toy.py"]
    assert not ms.fails_in_fresh_process(run, "", ["tests/test_toy.py"])
    names = ["toy.x_table__mutmut_1", "toy.x_table__mutmut_2"]
    assert ms.recheck_fresh(run, names) == {"toy.x_table__mutmut_1"}
    assert ms.recheck_fresh(run, []) == set()
    assert ms.fails_in_fresh_process(run, names[0], ["tests/test_missing.py"])  # any nonzero exit: a kill ...
    with pytest.raises(SystemExit, match="fails with no mutant.*exit 4"):  # ... once the selection passes unmutated
        ms.fails_in_fresh_process(run, "", ["tests/test_missing.py"])


def test_a_selection_failing_without_a_mutant_stops_the_recheck(tmp_path):
    ms = _summary()
    run = _toy_run(tmp_path, "assert toy.VALUE == 3")
    with pytest.raises(SystemExit, match="fails with no mutant.*exit 1"):
        ms.recheck_fresh(run, ["toy.x_table__mutmut_1"])
