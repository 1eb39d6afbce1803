"""Sessions and tasks through their lifecycle, with ArmoniK's semantics (ARMONIK.md 1.1, 1.2, 1.7, 3.7).

Most tests run on the module's cluster (broker, agent, workers). The ones that must decide exactly when
an agent reports use a broker without an agent and speak the agent protocol themselves
(``ScriptedAgent``): that makes the races of cancel and pause (a report arriving after the task was
stopped) deterministic.
"""

from __future__ import annotations

import itertools
import json
import queue
import signal
import time
from datetime import timedelta

import msgpack
import pytest
import zmq

from armonik_zmq.client import (EventTypes, ResultStatus, SessionStatus, TaskDefinition, TaskOptions, TaskStatus,
                                connect)
from armonik_zmq.errors import FailedPreconditionError, InvalidArgumentError
from armonik_zmq.protocol import ErrorCode, Op, request
from conftest import Api, broker_only, make_cluster
from test_outcomes import alive

_S = SessionStatus
_T = TaskStatus


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll a condition that no event announces (a file written, a process gone)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def wait_task(api: Api, session_id: str, task_id: str, *statuses: TaskStatus, timeout: float = 30.0):
    """Wait on the events stream until a task is in one of ``statuses``; return the task."""
    with api.conn.subscribe(session_id, [EventTypes.TASK_STATUS_UPDATE], [[["task_id", "eq", task_id]]]) as sub:
        task = api.tasks.get_task(task_id)
        deadline = time.monotonic() + timeout
        while task.status not in statuses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"task {task_id} is {task.status.name} after {timeout:g}s, "
                                     f"not {' or '.join(s.name for s in statuses)}")
            try:
                sub.get(remaining)
            except queue.Empty:
                continue
            task = api.tasks.get_task(task_id)
        return task


def stamps(task) -> list:
    return [task.created_at, task.submitted_at, task.received_at, task.acquired_at, task.fetched_at,
            task.started_at, task.processed_at, task.ended_at]


# -- sessions ---------------------------------------------------------------------------------------

#: ArmoniK 3.7: the statuses each operation accepts, and where it leads.
GUARDS = {
    "cancel": ({_S.RUNNING, _S.PAUSED, _S.CLOSED}, _S.CANCELLED),
    "pause": ({_S.RUNNING}, _S.PAUSED),
    "resume": ({_S.RUNNING, _S.PAUSED}, _S.RUNNING),
    "close": ({_S.RUNNING, _S.PAUSED}, _S.CLOSED),
    "purge": ({_S.CLOSED, _S.CANCELLED}, _S.PURGED),
    "delete": (set(_S) - {_S.UNSPECIFIED, _S.DELETED}, _S.DELETED),
}
PATHS = {_S.RUNNING: [], _S.PAUSED: ["pause"], _S.CLOSED: ["close"], _S.CANCELLED: ["cancel"],
         _S.PURGED: ["close", "purge"]}


def session_in(api: Api, status: SessionStatus) -> str:
    sid = api.session()
    for verb in PATHS[status]:
        getattr(api.sessions, f"{verb}_session")(sid)
    return sid


@pytest.mark.parametrize("verb", GUARDS)
def test_session_operations_follow_the_guard_table(api, verb):
    allowed, target = GUARDS[verb]
    for status in PATHS:
        sid = session_in(api, status)
        operation = getattr(api.sessions, f"{verb}_session")
        if status in allowed:
            assert operation(sid).status == target, (verb, status)
            continue
        with pytest.raises(FailedPreconditionError) as exc:
            operation(sid)
        message = exc.value.message
        assert sid in message and f"is {status.name}" in message, message
        assert all(s.name in message.split("allowed from:")[1] for s in allowed), message
        assert api.sessions.get_session(sid).status == status


def test_cancel_close_purge_switch_submission_off_and_stamp_the_session(api):
    sid = api.session()
    created = api.sessions.get_session(sid)
    assert created.status == _S.RUNNING and created.client_submission and created.worker_submission
    assert created.created_at is not None and created.closed_at is None and created.duration is None
    closed = api.sessions.close_session(sid)
    assert not closed.client_submission and not closed.worker_submission
    assert closed.created_at <= closed.closed_at
    assert abs(closed.duration - (closed.closed_at - closed.created_at)) < timedelta(milliseconds=1)
    purged = api.sessions.purge_session(sid)
    assert purged.closed_at <= purged.purged_at
    deleted = api.sessions.delete_session(sid)
    assert deleted.status == _S.DELETED and purged.purged_at <= deleted.deleted_at
    other = api.session()
    cancelled = api.sessions.cancel_session(other)
    assert not cancelled.client_submission and not cancelled.worker_submission
    assert cancelled.created_at <= cancelled.cancelled_at and cancelled.closed_at is None
    assert api.sessions.purge_session(other).purged_at >= cancelled.cancelled_at


def test_stop_submission_switches_client_and_worker_off_independently(api, tmp_path):
    gate = tmp_path / "gate"
    sid = api.session()
    # a task that will submit subtasks once the gate opens
    fanout, (fanout_out,) = api.submit(sid, {"op": "gate", "gate": str(gate), "then": {"op": "fanout", "xs": [2]}})
    wait_task(api, sid, fanout.id, _T.PROCESSING)
    row = api.sessions.stop_submission_session(sid, client=False, worker=True)
    assert row.client_submission and not row.worker_submission and row.status == _S.RUNNING
    _, (out,) = api.submit(sid, {"op": "square", "x": 3})  # clients still submit
    gate.touch()
    failed = wait_task(api, sid, fanout.id, _T.ERROR)
    assert "worker submission stopped" in failed.status_message, failed.status_message
    assert api.results.get_result(fanout_out).status == ResultStatus.ABORTED
    assert api.value(sid, out) == 9
    row = api.sessions.stop_submission_session(sid, client=True, worker=False)
    assert not row.client_submission and not row.worker_submission
    with pytest.raises(FailedPreconditionError, match=f"session {sid} has client submission stopped"):
        api.submit(sid, {"op": "square", "x": 3})
    # while a session that only stopped clients still takes subtasks from its workers
    other, gate = api.session(), tmp_path / "gate2"
    fanout, (fanout_out,) = api.submit(other, {"op": "gate", "gate": str(gate), "then": {"op": "fanout", "xs": [2]}})
    wait_task(api, other, fanout.id, _T.PROCESSING)
    api.sessions.stop_submission_session(other, client=True, worker=False)
    gate.touch()
    assert api.value(other, fanout_out) == 4


