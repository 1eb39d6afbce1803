"""Every arrow of seed 000 and of seed 002 sections 21.1, 21.2, 21.3 and 21.5, on real processes."""

from __future__ import annotations

import json
import threading
import time

import pytest

from armonik_zmq.client import EventTypes, ResultStatus, SessionStatus, TaskDefinition, TaskStatus
from armonik_zmq.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError


def test_seed_000_happy_flow(api):
    """Create session, service config, payload + output metadata, upload, submit, wait, download, close/purge/delete."""
    session_id = api.session()
    assert api.sessions.get_session(session_id).status == SessionStatus.RUNNING
    assert api.results.get_service_config() == 2 * 1024 * 1024

    payload = api.results.create_results_metadata(["payload"], session_id)["payload"]
    output = api.results.create_results_metadata(["output"], session_id)["output"]
    assert payload.status == ResultStatus.CREATED and output.status == ResultStatus.CREATED
    api.results.upload_result_data(payload.result_id, session_id, json.dumps({"op": "square", "x": 7}).encode())
    task = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload.result_id,
                                                              expected_output_ids=[output.result_id])])[0]
    assert task.expected_output_ids == [output.result_id] and task.payload_id == payload.result_id
    assert api.results.get_result(output.result_id).owner_task_id == task.id

    api.events.wait_for_result_availability([output.result_id], session_id)
    assert json.loads(api.results.download_result_data(output.result_id, session_id)) == 49

    done = api.tasks.get_task(task.id)
    assert done.status == TaskStatus.COMPLETED
    assert done.owner_pod_id and done.output.success
    stamps = [done.created_at, done.submitted_at, done.received_at, done.acquired_at, done.started_at,
              done.processed_at, done.ended_at]
    assert all(s is not None for s in stamps), stamps
    assert stamps[0] <= stamps[1] <= stamps[2] and stamps[4] <= stamps[5] <= stamps[6]
    result = api.results.get_result(output.result_id)
    assert result.status == ResultStatus.COMPLETED and result.size == 2 and result.completed_at is not None

    assert api.sessions.close_session(session_id).status == SessionStatus.CLOSED
    with pytest.raises(FailedPreconditionError):
        api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload.result_id,
                                                           expected_output_ids=[output.result_id])])
    assert api.sessions.purge_session(session_id).status == SessionStatus.PURGED
    assert api.results.get_result(output.result_id).status == ResultStatus.DELETED
    with pytest.raises(FailedPreconditionError):
        api.results.download_result_data(output.result_id, session_id)
    assert api.sessions.delete_session(session_id).status == SessionStatus.DELETED
    with pytest.raises(NotFoundError):
        api.sessions.get_session(session_id)
    with pytest.raises(NotFoundError):
        api.tasks.get_task(task.id)


def test_21_2_payload_created_with_data(api):
    session_id = api.session()
    payload = api.results.create_results({"p": json.dumps({"op": "square", "x": 5}).encode()}, session_id)["p"]
    assert payload.status == ResultStatus.COMPLETED
    out = api.results.create_results_metadata(["o"], session_id)["o"].result_id
    api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload.result_id, expected_output_ids=[out])])
    assert api.value(session_id, out) == 25


def test_21_3_delayed_upload_keeps_task_pending(api):
    session_id = api.session()
    meta = api.results.create_results_metadata(["payload", "out"], session_id)
    task = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=meta["payload"].result_id,
                                                              expected_output_ids=[meta["out"].result_id])])[0]
    assert api.tasks.get_task(task.id).status == TaskStatus.PENDING
    api.results.upload_result_data(meta["payload"].result_id, session_id, json.dumps({"op": "square", "x": 9}).encode())
    assert api.value(session_id, meta["out"].result_id) == 81
    assert api.tasks.get_task(task.id).status == TaskStatus.COMPLETED


def test_21_5_subtasks_take_over_parent_output(api):
    """A worker creates results (with and without data) and submits subtasks; one takes the parent's output."""
    session_id = api.session()
    parent, (out,) = api.submit(session_id, {"op": "fanout", "xs": [1, 2, 3]})
    assert api.value(session_id, out) == 1 + 4 + 9
    owner = api.results.get_result(out).owner_task_id
    assert owner != parent.id
    child = api.tasks.get_task(owner)
    assert child.created_by == parent.id and child.parent_task_ids == [parent.id]
    assert child.status == TaskStatus.COMPLETED and len(child.data_dependencies) == 3
    assert api.tasks.get_task(parent.id).status == TaskStatus.COMPLETED
    for dep in child.data_dependencies:
        r = api.results.get_result(dep)
        assert r.created_by == parent.id and r.status == ResultStatus.COMPLETED


def test_21_5_create_metadata_then_send_data(api):
    session_id = api.session()
    _, (out,) = api.submit(session_id, {"op": "two-step", "x": 41})
    assert api.value(session_id, out) == 42


