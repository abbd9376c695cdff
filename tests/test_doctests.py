"""Every docstring example (``>>>``) in ``lms`` and ``ddl`` runs and shows its real output.

The examples run in a fresh process as a single-rank torchrun job (RANK=0, WORLD_SIZE=1 and
a free MASTER_PORT), so the ``ddl`` examples call ``ddl.init()`` for real; each of them ends
with ``ddl.shutdown()``, so they do not depend on the order in which they run.
"""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_docstring_examples_pass():
    env = dict(os.environ)
    env.pop("DDL_LOCAL_SIZE", None)  # would change the topology the examples print
    env.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    cmd = [sys.executable, "-m", "pytest", "--doctest-modules", "lms", "ddl", "-q"]
    run = subprocess.run(
        cmd + ["-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = run.stdout + run.stderr
    if run.returncode != 0 or " passed" not in out:
        pytest.fail(f"doctests failed (exit {run.returncode}):\n{out}", pytrace=False)
