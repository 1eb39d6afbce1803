"""Start a whole cluster (broker + one agent + its workers) as child processes, and stop it in order."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from .config import DEFAULT_PROCESSOR

log = logging.getLogger(__name__)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "armonik_zmq.cli", *args]


class LocalProcesses:
    """A broker and an agent running as real processes on an LMDB directory.

    Endpoints default to ``ipc://`` sockets in a private temporary directory, so nothing else on the
    host can connect and two clusters never collide. With ``links`` (the default without CURVE keys) the broker
    also serves Unix-socket links (unixlink.py) in that directory, and the agents and ``endpoint`` (what clients
    are given, unless ``endpoint`` is given) use them instead of ZeroMQ: no ZeroMQ I/O-thread hops between
    these processes of one host. ``zmq_endpoint`` is the broker's ZeroMQ endpoint for clients either way.
    """

    def __init__(self, data_dir: Optional[str] = None, endpoint: Optional[str] = None,
                 agents_endpoint: Optional[str] = None, workers: int = 2, processor: str = DEFAULT_PROCESSOR,
                 log_level: str = "WARNING", lease: Optional[float] = None, env: Optional[dict] = None,
                 broker_args: tuple[str, ...] = (), agent_id: str = "", agent_args: tuple[str, ...] = (),
                 broker_log: Optional[str] = None, secure: bool = False, keys_dir: Optional[str] = None,
                 links: Optional[bool] = None, own_groups: bool = False):
        self._tmp = tempfile.mkdtemp(prefix="armonik-zmq-")
        #: the broker and agents each in a process group of its own (same session), for a caller that SIGSTOPs
        #: them: a stopped process in the caller's group is sent SIGHUP (its death) and SIGCONT by the kernel
        #: when that group is orphaned, e.g. when the shell that started the caller in the background exits
        self._popen = {"process_group": 0} if own_groups else {}
        self.data_dir = data_dir or os.path.join(self._tmp, "data")
        self.zmq_endpoint = endpoint or f"ipc://{self._tmp}/frontend"
        self.agents_endpoint = agents_endpoint or f"ipc://{self._tmp}/backend"
        #: the broker's Unix-socket links for this host's peers (served with ``links``); a link has no
        #: authenticated identity, so not with CURVE keys
        self.links = links = (keys_dir is None and not secure) if links is None else links
        self.client_link = f"unix://{self._tmp}/links/clients.sock"
        self.agent_link = f"unix://{self._tmp}/links/agents.sock"
        #: where clients connect
        self.endpoint = endpoint or (self.client_link if links else self.zmq_endpoint)
        self.workers = workers
        self.processor = processor
        self.log_level = log_level
        self.lease = lease
        self.env = {**os.environ, **(env or {})}
        #: extra options for `armonik-zmq broker` (e.g. --no-sync)
        self.broker_args = list(broker_args)
        #: extra options for every `armonik-zmq agent` (e.g. --partition)
        self.agent_args = list(agent_args)
        #: the first agent's name ("" lets the agent choose one)
        self.agent_id = agent_id
        #: a file the broker's log (stderr) is appended to, across restarts (None: this process's stderr)
        self.broker_log = broker_log
        self.broker: Optional[subprocess.Popen] = None
        self.agent: Optional[subprocess.Popen] = None
        #: agents started with start_extra_agent, stopped with the cluster
        self.extra_agents: list[subprocess.Popen] = []
        #: CURVE keys (``armonik-zmq keys`` layout): ``keys_dir``, or with ``secure`` keys made for this cluster
        self.keys_dir: Optional[str] = keys_dir
        if secure and keys_dir is None:
            from .security import create_keys

            self.keys_dir = os.path.join(self._tmp, "keys")
            create_keys(self.keys_dir, ["client-1"], ["agent-1"])
        #: the agent's and this process's secret keys: the first of each kind in the key directory
        self._agent_secret = self._first_secret("agents") if self.keys_dir else ""
        self._client_secret = self._first_secret("clients") if self.keys_dir else ""

    def _first_secret(self, kind: str) -> str:
        where = os.path.join(self.keys_dir, kind)
        names = sorted(n for n in os.listdir(where) if n.endswith(".key_secret")) if os.path.isdir(where) else []
        if not names:
            raise RuntimeError(f"no {kind[:-1]} secret key in {where}: the local {kind[:-1]} needs one "
                               f"(armonik-zmq keys {self.keys_dir} --{kind[:-1]} NAME)")
        return os.path.join(where, names[0])

    @property
    def client_keys(self) -> dict:
        """``connect()``'s key arguments for this cluster's client key (empty without ``secure``)."""
        if self.keys_dir is None:
            return {}
        return {"server_key": os.path.join(self.keys_dir, "server.key"), "secret": self._client_secret}

    def start_broker(self) -> subprocess.Popen:
        args = ["--log-level", self.log_level, "broker", "--data-dir", self.data_dir, "--endpoint", self.zmq_endpoint,
                "--agents-endpoint", self.agents_endpoint]
        if self.lease is not None:
            args += ["--lease", str(self.lease)]
        if self.keys_dir is not None:
            args += ["--keys", self.keys_dir]
        if self.links:
            args += ["--client-link", self.client_link, "--agent-link", self.agent_link]
        args += self.broker_args
        if self.broker_log is None:
            self.broker = subprocess.Popen(_cli(*args), env=self.env, **self._popen)
        else:
            with open(self.broker_log, "ab") as log_file:
                self.broker = subprocess.Popen(_cli(*args), env=self.env, stderr=log_file, **self._popen)
        return self.broker

    def _spawn_agent(self, agent_id: str, workers: int, link: Optional[bool] = None) -> subprocess.Popen:
        """An agent on the broker's link (``link``; None: when the cluster has links), else on ZeroMQ."""
        on_link = self.links if link is None else link
        args = ["--log-level", self.log_level, "agent", "--broker", self.agent_link if on_link else self.agents_endpoint,
                "--workers", str(workers), "--processor", self.processor]
        if agent_id:
            args += ["--agent-id", agent_id]
        if self.keys_dir is not None:
            args += ["--server-key", os.path.join(self.keys_dir, "server.key"),
                     "--agent-secret", self._agent_secret]
        args += self.agent_args
        return subprocess.Popen(_cli(*args), env=self.env, **self._popen)

    def start_agent(self) -> subprocess.Popen:
        self.agent = self._spawn_agent(self.agent_id, self.workers)
        return self.agent

    def start_extra_agent(self, agent_id: str = "", workers: Optional[int] = None,
                          link: Optional[bool] = None) -> subprocess.Popen:
        """Start one more agent on this broker (it takes its share of the work); stopped with the cluster."""
        proc = self._spawn_agent(agent_id, self.workers if workers is None else workers, link)
        self.extra_agents.append(proc)
        return proc

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the broker answers and an agent is registered."""
        from .client import connect
        from .protocol import Op

        deadline = time.monotonic() + timeout
        with connect(self.endpoint, timeout=1.0, **self.client_keys) as conn:
            while True:
                for name, proc in (("broker", self.broker), ("agent", self.agent)):
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(f"the {name} exited with code {proc.returncode} while starting")
                try:
                    header, _ = conn.call(Op.HEALTH, timeout=1.0)
                    if self.agent is None or header["checks"][1]["healthy"]:
                        return
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the cluster at {self.endpoint} was not ready after {timeout:g}s")
                time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> "LocalProcesses":
        """Start the broker and the agent and wait until both are ready; if they are not, stop what started (an
        agent left behind would try to reach the broker forever) and raise."""
        try:
            self.start_broker()
            self.start_agent()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _stop(proc: Optional[subprocess.Popen], timeout: float) -> Optional[int]:
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the agents first (they hand back unfinished tasks), then the broker."""
        for agent in [*self.extra_agents, self.agent]:
            self._stop(agent, timeout)
        self._stop(self.broker, timeout)

    def kill_broker(self) -> None:
        if self.broker is not None:
            self.broker.kill()
            self.broker.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LocalProcesses":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
