"""SUBMIT_INLINE: payloads, outputs and tasks in one request (one commit), all or nothing."""

from __future__ import annotations

import json

import pytest

from armonik_zmq.client import EventTypes, ResultStatus, TaskStatus
from armonik_zmq.errors import ArmoniKZmqError
from armonik_zmq.protocol import Op
from test_events import stream  # noqa: F401  (the fixture)


def _inline(api, session_id, payloads, **fields):
    frames = [json.dumps(p).encode() for p in payloads]
    tasks = fields.pop("tasks", None) or [{"name": f"t{i}"} for i in range(len(payloads))]
    header, _ = api.conn.call(Op.SUBMIT_INLINE, frames=frames, counts=[1] * len(frames), session_id=session_id,
                              tasks=tasks, **fields)
    return header["tasks"]


def test_one_request_creates_payloads_outputs_and_tasks_that_run(api, stream):  # noqa: F811
    session_id = api.session()
    events = stream(session_id, [EventTypes.NEW_RESULT, EventTypes.NEW_TASK])
    infos = _inline(api, session_id, [{"op": "square", "x": x} for x in range(5)])
    assert len(infos) == 5 and len({i["task_id"] for i in infos}) == 5
    outs = [i["expected_output_ids"][0] for i in infos]
    assert [api.value(session_id, o) for o in outs] == [x * x for x in range(5)]
    # the payloads are COMPLETED results named after their task, the outputs are named as asked
    payloads = [api.results.get_result(i["payload_id"]) for i in infos]
    assert {r.name for r in payloads} == {f"t{i}-payload" for i in range(5)}
    assert all(r.status == ResultStatus.COMPLETED for r in payloads)
    assert [api.results.get_result(o).name for o in outs] == [f"t{i}" for i in range(5)]
    assert all(api.tasks.get_task(i["task_id"]).status == TaskStatus.COMPLETED for i in infos)
    # the same events as the three requests it replaces: two new results and one new task per task
    events.wait_for(lambda evs: sum(1 for t, _ in evs if t == EventTypes.NEW_TASK) == 5)
    created = {i["payload_id"] for i in infos} | set(outs)
    assert {e.result_id for e in events.of(EventTypes.NEW_RESULT)} >= created


def test_dependencies_and_options_of_inline_tasks(api):
    session_id = api.session()
    [first] = _inline(api, session_id, [{"op": "square", "x": 3}])
    dep = first["expected_output_ids"][0]
    [second] = _inline(api, session_id, [{"op": "concat-deps", "order": [dep]}],
                       tasks=[{"name": "c", "data_dependencies": [dep], "options": {"priority": 3}}])
    assert second["data_dependencies"] == [dep]
    assert api.value(session_id, second["expected_output_ids"][0]) == 9
    assert api.tasks.get_task(second["task_id"]).options.priority == 3


def test_a_refused_inline_submission_leaves_nothing_behind(api):
    session_id = api.session()
    before = api.results.list_results()[0], api.tasks.count_tasks_by_status()
    with pytest.raises(ArmoniKZmqError, match="not found"):
        _inline(api, session_id, [{"op": "square", "x": 1}, {"op": "square", "x": 2}],
                tasks=[{"name": "ok"}, {"name": "bad", "data_dependencies": ["no-such-result"]}])
    with pytest.raises(ArmoniKZmqError, match="'frames' has 1 counts for 2 tasks"):
        api.conn.call(Op.SUBMIT_INLINE, frames=[b"{}"], counts=[1], session_id=session_id,
                      tasks=[{"name": "a"}, {"name": "b"}])
    assert (api.results.list_results()[0], api.tasks.count_tasks_by_status()) == before
    api.sessions.close_session(session_id)
    with pytest.raises(ArmoniKZmqError, match="CLOSED"):
        _inline(api, session_id, [{"op": "square", "x": 1}])
