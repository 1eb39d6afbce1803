"""A turn that gives an idle agent its only task waits (up to --report-wait) for that task's report before its
commit, so a short lone task's submit and completion take one commit (broker/reportwait.py)."""

from __future__ import annotations

import threading
import time

import pytest

import armonik_zmq
from armonik_zmq.client import TaskStatus, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.protocol import Op
from conftest import Api, broker_only, make_cluster
from test_lifecycle import ScriptedAgent


def _metrics(api: Api) -> dict:
    return api.conn.call(Op.HEALTH, metrics=True)[0]["metrics"]


def test_a_short_lone_task_is_complete_when_its_submit_is_answered(tmp_path):
    """With a real agent and worker, each lone task's report joins the turn of its submit: the submit's reply
    comes once the task is COMPLETED (and durable). Premise: a task of the test processor reports within the
    30 s window on any machine."""
    with make_cluster(tmp_path, workers=1, broker_args=("--report-wait", "30")) as cluster:
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            sid = api.session()
            api.value(sid, api.submit(sid, {"op": "square", "x": 1})[1][0])  # the agent and its worker are up
            before = _metrics(api)
            for x in range(10):
                task, (out,) = api.submit(sid, {"op": "square", "x": x})
                done = api.tasks.get_task(task.id)
                assert done.status == TaskStatus.COMPLETED
                # handled after the wait, the report is stamped with its own time, not the turn's start
                assert done.created_at <= done.received_at <= done.started_at <= done.processed_at <= done.ended_at
                assert api.value(sid, out) == x * x
            after = _metrics(api)
    assert after["reports_joined"] - before["reports_joined"] >= 10
    assert after["report_waits_missed"] == before["report_waits_missed"]


def test_waits_that_end_without_the_report_are_skipped_more_and_more(tmp_path_factory):
    """A scripted agent that cannot answer while the test waits for the submit's reply: every lone submit's
    turn would wait the whole window. After a miss the next wait is skipped, after a second miss in a row the
    next three: of 8 lone submits, the 1st, 3rd and 7th wait."""
    with broker_only(tmp_path_factory, "--no-sync", "--report-wait", "0.05") as lone:
        agent = ScriptedAgent(lone.agents_endpoint)
        try:
            with connect(lone.endpoint, timeout=30) as conn:
                api = Api(conn)
                sid = api.session()
                took = []
                for x in range(8):
                    started = time.monotonic()
                    task, (out,) = api.submit(sid, {"op": "square", "x": x})
                    took.append(time.monotonic() - started)
                    attempt = agent.push(Op.DISPATCH, task.id)["attempt"]
                    assert agent.done(task.id, attempt, out, str(x * x).encode())["accepted"] == [task.id]
                assert _metrics(api)["report_waits_missed"] == 3
                assert _metrics(api)["reports_joined"] == 0
                assert took[0] >= 0.05 and took[2] >= 0.05 and took[6] >= 0.05
        finally:
            agent.close()


def test_a_clients_request_ends_the_wait(tmp_path_factory):
    """While a turn waits for a lone task's report, another client's request comes: the turn commits at once
    (the submit is answered), and the request is served, both long before the 30 s window."""
    with broker_only(tmp_path_factory, "--no-sync", "--report-wait", "30") as lone:
        agent = ScriptedAgent(lone.agents_endpoint)
        try:
            with connect(lone.endpoint, timeout=30) as conn, connect(lone.endpoint, timeout=10) as other:
                api = Api(conn)
                sid = api.session()
                submitted: list = []
                submitter = threading.Thread(target=lambda: submitted.append(api.submit(sid, {"op": "square", "x": 3})))
                started = time.monotonic()
                submitter.start()
                assert agent._receive(10)["op"] == Op.DISPATCH  # sent before the commit: the turn now waits
                health = other.call(Op.HEALTH, metrics=True)[0]
                submitter.join(10)
                assert submitted and time.monotonic() - started < 10
                assert health["metrics"]["report_waits_missed"] == 1
        finally:
            agent.close()


def _wakeups(thread: threading.Thread):
    """The voluntary context switches of ``thread`` (None where /proc does not tell them)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def test_a_value_that_comes_with_its_submits_reply_needs_no_listener(tmp_path):
    """The futures API: a lone task's completion event now comes right after its SUBMIT_INLINE's reply, before the
    future is registered. The thread that routes it keeps its value for the submit (``_early``), which settles the
    future: the listener thread is not woken to do that (it was, once per task)."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, broker_args=("--report-wait", "30")) as cluster:
        with armonik_zmq.Client(cluster.endpoint) as client:
            for x in range(3):
                assert client.submit(abs, -x).result(timeout=60) == x
            before = _wakeups(client._listener)
            values = [client.submit(abs, -x).result(timeout=60) for x in range(20)]
            after = _wakeups(client._listener)
    assert values == list(range(20))
    if before is None or after is None:
        pytest.skip("/proc/self/task/<tid>/status is not readable here: the listener's wake-ups cannot be counted")
    assert after - before < 10, after - before


def test_a_lone_tasks_completion_event_comes_inside_its_submits_reply(tmp_path):
    """The futures client subscribes ``with_replies``: a lone task's completion event, committed with its submit
    (the report joined the turn), comes inside the SUBMIT_INLINE's reply, one message instead of two, and settles
    the future as before. Premise: a task reports within the 30 s window on any machine (every report joins)."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, broker_args=("--report-wait", "30")) as cluster:
        with armonik_zmq.Client(cluster.endpoint) as client, connect(cluster.endpoint, timeout=60) as conn:
            assert client.submit(abs, -1).result(timeout=60) == 1
            before = _metrics(Api(conn))
            values = [client.submit(abs, -x).result(timeout=60) for x in range(20)]
            after = _metrics(Api(conn))
    assert values == list(range(20))
    # every report joined its submit's turn; an agent's other messages that came during a wait (a heartbeat, or a
    # started-task report on a slow machine) are joined too and counted, without ending the wait
    assert after["reports_joined"] - before["reports_joined"] >= 20
    assert after["events_carried"] - before["events_carried"] == 20


def test_the_window_grows_to_the_reports_delay(tmp_path):
    """Lone tasks that take 3 ms, longer than the 2 ms floor of the window: after the first misses the window grows
    (up to 8 ms) and the reports join their submit's turn, so the completion event comes inside the submit's
    reply. With a fixed 2 ms window every wait missed (none carried) and most submits skipped the wait."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, broker_args=("--report-wait", "0.002")) as cluster:
        with armonik_zmq.Client(cluster.endpoint) as client, connect(cluster.endpoint, timeout=60) as conn:
            assert client.submit(abs, -1).result(timeout=60) == 1
            before = _metrics(Api(conn))
            for _ in range(30):
                assert client.submit(time.sleep, 0.003).result(timeout=60) is None
            after = _metrics(Api(conn))
    assert after["events_carried"] - before["events_carried"] >= 10, (before, after)
