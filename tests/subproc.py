"""The environment the tests give the scripts they start as subprocesses."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with the repository first on ``PYTHONPATH`` and ``extra`` set.

    Whatever ``PYTHONPATH`` already held stays after it: on a machine whose packages come from
    ``PYTHONPATH`` (the lent GPU machine's diffusers), a script started by a test must find them too.
    """
    path = os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))
    return {**os.environ, **extra, "PYTHONPATH": path}
