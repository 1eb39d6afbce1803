"""The events service (ARMONIK.md 1.4): the five event types, task and result filters, and waiting without polling.

``get_events`` blocks, so each test runs it in a thread (``Stream``). It is known to be subscribed once
it delivers a probe: a result named ``probe-*`` that the test creates until the stream sees one.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from typing import Optional

import pytest

from armonik_zmq.client import (ArmoniKEvents, EventTypes, FilterError, NewResultEvent, NewTaskEvent, Result,
                                ResultOwnerUpdateEvent, ResultStatus, ResultStatusUpdateEvent, Task, TaskDefinition,
                                TaskOptions, TaskStatus, TaskStatusUpdateEvent, connect)
from armonik_zmq.client.arrived import INLINE_MAX, ArrivedData
from armonik_zmq.errors import ArmoniKZmqError, InvalidArgumentError, NotFoundError
from armonik_zmq.protocol import Op

_E = EventTypes
PROBES = Result.name.startswith("probe-")


class Stream:
    """``get_events`` running in a thread, recording every event; ``close()`` ends it through a handler."""

    def __init__(self, endpoint: str, api, session_id: str, event_types, task_filter=None, result_filter=None):
        self.api = api
        self.session_id = session_id
        self.events: list[tuple[EventTypes, object]] = []
        self.error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._closing = False
        self._conn = connect(endpoint)
        self._thread = threading.Thread(target=self._run, args=(event_types, task_filter, result_filter), daemon=True)
        self._thread.start()
        self._wait_subscribed()

    def _run(self, event_types, task_filter, result_filter) -> None:
        try:
            ArmoniKEvents(self._conn).get_events(self.session_id, event_types, [self._record], task_filter,
                                                 result_filter)
        except BaseException as exc:  # reported by wait_for / close
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def _record(self, session_id: str, event_type: EventTypes, event) -> bool:
        assert session_id == self.session_id
        with self._cond:
            self.events.append((event_type, event))
            self._cond.notify_all()
            return self._closing

    def _probe(self) -> str:
        return self.api.results.create_results_metadata([f"probe-{time.monotonic_ns()}"],
                                                        self.session_id).popitem()[1].result_id

    def _wait_subscribed(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = self._probe()
            if self.wait_for(lambda evs: any(getattr(e, "result_id", None) == probe for _, e in evs), timeout=0.2,
                             check=False):
                return
        raise TimeoutError("the event stream never delivered a probe")

    def wait_for(self, predicate, timeout: float = 30, check: bool = True) -> bool:
        """Wait until ``predicate(events)`` holds."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.events) or self.error is not None, timeout)
        if self.error is not None:
            raise self.error
        if check:
            assert ok, f"timed out; events so far: {self.events}"
        return ok

    def of(self, event_type: EventTypes, **fields) -> list:
        """Return the events of a type whose attributes have the given values."""
        with self._cond:
            return [e for t, e in self.events if t == event_type and all(getattr(e, k) == v for k, v in fields.items())]

    def close(self) -> None:
        """End the stream the official way: the next event's handler returns True."""
        if self._closing:
            return
        self._closing = True
        while self._thread.is_alive():
            self._probe()
            self._thread.join(0.2)
        self._conn.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def stream(cluster, api):
    streams = []

    def start(session_id: str, event_types=(), task_filter=None, result_filter=None) -> Stream:
        streams.append(Stream(cluster.endpoint, api, session_id, event_types, task_filter, result_filter))
        return streams[-1]

    yield start
    for s in streams:
        s.close()


def payload(api, session_id: str, body: dict, name: str = "payload") -> str:
    return api.results.create_results({name: json.dumps(body).encode()}, session_id)[name].result_id