# -- pause and resume ---------------------------------------------------------------------------------


def wait_workers(api: Api, n: int, timeout: float = 30.0) -> None:
    """Wait until ``n`` workers run tasks side by side (a worker that starts late misses the first tasks)."""
    sid = api.session()
    payload = api.results.create_results({"p": json.dumps({"op": "pid", "sleep": 0.05}).encode()}, sid)["p"]
    deadline = time.monotonic() + timeout
    while True:
        outs = api.results.create_results_metadata([f"o{i}" for i in range(n)], sid)
        api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload.result_id, expected_output_ids=[o.result_id])
                                     for o in outs.values()])
        if len({api.value(sid, o.result_id) for o in outs.values()}) == n:
            return
        assert time.monotonic() < deadline, f"{n} workers were not ready after {timeout:g}s"


def test_pause_holds_tasks_not_started_and_resume_runs_them(api, tmp_path):
    """Running tasks finish; queued ones (at the agent too) wait PAUSED and never run before the resume."""
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    wait_workers(api, 2)
    sid = api.session()
    gated = lambda x: {"op": "gate", "gate": str(gate), "then": {"op": "square", "x": x}}  # noqa: E731
    # both workers busy, then one task queued behind each of them at the worker, then some held by the agent
    running = [api.submit(sid, gated(x)) for x in (1, 2)]
    for task, _ in running:
        wait_task(api, sid, task.id, _T.PROCESSING)
    at_workers = [api.submit(sid, gated(x)) for x in (3, 4)]
    at_agent = [api.submit(sid, {"op": "record", "path": str(runs), "value": i}) for i in range(3)]
    for task, _ in at_workers + at_agent:
        wait_task(api, sid, task.id, _T.DISPATCHED)
    late = api.results.create_results_metadata(["late"], sid)["late"].result_id
    pending, (pending_out,) = api.submit(sid, {"op": "sum"}, deps=[late])
    assert api.tasks.get_task(pending.id).status == _T.PENDING

    assert api.sessions.pause_session(sid).status == _S.PAUSED
    for task, _ in at_workers + at_agent + [(pending, None)]:
        paused = api.tasks.get_task(task.id)
        assert paused.status == _T.PAUSED and paused.owner_pod_id == "", paused
    for task, _ in running:
        assert api.tasks.get_task(task.id).status == _T.PROCESSING
    # submitted to a paused session: waits too
    extra, (extra_out,) = api.submit(sid, {"op": "record", "path": str(runs), "value": 9})
    assert api.tasks.get_task(extra.id).status == _T.PAUSED

    gate.touch()
    assert [api.value(sid, out) for _, (out,) in running] == [1, 4]
    # A task of a running session goes through the same agent and workers: had the paused ones been kept
    # there, they would have run first.
    other = api.session()
    _, (other_out,) = api.submit(other, {"op": "square", "x": 5})
    assert api.value(other, other_out) == 25
    assert not runs.exists()
    for task, _ in at_workers + at_agent + [(extra, None)]:
        assert api.tasks.get_task(task.id).status == _T.PAUSED

    assert api.sessions.resume_session(sid).status == _S.RUNNING
    assert api.tasks.get_task(pending.id).status == _T.PENDING  # its input still has no data
    api.results.upload_result_data(late, sid, b"11")
    assert [api.value(sid, out) for _, (out,) in at_workers] == [9, 16]
    assert [api.value(sid, out) for _, (out,) in at_agent] == [0, 1, 2]
    assert api.value(sid, extra_out) == 9 and api.value(sid, pending_out) == 11
    # each paused task ran once, after the resume
    assert sorted(runs.read_text().split()) == sorted(t.id for t, _ in at_agent + [(extra, None)])


# -- cancellation --------------------------------------------------------------------------------------


def test_cancel_tasks_kills_the_running_one_on_its_agent(api, tmp_path):
    marker = tmp_path / "pid"
    sid = api.session()
    spinning, (out,) = api.submit(sid, {"op": "spin", "marker": str(marker)})
    dependent, (dep_out,) = api.submit(sid, {"op": "sum"}, deps=[out])
    wait_until(marker.exists, "the task to start")
    pid = int(marker.read_text())
    # the broker has its start (the agent reports it 2 ms in, or later under load): started_at is set below
    wait_task(api, sid, spinning.id, _T.PROCESSING)
    (row,) = api.tasks.cancel_tasks([spinning.id])
    assert row.id == spinning.id and row.status in (_T.CANCELLING, _T.CANCELLED)
    # outputs aborted and dependents cancelled at once, as ArmoniK does
    assert api.results.get_result(out).status == ResultStatus.ABORTED
    assert api.tasks.get_task(dependent.id).status == _T.CANCELLED
    assert api.results.get_result(dep_out).status == ResultStatus.ABORTED
    cancelled = wait_task(api, sid, spinning.id, _T.CANCELLED)
    wait_until(lambda: not alive(pid), f"worker {pid} to be killed")
    assert cancelled.started_at <= cancelled.ended_at and cancelled.processed_at is None
    assert cancelled.created_at <= cancelled.submitted_at <= cancelled.acquired_at <= cancelled.started_at
    # the pool is whole again
    _, (o,) = api.submit(sid, {"op": "square", "x": 6})
    assert api.value(sid, o) == 36