def test_dag_of_dependencies(api):
    """a -> (b, c) -> d: d is queued only when b and c have data, and sees both."""
    session_id = api.session()
    _, (a,) = api.submit(session_id, {"op": "square", "x": 3})
    _, (b,) = api.submit(session_id, {"op": "sum"}, deps=[a])
    _, (c,) = api.submit(session_id, {"op": "sum"}, deps=[a])
    d_task, (d,) = api.submit(session_id, {"op": "sum"}, deps=[b, c])
    assert api.value(session_id, d) == 18
    ordered = api.tasks.get_task(d_task.id)
    assert ordered.data_dependencies == [b, c]


def test_error_aborts_outputs_and_dependents(api):
    session_id = api.session()
    payloads = api.results.create_results({"bad": json.dumps({"op": "fail", "message": "no luck"}).encode(),
                                           "sum": json.dumps({"op": "sum"}).encode()}, session_id, batch_size=2)
    outs = api.results.create_results_metadata(["bad", "dep", "further"], session_id)
    bad_out, dep_out, further_out = (outs[n].result_id for n in ("bad", "dep", "further"))
    # one submission: the failure cannot happen before its dependents exist
    bad, dependent, further = api.tasks.submit_tasks(session_id, [
        TaskDefinition(payload_id=payloads["bad"].result_id, expected_output_ids=[bad_out]),
        TaskDefinition(payload_id=payloads["sum"].result_id, expected_output_ids=[dep_out], data_dependencies=[bad_out]),
        TaskDefinition(payload_id=payloads["sum"].result_id, expected_output_ids=[further_out],
                       data_dependencies=[dep_out]),
    ])
    with pytest.raises(RuntimeError, match=f"Result {bad_out} has been aborted"):
        api.events.wait_for_result_availability(bad_out, session_id)
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability([further_out], session_id)
    row = api.tasks.get_task(bad.id)
    assert row.status == TaskStatus.ERROR and row.status_message == "no luck" and row.output.error == "no luck"
    for t in (dependent, further):
        row = api.tasks.get_task(t.id)
        assert row.status == TaskStatus.ERROR
        assert bad.id in row.status_message and "aborted" in row.status_message
    for r in (bad_out, dep_out, further_out):
        assert api.results.get_result(r).status == ResultStatus.ABORTED
    # submitting on an aborted input is refused
    with pytest.raises(Exception, match="ABORTED"):
        api.submit(session_id, {"op": "sum"}, deps=[bad_out])


def test_exception_in_processor_is_retried_then_ends_in_error(api):
    """max_retries=1: the task is RETRIED once, and its retry ends in ERROR (tests/test_outcomes.py has the rest)."""
    session_id = api.session()
    task, (out,) = api.submit(session_id, {"op": "raise"})
    with pytest.raises(RuntimeError):
        api.events.wait_for_result_availability(out, session_id)
    row = api.tasks.get_task(task.id)
    assert row.status == TaskStatus.RETRIED and "raised on purpose" in row.status_message
    row = api.tasks.get_task(f"{task.id}###1")
    assert row.status == TaskStatus.ERROR and "raised on purpose" in row.status_message


def test_events_stream(api):
    """get_events calls each handler as handler(session_id, event_type, event); True ends the stream."""
    session_id = api.session()
    payload = api.results.create_results({"p": json.dumps({"op": "square", "x": 2}).encode()}, session_id)["p"]
    out = api.results.create_results_metadata(["o"], session_id)["o"].result_id
    seen = []

    def handler(sid, event_type, event):
        assert sid == session_id
        seen.append((event_type, event))
        return (event_type == EventTypes.RESULT_STATUS_UPDATE and event.result_id == out
                and event.status == ResultStatus.COMPLETED)

    listener = threading.Thread(target=api.events.get_events, args=(session_id, [], [handler]))
    listener.start()
    # Events are only those after the subscription: create probes until one is seen, so we know it is live.
    for _ in range(200):
        api.results.create_results_metadata(["probe"], session_id)
        if any(t == EventTypes.NEW_RESULT for t, _ in seen):
            break
        time.sleep(0.01)
    task = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload.result_id, expected_output_ids=[out])])[0]
    listener.join(30)
    assert not listener.is_alive()
    types = {t for t, _ in seen}
    assert {EventTypes.NEW_RESULT, EventTypes.NEW_TASK, EventTypes.RESULT_OWNER_UPDATE,
            EventTypes.TASK_STATUS_UPDATE} <= types
    new_task = next(e for t, e in seen if t == EventTypes.NEW_TASK)
    assert new_task.task_id == task.id and new_task.expected_output_keys == [out]
    owner = next(e for t, e in seen if t == EventTypes.RESULT_OWNER_UPDATE)
    assert owner.result_id == out and owner.current_owner_id == task.id and owner.previous_owner_id == ""
    statuses = [e.status for t, e in seen if t == EventTypes.TASK_STATUS_UPDATE and e.task_id == task.id]
    assert statuses[:2] == [TaskStatus.DISPATCHED, TaskStatus.PROCESSING]
    assert seen[-1][1].result_id == out