def test_the_five_event_types_carry_their_fields(api, stream):
    """A task whose subtask takes over its output: every event type, with ArmoniK's fields."""
    session_id = api.session()
    events = stream(session_id)  # no types: all of them
    p = payload(api, session_id, {"op": "two-step", "x": 4})
    out = api.results.create_results_metadata(["out"], session_id)["out"].result_id
    parent = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p, expected_output_ids=[out])])[0].id
    events.wait_for(lambda _: events.of(_E.RESULT_STATUS_UPDATE, result_id=out, status=ResultStatus.COMPLETED))
    assert json.loads(api.results.download_result_data(out, session_id)) == 5

    [new_out] = events.of(_E.NEW_RESULT, result_id=out)
    assert new_out == NewResultEvent(result_id=out, owner_id="", status=ResultStatus.CREATED)
    [new_parent] = events.of(_E.NEW_TASK, task_id=parent)
    assert new_parent == NewTaskEvent(task_id=parent, payload_id=p, origin_task_id="", status=TaskStatus.SUBMITTED,
                                      expected_output_keys=[out], data_dependencies=[], retry_of_ids=[],
                                      parent_task_ids=[])
    [child] = [e for e in events.of(_E.NEW_TASK) if e.task_id != parent]
    assert child.origin_task_id == parent and child.parent_task_ids == [parent]
    assert child.expected_output_keys == [out] and child.status == TaskStatus.PENDING
    [intermediate] = child.data_dependencies
    assert events.of(_E.NEW_RESULT, result_id=intermediate)  # created inside the parent
    # the output is owned by the parent, then handed to the child (ARMONIK.md 3.8)
    assert events.of(_E.RESULT_OWNER_UPDATE, result_id=out) == [
        ResultOwnerUpdateEvent(result_id=out, previous_owner_id="", current_owner_id=parent),
        ResultOwnerUpdateEvent(result_id=out, previous_owner_id=parent, current_owner_id=child.task_id)]
    statuses = [e.status for e in events.of(_E.TASK_STATUS_UPDATE, task_id=parent)]
    assert statuses[-1] == TaskStatus.COMPLETED and TaskStatus.PROCESSING in statuses
    assert all(isinstance(e, TaskStatusUpdateEvent) and isinstance(e.status, TaskStatus)
               for e in events.of(_E.TASK_STATUS_UPDATE))
    assert events.of(_E.RESULT_STATUS_UPDATE, result_id=p) == [
        ResultStatusUpdateEvent(result_id=p, status=ResultStatus.COMPLETED)]


def test_only_the_requested_event_types_arrive(api, stream):
    session_id = api.session()
    events = stream(session_id, [_E.NEW_RESULT, "task_status_update"])
    task, [out] = api.submit(session_id, {"op": "square", "x": 2})
    events.wait_for(lambda _: events.of(_E.TASK_STATUS_UPDATE, task_id=task.id, status=TaskStatus.COMPLETED))
    assert events.of(_E.NEW_RESULT, result_id=out)
    assert {t for t, _ in events.events} == {_E.NEW_RESULT, _E.TASK_STATUS_UPDATE}


def test_task_filter_on_status(api, stream):
    session_id = api.session()
    events = stream(session_id, [_E.NEW_RESULT, _E.TASK_STATUS_UPDATE],
                    task_filter=Task.status == TaskStatus.COMPLETED, result_filter=PROBES)
    tasks = [api.submit(session_id, {"op": "square", "x": x})[0].id for x in range(3)]
    events.wait_for(lambda _: len(events.of(_E.TASK_STATUS_UPDATE)) >= 3)
    updates = events.of(_E.TASK_STATUS_UPDATE)
    assert sorted(e.task_id for e in updates) == sorted(tasks)
    assert {e.status for e in updates} == {TaskStatus.COMPLETED}