def test_cancel_session_stops_its_running_tasks(api, tmp_path):
    marker = tmp_path / "pid"
    sid = api.session()
    spinning, (out,) = api.submit(sid, {"op": "spin", "marker": str(marker)})
    waiting = api.results.create_results_metadata(["w"], sid)["w"].result_id
    pending, (pending_out,) = api.submit(sid, {"op": "sum"}, deps=[waiting])
    wait_until(marker.exists, "the task to start")
    pid = int(marker.read_text())
    assert api.sessions.cancel_session(sid).status == _S.CANCELLED
    wait_task(api, sid, spinning.id, _T.CANCELLED)
    wait_until(lambda: not alive(pid), f"worker {pid} to be killed")
    assert api.tasks.get_task(pending.id).status == _T.CANCELLED
    for rid in (out, waiting, pending_out):
        assert api.results.get_result(rid).status == ResultStatus.ABORTED


def test_timestamps_of_a_normal_run_are_all_set_and_ordered(api):
    sid = api.session()
    task, (out,) = api.submit(sid, {"op": "square", "x": 2})
    assert api.value(sid, out) == 4
    done = api.tasks.get_task(task.id)
    times = stamps(done)
    assert all(t is not None for t in times), times
    assert times == sorted(times), times
    result = api.results.get_result(out)
    assert result.created_at <= done.created_at and result.completed_at == done.ended_at
    payload = api.results.get_result(done.payload_id)
    assert payload.created_at <= payload.completed_at <= done.submitted_at


# -- task options ---------------------------------------------------------------------------------------


def _options(**fields) -> TaskOptions:
    base = dict(max_duration=timedelta(seconds=30), priority=1, max_retries=1)
    return TaskOptions(**{**base, **fields})


@pytest.mark.parametrize("fields, field", [
    (dict(priority=100), "priority"),
    (dict(priority=-1), "priority"),
    (dict(max_retries=-1), "max_retries"),
    (dict(max_duration=timedelta(seconds=-1)), "max_duration"),
    (dict(partition_id="elsewhere"), "partition_id"),
])
def test_task_options_rejections_name_the_field(api, fields, field):
    sid = api.session()
    out = api.results.create_results_metadata(["o"], sid)["o"].result_id
    payload = api.results.create_results({"p": b"{}"}, sid)["p"].result_id
    with pytest.raises(InvalidArgumentError, match=rf"task 0: task_options\.{field}"):
        api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[out],
                                                    options=_options(**fields))])
    with pytest.raises(InvalidArgumentError, match=rf"task_options\.{field}"):
        api.sessions.create_session(_options(**fields))
    assert api.results.get_result(out).owner_task_id == ""


@pytest.mark.parametrize("fields, field", [
    (dict(max_duration=timedelta(0)), "max_duration"),
    (dict(priority=0), "priority"),
    (dict(max_retries=0), "max_retries"),
])
def test_session_defaults_must_be_complete(api, fields, field):
    with pytest.raises(InvalidArgumentError, match=rf"default_task_options: task_options\.{field}"):
        api.sessions.create_session(_options(**fields))


def test_task_options_merge_task_over_request_over_session_key_by_key(api):
    sid = api.sessions.create_session(_options(priority=2, application_name="app",
                                               options={"a": "session", "b": "session"}))
    request_defaults = _options(max_duration=timedelta(0), priority=3, max_retries=0,
                                options={"b": "request", "c": "request"})
    payload = api.results.create_results({"p": json.dumps({"op": "echo-options"}).encode()}, sid)["p"].result_id
    outs = api.results.create_results_metadata(["zero", "own"], sid)
    api.tasks.submit_tasks(sid, [
        # zero/empty task fields fall back (ArmoniK 1.7); its options merge key by key
        TaskDefinition(payload_id=payload, expected_output_ids=[outs["zero"].result_id],
                       options=_options(max_duration=timedelta(0), priority=0, max_retries=0,
                                        options={"c": "task", "d": "task"})),
        TaskDefinition(payload_id=payload, expected_output_ids=[outs["own"].result_id],
                       options=_options(priority=7, max_retries=4, engine_type="e")),
    ], default_task_options=request_defaults)
    zero = api.value(sid, outs["zero"].result_id)
    assert zero["options"] == {"a": "session", "b": "request", "c": "task", "d": "task"}
    assert (zero["priority"], zero["max_retries"], zero["max_duration"]) == (3, 1, 30.0)
    assert zero["application_name"] == "app" and zero["partition_id"] == "default"
    own = api.value(sid, outs["own"].result_id)
    assert (own["priority"], own["max_retries"], own["engine_type"]) == (7, 4, "e")
    assert own["options"] == {"a": "session", "b": "request", "c": "request"}


# -- a broker driven by a scripted agent -----------------------------------------------------------------


