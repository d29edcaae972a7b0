"""Writing files so that a crash or a full disk never leaves half a file where a whole one was.

:func:`atomic_write` is the one way dkdm writes a file it may later trust (checkpoints, the
pool cache, config.yaml, sample shards and npz files): a hidden temporary file in the same
directory, fsynced, renamed over the target, then the directory fsynced. On any failure the
temporary file is removed and the target, if it existed, is untouched. A full disk is
reported in words (:class:`DiskFullError`), whatever layer noticed it first (``torch.save``
reports it as an obscure ``RuntimeError``).
"""

from __future__ import annotations

import atexit
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TMP_MARK", "DiskFullError", "atomic_save", "atomic_write", "file_sha256", "remove_stale_temporaries"]

TMP_MARK = ".tmp-"
_NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this left counts as disk full


class DiskFullError(OSError):
    """A write ran out of space; the message names the file and says the old one is intact."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file and rename it over ``path`` (see the module docstring).

    Raises :class:`DiskFullError` when the filesystem ran out of space, other errors as they
    come; either way ``path`` is what it was before.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        free = _free_bytes(directory)
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        try:
            os.remove(tmp)
        except OSError:
            pass
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(e, (OSError, RuntimeError)) and free is not None and free < _NEARLY_FULL
        )
        if full:
            old = "the previous file there is intact" if os.path.exists(path) else "nothing was written there"
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {path}: it needed more than the {written + (free or 0):,} bytes that were "
                f"free on its filesystem; {old}. Free some space (or point the output elsewhere) and rerun: "
                "the run resumes from what was already saved",
            ) from None
        raise
    _fsync_dir(directory)


def emit_json(obj: Any, path: str = "") -> str:
    """Print ``obj`` as indented JSON (a benchmark's or an evaluation's result) and, when ``path``
    is given, also write it there through :func:`atomic_write`; returns the text."""
    import json

    text = json.dumps(obj, indent=1)
    if path:
        atomic_write(path, lambda f: f.write(text + "\n"), mode="w")
    print(text)
    return text


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(directory: str, pattern: str = "*") -> list[str]:
    """Delete temporary files that killed writes left in ``directory``; return their paths.

    Only temporaries of processes that no longer exist on this host are removed, so a
    directory shared between live runs (a pool cache) is safe to clean.
    """
    stale = []
    for p in sorted(glob.glob(os.path.join(directory, f".{pattern}{TMP_MARK}*"))):
        pid = p.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            os.remove(p)
            stale.append(p)
        except OSError:
            pass
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes; of a folder, of its files' relative paths and hashes."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for d, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(d, name)
                h.update(f"{os.path.relpath(full, path)}\0{file_sha256(full, chunk)}\n".encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- one run per directory

LOCK_NAME = "run.lock"


class RunDirectoryLocked(OSError):
    """Another live process holds the run directory; the message names it and what to do."""


def acquire_lock(directory: str) -> str | None:
    """Take ``directory/run.lock`` for this process (host, pid, start time); return a note or None.

    A lock left by a process that no longer exists on this host is stale and taken over (the
    returned note says so); a lock of this very process is kept (re-entrant). A live holder,
    or one on another host whose state cannot be checked from here, raises
    :class:`RunDirectoryLocked`. Released at exit, or by :func:`release_lock`.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
                host, pid = str(holder["host"]), int(holder["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                if time.time() - os.path.getmtime(path) < 10:  # being written this instant
                    time.sleep(0.5)
                    continue
                host, pid = me["host"], -1  # unreadable and old: a writer died mid-write
            if host == me["host"] and pid == me["pid"]:
                return None
            if host == me["host"] and (pid <= 0 or not _alive(pid)):  # pid 0 would probe our own group
                os.remove(path)
                note = f"removed a stale lock of process {pid} (no longer running) from {directory}"
                continue
            where = "this host" if host == me["host"] else f"host {host}"
            raise RunDirectoryLocked(
                errno.EBUSY,
                f"{directory} is in use by process {pid} on {where} (since {holder.get('since', '?')}); two "
                "runs writing one directory would corrupt it. Stop that process first (leftover workers of a "
                f"killed launcher, e.g. `kill {pid}`), or use another --log_dir"
                + ("" if host == me["host"] else f"; if that run is gone, delete {path}"),
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, directory)
        return note
    raise RunDirectoryLocked(errno.EBUSY, f"could not take {path}: it keeps changing; is another run starting?")


def release_lock(directory: str) -> None:
    """Remove ``directory/run.lock`` if this process holds it."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        with open(path) as f:
            holder = json.load(f)
        if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
            os.remove(path)
    except (OSError, ValueError):
        pass