def test_task_filter_on_options(api, stream):
    session_id = api.session()
    events = stream(session_id, [_E.NEW_RESULT, _E.NEW_TASK, _E.TASK_STATUS_UPDATE],
                    task_filter=(Task.options["team"] == "blue") & (Task.options.priority >= 2), result_filter=PROBES)
    p = payload(api, session_id, {"op": "square", "x": 3})
    outs = api.results.create_results_metadata(["blue", "red", "blue-low"], session_id)

    def definition(name: str, team: str, priority: int) -> TaskDefinition:
        return TaskDefinition(payload_id=p, expected_output_ids=[outs[name].result_id],
                              options=TaskOptions(max_duration=api.options.max_duration, priority=priority,
                                                  max_retries=1, options={"team": team}))

    blue, red, low = api.tasks.submit_tasks(session_id, [definition("blue", "blue", 2), definition("red", "red", 2),
                                                         definition("blue-low", "blue", 1)])
    api.events.wait_for_result_availability([o.result_id for o in outs.values()], session_id)
    events.wait_for(lambda _: events.of(_E.TASK_STATUS_UPDATE, task_id=blue.id, status=TaskStatus.COMPLETED))
    events.close()  # the probe that closes it comes after every event of the tasks
    assert [e.task_id for e in events.of(_E.NEW_TASK)] == [blue.id]
    assert {e.task_id for e in events.of(_E.TASK_STATUS_UPDATE)} == {blue.id}


def test_result_filters(api, stream):
    session_id = api.session()
    keep = stream(session_id, [_E.NEW_RESULT, _E.RESULT_STATUS_UPDATE],
                  result_filter=(Result.name == "keep") | PROBES)
    done = stream(session_id, [_E.RESULT_STATUS_UPDATE, _E.NEW_RESULT],
                  result_filter=(Result.status == ResultStatus.COMPLETED) | PROBES)  # probes never complete
    raw = stream(session_id, [_E.NEW_RESULT], result_filter=[[["name", "endswith", "eep"]], [["name", "startswith",
                                                                                              "probe-"]]])
    ids = {name: r.result_id for name, r in api.results.create_results_metadata(["keep", "drop"], session_id).items()}
    for rid in ids.values():
        api.results.upload_result_data(rid, session_id, b"data")
    keep.wait_for(lambda _: keep.of(_E.RESULT_STATUS_UPDATE, result_id=ids["keep"]))
    done.wait_for(lambda _: len(done.of(_E.RESULT_STATUS_UPDATE)) == 2)
    raw.wait_for(lambda _: raw.of(_E.NEW_RESULT, result_id=ids["keep"]))
    for s in (keep, done, raw):
        s.close()
    assert not keep.of(_E.NEW_RESULT, result_id=ids["drop"]) and not keep.of(_E.RESULT_STATUS_UPDATE,
                                                                             result_id=ids["drop"])
    assert keep.of(_E.NEW_RESULT, result_id=ids["keep"])
    # a new result is CREATED: the COMPLETED filter lets only the status updates through
    assert {e.result_id for e in done.of(_E.RESULT_STATUS_UPDATE)} == set(ids.values())
    assert not [e for e in done.of(_E.NEW_RESULT) if e.result_id in ids.values()]
    assert not raw.of(_E.NEW_RESULT, result_id=ids["drop"])


def test_bad_filters_are_refused(api):
    session_id = api.session()
    with pytest.raises(InvalidArgumentError, match=r"result_filter\[0\]\[0\]: operator 'gt' does not apply"):
        api.events.get_events(session_id, [], [lambda *_: True], result_filter=[[["name", "gt", "a"]]])
    with pytest.raises(FilterError, match="task_filter must filter tasks, not results"):
        api.events.get_events(session_id, [], [lambda *_: True], task_filter=Result.name == "a")


# -- waiting without polling -------------------------------------------------------------------------


def _requests_made(conn, action) -> int:
    """Run ``action`` alone on ``conn``; return how many requests it sent (each takes the next request id)."""
    before = next(conn._rids)
    action()
    return next(conn._rids) - before - 1


def test_wait_returns_at_once_for_completed_results(cluster, api):
    session_id = api.session()
    done = api.results.create_results({f"r{i}": b"x" for i in range(50)}, session_id)
    ids = [r.result_id for r in done.values()]
    with connect(cluster.endpoint) as conn:
        started = time.monotonic()
        n = _requests_made(conn, lambda: ArmoniKEvents(conn).wait_for_result_availability(ids, session_id))
        assert time.monotonic() - started < 1.0
    assert n == 1  # subscribe (its snapshot says COMPLETED); the unsubscribe leaves with the next request