class ScriptedAgent:
    """The agent side of the backend protocol, one step at a time (no workers): the test reports."""

    def __init__(self, endpoint: str, agent_id: str = "scripted", partition: str = "default", capacity: int = 16,
                 **register_fields):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.agent_id = agent_id
        self._rids = itertools.count(1)
        self._pushes: list[dict] = []
        # the same id each time: registering again makes the broker forget the previous test's agent
        self.call(Op.AGENT_REGISTER, capacity=capacity, partitions=[partition], **register_fields)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def _receive(self, timeout: float) -> dict:
        if not self.sock.poll(max(0, int(timeout * 1000))):
            raise AssertionError("the broker sent nothing in time")
        return msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)

    def call(self, op: Op, frames=(), **fields) -> dict:
        """Send a request, return its reply (pushes that arrive meanwhile are kept)."""
        rid = next(self._rids)
        self.sock.send_multipart([request(op, rid, agent_id=self.agent_id, **fields), *frames])
        while True:
            header = self._receive(10)
            if header["op"] == op and header["rid"] == rid:
                assert "error" not in header, header
                return header
            self._pushes.append(header)

    def push(self, op: Op, task_id: str, timeout: float = 10.0) -> dict:
        """Return the item of the next ``op`` push (DISPATCH, STOP_TASKS) that names ``task_id``."""
        deadline = time.monotonic() + timeout
        while True:
            for header in self._pushes:
                for item in header["tasks"] if header["op"] == op else ():
                    if (item["task_id"] if isinstance(item, dict) else item[0]) == task_id:
                        header["tasks"].remove(item)
                        return item
            self._pushes.append(self._receive(deadline - time.monotonic()))

    def pushed_tasks(self, op: Op) -> list[str]:
        """Return the ids named by the ``op`` pushes the broker sent so far (and not taken by ``push``), in order."""
        # A request's reply follows whatever the broker sent this agent before it on the same socket.
        self.call(Op.AGENT_HEARTBEAT)
        return [item["task_id"] if isinstance(item, dict) else item[0]
                for header in self._pushes if header["op"] == op for item in header["tasks"]]

    def done(self, task_id: str, attempt: int, output: str, data: bytes) -> dict:
        return self.call(Op.TASKS_DONE, [data], tasks=[{"task_id": task_id, "attempt": attempt, "ok": True,
                                                        "results": [{"result_id": output, "frames": 1}]}])


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
    """A broker without an agent of its own (tests bring a ScriptedAgent)."""
    # "solo": no agent ever serves it, its tasks stay queued; "late", "order", "inline": an agent comes when a test
    # says so
    with broker_only(tmp_path_factory, "--no-sync", "--partition", "default,solo,late,order,inline") as cluster:
        yield cluster


@pytest.fixture
def lone_api(lone):
    with connect(lone.endpoint, timeout=30) as conn:
        yield Api(conn)


@pytest.fixture
def agent(lone):
    scripted = ScriptedAgent(lone.agents_endpoint)
    yield scripted
    scripted.close()


def test_a_deleted_sessions_running_task_is_stopped_on_its_agent_and_its_report_refused(lone_api, agent):
    """The delete's chunk that takes a running task's row away tells its agent to stop it; a report that comes
    anyway names a task that is gone."""
    from armonik_zmq.errors import NotFoundError

    api = lone_api
    sid = api.session()
    task, (out,) = api.submit(sid, {"op": "square", "x": 2})
    dependent, _ = api.submit(sid, {"op": "sum"}, deps=[out])
    attempt = agent.push(Op.DISPATCH, task.id)["attempt"]
    agent.call(Op.TASKS_STARTED, tasks=[[task.id, attempt, time.time()]])
    assert wait_task(api, sid, task.id, _T.PROCESSING)
    assert api.sessions.delete_session(sid).status == _S.DELETED
    assert agent.push(Op.STOP_TASKS, task.id) == [task.id, attempt]
    reply = agent.done(task.id, attempt, out, b"4")
    assert reply["accepted"] == [] and reply["refused"][0][:2] == [task.id, ErrorCode.NOT_FOUND]
    for gone in (task.id, dependent.id):
        with pytest.raises(NotFoundError):
            api.tasks.get_task(gone)


def test_a_report_for_a_cancelling_task_is_refused_and_changes_nothing(lone_api, agent):
    api = lone_api
    sid = api.session()
    task, (out,) = api.submit(sid, {"op": "square", "x": 2})
    dependent, (dep_out,) = api.submit(sid, {"op": "sum"}, deps=[out])
    attempt = agent.push(Op.DISPATCH, task.id)["attempt"]
    agent.call(Op.TASKS_STARTED, tasks=[[task.id, attempt, time.time()]])
    assert wait_task(api, sid, task.id, _T.PROCESSING)

    (row,) = api.tasks.cancel_tasks([task.id])
    assert row.status == _T.CANCELLING
    assert api.results.get_result(out).status == ResultStatus.ABORTED
    assert api.tasks.get_task(dependent.id).status == _T.CANCELLED
    assert agent.push(Op.STOP_TASKS, task.id) == [task.id, attempt]

    reply = agent.done(task.id, attempt, out, b"4")
    assert reply["accepted"] == [] and reply["refused"][0][:2] == [task.id, ErrorCode.STALE_ATTEMPT]
    assert api.tasks.get_task(task.id).status == _T.CANCELLING
    result = api.results.get_result(out)
    assert result.status == ResultStatus.ABORTED and result.size == 0

    agent.call(Op.TASKS_STOPPED, tasks=[[task.id, attempt]])
    cancelled = api.tasks.get_task(task.id)
    assert cancelled.status == _T.CANCELLED and cancelled.started_at <= cancelled.ended_at
    assert agent.done(task.id, attempt, out, b"4")["refused"][0][1] == ErrorCode.STALE_ATTEMPT
    assert api.results.get_result(dep_out).status == ResultStatus.ABORTED


def _acks_held(api) -> int:
    return api.conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["completion_acks_held"]


