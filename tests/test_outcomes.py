"""How a task ends, with ArmoniK's semantics (ARMONIK.md 2.4, 3.4, 3.5, 3.6), on real processes.

- ``Output(error)``: ERROR, no retry, outputs ABORTED, every dependent ERROR naming the failed task;
- the processor raises, its worker dies, or its agent is lost: RETRIED and a new task
  ``<initial_task_id>###<n>``, ERROR once ``max_retries`` is used up;
- past ``max_duration``: the agent kills the worker, TIMEOUT, no retry;
- nothing a failed task created is kept; a late report from a replaced attempt changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, Optional

import pytest
import zmq

from armonik_zmq.client import EventTypes, ResultStatus, TaskDefinition, TaskOptions, TaskStatus, connect
from armonik_zmq.errors import NotFoundError
from armonik_zmq.protocol import ErrorCode, Op, decode_header, request
from conftest import Api, make_cluster

_T = TaskStatus


def options(max_retries: int = 1, max_duration: float = 60) -> TaskOptions:
    return TaskOptions(max_duration=timedelta(seconds=max_duration), priority=1, max_retries=max_retries)


def submit(api: Api, session_id: str, *specs) -> list[tuple[dict, str]]:
    """Submit tasks in one call; return (task info, output id) per spec.

    A spec is ``(payload, deps, options)``: ``deps`` lists indexes of earlier specs (their outputs are the
    inputs), ``options`` may be None (session defaults). One call, so a failure cannot come before its
    dependents exist.
    """
    n = len(specs)
    payloads = api.results.create_results({f"p{i}": json.dumps(s[0]).encode() for i, s in enumerate(specs)},
                                          session_id, batch_size=n)
    outs = api.results.create_results_metadata([f"o{i}" for i in range(n)], session_id)
    out_ids = [outs[f"o{i}"].result_id for i in range(n)]
    tasks = api.tasks.submit_tasks(session_id, [
        TaskDefinition(payload_id=payloads[f"p{i}"].result_id, expected_output_ids=[out_ids[i]],
                       data_dependencies=[out_ids[d] for d in deps], options=opts)
        for i, (_, deps, opts) in enumerate(specs)])
    return [({"task_id": t.id, "payload_id": t.payload_id}, out_ids[i]) for i, t in enumerate(tasks)]


def task_row(conn, task_id: str) -> dict:
    return conn.call(Op.GET_TASKS, task_ids=[task_id])[0]["tasks"][0]


def result_row(conn, result_id: str) -> dict:
    return conn.call(Op.GET_RESULTS, result_ids=[result_id])[0]["results"][0]


def wait_for(probe: Callable[[], object], what: str, timeout: float = 30.0):
    """Read a status with ``probe`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout:g}s")
        time.sleep(0.02)


def events_until(sub, stop: Callable[[EventTypes, object], bool], timeout: float = 30.0) -> list:
    """Read a subscription's events up to and including the one ``stop`` accepts."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event_type, event = sub.get(timeout=max(0.01, deadline - time.monotonic()))
        seen.append((event_type, event))
        if stop(event_type, event):
            return seen


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            kids.append(int(entry))
    return kids


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def read_marker(path) -> Optional[int]:
    return int(open(path).read()) if os.path.exists(path) else None


def assert_same_task_but_attempt(first: dict, retry: dict) -> None:
    """A retry is a copy: same work, same place in the graph, same options."""
    for field in ("session_id", "payload_id", "data_dependencies", "expected_output_ids", "options", "created_by",
                  "parent_task_ids", "initial_task_id"):
        assert retry[field] == first[field], field


# -- Output(error) ---------------------------------------------------------------------------------


def test_output_error_fails_the_task_and_every_task_down_the_graph(api):
    session_id = api.session()
    (bad, bad_out), (mid, mid_out), (low, low_out) = submit(
        api, session_id, ({"op": "fail", "message": "no luck"}, [], None), ({"op": "sum"}, [0], None),
        ({"op": "sum"}, [1], None))
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability(low_out, session_id)
    row = task_row(api.conn, bad["task_id"])
    assert row["status"] == _T.ERROR and row["status_message"] == "no luck" and row["ended_at"] is not None
    assert row["retry_of_ids"] == []
    with pytest.raises(NotFoundError):  # an error output is not retried
        task_row(api.conn, f"{bad['task_id']}###1")
    for task, its_input in ((mid, bad_out), (low, mid_out)):
        row = task_row(api.conn, task["task_id"])
        assert row["status"] == _T.ERROR and row["ended_at"] is not None
        # two levels down, the message still names the task that failed, and the input that was lost
        assert f"task {bad['task_id']} ended in ERROR: no luck" in row["status_message"], row["status_message"]
        assert its_input in row["status_message"]
    for rid in (bad_out, mid_out, low_out):
        assert result_row(api.conn, rid)["status"] == ResultStatus.ABORTED


# -- the retry path --------------------------------------------------------------------------------


def test_exception_is_retried_as_initial_id_hash_n_until_it_succeeds(api, tmp_path):
    """max_retries=2: up to three runs; ownership of the output moves to each retry, its dependent waits."""
    session_id = api.session()
    sub = api.conn.subscribe(session_id)
    marker = str(tmp_path / "attempts")
    (first, out), (dependent, dep_out) = submit(
        api, session_id, ({"op": "raise-n-times", "n": 2, "marker": marker}, [], options(max_retries=2)),
        ({"op": "sum"}, [0], None))
    assert api.value(session_id, dep_out) == 3  # the third run wrote 3, the dependent summed it
    assert api.value(session_id, out) == 3
    assert len(open(marker).read().split()) == 3

    tid = first["task_id"]
    ids = [tid, f"{tid}###1", f"{tid}###2"]
    rows = [task_row(api.conn, i) for i in ids]
    for n, row in enumerate(rows):
        assert row["initial_task_id"] == tid and row["retry_of_ids"] == ids[:n]
        assert_same_task_but_attempt(rows[0], row)
    for n in (0, 1):
        assert rows[n]["status"] == _T.RETRIED and rows[n]["ended_at"] is not None
        assert f"attempt {n + 1} raised on purpose" in rows[n]["status_message"]
    assert rows[2]["status"] == _T.COMPLETED
    with pytest.raises(NotFoundError):
        task_row(api.conn, f"{tid}###3")
    result = result_row(api.conn, out)
    assert result["owner_task_id"] == ids[2] and result["completed_by"] == ids[2]
    dep = task_row(api.conn, dependent["task_id"])
    assert dep["status"] == _T.COMPLETED and dep["retry_of_ids"] == []

    seen = events_until(sub, lambda t, e: t == EventTypes.RESULT_STATUS_UPDATE and e.result_id == dep_out
                        and e.status == ResultStatus.COMPLETED)
    sub.close()
    new_tasks = {e.task_id: e for t, e in seen if t == EventTypes.NEW_TASK}
    for n in (1, 2):
        assert new_tasks[ids[n]].retry_of_ids == ids[:n] and new_tasks[ids[n]].status == _T.SUBMITTED
    owners = [(e.previous_owner_id, e.current_owner_id) for t, e in seen
              if t == EventTypes.RESULT_OWNER_UPDATE and e.result_id == out]
    assert owners == [("", tid), (ids[0], ids[1]), (ids[1], ids[2])]
    statuses = {(e.task_id, e.status) for t, e in seen if t == EventTypes.TASK_STATUS_UPDATE}
    assert {(ids[0], _T.RETRIED), (ids[1], _T.RETRIED), (ids[2], _T.COMPLETED)} <= statuses


def test_retries_used_up_end_in_error_and_fail_dependents(api, tmp_path):
    """max_retries=1: two runs, then ERROR; the retry's failure reaches the dependents."""
    session_id = api.session()
    marker = str(tmp_path / "attempts")
    (first, out), (dependent, dep_out) = submit(
        api, session_id, ({"op": "raise-n-times", "n": 5, "marker": marker}, [], options(max_retries=1)),
        ({"op": "sum"}, [0], None))
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability(dep_out, session_id)
    assert len(open(marker).read().split()) == 2
    tid = first["task_id"]
    assert task_row(api.conn, tid)["status"] == _T.RETRIED
    last = task_row(api.conn, f"{tid}###1")
    assert last["status"] == _T.ERROR and "attempt 2 raised on purpose" in last["status_message"]
    assert last["retry_of_ids"] == [tid] and last["ended_at"] is not None
    with pytest.raises(NotFoundError):
        task_row(api.conn, f"{tid}###2")
    assert result_row(api.conn, out)["status"] == ResultStatus.ABORTED
    dep = task_row(api.conn, dependent["task_id"])
    assert dep["status"] == _T.ERROR and f"task {tid}###1 ended in ERROR" in dep["status_message"]


def test_sigkilled_worker_is_a_retry_and_is_replaced(api, tmp_path):
    session_id = api.session()
    marker = str(tmp_path / "pid")
    ((first, out),) = submit(api, session_id, ({"op": "hang-first-time", "marker": marker}, [], options()))
    pid = wait_for(lambda: read_marker(marker), "the first run to start")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    assert api.value(session_id, out) == "second attempt"
    tid = first["task_id"]
    row = task_row(api.conn, tid)
    assert row["status"] == _T.RETRIED
    assert row["status_message"] == f"worker process {pid} died (exit code -9) while running the task"
    assert row["ended_at"] - killed_at < 2.0  # noticed at the agent's next reap (every 0.2 s)
    retry = task_row(api.conn, f"{tid}###1")
    assert retry["status"] == _T.COMPLETED and retry["retry_of_ids"] == [tid]
    assert result_row(api.conn, out)["completed_by"] == retry["task_id"]
    assert not alive(pid)


def test_workers_run_in_their_agents_session_each_in_a_process_group_of_its_own(cluster):
    """A process group keeps a terminal's Ctrl-C off the workers (the agent stops them in order); sharing the
    agent's session keeps them in its scheduler autogroup, where they cannot starve the control plane."""
    agent = cluster.agent.pid
    workers = wait_for(lambda: children_of(agent) or None, "the agent's workers to start")
    for pid in workers:
        assert os.getsid(pid) == os.getsid(agent)
        assert os.getpgid(pid) == pid != os.getpgid(agent)


def test_nothing_a_failing_task_created_is_kept(api):
    """Each run creates results (with and without data) and a subtask, then raises: none of it ever existed."""
    session_id = api.session()
    sub = api.conn.subscribe(session_id)
    ((first, out),) = submit(api, session_id, ({"op": "create-then-raise"}, [], options(max_retries=1)))
    tid = first["task_id"]
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability(out, session_id)
    seen = events_until(sub, lambda t, e: t == EventTypes.RESULT_STATUS_UPDATE and e.result_id == out
                        and e.status == ResultStatus.ABORTED)
    sub.close()

    created_results, created_tasks = set(), set()
    for task_id, status in ((tid, _T.RETRIED), (f"{tid}###1", _T.ERROR)):
        row = task_row(api.conn, task_id)
        assert row["status"] == status
        created = json.loads(re.search(r"created (\{.*\})", row["status_message"]).group(1))
        created_results.update(created["results"])
        created_tasks.update(created["tasks"])
    assert len(created_results) == 6 and len(created_tasks) == 2  # two runs, each its own ids
    for rid in created_results:
        with pytest.raises(NotFoundError):
            result_row(api.conn, rid)
    for task_id in created_tasks:
        with pytest.raises(NotFoundError):
            task_row(api.conn, task_id)
    announced = {getattr(e, "result_id", None) for _, e in seen} | {getattr(e, "task_id", None) for _, e in seen}
    assert not announced & (created_results | created_tasks)
    # the data the worker sent for its own output was not kept either
    result = result_row(api.conn, out)
    assert result["status"] == ResultStatus.ABORTED and result["size"] == 0 and result["completed_by"] == ""


# -- max_duration ----------------------------------------------------------------------------------


def test_max_duration_kills_the_worker_and_ends_in_timeout(tmp_path):
    """One worker: the task queued behind the one that times out goes back to the agent and runs next."""
    cluster = make_cluster(tmp_path, workers=1)
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            marker = str(tmp_path / "pid")
            (spin, spin_out), (behind, behind_out), (dependent, dep_out) = submit(
                api, session_id, ({"op": "spin", "marker": marker}, [], options(max_duration=1)),
                ({"op": "square", "x": 7}, [], None), ({"op": "sum"}, [0], None))
            pid = wait_for(lambda: read_marker(marker), "the spinning task to start")
            assert api.value(session_id, behind_out) == 49
            with pytest.raises(RuntimeError, match="aborted"):
                api.events.wait_for_result_availability(dep_out, session_id)

            row = task_row(conn, spin["task_id"])
            assert row["status"] == _T.TIMEOUT
            assert row["status_message"] == f"task exceeded its max_duration of 1s: worker process {pid} killed"
            assert 1.0 <= row["ended_at"] - row["started_at"] < 2.5
            with pytest.raises(NotFoundError):  # a timeout is not retried
                task_row(conn, f"{spin['task_id']}###1")
            assert result_row(conn, spin_out)["status"] == ResultStatus.ABORTED
            dep = task_row(conn, dependent["task_id"])
            assert dep["status"] == _T.ERROR and f"task {spin['task_id']} ended in TIMEOUT" in dep["status_message"]
            # the task behind it was not charged with anything: same id, no retry, no message
            row = task_row(conn, behind["task_id"])
            assert row["status"] == _T.COMPLETED and row["retry_of_ids"] == [] and row["status_message"] == ""
            assert row["started_at"] >= task_row(conn, spin["task_id"])["ended_at"] - 0.5
            wait_for(lambda: not alive(pid), "the spinning worker to be gone", timeout=5)
    finally:
        cluster.cleanup()


# -- agent lost ------------------------------------------------------------------------------------


def test_sigkilled_agent_running_tasks_are_retried_on_another_agent(tmp_path):
    """After the lease: running tasks are RETRIED (###1 runs elsewhere), merely dispatched ones are requeued."""
    cluster = make_cluster(tmp_path, workers=2, lease=2, agent_id="first")
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            submitted = submit(api, session_id, *[({"op": "pid", "sleep": 2}, [], options()) for _ in range(4)])
            ids = [t["task_id"] for t, _ in submitted]

            def running():
                rows = [task_row(conn, i) for i in ids]
                started = [r["task_id"] for r in rows if r["status"] == _T.PROCESSING]
                return started if len(started) == 2 else None

            started = wait_for(running, "two tasks running on the first agent")
            queued = [i for i in ids if i not in started]
            assert all(task_row(conn, i)["status"] == _T.DISPATCHED for i in queued)
            first_workers = children_of(cluster.agent.pid)
            assert len(first_workers) == 2
            second = cluster.start_extra_agent("second", workers=4)

            cluster.agent.send_signal(signal.SIGKILL)
            cluster.agent.wait()
            # its workers do not outlive it, not even in the middle of a task
            wait_for(lambda: not any(alive(p) for p in first_workers), "the dead agent's workers to exit", timeout=1)

            outs = [out for _, out in submitted]
            api.events.wait_for_result_availability(outs, session_id)
            second_workers = children_of(second.pid)
            for task_id, out in zip(ids, outs):
                if task_id in started:
                    row = task_row(conn, task_id)
                    assert row["status"] == _T.RETRIED and row["ended_at"] is not None
                    assert row["status_message"] == "agent first missed its heartbeats for 2s while the task was running"
                    done = task_row(conn, f"{task_id}###1")
                    assert done["retry_of_ids"] == [task_id]
                    assert_same_task_but_attempt(row, done)
                else:
                    done = task_row(conn, task_id)
                    assert done["retry_of_ids"] == []  # never started: requeued, not a retry
                    with pytest.raises(NotFoundError):
                        task_row(conn, f"{task_id}###1")
                assert done["status"] == _T.COMPLETED and done["owner_pod_id"] == "second"
                assert result_row(conn, out)["completed_by"] == done["task_id"]
                assert api.value(session_id, out) in second_workers
    finally:
        cluster.cleanup()


def test_a_worker_whose_agent_died_before_it_armed_its_death_signal_exits(tmp_path):
    """An agent SIGKILLed between starting a worker and the worker's prctl sends it no signal: the worker
    compares its parent with the agent pid it was given and exits instead of waiting forever as an orphan."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is not this worker's parent (as after the agent died and init adopted the worker)
    worker = subprocess.Popen([sys.executable, "-m", "armonik_zmq.worker", "--agent", f"{tmp_path}/none",
                               "--processor", "armonik_zmq.processors:processor", "--agent-pid", str(gone.pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        _, err = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert worker.returncode == 3 and f"agent {gone.pid} is gone" in err, (worker.returncode, err)
    # and with its real parent given, it stays up waiting for the agent
    alive_worker = subprocess.Popen([sys.executable, "-m", "armonik_zmq.worker", "--agent", f"{tmp_path}/none",
                                     "--processor", "armonik_zmq.processors:processor", "--agent-pid", str(os.getpid())])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            alive_worker.wait(timeout=2)
    finally:
        alive_worker.kill()
        alive_worker.wait()


def test_late_report_of_a_replaced_attempt_changes_nothing(tmp_path, capfd):
    """SIGSTOP an agent past its lease: its task is retried and completed elsewhere; resumed, its report is refused."""
    cluster = make_cluster(tmp_path, workers=1, lease=2, agent_id="first", own_groups=True)
    stopped = False
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            ((task, out),) = submit(api, session_id, ({"op": "pid", "sleep": 3}, [], options()))
            tid = task["task_id"]
            wait_for(lambda: task_row(conn, tid)["status"] == _T.PROCESSING, "the task to run on the first agent")
            (first_worker,) = children_of(cluster.agent.pid)
            cluster.agent.send_signal(signal.SIGSTOP)
            stopped = True
            second = cluster.start_extra_agent("second", workers=1)

            value = api.value(session_id, out)
            assert value in children_of(second.pid) and value != first_worker
            assert task_row(conn, tid)["status"] == _T.RETRIED
            retry = task_row(conn, f"{tid}###1")
            assert retry["status"] == _T.COMPLETED and retry["owner_pod_id"] == "second"
            written = result_row(conn, out)
            assert written["completed_by"] == retry["task_id"]
            # the first worker finished too, meanwhile: its output waits in the stopped agent's socket
            cluster.agent.send_signal(signal.SIGCONT)
            stopped = False

            # the first agent comes back, registers again and serves: the next task runs there
            second.send_signal(signal.SIGTERM)
            second.wait(10)
            ((_, later_out),) = submit(api, session_id, ({"op": "square", "x": 5}, [], None))
            assert api.value(session_id, later_out) == 25
            later = task_row(conn, result_row(conn, later_out)["completed_by"])
            assert later["owner_pod_id"] == "first"

            # its report of the replaced attempt, sent before that, was refused and changed nothing; or, when the
            # broker's word to drop the attempt (its registration again) was read before the worker's output, the
            # agent killed the worker: the late result was fenced off at the agent
            err = capfd.readouterr().err
            assert (f"broker refused the report of task {tid}: [STALE_ATTEMPT]" in err
                    or f"task {tid}: killing worker process" in err), err[-3000:]
            assert result_row(conn, out) == written
            assert api.value(session_id, out) == value
            assert task_row(conn, tid)["status"] == _T.RETRIED
            assert task_row(conn, f"{tid}###1") == retry
            with pytest.raises(NotFoundError):
                task_row(conn, f"{tid}###2")
    finally:
        if stopped:
            cluster.agent.send_signal(signal.SIGCONT)
        cluster.cleanup()


def test_report_of_a_task_queued_again_is_refused_and_the_rest_of_the_batch_stands(tmp_path):
    """Speak the agent protocol by hand: an agent registering again loses the tasks it held (queued again, not
    retried, since none had started); its report of one still queued is refused, its report of the new attempt
    of the other is accepted, in the same batch."""
    cluster = make_cluster(tmp_path)
    ctx = zmq.Context()
    agent = ctx.socket(zmq.DEALER)
    agent.setsockopt(zmq.LINGER, 0)
    agent.setsockopt(zmq.RCVTIMEO, 10_000)
    dispatched: list[dict] = []

    def call(op: Op, rid: int, frames=(), **fields) -> dict:
        agent.send_multipart([request(op, rid, agent_id="by-hand", **fields), *frames])
        while True:
            header = decode_header(agent.recv_multipart()[0])
            if header["op"] == Op.DISPATCH:
                dispatched.extend(header["tasks"])
            elif header["rid"] == rid:
                assert "error" not in header, header
                return header

    try:
        cluster.start_broker()
        cluster.wait_ready()
        agent.connect(cluster.agents_endpoint)
        call(Op.AGENT_REGISTER, 1, capacity=2)
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            (first, first_out), (second, second_out) = submit(
                api, session_id, ({"op": "square", "x": 1}, [], None), ({"op": "square", "x": 2}, [], None))
            while len(dispatched) < 2:
                call(Op.AGENT_HEARTBEAT, 2)
            assert [(t["task_id"], t["attempt"]) for t in dispatched] == [(first["task_id"], 1), (second["task_id"], 1)]

            dispatched.clear()
            call(Op.AGENT_REGISTER, 3, capacity=1)  # both taken back; room for one again
            while not dispatched:
                call(Op.AGENT_HEARTBEAT, 4)
            assert [(t["task_id"], t["attempt"]) for t in dispatched] == [(first["task_id"], 2)]
            queued = task_row(conn, second["task_id"])
            assert queued["status"] == _T.SUBMITTED and queued["attempt"] == 1 and queued["retry_of_ids"] == []

            reply = call(Op.TASKS_DONE, 5, frames=[b"1", b"4"], tasks=[
                {"task_id": first["task_id"], "attempt": 2, "ok": True, "results": [{"result_id": first_out, "frames": 1}]},
                {"task_id": second["task_id"], "attempt": 1, "ok": True,
                 "results": [{"result_id": second_out, "frames": 1}]}])
            assert reply["accepted"] == [first["task_id"]]
            ((task_id, code, message),) = reply["refused"]
            assert task_id == second["task_id"] and code == ErrorCode.STALE_ATTEMPT and "queued again" in message
            assert task_row(conn, first["task_id"])["status"] == _T.COMPLETED
            assert result_row(conn, second_out)["status"] == ResultStatus.CREATED  # the refused data went nowhere
            # the credit freed by the first dispatches the second again: only that attempt's report counts
            again = task_row(conn, second["task_id"])
            assert again["status"] == _T.DISPATCHED and again["attempt"] == 2
            reply = call(Op.TASKS_DONE, 6, frames=[b"4"], tasks=[
                {"task_id": second["task_id"], "attempt": 2, "ok": True,
                 "results": [{"result_id": second_out, "frames": 1}]}])
            assert reply["accepted"] == [second["task_id"]] and reply["refused"] == []
            assert [api.value(session_id, out) for out in (first_out, second_out)] == [1, 4]
    finally:
        agent.close()
        ctx.term()
        cluster.cleanup()