def test_a_wait_unsubscribes_after_the_next_request_or_when_idle(cluster, api):
    """The UNSUBSCRIBE that ends a wait is not on the way to the next request (the download of what it waited
    for): it follows that request, or leaves by itself within the I/O thread's tick when none comes."""
    session_id = api.session()
    rid = api.results.create_results({"r": b"x"}, session_id)["r"].result_id
    with connect(cluster.endpoint) as conn:
        events = ArmoniKEvents(conn)
        for next_request in (True, False):
            before = next(conn._rids)
            events.wait_for_result_availability(rid, session_id)
            assert next(conn._rids) == before + 2  # one request: its SUBSCRIBE
            subscription = before + 1
            if next_request:
                conn.call(Op.GET_SESSIONS, session_ids=[session_id])  # the deferred UNSUBSCRIBE follows it
            else:
                time.sleep(1.5)  # nothing else to send: the I/O thread sends it
            # The broker ended it already: asking again finds nothing (sent before it, this would succeed).
            with pytest.raises(NotFoundError, match=f"no subscription {subscription}"):
                conn.call(Op.UNSUBSCRIBE_EVENTS, subscription=subscription)


def test_wait_sleeps_until_the_result_completes(cluster, api):
    session_id = api.session()
    rid = api.results.create_results_metadata(["later"], session_id)["later"].result_id
    finished = threading.Event()
    with connect(cluster.endpoint) as conn:
        counted: list[int] = []

        def wait() -> None:
            counted.append(_requests_made(conn, lambda: ArmoniKEvents(conn).wait_for_result_availability(rid,
                                                                                                          session_id)))
            finished.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert not finished.wait(1.0)  # nothing to wait for yet: a second passes with the waiter still blocked
        uploaded = time.monotonic()
        api.results.upload_result_data(rid, session_id, b"now")
        assert finished.wait(10) and time.monotonic() - uploaded < 1.0
        waiter.join()
    assert counted == [1]  # however long it waited: one subscription, no polling


def test_a_long_wait_leaves_no_container_per_result_for_the_garbage_collector(cluster, api):
    """Once its snapshot is read, a wait on N results holds nothing the collector tracks per result: every full
    collection of the waiting process scans what is tracked, pausing all its threads (T15: a thread submitting
    while another waits). Before, the wait kept its filter (2 lists per result) and a set of the ids."""
    n = 5000
    session_id = api.session()
    ids = [r.result_id for r in api.results.create_results_metadata([f"w{i}" for i in range(n)], session_id,
                                                                    batch_size=n).values()]
    with connect(cluster.endpoint) as conn:
        ended: list = []

        def wait() -> None:
            try:
                ArmoniKEvents(conn).wait_for_result_availability(ids, session_id, bucket_size=n)
            except BaseException as exc:  # the connection's close ends it
                ended.append(exc)

        gc.collect()
        before = len(gc.get_objects())
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        deadline = time.monotonic() + 20
        while True:  # the snapshot's events are transient: tracked until the waiter has read them
            time.sleep(0.2)
            gc.collect()
            grown = len(gc.get_objects()) - before
            if grown < n // 10 or time.monotonic() > deadline:
                break
        assert waiter.is_alive() and not ended  # still waiting: nothing completed
        assert grown < n // 10, grown
    waiter.join(10)
    assert ended


