"""The command line: --help everywhere, and the demo end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [[], ["up"], ["broker"], ["agent"], ["demo"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "main")
def test_help(args):
    out = subprocess.run([sys.executable, "-m", "armonik_zmq", *args, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout


def test_worker_help():
    out = subprocess.run([sys.executable, "-m", "armonik_zmq.worker", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--processor" in out.stdout


def test_agent_rejects_bad_processor():
    out = subprocess.run([sys.executable, "-m", "armonik_zmq", "agent", "--processor", "no_such_module:fn"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no_such_module" in out.stderr


def test_demo_runs_its_own_cluster():
    out = subprocess.run([sys.executable, "-m", "armonik_zmq", "demo", "--tasks", "10"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for expected in ("fan-out: 10 tasks", "summed them to 285", "delayed upload: task waited PENDING",
                     "took over its output = 30", "has been aborted", "demo finished"):
        assert expected in out.stdout, out.stdout