def test_the_ack_of_a_completion_that_leaves_its_agent_idle_waits_for_its_next_message(lone_api, agent):
    """The reply to a TASKS_DONE that leaves its agent with no task is held (broker/acks.py): it goes right after
    the next message to that agent (most often its next DISPATCH: one wake-up of the agent for both), or alone
    after ACK_HOLD. An agent that still holds a task is answered at once (its next report waits for it)."""
    api = lone_api
    sid = api.session()
    held = _acks_held(api)
    first, (out,) = api.submit(sid, {"op": "square", "x": 2})
    attempt = agent.push(Op.DISPATCH, first.id)["attempt"]
    assert agent.done(first.id, attempt, out, b"4")["accepted"] == [first.id]  # no other message came: alone
    assert _acks_held(api) == held + 1

    tasks = [api.submit(sid, {"op": "square", "x": x}) for x in (3, 4)]
    attempts = [agent.push(Op.DISPATCH, task.id)["attempt"] for task, _ in tasks]
    (second, (out2,)), (third, (out3,)) = tasks
    assert agent.done(second.id, attempts[0], out2, b"9")["accepted"] == [second.id]
    assert _acks_held(api) == held + 1  # the third one still runs there: answered at once
    rid = next(agent._rids)  # sent without waiting: it leaves the agent idle, so its reply is held
    agent.sock.send_multipart([request(Op.TASKS_DONE, rid, agent_id=agent.agent_id, tasks=[
        {"task_id": third.id, "attempt": attempts[1], "ok": True, "results": [{"result_id": out3, "frames": 1}]}]),
        b"16"])
    # held before the next submit: handled in one turn, the fourth's DISPATCH would leave the agent busy (no hold)
    deadline = time.monotonic() + 10
    while _acks_held(api) < held + 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _acks_held(api) == held + 2
    fourth, _ = api.submit(sid, {"op": "square", "x": 5})
    got = {}
    while len(got) < 2:  # the DISPATCH, then the reply (or the reply first, had ACK_HOLD passed meanwhile)
        header = agent._receive(10)
        got[header["op"]] = header
    assert got[Op.TASKS_DONE]["rid"] == rid and got[Op.TASKS_DONE]["accepted"] == [third.id]
    assert [t["task_id"] for t in got[Op.DISPATCH]["tasks"]] == [fourth.id]
    assert [api.value(sid, o) for o in (out, out2, out3)] == [4, 9, 16]


def test_an_agent_that_takes_acks_inline_gets_a_held_ack_inside_its_next_dispatch(lone, lone_api):
    """An agent registered with acks_inline gets the reply held for it (above) inside its next push: the DISPATCH has
    it in ``acks``, and no message of its own follows. Premise: the next submit reaches the broker within ACK_HOLD
    of the hold; when it does not (a loaded machine), the reply comes alone first and the round is played again."""
    api = lone_api
    sid = api.sessions.create_session(api.options, partition_ids=["inline"])
    carried = api.conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["completion_acks_carried"]
    agent = ScriptedAgent(lone.agents_endpoint, agent_id="inline", partition="inline", acks_inline=True)
    try:
        task, (out,) = api.submit(sid, {"op": "square", "x": 2})
        attempt = agent.push(Op.DISPATCH, task.id)["attempt"]
        for _ in range(20):
            held = _acks_held(api)
            rid = next(agent._rids)  # sent without waiting: its reply is held (the agent is left with no task)
            agent.sock.send_multipart([request(Op.TASKS_DONE, rid, agent_id=agent.agent_id, tasks=[
                {"task_id": task.id, "attempt": attempt, "ok": True, "results": [{"result_id": out, "frames": 1}]}]),
                b"4"])
            deadline = time.monotonic() + 10
            while _acks_held(api) < held + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _acks_held(api) == held + 1
            done = task
            task, (out,) = api.submit(sid, {"op": "square", "x": 3})
            first = agent._receive(10)
            if first["op"] == Op.TASKS_DONE:  # ACK_HOLD passed before the submit came: the reply went alone
                assert first["rid"] == rid
                dispatch = agent._receive(10)
                assert dispatch["op"] == Op.DISPATCH and "acks" not in dispatch
                attempt = dispatch["tasks"][0]["attempt"]
                continue
            assert first["op"] == Op.DISPATCH and [t["task_id"] for t in first["tasks"]] == [task.id]
            (ack,) = first["acks"]
            assert (ack["op"], ack["rid"], ack["accepted"], ack["refused"]) == (Op.TASKS_DONE, rid, [done.id], [])
            agent.call(Op.AGENT_HEARTBEAT)  # whatever the broker sent before its reply is in _pushes now
            assert [h for h in agent._pushes if h["op"] == Op.TASKS_DONE] == []
            break
        else:
            pytest.fail("20 rounds in a row took longer than ACK_HOLD between the hold and the next submit")
        assert api.conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["completion_acks_carried"] == carried + 1
    finally:
        agent.close()


def test_cancel_tasks_not_on_an_agent_at_once(lone_api):
    api = lone_api
    sid = api.sessions.create_session(api.options, partition_ids=["solo"])
    late = api.results.create_results_metadata(["late"], sid)["late"].result_id
    queued, (queued_out,) = api.submit(sid, {"op": "square", "x": 1})
    pending, _ = api.submit(sid, {"op": "sum"}, deps=[late])
    downstream, _ = api.submit(sid, {"op": "sum"}, deps=[queued_out])
    paused_sid = api.sessions.create_session(api.options, partition_ids=["solo"])
    api.sessions.pause_session(paused_sid)
    paused, _ = api.submit(paused_sid, {"op": "square", "x": 1})
    before = [api.tasks.get_task(t.id).status for t in (queued, pending, paused)]
    assert before == [_T.SUBMITTED, _T.PENDING, _T.PAUSED]
    rows = api.tasks.cancel_tasks([queued.id, pending.id, paused.id])
    assert [r.status for r in rows] == [_T.CANCELLED] * 3
    for row in rows:
        assert row.created_at <= row.ended_at and row.received_at is None and row.started_at is None
        assert row.status_message == "cancelled by a client"
    down = api.tasks.get_task(downstream.id)
    assert down.status == _T.CANCELLED and queued.id in down.status_message
    # an ended task is left as it is
    assert api.tasks.cancel_tasks([queued.id])[0].ended_at == rows[0].ended_at


