"""benchmarks/fault_injection.py: killed runs resume bitwise; a full disk is survived."""

import json
import os
import subprocess
import sys

import pytest

from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "benchmarks", "fault_injection.py")


def _harness(tmp_path, *flags, timeout=900):
    out = tmp_path / "faults.json"
    p = subprocess.run(
        [sys.executable, HARNESS, *flags, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=script_env(),
        check=False,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())["results"]


def test_one_killed_sampling_run_resumes_bitwise(tmp_path):
    (row,) = _harness(tmp_path, "--trials", "1", "--trials2", "0", "--kinds", "sample", "--no_disk_full")
    assert row["trials"] == row["bitwise_equal_after_resume"] == 1, row["failures"]


@pytest.mark.slow
def test_every_kind_of_kill_and_a_full_disk(tmp_path):
    rows = _harness(tmp_path, "--trials", "3", "--trials2", "1", timeout=1800)
    kills = [r for r in rows if r["kind"] != "disk_full"]
    assert {(r["kind"], r["processes"]) for r in kills} >= {(k, 1) for k in ("distill", "prepare", "sample")}
    assert all(r["bitwise_equal_after_resume"] == r["trials"] for r in kills)
    disk = next(r for r in rows if r["kind"] == "disk_full")
    if "skipped" not in disk:
        assert disk["failed_with_message"] and disk["previous_checkpoint_loads"] and disk["bitwise_equal_after_resume"]
