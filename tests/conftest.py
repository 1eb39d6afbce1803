"""Fixtures: a real cluster (broker + agent + worker processes) on a temporary LMDB directory."""

from __future__ import annotations

import contextlib

import json
import os
from datetime import timedelta

import pytest

import armonik_zmq
from armonik_zmq.client import (ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, TaskDefinition,
                                TaskOptions, connect)
from armonik_zmq.cluster import LocalProcesses

# the reliability tools: History, figure() and the `scale` fixture (full / ci) for every test module
pytest_plugins = ["reliability"]

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSOR = "processors:processor"
WORKER_ENV = {"PYTHONPATH": os.pathsep.join([HERE, *filter(None, [os.environ.get("PYTHONPATH")])])}


def make_cluster(tmp_path, workers: int = 2, **kwargs) -> LocalProcesses:
    return LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=workers, processor=PROCESSOR, env=WORKER_ENV,
                          **kwargs)


@contextlib.contextmanager
def broker_only(tmp_path_factory, *broker_args: str, **kwargs):
    """Run a broker with no agent of its own (a test plays the agent, or needs none)."""
    cluster = make_cluster(tmp_path_factory.mktemp("lone"), broker_args=broker_args, **kwargs)
    try:
        cluster.start_broker()
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster shared by a test module (each test uses its own session)."""
    with make_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def default_cluster(tmp_path_factory):
    """A cluster started with no --processor: agents run armonik_zmq.processors:processor (functions + demo)."""
    with LocalProcesses(data_dir=str(tmp_path_factory.mktemp("default") / "lmdb"), workers=2) as processes:
        yield processes


@pytest.fixture
def client(default_cluster):
    """A futures-API client (armonik_zmq.Client) of ``default_cluster``."""
    with armonik_zmq.Client(default_cluster.endpoint) as c:
        yield c


@pytest.fixture
def conn(cluster):
    with connect(cluster.endpoint, timeout=30) as c:
        yield c


class Api:
    """The four ArmoniK clients on one connection, plus helpers that keep tests short."""

    def __init__(self, conn):
        self.conn = conn
        self.sessions = ArmoniKSessions(conn)
        self.results = ArmoniKResults(conn)
        self.tasks = ArmoniKTasks(conn)
        self.events = ArmoniKEvents(conn)
        self.options = TaskOptions(max_duration=timedelta(minutes=1), priority=1, max_retries=1)

    def session(self) -> str:
        return self.sessions.create_session(self.options)

    def submit(self, session_id: str, payload: dict, deps=(), n_outputs: int = 1):
        """Create a payload and outputs, submit one task; return (task, output ids)."""
        p = self.results.create_results({"payload": json.dumps(payload).encode()}, session_id)["payload"]
        outs = self.results.create_results_metadata([f"out{i}" for i in range(n_outputs)], session_id)
        out_ids = [outs[f"out{i}"].result_id for i in range(n_outputs)]
        task = self.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id, expected_output_ids=out_ids,
                                                                   data_dependencies=list(deps))])[0]
        return task, out_ids

    def value(self, session_id: str, result_id: str):
        self.events.wait_for_result_availability(result_id, session_id)
        return json.loads(self.results.download_result_data(result_id, session_id))


@pytest.fixture
def api(conn):
    return Api(conn)