def test_many_tasks_in_one_submission(api):
    session_id = api.session()
    n = 300
    payloads = api.results.create_results({f"p{i}": json.dumps({"op": "square", "x": i}).encode() for i in range(n)},
                                          session_id, batch_size=n)
    outs = api.results.create_results_metadata([f"o{i}" for i in range(n)], session_id)
    api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payloads[f"p{i}"].result_id,
                                                       expected_output_ids=[outs[f"o{i}"].result_id]) for i in range(n)],
                           chunk_size=n)
    ids = [outs[f"o{i}"].result_id for i in range(n)]
    api.events.wait_for_result_availability(ids, session_id)
    assert [json.loads(api.results.download_result_data(r, session_id)) for r in ids] == [i * i for i in range(n)]


def test_large_payload_is_prefetched(api):
    """Inputs above the inline limit are fetched by the agent before the worker runs."""
    session_id = api.session()
    big = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB: above the 1 MiB inline limit and the 2 MiB chunk size
    small = b"tail"
    created = api.results.create_results({"big": big, "small": small}, session_id, batch_size=2)
    _, (out,) = api.submit(session_id, {"op": "concat-deps", "order": [created["big"].result_id, created["small"].result_id]},
                           deps=[created["big"].result_id, created["small"].result_id])
    api.events.wait_for_result_availability(out, session_id)
    assert api.results.download_result_data(out, session_id) == big + small


def test_invalid_requests_name_the_problem(api):
    session_id = api.session()
    with pytest.raises(NotFoundError, match="session"):
        api.results.create_results_metadata(["x"], "no-such-session")
    p = api.results.create_results({"p": b"{}"}, session_id)["p"]
    with pytest.raises(NotFoundError, match="not-a-result"):
        api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id, expected_output_ids=["not-a-result"])])
    out = api.results.create_results_metadata(["o"], session_id)["o"]
    from armonik_zmq.client import TaskOptions
    from datetime import timedelta
    with pytest.raises(InvalidArgumentError, match="priority"):
        api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id, expected_output_ids=[out.result_id],
                                                           options=TaskOptions(max_duration=timedelta(seconds=1),
                                                                               priority=500, max_retries=1))])
    with pytest.raises(InvalidArgumentError, match="partition"):
        api.sessions.create_session(api.options, partition_ids=["nope"])
    # nothing of the refused submissions was written: the output still has no owner
    assert api.results.get_result(out.result_id).owner_task_id == ""


def test_waiting_on_an_unknown_result_fails_at_once(api):
    session_id = api.session()
    with pytest.raises(NotFoundError, match="no-such-result"):
        api.events.wait_for_result_availability(["no-such-result"], session_id)


def _values(api, session_id: str, payloads: list) -> list:
    """Submit one task per payload in one request; return their values."""
    created = api.results.create_results({f"p{i}": json.dumps(p).encode() for i, p in enumerate(payloads)}, session_id)
    outs = api.results.create_results_metadata([f"o{i}" for i in range(len(payloads))], session_id)
    api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=created[f"p{i}"].result_id,
                                                       expected_output_ids=[outs[f"o{i}"].result_id])
                                        for i in range(len(payloads))])
    return [api.value(session_id, outs[f"o{i}"].result_id) for i in range(len(payloads))]


def test_worker_death_fails_its_task_and_is_replaced(api):
    session_id = api.session()
    task, (out,) = api.submit(session_id, {"op": "crash"})
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability(out, session_id)
    for task_id, status in ((task.id, TaskStatus.RETRIED), (f"{task.id}###1", TaskStatus.ERROR)):
        row = api.tasks.get_task(task_id)
        assert row.status == status and "died (exit code 3)" in row.status_message
    # the pool is whole again: tasks running side by side land on two live worker processes. Four at a time, in
    # one request (four calls one after another took longer than a task's 0.3 s on a loaded machine: each ran
    # alone, on the same worker); a replacement still starting takes no task, so a few rounds may be needed
    pids: set = set()
    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= set(_values(api, session_id, [{"op": "pid", "sleep": 0.3}] * 4))
    assert len(pids) == 2, pids
    _, (o,) = api.submit(session_id, {"op": "square", "x": 4})
    assert api.value(session_id, o) == 16


def test_threads_sharing_a_connection_each_get_their_own_replies(api):
    """User threads send on the connection's DEALER themselves (under its lock) while its I/O thread receives:
    many at once, with data frames of their own, each gets its own reply and its own bytes back."""
    sid = api.session()
    sub = api.conn.subscribe(sid, [int(EventTypes.RESULT_STATUS_UPDATE)])  # pushes keep the I/O thread reading
    failures = []

    def work(k: int) -> None:
        try:
            for i in range(60):
                data = f"{k}:{i}:".encode() * (1 + (7 * k + i) % 50)
                result_id = api.results.create_results({"r": data}, sid)["r"].result_id
                assert api.results.download_result_data(result_id, sid) == data
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sub.close()
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:3]
