"""Fault injection on real processes (RELIABILITY.md section 6: T1, T2, T3, T4, T7).

Every fault is a signal sent to a process this test started (SIGKILL, SIGSTOP/SIGCONT) or a task
that misbehaves on purpose (spins, aborts). Each test records its figures with ``figure()``
(``python -m bench.faults`` turns them into docs/reliability.md) and asserts the criterion.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from datetime import timedelta


from armonik_zmq.client import TaskDefinition, TaskOptions, TaskStatus, connect
from armonik_zmq.client.filters import Direction, to_wire_filter, to_wire_sort
from armonik_zmq.client.tasks import Task
from armonik_zmq.protocol import Op
from armonik_zmq.cluster import LocalProcesses
from conftest import PROCESSOR, WORKER_ENV, Api, make_cluster
from reliability import figure, read_executions
from test_outcomes import alive, children_of, result_row, task_row, wait_for

_T = TaskStatus


def cluster_with_log(tmp_path, exec_log, workers: int = 2, **kwargs) -> LocalProcesses:
    """A cluster whose workers log every execution to ``exec_log`` (see tests/reliability.py)."""
    return LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=workers, processor=PROCESSOR,
                          env={**WORKER_ENV, "ARMONIK_ZMQ_EXEC_LOG": str(exec_log)}, **kwargs)


def options(max_retries: int = 1, max_duration: float = 300) -> TaskOptions:
    return TaskOptions(max_duration=timedelta(seconds=max_duration), priority=1, max_retries=max_retries)


def session_tasks(conn, session_id: str) -> list[dict]:
    """Every task row of a session (wire form: float timestamps), all pages."""
    rows, page = [], 0
    wire_filter = to_wire_filter(Task.session_id == session_id, "task", "task_filter")
    while True:
        header, _ = conn.call(Op.LIST_TASKS, filter=wire_filter, sort=to_wire_sort(Task.id, Direction.ASC, "task"),
                              page=page, page_size=10_000, with_errors=True, detailed=True)
        rows += header["tasks"]
        if not header["tasks"] or len(rows) >= header["total"]:
            return rows
        page += 1


def sha_payload(key: str, size: int = 100) -> bytes:
    """A ``sha256:KEY:`` payload of ``size`` bytes (tests/processors.py answers with its sha256)."""
    head = f"sha256:{key}:".encode()
    return head + os.urandom(max(0, size - len(head)))


def submit_sha(api: Api, session_id: str, keys: list[str], opts=None) -> dict[str, tuple[str, str, bytes]]:
    """Submit one no-op task per key in one call; return key -> (task id, output id, payload)."""
    payloads = {k: sha_payload(k) for k in keys}
    created = api.results.create_results(payloads, session_id, batch_size=len(keys))
    outs = api.results.create_results_metadata([f"out-{k}" for k in keys], session_id)
    tasks = api.tasks.submit_tasks(session_id, [
        TaskDefinition(payload_id=created[k].result_id, expected_output_ids=[outs[f"out-{k}"].result_id], options=opts)
        for k in keys])
    return {k: (t.id, outs[f"out-{k}"].result_id, payloads[k]) for k, t in zip(keys, tasks)}


def ended(conn, task_id: str) -> float:
    row = task_row(conn, task_id)
    return row["ended_at"] if row["ended_at"] else 0.0


# -- T3: hung agent and fencing --------------------------------------------------------------------------


def test_t3a_stopped_agent_loses_its_task_and_its_late_result_is_refused(tmp_path, capfd, scale):
    """SIGSTOP an agent holding a task (10 s; CI 5 s, still past its 3 s lease), then SIGCONT it."""
    stop_for = 10.0 if scale == 1.0 else 5.0
    cluster = make_cluster(tmp_path, workers=1, agent_id="first")
    stopped = False
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options())
            # the task runs longer than the stop: the stopped agent's worker finishes it meanwhile
            p = api.results.create_results({"p": json.dumps({"op": "pid", "sleep": 2}).encode()}, session_id)["p"]
            out = api.results.create_results_metadata(["out"], session_id)["out"].result_id
            (task,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                         expected_output_ids=[out])])
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.PROCESSING, "the task to run on the first agent")
            (first_worker,) = children_of(cluster.agent.pid)
            second = cluster.start_extra_agent("second", workers=1)
            cluster.agent.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            stopped = True

            wait_for(lambda: ended(conn, task.id), "the stopped agent's task to be taken back", timeout=stop_for)
            requeue = ended(conn, task.id) - stopped_at
            assert task_row(conn, task.id)["status"] == _T.RETRIED
            value = api.value(session_id, out)
            assert value in children_of(second.pid) and value != first_worker
            written = result_row(conn, out)
            retry = task_row(conn, f"{task.id}###1")
            assert written["completed_by"] == retry["task_id"] and retry["owner_pod_id"] == "second"

            time.sleep(max(0.0, stopped_at + stop_for - time.time()))
            cluster.agent.send_signal(signal.SIGCONT)
            stopped = False
            # its late report (old attempt, finished while it was stopped) is refused; nothing changes
            wait_for(lambda: "broker refused the report of task" in (err := capfd.readouterr().err) and err,
                     "the resumed agent's report to be refused", timeout=15)
            second.send_signal(signal.SIGTERM)
            second.wait(10)
            # the resumed agent carries on: the next task runs there
            later = submit_sha(api, session_id, ["after-resume"])["after-resume"]
            api.events.wait_for_result_availability(later[1], session_id)
            assert task_row(conn, later[0])["owner_pod_id"] == "first"
            # the result keeps the data and completer of the retry (one record: the late one was not applied)
            assert result_row(conn, out) == written
            assert api.value(session_id, out) == value
            assert task_row(conn, task.id)["status"] == _T.RETRIED and task_row(conn, retry["task_id"]) == retry
    finally:
        if stopped:
            cluster.agent.send_signal(signal.SIGCONT)
        cluster.cleanup()
    figure("T3", "(a) requeued after SIGSTOP", requeue, "s", "<= 4 s", requeue <= 4.0)
    figure("T3", "(a) late result of the old attempt", "refused (STALE_ATTEMPT)", "", "refused, 1 stored result", True)
    assert requeue <= 4.0, f"the stopped agent's task was taken back {requeue:.2f}s after SIGSTOP (criterion 4 s)"


def test_t3b_spinning_worker_is_killed_at_max_duration(tmp_path):
    """A worker spinning past max_duration is killed at max_duration + <= 1 s; the task ends TIMEOUT.

    ArmoniK (ARMONIK.md) ends a task past its max_duration in TIMEOUT without retry; RELIABILITY.md T3(b)
    says "retried". We keep ArmoniK's semantics: the task is not retried, even with retries left.
    """
    max_duration = 1.5
    cluster = make_cluster(tmp_path, workers=1)
    marker = tmp_path / "spinner.pid"
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options(max_retries=2, max_duration=max_duration))
            p = api.results.create_results({"p": json.dumps({"op": "spin", "marker": str(marker)}).encode()},
                                           session_id)["p"]
            out = api.results.create_results_metadata(["out"], session_id)["out"].result_id
            (task,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                         expected_output_ids=[out])])
            wait_for(marker.exists, "the spinning task to start", timeout=30)
            started = marker.stat().st_mtime
            pid = int(marker.read_text())
            deadline = time.monotonic() + max_duration + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            killed = time.time()
            late = killed - started - max_duration
            assert not alive(pid), "the spinning worker was never killed"
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.TIMEOUT, "the task to end in TIMEOUT")
            row = task_row(conn, task.id)
            assert "max_duration" in row["status_message"]
            assert [r["task_id"] for r in session_tasks(conn, session_id)] == [task.id]  # no retry
    finally:
        cluster.cleanup()
    figure("T3", "(b) worker killed after max_duration", late, "s late", "<= 1 s (then TIMEOUT, no retry: ArmoniK)",
           late <= 1.0)
    assert late <= 1.0, f"the worker was killed {late:.2f}s after its max_duration (criterion 1 s)"


# -- T4: poison task -------------------------------------------------------------------------------------


def test_t4_poison_task_ends_in_error_after_exactly_four_attempts(tmp_path, scale):
    """1,000 (CI 200) tasks: one whose worker calls os.abort() on every attempt (max_retries=3), the others normal."""
    n = (1000 if scale == 1.0 else 200) - 1
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=2)
    try:
        cluster.start()
        broker_pid = cluster.broker.pid
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options(max_retries=3))
            p = api.results.create_results({"p": json.dumps({"op": "abort"}).encode()}, session_id)["p"]
            poison_out = api.results.create_results_metadata(["poison"], session_id)["poison"].result_id
            (poison,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                           expected_output_ids=[poison_out])])
            normal = submit_sha(api, session_id, [f"n{i}" for i in range(n)])
            final_id = f"{poison.id}###3"
            wait_for(lambda: ended(conn, final_id) if any(r["task_id"] == final_id
                                                         for r in session_tasks(conn, session_id)) else 0,
                     "the poison task's last attempt to end", timeout=120)
            api.events.wait_for_result_availability([o for _, o, _ in normal.values()], session_id)
            rows = {r["task_id"]: r for r in session_tasks(conn, session_id)}
            attempts = [rows[poison.id]] + [rows[f"{poison.id}###{i}"] for i in (1, 2, 3)]
            assert [r["status"] for r in attempts] == [_T.RETRIED] * 3 + [_T.ERROR]
            assert f"{poison.id}###4" not in rows
            # every attempt keeps its own error: the worker died of SIGABRT
            assert all("died (exit code -6)" in r["status_message"] for r in attempts), [
                r["status_message"] for r in attempts]
            execs = [row for row in read_executions(str(log)) if row[0].split("###")[0] == poison.id]
            first_run = min(t for _, _, t, _ in execs)
            took = attempts[-1]["ended_at"] - first_run
            completed = sum(1 for tid, _, _ in normal.values() if rows[tid]["status"] == _T.COMPLETED)
            digests_ok = all(api.results.download_result_data(o, session_id) == hashlib.sha256(pl).digest()
                             for _, o, pl in list(normal.values())[:50])
            assert cluster.broker.poll() is None and cluster.broker.pid == broker_pid
    finally:
        cluster.cleanup()
    per_attempt = took / 4
    figure("T4", "attempts of the poison task", len(execs), "", "= 4, then Error", len(execs) == 4)
    figure("T4", "poison task: first attempt to Error", took, "s", "<= 4 x (detection + respawn) = 4 x 2 s",
           took <= 8.0)
    figure("T4", "detection + respawn per attempt", per_attempt, "s", "(measured)", True)
    figure("T4", "other tasks Completed", completed, "tasks", f"= {n}", completed == n)
    assert len(execs) == 4, f"the poison task ran {len(execs)} times (criterion: exactly 4)"
    assert completed == n and digests_ok
    assert took <= 8.0, f"the poison task took {took:.2f}s from its first attempt to Error (criterion 8 s)"
