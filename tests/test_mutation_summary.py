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
