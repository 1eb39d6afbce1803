"""The command line: --help everywhere, and the demo end to end."""

from __future__ import annotations

import re
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


def test_up_serves_the_demo_and_stops_cleanly_on_sigterm(tmp_path):
    import os
    import signal
    import socket
    import time

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    endpoint, agents = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    up = subprocess.Popen([sys.executable, "-m", "armonik_zmq", "--log-level", "WARNING", "up", "--data-dir",
                           str(tmp_path / "data"), "--endpoint", endpoint, "--agents-endpoint", agents,
                           "--workers", "2"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        demo = None
        while time.monotonic() < deadline:
            demo = subprocess.run([sys.executable, "-m", "armonik_zmq", "demo", "--endpoint", endpoint, "--tasks", "5"],
                                  capture_output=True, text=True, timeout=120)
            if demo.returncode == 0:
                break
            time.sleep(0.5)
        assert demo is not None and demo.returncode == 0, demo.stdout + demo.stderr
        assert "demo finished" in demo.stdout
        assert os.path.isdir(tmp_path / "data")
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    assert "stopping the cluster" in err


def test_broker_nice_option_sets_every_thread_or_says_why_not(tmp_path):
    """--nice -3: every thread of the broker runs at nice -3, or (without CAP_SYS_NICE) it keeps its own and logs why."""
    import os
    import time

    from armonik_zmq.cluster import LocalProcesses

    log_path = str(tmp_path / "broker.log")
    cluster = LocalProcesses(str(tmp_path / "lmdb"), broker_args=("--nice", "-3"), log_level="INFO", broker_log=log_path)
    try:
        cluster.start_broker()
        deadline = time.monotonic() + 30
        while "broker serving clients" not in open(log_path).read():
            assert time.monotonic() < deadline and cluster.broker.poll() is None, open(log_path).read()
            time.sleep(0.05)
        tids = os.listdir(f"/proc/{cluster.broker.pid}/task")
        nices = {int(open(f"/proc/{cluster.broker.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[16])
                 for t in tids}
        if os.geteuid() == 0:
            assert len(tids) >= 3 and nices == {-3}, nices  # the main thread and ZeroMQ's threads
        else:
            assert nices == {os.getpriority(os.PRIO_PROCESS, 0)} and "needs CAP_SYS_NICE" in open(log_path).read()
    finally:
        cluster.cleanup()
    bad = subprocess.run([sys.executable, "-m", "armonik_zmq", "broker", "--nice", "5"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--nice" in bad.stderr


def _nices(pid: int) -> set:
    """The nice values of every thread of a process."""
    import os

    return {int(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[16])
            for t in os.listdir(f"/proc/{pid}/task")}


def _autogroup_nice(pid) -> str | None:
    """The nice value of a process's scheduler autogroup ("/autogroup-42 nice 0"), or None where the kernel has
    none to show: no file, or an empty one (some sandboxed kernels, such as gVisor, keep the file but no groups)."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            found = re.search(r"nice\s+(-?\d+)", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def _autogroup_writable() -> bool:
    """Whether this kernel has autogroups and lets a process set its own (writing back this process's value)."""
    value = _autogroup_nice("self")
    if value is None:
        return False
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(value)
    except OSError:
        return False
    return _autogroup_nice("self") == value


def test_agents_and_their_workers_run_at_the_agent_nice_value(tmp_path):
    """Every thread of an agent and of its workers runs at the agent's nice value (DEFAULT_AGENT_NICE, or --nice),
    so the broker and the clients run first on a busy host; the broker keeps its own. An agent that leads a session
    of its own (its own scheduler autogroup) sets that group's nice value too."""
    import os
    import time

    from armonik_zmq.cluster import LocalProcesses
    from armonik_zmq.config import DEFAULT_AGENT_NICE

    own = os.getpriority(os.PRIO_PROCESS, 0)
    cluster = LocalProcesses(str(tmp_path / "lmdb"), workers=2, links=False)  # the agent's ZeroMQ threads are checked
    alone = None
    try:
        cluster.start()
        alone = subprocess.Popen([sys.executable, "-m", "armonik_zmq.cli", "agent", "--broker", cluster.agents_endpoint,
                                  "--workers", "1", "--nice", "7"], env=cluster.env, start_new_session=True)
        for agent, workers, nice in ((cluster.agent, 2, DEFAULT_AGENT_NICE), (alone, 1, 7)):
            deadline = time.monotonic() + 30
            while True:
                children = [int(c) for t in os.listdir(f"/proc/{agent.pid}/task")
                            for c in open(f"/proc/{agent.pid}/task/{t}/children").read().split()]
                # the workers' own program runs (their threads start from its main thread), and the agent's ZeroMQ
                # threads too: it starts its workers before its first socket (which starts them), and on a loaded
                # machine the workers were seen first (2 threads, where the main thread and ZeroMQ's make 3)
                if (len(children) == workers and all(b"armonik_zmq.worker" in open(f"/proc/{c}/cmdline", "rb").read()
                                                     for c in children)
                        and len(os.listdir(f"/proc/{agent.pid}/task")) >= 3):
                    break
                assert time.monotonic() < deadline and agent.poll() is None, \
                    "the agent's workers or its ZeroMQ threads did not start"
                time.sleep(0.05)
            for pid in (agent.pid, *children):
                assert _nices(pid) == {max(own, nice)}, (pid, _nices(pid))
        assert _nices(cluster.broker.pid) == {own}
        if _autogroup_writable():
            assert _autogroup_nice(alone.pid) == str(max(own, 7))
    finally:
        if alone is not None:
            alone.terminate()
            alone.wait(30)
        cluster.cleanup()


def test_a_cluster_that_cannot_start_stops_the_processes_it_started(tmp_path):
    """A broker that exits while starting fails start() with the reason, and the agent started beside it is stopped
    with it, not left trying to reach a broker that is not there."""
    from armonik_zmq.cluster import LocalProcesses

    cluster = LocalProcesses(str(tmp_path / "lmdb"), broker_args=("--no-such-option",))
    try:
        with pytest.raises(RuntimeError, match="the broker exited with code 2 while starting"):
            cluster.start()
        assert cluster.agent is not None and cluster.agent.poll() is not None
    finally:
        cluster.cleanup()


def test_the_in_place_build_left_bytecode_for_every_module():
    """setup.py byte-compiles the package when it builds the core in place (what `pip install -e` does): without
    it, where PYTHONDONTWRITEBYTECODE is set, every broker, agent and worker start compiles every module again."""
    import importlib.util
    import pathlib

    import armonik_zmq

    root = pathlib.Path(armonik_zmq.__file__).parent
    missing = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py"))
               if not pathlib.Path(importlib.util.cache_from_source(str(p))).exists()]
    assert not missing, f"no bytecode for {missing[:5]}: rebuild in place (python setup.py build_ext --inplace)"
