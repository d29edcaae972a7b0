"""dkdm.fileio: the one atomic writer, its disk-full message, stale temporaries."""

import json
import os
import subprocess
import types

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


def test_emit_json_prints_and_writes_the_same_text(tmp_path, capsys, monkeypatch):
    from dkdm.fileio import emit_json

    path = tmp_path / "r.json"
    text = emit_json({"a": 1, "b": [2.5]}, str(path))
    assert capsys.readouterr().out == text + "\n" and path.read_text() == text + "\n"
    assert json.loads(text) == {"a": 1, "b": [2.5]}
    monkeypatch.chdir(tmp_path)
    assert emit_json({"c": 3}) and os.listdir(tmp_path) == ["r.json"]  # no path: printed only, nothing written


# --------------------------------------------------------------------------- failures and the disk-full message


def _fail_after(nbytes, exc):
    def write(f):
        f.write(b"x" * nbytes)
        f.flush()
        raise exc

    return write


def test_disk_full_message_counts_what_was_written_and_what_was_free(tmp_path, monkeypatch):
    import errno

    from dkdm import fileio

    monkeypatch.setattr(fileio, "_free_bytes", lambda directory: 1000)
    path = tmp_path / "opt000004.pt"
    with pytest.raises(DiskFullError) as e:
        atomic_write(str(path), _fail_after(300, OSError(errno.ENOSPC, "No space left on device")))
    assert e.value.errno == errno.ENOSPC
    assert "needed more than the 1,300 bytes that were free" in str(e.value)  # 300 written + 1,000 free
    assert os.listdir(tmp_path) == []

    def no_room(*args, **kwargs):  # the temporary file cannot even be created
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_free_bytes", lambda directory: 0)
    with pytest.raises(DiskFullError, match="needed more than the 300 bytes that were free"):
        atomic_write(str(path), _fail_after(300, OSError(errno.ENOSPC, "No space left on device")))
    monkeypatch.setattr(fileio, "_free_bytes", lambda directory: 1000)
    monkeypatch.setattr(fileio, "open", no_room, raising=False)
    with pytest.raises(DiskFullError, match=r"more than the 1,000 bytes .* nothing was written there"):
        atomic_write(str(path), lambda f: None)


def test_only_space_errors_or_a_nearly_full_disk_count_as_disk_full(tmp_path, monkeypatch):
    from dkdm import fileio

    path = str(tmp_path / "a.bin")
    free = [None]
    monkeypatch.setattr(fileio, "_free_bytes", lambda directory: free[0])
    with pytest.raises(RuntimeError, match="^boom$"):  # free space unknown: the error as it came
        atomic_write(path, _fail_after(10, RuntimeError("boom")))
    free[0] = fileio._NEARLY_FULL  # exactly 1 MiB left is not "nearly full"
    with pytest.raises(RuntimeError, match="^boom$"):
        atomic_write(path, _fail_after(10, RuntimeError("boom")))
    free[0] = fileio._NEARLY_FULL - 1  # torch.save's RuntimeError on a disk with less left is
    with pytest.raises(DiskFullError):
        atomic_write(path, _fail_after(10, RuntimeError("boom")))
    free[0] = 10  # a bug in the writer is not a full disk, however little space is left
    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda f: 1 / 0)
    assert os.listdir(tmp_path) == []


def test_emit_json_writes_one_space_indents(tmp_path, capsys):
    from dkdm.fileio import emit_json

    assert emit_json({"a": [1]}) == '{\n "a": [\n  1\n ]\n}'  # the committed result files' layout


def test_file_sha256_reads_in_chunks(tmp_path, monkeypatch):
    import builtins
    import hashlib

    from dkdm import fileio

    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    sizes = []

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

    spy_open = lambda p, mode: Spy(builtins.open(p, mode))  # noqa: SIM115 - Spy.__exit__ closes it
    monkeypatch.setattr(fileio, "open", spy_open, raising=False)
    assert fileio.file_sha256(str(path), chunk=4096) == hashlib.sha256(data).hexdigest()
    assert sizes == [4096, 4096, 4096, 4096]  # three blocks (the last partial) and the empty read


# --------------------------------------------------------------------------- stale temporaries