def test_pause_takes_back_dispatched_tasks_and_resume_dispatches_them_again(lone_api, agent):
    api = lone_api
    sid = api.session()
    task, (out,) = api.submit(sid, {"op": "square", "x": 5})
    first = agent.push(Op.DISPATCH, task.id)["attempt"]
    api.sessions.pause_session(sid)
    assert api.tasks.get_task(task.id).status == _T.PAUSED
    assert agent.push(Op.STOP_TASKS, task.id) == [task.id, first]
    assert agent.done(task.id, first, out, b"25")["refused"][0][1] == ErrorCode.STALE_ATTEMPT
    assert api.results.get_result(out).status == ResultStatus.CREATED
    api.sessions.resume_session(sid)
    second = agent.push(Op.DISPATCH, task.id)["attempt"]
    assert second > first
    assert agent.done(task.id, second, out, b"25")["accepted"] == [task.id]
    assert api.value(sid, out) == 25


def test_resume_queues_by_priority_then_in_submission_order(lone_api, lone):
    api = lone_api
    # "order" has no agent until the resume: tasks submitted before the pause wait SUBMITTED in its queue
    sid = api.sessions.create_session(api.options, partition_ids=["order"])
    payload = api.results.create_results({"p": b"{}"}, sid)["p"].result_id

    def submit(priorities: list[int]) -> list:
        """Submit one task per priority, each in its own request (tasks of one request have no order)."""
        outs = api.results.create_results_metadata([f"o{i}" for i in range(len(priorities))], sid)
        return [api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, options=_options(priority=p),
                                                            expected_output_ids=[outs[f"o{i}"].result_id])])[0]
                for i, p in enumerate(priorities)]

    before = [1, 3, 2, 3, 1, 2, 3, 2, 1, 3]
    tasks = submit(before)
    api.sessions.pause_session(sid)
    after = [2, 3, 1]
    tasks += submit(after)
    late = api.results.create_results_metadata(["late"], sid)["late"].result_id
    waiting, _ = api.submit(sid, {"op": "sum"}, deps=[late])
    assert {api.tasks.get_task(t.id).status for t in tasks + [waiting]} == {_T.PAUSED}
    scripted = ScriptedAgent(lone.agents_endpoint, agent_id="order-agent", partition="order")
    try:
        assert scripted.pushed_tasks(Op.DISPATCH) == []  # paused: neither run nor cancelled
        api.sessions.resume_session(sid)
        # one DISPATCH (the agent has room for all): highest priority first, in submission order within one
        priorities = before + after
        assert scripted.pushed_tasks(Op.DISPATCH) == [t.id for p in (3, 2, 1)
                                                      for t, q in zip(tasks, priorities) if q == p]
        assert api.tasks.get_task(waiting.id).status == _T.PENDING
        assert api.sessions.cancel_session(sid).status == _S.CANCELLED
    finally:
        scripted.close()


def test_a_paused_task_fails_with_its_aborted_input(lone_api, agent):
    """Paused tasks still hear about their inputs: an input aborted while paused cancels them."""
    api = lone_api
    sid = api.session()
    api.sessions.pause_session(sid)
    producer, (out,) = api.submit(sid, {"op": "square", "x": 2})
    consumer, _ = api.submit(sid, {"op": "sum"}, deps=[out])
    api.tasks.cancel_tasks([producer.id])
    row = api.tasks.get_task(consumer.id)
    assert row.status == _T.CANCELLED and producer.id in row.status_message
    assert api.sessions.resume_session(sid).status == _S.RUNNING


def test_closed_session_tasks_are_cancelled_at_dispatch_paused_ones_wait(lone_api, lone):
    """ArmoniK 3.3: an agent that dequeues a closed session's task cancels it; a paused session's stays PAUSED."""
    api = lone_api
    closed = api.sessions.create_session(api.options, partition_ids=["late"])
    task, (out,) = api.submit(closed, {"op": "square", "x": 2})
    api.sessions.close_session(closed)
    paused = api.sessions.create_session(api.options, partition_ids=["late"])
    waiting, _ = api.submit(paused, {"op": "square", "x": 2})
    api.sessions.pause_session(paused)
    assert api.tasks.get_task(task.id).status == _T.SUBMITTED
    scripted = ScriptedAgent(lone.agents_endpoint, agent_id="late-agent", partition="late")
    try:
        row = wait_task(api, closed, task.id, _T.CANCELLED)
        assert "CLOSED" in row.status_message
        assert api.results.get_result(out).status == ResultStatus.ABORTED
        assert scripted.pushed_tasks(Op.DISPATCH) == []
        assert api.tasks.get_task(waiting.id).status == _T.PAUSED
    finally:
        scripted.close()


def test_paused_and_cancelling_tasks_survive_a_broker_restart(tmp_path):
    cluster = make_cluster(tmp_path, broker_args=("--no-sync",))
    try:
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            agent = ScriptedAgent(cluster.agents_endpoint)
            running_sid = api.session()
            running, _ = api.submit(running_sid, {"op": "square", "x": 1})
            attempt = agent.push(Op.DISPATCH, running.id)["attempt"]
            agent.call(Op.TASKS_STARTED, tasks=[[running.id, attempt, time.time()]])
            assert api.tasks.cancel_tasks([running.id])[0].status == _T.CANCELLING
            agent.close()
            sid = api.session()
            api.sessions.pause_session(sid)
            low, _ = api.submit(sid, {"op": "square", "x": 1})
            high = api.tasks.submit_tasks(sid, [TaskDefinition(
                payload_id=low.payload_id, options=_options(priority=2),
                expected_output_ids=[api.results.create_results_metadata(["o"], sid)["o"].result_id])])[0]
            late = api.results.create_results_metadata(["late"], sid)["late"].result_id
            waiting, _ = api.submit(sid, {"op": "sum"}, deps=[late])
        cluster.kill_broker()
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            # nobody can report the cancelled run any more: the restart ends it
            assert api.tasks.get_task(running.id).status == _T.CANCELLED
            assert [api.tasks.get_task(t.id).status for t in (low, high, waiting)] == [_T.PAUSED] * 3
            agent = ScriptedAgent(cluster.agents_endpoint)
            try:
                assert agent.pushed_tasks(Op.DISPATCH) == []
                api.sessions.resume_session(sid)
                assert agent.pushed_tasks(Op.DISPATCH) == [high.id, low.id]
                assert api.tasks.get_task(waiting.id).status == _T.PENDING
            finally:
                agent.close()
    finally:
        cluster.cleanup()


