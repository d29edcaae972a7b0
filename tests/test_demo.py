"""`make demo` (scripts/demo.py): the whole job on the embedded default."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.subproc import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "dkdm", "assets", "digits_teacher.pt")


def test_make_demo_runs_the_demo_script():
    with open(os.path.join(ROOT, "Makefile")) as f:
        lines = f.read().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()
    assert lines[0].strip() == "install"  # the environment is created first
    assert any("scripts/demo.py" in line for line in lines[1:]) and not any("not built" in line for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(TEACHER), reason="embedded teacher not built")
def test_whole_demo(tmp_path):
    start = time.time()
    out = tmp_path / "demo_out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--out", str(out)],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | params | FD | IS | precision | recall | sampling images/s |" in proc.stdout
    with open(out / "results.json") as f:
        rows = {r["model"]: r for r in json.load(f)["rows"]}
    assert set(rows) == {"teacher", "student"}
    assert rows["student"]["params"] < rows["teacher"]["params"] / 2
    for r in rows.values():
        assert os.path.getsize(r["grid"]) > 0
        with np.load(r["npz"]) as z:
            assert z["arr_0"].shape == (2000, 8, 8, 1)
        assert 0 <= r["fd"] < 1e4 and 1 <= r["is"] <= 10 and 0 <= r["precision"] <= 1 and r["images_per_s"] > 0
    # The teacher is a real digit generator; the student learnt something from it without data.
    assert rows["teacher"]["is"] > 5 and rows["teacher"]["precision"] > 0.5
    assert rows["student"]["is"] > 2
    print(f"demo took {time.time() - start:.0f} s")
