"""Shortcuts of the broker's hot path keep its behaviour: ids, event routing, shared inputs in one dispatch."""

from __future__ import annotations

import json
import os
import uuid

from armonik_zmq.broker.state import new_id
from armonik_zmq.client import EventTypes, ResultStatus, TaskDefinition, TaskStatus
from test_events import stream  # noqa: F401  (the fixture)

_E = EventTypes


def test_new_ids_are_distinct_time_ordered_version_7_uuids():
    """Ids are valid UUID strings that sort in creation order (LMDB page locality), even within a millisecond."""
    ids = [new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for i in ids:
        parsed = uuid.UUID(i)
        assert str(parsed) == i and parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_each_subscription_gets_its_types_while_others_come_and_go(api, stream):  # noqa: F811
    """The broker builds only the event types some subscription of the session wants, recomputed as they change."""
    session_id = api.session()
    task_events = stream(session_id, [_E.NEW_RESULT, _E.TASK_STATUS_UPDATE])
    result_events = stream(session_id, [_E.NEW_RESULT, _E.RESULT_STATUS_UPDATE])
    task, [out] = api.submit(session_id, {"op": "square", "x": 2})
    task_events.wait_for(lambda _: task_events.of(_E.TASK_STATUS_UPDATE, task_id=task.id, status=TaskStatus.COMPLETED))
    result_events.wait_for(lambda _: result_events.of(_E.RESULT_STATUS_UPDATE, result_id=out,
                                                      status=ResultStatus.COMPLETED))
    task_events.close()
    _, [out2] = api.submit(session_id, {"op": "square", "x": 3})
    result_events.wait_for(lambda _: result_events.of(_E.RESULT_STATUS_UPDATE, result_id=out2,
                                                      status=ResultStatus.COMPLETED))
    assert {t for t, _ in result_events.events} == {_E.NEW_RESULT, _E.RESULT_STATUS_UPDATE}
    later = stream(session_id, [_E.NEW_RESULT, _E.TASK_STATUS_UPDATE])
    task3, _ = api.submit(session_id, {"op": "square", "x": 4})
    later.wait_for(lambda _: later.of(_E.TASK_STATUS_UPDATE, task_id=task3.id, status=TaskStatus.COMPLETED))


def test_tasks_sharing_one_payload_all_receive_it(api):
    """One dispatch reads a shared payload once and hands the same bytes to every task."""
    session_id = api.session()
    payload = api.results.create_results({"p": json.dumps({"op": "square", "x": 7}).encode()}, session_id)["p"]
    outs = api.results.create_results_metadata([f"o{i}" for i in range(50)], session_id)
    out_ids = [outs[f"o{i}"].result_id for i in range(50)]
    api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload.result_id, expected_output_ids=[o])
                                        for o in out_ids])
    api.events.wait_for_result_availability(out_ids, session_id)
    assert {json.loads(api.results.download_result_data(o, session_id)) for o in out_ids} == {49}


def test_a_forked_child_draws_other_ids():
    """Ids come from a pool of random bytes: a child forked with a full pool must not repeat the parent's ids."""
    new_id()  # the pool now holds random bytes the child would otherwise share
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, json.dumps([new_id() for _ in range(10)]).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        child_ids = json.loads(f.read())
    os.waitpid(pid, 0)
    assert not set(child_ids) & {new_id() for _ in range(10)}