def _big_session(api: Api, n: int) -> tuple[str, int]:
    """A session of ``n`` unfinished tasks (no agent runs them): half queued, half waiting on the first half's
    outputs; return its id and its row count (tasks and results)."""
    sid = api.session()
    payload = api.results.create_results({"p": b"sha256:x"}, sid)["p"].result_id
    outs = api.results.create_results_metadata([f"o{i}" for i in range(n)], sid, batch_size=10_000)
    ids = [outs[f"o{i}"].result_id for i in range(n)]
    half = n // 2
    api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[ids[i]],
                                                data_dependencies=[ids[i - half]] if i >= half else [])
                                 for i in range(n)], chunk_size=5_000)
    return sid, 2 * n + 1


def _session_rows(data_dir: str, sid: str) -> dict:
    """What LMDB holds of a session (read with the broker stopped or gone): its row, its index entries, whether it
    is listed as being deleted, and the tasks and results tables' sizes."""
    import lmdb

    env = lmdb.open(data_dir, max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            def db(name):
                return env.open_db(name, txn=txn, create=False)
            index = txn.cursor(db=db(b"session_index"))
            indexed = sum(index.count() for key in (sid.encode(), sid.encode() + b"\x00r") if index.set_key(key))
            return {"session": txn.get(sid.encode(), db=db(b"sessions")) is not None, "indexed": indexed,
                    "deleting": txn.get(sid.encode(), db=db(b"deleting")) is not None,
                    "tasks": txn.stat(db(b"tasks"))["entries"], "results": txn.stat(db(b"results"))["entries"]}
    finally:
        env.close()


def test_a_big_session_is_deleted_a_chunk_per_turn_while_other_clients_are_served(tmp_path_factory):
    """20,000 unfinished tasks and their results: the session is DELETED at once, its rows go over many commits
    while another client's requests are answered, and the delete is answered once they are all gone."""
    from armonik_zmq.broker.lifecycle import DELETE_CHUNK
    from armonik_zmq.errors import NotFoundError

    with broker_only(tmp_path_factory) as cluster:
        with connect(cluster.endpoint, timeout=60) as conn, connect(cluster.endpoint, timeout=60) as other:
            api, other_api = Api(conn), Api(other)
            kept = other_api.session()
            kept_task, _ = other_api.submit(kept, {"op": "sleep", "seconds": 0})
            sid, rows = _big_session(api, 20_000)
            commits_before = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["lmdb_last_txnid"]
            answered: list = []
            deleting = conn.call_async(Op.DELETE_SESSIONS, session_ids=[sid])
            sent = time.monotonic()
            while not deleting.done():
                # the other client reads the session being deleted, and its own
                try:
                    status = other_api.sessions.get_session(sid).status
                except NotFoundError:
                    break  # gone: the delete's reply is on its way
                assert other_api.tasks.get_task(kept_task.id).session_id == kept
                answered.append((time.monotonic(), status))
            done = time.monotonic()
            header, _ = deleting.result()
            commits = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["lmdb_last_txnid"] - commits_before
            assert header["sessions"][0]["status"] == _S.DELETED
            statuses = [status for at, status in answered if sent < at < done]
            during = statuses[statuses.index(_S.DELETED):] if _S.DELETED in statuses else []
            # (a read sent with the delete may come first: the two clients' messages race to the broker)
            assert set(during) == {_S.DELETED}, "the session is DELETED from the turn of the request on"
            assert len(during) >= 5, f"the other client got {len(during)} replies while the session was deleted"
            assert commits >= rows // DELETE_CHUNK, f"{rows} rows deleted in {commits} commits"
            # answered once gone: no row of it is left to read
            with pytest.raises(NotFoundError):
                other_api.sessions.get_session(sid)
            assert conn.call(Op.LIST_TASKS, filter=[[["session_id", "eq", sid]]], page=0, page_size=1)[0]["total"] == 0
            assert conn.call(Op.LIST_RESULTS, filter=[[["session_id", "eq", sid]]], page=0, page_size=1)[0]["total"] == 0
            assert other_api.tasks.get_task(kept_task.id).session_id == kept


def test_a_delete_nobody_waits_behind_takes_whole_chunks(tmp_path_factory):
    """With no other message waiting, a turn deletes DELETE_CHUNK rows whatever the time it takes (the 2 ms slice
    holds only while another request or report waits): a durable commit per DELETE_CHUNK rows, not per 2 ms."""
    from armonik_zmq.broker.lifecycle import DELETE_CHUNK

    with broker_only(tmp_path_factory) as cluster:
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            sid, rows = _big_session(api, 20_000)
            before = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["lmdb_last_txnid"]
            assert api.sessions.delete_session(sid).status == _S.DELETED
            commits = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["lmdb_last_txnid"] - before
    # the delete's own turn, the chunks, and the last chunk's turn if it ends short
    assert commits <= 2 + -(-rows // DELETE_CHUNK), f"{rows} rows deleted in {commits} commits"


def test_a_deleted_session_leaves_no_core_slot_of_a_result_its_tasks_waited_for(tmp_path):
    """A task waiting for a result no task produces (a client would upload it) holds that result in the broker's
    core; the delete frees it with the result's row (it stayed until a restart). In-process broker, turn by turn."""
    from test_fairness import OPTIONS, serving
    from test_snapshot import Client

    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        sid = client.reply(client.send(Op.CREATE_SESSION, default_task_options=OPTIONS))["session_id"]
        payload = client.reply(client.send(Op.CREATE_RESULTS, b"x", session_id=sid, results=[{"name": "p"}],
                                           frames=[1]))["results"][0]["result_id"]
        wanted, out = (r["result_id"] for r in client.reply(client.send(
            Op.CREATE_RESULTS_METADATA, session_id=sid, results=[{"name": "wanted"}, {"name": "out"}]))["results"])
        client.reply(client.send(Op.SUBMIT_TASKS, session_id=sid, tasks=[
            {"payload_id": payload, "expected_output_ids": [out], "data_dependencies": [wanted]}]))["tasks"]
        assert wanted in broker.state.result_slot  # the task waits for it
        deleting = client.send(Op.DELETE_SESSIONS, session_ids=[sid])
        while broker.deletions.pending:
            broker.turn(0)
        assert client.reply(deleting)["sessions"][0]["status"] == _S.DELETED
        assert wanted not in broker.state.result_slot and broker.state.core.n_tasks() == 0
        broker.state.core.validate()


def test_a_broker_killed_mid_delete_finishes_it_after_a_restart_and_answers_the_delete(tmp_path_factory):
    """SIGKILL while a big session's rows are being deleted: once back, the broker deletes the rest, and the
    client's delete (sent again on reconnection, under its idempotency key) is answered then; nothing of the
    session is left, another session is whole."""
    import threading

    with broker_only(tmp_path_factory, own_groups=True) as cluster:
        with connect(cluster.endpoint, timeout=60) as conn, connect(cluster.endpoint, timeout=60) as other:
            api, other_api = Api(conn), Api(other)
            kept = other_api.session()
            other_api.submit(kept, {"op": "sleep", "seconds": 0})
            sid, _ = _big_session(api, 20_000)
            replies: list = []
            deleter = threading.Thread(target=lambda: replies.append(api.sessions.delete_session(sid)))
            deleter.start()
            wait_until(lambda: other_api.sessions.get_session(sid).status == _S.DELETED, "the delete to start")
            cluster.broker.send_signal(signal.SIGSTOP)
            try:
                mid = _session_rows(cluster.data_dir, sid)
            finally:
                cluster.kill_broker()  # SIGKILL while stopped
            assert mid["deleting"] and mid["indexed"] > 0, f"the delete ended before the broker was stopped: {mid}"
            assert not replies, "the delete was answered before its session was gone"
            cluster.start_broker()
            deleter.join(60)
            assert replies and replies[0].status == _S.DELETED
            with pytest.raises(Exception, match="not found|NOT_FOUND"):
                other_api.sessions.get_session(sid)
            assert other_api.sessions.get_session(kept).status == _S.RUNNING
        cluster.kill_broker()
        left = _session_rows(cluster.data_dir, sid)
        # the kept session's task, and its payload and output
        assert left == {"session": False, "indexed": 0, "deleting": False, "tasks": 1, "results": 2}, left


def test_a_big_session_is_purged_a_chunk_per_turn_and_the_purge_resumes_after_a_restart(tmp_path_factory):
    """20,000 results: the session is PURGED at once and its data deleted over many commits (each turn deletes
    a chunk, so other requests are served between them); a broker killed mid-purge finishes it once back."""
    import lmdb

    from armonik_zmq.broker.lifecycle import PURGE_CHUNK

    n = 20_000
    with broker_only(tmp_path_factory, own_groups=True) as cluster:
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            sid = api.session()
            kept = api.results.create_results_metadata(["kept"], sid, manual_deletion=True)["kept"].result_id
            api.results.upload_result_data(kept, sid, b"kept")
            plain = [r.result_id for r in api.results.create_results({f"r{i}": b"%d" % i for i in range(n)}, sid,
                                                                      batch_size=n).values()]
            api.sessions.close_session(sid)
            commits_before = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["lmdb_last_txnid"]
            assert api.sessions.purge_session(sid).status == _S.PURGED
            cluster.broker.send_signal(signal.SIGSTOP)  # mid-purge: the reply came after the first chunk
            try:
                env = lmdb.open(cluster.data_dir, max_dbs=16, readonly=True, lock=False)
                with env.begin() as txn:
                    purging = txn.stat(env.open_db(b"purging", txn=txn, create=False))["entries"]
                env.close()
            finally:
                cluster.kill_broker()  # SIGKILL while stopped
            assert purging == 1, "the purge was done within its request's turn"
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)

            def left() -> int:
                return conn.call(Op.LIST_RESULTS, filter=[[["session_id", "eq", sid], ["status", "eq",
                                                           int(ResultStatus.COMPLETED)]]], page=0, page_size=1)[0]["total"]
            wait_until(lambda: left() == 1, "the purge to resume and end after the restart")
            commits = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["lmdb_last_txnid"] - commits_before
            assert commits >= n // PURGE_CHUNK, f"{n} results purged in {commits} commits"
            assert api.results.get_result(plain[0]).status == ResultStatus.DELETED
            assert api.results.get_result(plain[-1]).status == ResultStatus.DELETED
            with pytest.raises(FailedPreconditionError, match="DELETED"):
                api.results.download_result_data(plain[n // 2], sid)
            assert api.results.download_result_data(kept, sid) == b"kept"