@pytest.fixture
def live_pid():
    """The pid of a process that stays alive for the test (not this one)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p.pid
    p.kill()
    p.wait()


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_go_and_live_ones_stay(tmp_path, live_pid):
    from dkdm import fileio
    from dkdm.training import checkpoint as ckpt

    d = tmp_path / "run.tmp-1"  # a directory whose own name carries the marker
    d.mkdir()
    dead, mine = _dead_pid(), os.getpid()
    names = {
        "dead": f".model000002.pt{fileio.TMP_MARK}{dead}",
        "live": f".a.pt{fileio.TMP_MARK}{live_pid}",  # sorts first: a live one does not end the sweep
        "mine": f".opt000002.pt{fileio.TMP_MARK}{mine}",  # this process starts afresh: its own leftovers go
        "yaml": f".config.yaml{fileio.TMP_MARK}{dead}",
    }
    for name in names.values():
        (d / name).write_bytes(b"half")
    removed = ckpt.remove_stale_temporaries(str(d))  # checkpoint files only
    assert sorted(removed) == sorted(str(d / names[k]) for k in ("dead", "mine"))
    assert sorted(os.listdir(d)) == sorted([names["live"], names["yaml"]])
    assert fileio.remove_stale_temporaries(str(d)) == [str(d / names["yaml"])]
    assert os.listdir(d) == [names["live"]]


def test_alive_probes_without_signalling():
    import time

    from dkdm import fileio

    p = subprocess.Popen(["sleep", "60"])
    try:
        assert fileio._alive(p.pid) and not fileio._alive(_dead_pid())
        time.sleep(0.2)
        assert p.poll() is None  # probing sent no signal that ended it
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------- the run directory's lock


def _holder(d):
    from dkdm import fileio

    return json.loads((d / fileio.LOCK_NAME).read_text())


def test_lock_records_host_pid_and_time_and_is_released_at_exit(tmp_path, monkeypatch):
    import re
    import socket

    from dkdm import fileio

    registered = []
    monkeypatch.setattr(fileio.atexit, "register", lambda fn, *args: registered.append((fn, args)))
    old = os.umask(0o022)
    try:
        assert fileio.acquire_lock(str(tmp_path / "run")) is None  # nothing to report
    finally:
        os.umask(old)
    lock = tmp_path / "run" / fileio.LOCK_NAME
    holder = _holder(tmp_path / "run")
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", holder["since"])
    assert os.stat(lock).st_mode & 0o777 == 0o644
    assert registered == [(fileio.release_lock, (str(tmp_path / "run"),))]
    assert fileio.acquire_lock(str(tmp_path / "run")) is None and len(registered) == 1  # re-entrant
    fileio.release_lock(str(tmp_path / "run"))
    assert not lock.exists()


def test_release_lock_leaves_other_holders_alone(tmp_path, live_pid):
    import socket

    from dkdm import fileio

    lock = tmp_path / fileio.LOCK_NAME
    for host, pid in [(socket.gethostname(), live_pid), ("elsewhere", os.getpid())]:
        lock.write_text(json.dumps({"host": host, "pid": pid, "since": "x"}))
        fileio.release_lock(str(tmp_path))
        assert lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "x"}))
    fileio.release_lock(str(tmp_path))
    assert not lock.exists()


def test_a_live_holder_is_named_with_where_and_since(tmp_path, live_pid):
    import errno
    import socket

    from dkdm import fileio

    lock = tmp_path / fileio.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live_pid, "since": "2026-01-02 03:04:05"}))
    with pytest.raises(fileio.RunDirectoryLocked) as e:
        fileio.acquire_lock(str(tmp_path))
    msg = str(e.value)
    assert e.value.errno == errno.EBUSY
    assert f"in use by process {live_pid} on this host (since 2026-01-02 03:04:05)" in msg
    assert f"`kill {live_pid}`" in msg and msg.endswith("or use another --log_dir")  # nothing to delete by hand
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 7}))  # another host: cannot be checked from here
    with pytest.raises(fileio.RunDirectoryLocked) as e:
        fileio.acquire_lock(str(tmp_path))
    msg = str(e.value)
    assert "in use by process 7 on host elsewhere (since ?)" in msg
    assert msg.endswith(f"; if that run is gone, delete {lock}")


@pytest.mark.parametrize("pid", [0, -3])
def test_a_lock_naming_no_real_process_is_stale(tmp_path, monkeypatch, pid):
    import socket

    from dkdm import fileio

    monkeypatch.setattr(fileio.atexit, "register", lambda *a: None)
    (tmp_path / fileio.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    note = fileio.acquire_lock(str(tmp_path))
    assert note == f"removed a stale lock of process {pid} (no longer running) from {tmp_path}"
    assert _holder(tmp_path)["pid"] == os.getpid()
    fileio.release_lock(str(tmp_path))


def test_a_lock_being_written_is_waited_for_three_times(tmp_path, monkeypatch):
    import errno

    from dkdm import fileio

    sleeps = []
    monkeypatch.setattr(fileio.time, "sleep", sleeps.append)
    (tmp_path / fileio.LOCK_NAME).write_text('{"host": ')  # half-written, just now
    with pytest.raises(fileio.RunDirectoryLocked, match="keeps changing") as e:
        fileio.acquire_lock(str(tmp_path))
    assert sleeps == [0.5, 0.5, 0.5] and e.value.errno == errno.EBUSY


def test_an_unreadable_lock_ten_seconds_old_is_stale(tmp_path, monkeypatch):
    import time

    from dkdm import fileio

    lock = tmp_path / fileio.LOCK_NAME
    lock.write_text('{"host": ')  # its writer died mid-write
    written = os.path.getmtime(lock)
    fake = types.SimpleNamespace(
        time=lambda: written + 10, sleep=lambda s: pytest.fail("waited"), strftime=time.strftime
    )
    monkeypatch.setattr(fileio, "time", fake)
    monkeypatch.setattr(fileio.atexit, "register", lambda *a: None)
    assert (
        fileio.acquire_lock(str(tmp_path)) == f"removed a stale lock of process -1 (no longer running) from {tmp_path}"
    )
    fileio.release_lock(str(tmp_path))


def test_a_lock_held_by_init_is_live(tmp_path):
    import socket

    from dkdm import fileio

    (tmp_path / fileio.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": 1}))
    with pytest.raises(fileio.RunDirectoryLocked, match="in use by process 1 on this host"):
        fileio.acquire_lock(str(tmp_path))


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path):
    import errno as _errno

    def write(f):
        f.write(b"partial")
        raise OSError(_errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:
        atomic_write(str(tmp_path / "x.txt"), write)
    assert not isinstance(info.value, DiskFullError) and info.value.errno == _errno.EIO
    assert os.listdir(tmp_path) == []  # the temporary is gone, nothing half-written in its place