def test_a_result_that_completes_during_a_wait_is_downloaded_without_a_request(api):
    """ArmoniK code waits, then downloads: a small result that completed during the wait came with its event, so
    its first download here asks nothing of the broker; the next one does, with the same bytes. A small result
    already complete when the wait began comes with the wait's snapshot, the same way; a larger one (past
    ``inline_max``), or one whose data was deleted since, is asked for."""
    sid = api.session()
    _, (out,) = api.submit(sid, {"op": "sleep", "seconds": 1.0, "value": [1, 2]})  # outlasts the wait's SUBSCRIBE
    before = api.results.create_results({"before": b"b", "empty": b"", "large": b"L" * (INLINE_MAX + 1)}, sid)
    ids = {name: r.result_id for name, r in before.items()}
    api.events.wait_for_result_availability([out, *ids.values()], sid)
    got: list = []
    assert _requests_made(api.conn, lambda: got.append(api.results.download_result_data(out, sid))) == 0
    assert json.loads(got[0]) == [1, 2]
    assert _requests_made(api.conn, lambda: got.append(api.results.download_result_data(out, sid))) >= 1
    assert got[1] == got[0]
    for name, value in (("before", b"b"), ("empty", b"")):  # in the snapshot
        assert _requests_made(api.conn, lambda: got.append(api.results.download_result_data(ids[name], sid))) == 0
        assert got[-1] == value
    assert _requests_made(api.conn, lambda: got.append(api.results.download_result_data(ids["large"], sid))) >= 1
    assert got[-1] == b"L" * (INLINE_MAX + 1)

    _, (gone,) = api.submit(sid, {"op": "sleep", "seconds": 0.3, "value": 3})
    api.events.wait_for_result_availability(gone, sid)
    api.results.delete_result_data([gone], sid)
    with pytest.raises(ArmoniKZmqError):  # not the bytes that came with the event
        api.results.download_result_data(gone, sid)


def test_arrived_data_is_bounded():
    arrived = ArrivedData(max_bytes=10)
    keep = arrived.keeper("s")
    keep([[int(_E.RESULT_STATUS_UPDATE), {"result_id": f"r{i}", "status": int(ResultStatus.COMPLETED),
                                           "data": b"abcd"}] for i in range(4)])
    keep([[int(_E.RESULT_STATUS_UPDATE), {"result_id": "x", "status": int(ResultStatus.ABORTED), "data": b"a"}]])
    assert len(arrived) == 2  # the two newest: 8 bytes of at most 10; not the aborted one
    assert arrived.take("other", "r3") is None  # another session's
    assert arrived.take("s", "r3") == b"abcd" and arrived.take("s", "r3") is None
    assert arrived.take("s", "r0") is None


def _completions(sub, ids: set, timeout: float = 30.0) -> dict:
    """The RESULT_STATUS_UPDATE bodies (wire form) of ``ids`` reaching COMPLETED on ``sub``, by result id."""
    found: dict = {}
    deadline = time.monotonic() + timeout
    while set(found) != ids:
        for etype, body in sub.get_batch(timeout=max(0.01, deadline - time.monotonic())):
            if etype == _E.RESULT_STATUS_UPDATE and body["result_id"] in ids and body["status"] == ResultStatus.COMPLETED:
                found[body["result_id"]] = body
    return found


def test_small_results_ride_inline_with_their_completion_event(cluster, api):
    """A subscription with ``inline_max`` gets a result's data in its completion event up to that size; a larger
    result, or a subscription that did not ask, gets the status alone (and the data is downloaded as usual)."""
    session_id = api.session()
    with connect(cluster.endpoint) as conn:
        inline = conn.subscribe(session_id, [int(_E.RESULT_STATUS_UPDATE)], inline_max=64)
        plain = conn.subscribe(session_id, [int(_E.RESULT_STATUS_UPDATE)])
        try:
            uploaded = api.results.create_results({"small": b"s" * 64, "large": b"L" * 65, "empty": b""}, session_id)
            task, (out,) = api.submit(session_id, {"op": "sleep", "seconds": 0, "value": [1, 2]})
            ids = {uploaded["small"].result_id, uploaded["large"].result_id, uploaded["empty"].result_id, out}
            with_data = _completions(inline, ids)
            without = _completions(plain, ids)
        finally:
            inline.close()
            plain.close()
    assert with_data[uploaded["small"].result_id]["data"] == b"s" * 64
    assert "data" not in with_data[uploaded["large"].result_id]
    assert with_data[uploaded["empty"].result_id]["data"] == b""
    assert json.loads(with_data[out]["data"]) == [1, 2]  # a task's output, from its completion
    assert all("data" not in body for body in without.values())  # not even an empty result's b""
    assert api.value(session_id, out) == [1, 2]


def test_inline_max_is_bounded(api, conn):
    with pytest.raises(InvalidArgumentError, match="inline_max"):
        conn.subscribe(api.session(), [int(_E.RESULT_STATUS_UPDATE)], inline_max=1 << 30)
