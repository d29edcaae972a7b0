"""dkdm.fileio: the one atomic writer, its disk-full message, stale temporaries."""

import json
import os
import subprocess

import pytest
import torch

from dkdm.fileio import DiskFullError, atomic_save, atomic_write, file_sha256


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (needs root, as on the development machines and CI; skipped elsewhere)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_said_in_words_and_the_old_file_survives(tiny_fs):
    path = tiny_fs / "model000010.pt"
    atomic_save({"w": torch.zeros(100)}, str(path))
    old = path.read_bytes()
    with pytest.raises(DiskFullError) as e:
        atomic_save({"w": torch.zeros(1 << 20)}, str(path))  # 4 MiB into 256 KiB
    msg = str(e.value)
    assert "disk full while writing" in msg and str(path) in msg and "previous file there is intact" in msg
    assert path.read_bytes() == old and sorted(os.listdir(tiny_fs)) == ["model000010.pt"]  # no temporary left
    with pytest.raises(DiskFullError, match="nothing was written there"):
        atomic_write(str(tiny_fs / "new.bin"), lambda f: f.write(b"x" * (1 << 20)))
    assert sorted(os.listdir(tiny_fs)) == ["model000010.pt"]


def test_atomic_write_replaces_whole_files_and_hashes(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(str(path), lambda f: f.write("one"), mode="w")
    atomic_write(str(path), lambda f: f.write(b"two"))
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(ZeroDivisionError):
        atomic_write(str(path), lambda f: (f.write(b"half"), 1 / 0))
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["a.txt"]
    assert file_sha256(str(path)) == "3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"


class _Payload:
    """Unpickling this runs code: it deletes the canary file."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.remove, (self.canary,))


def test_trainer_files_load_weights_only_and_code_is_refused(tmp_path):
    import numpy as np

    from dkdm.training.checkpoint import UntrustedFileError, load_file, rng_state

    ours = tmp_path / "opt000001.pt"
    torch.save({"step": 1, "rank_states": [{"rng": rng_state()}], "optimizer": {"state": {}}}, ours)
    loaded = load_file(str(ours))  # numpy generator states are allow-listed, nothing else is needed
    assert isinstance(loaded["rank_states"][0]["rng"]["numpy"][1], np.ndarray)
    canary = tmp_path / "canary"
    canary.write_text("still here")
    evil = tmp_path / "pool000001.pt"
    torch.save({"x": torch.zeros(2), "payload": _Payload(str(canary))}, evil)
    with pytest.raises(UntrustedFileError, match="--trust_checkpoints") as e:
        load_file(str(evil))
    assert str(evil) in str(e.value) and canary.exists()
    load_file(str(evil), trusted=True)  # the user vouched for it: plain torch.load
    assert not canary.exists()


def test_emit_json_prints_and_writes_the_same_text(tmp_path, capsys):
    from dkdm.fileio import emit_json

    path = tmp_path / "r.json"
    text = emit_json({"a": 1, "b": [2.5]}, str(path))
    assert capsys.readouterr().out == text + "\n" and path.read_text() == text + "\n"
    assert json.loads(text) == {"a": 1, "b": [2.5]}
    assert emit_json({"c": 3}) and not list(tmp_path.glob(".*"))  # no path: printed only; no temporaries left
