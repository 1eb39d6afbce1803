"""Shortcuts of the broker's hot path keep its behaviour: ids, event routing, shared inputs in one dispatch."""

from __future__ import annotations

import json
import os
import uuid

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from armonik_zmq._core import DISPATCH_TASK_KEYS, DispatchMessage
from armonik_zmq.broker.state import new_id
from armonik_zmq.protocol import PROTOCOL_VERSION, Op, pack, request
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


_ids = st.text(min_size=0, max_size=80)
_id_tuples = st.lists(_ids, max_size=4).map(tuple)
_options = st.dictionaries(st.text(max_size=12), st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=40)
                           | st.floats(allow_nan=False) | st.booleans(), max_size=6)
_dispatched = st.fixed_dictionaries({
    "task_id": _ids, "attempt": st.integers(0, 2**40), "session_id": _ids, "status": st.integers(0, 12),
    "payload_id": _ids, "data_dependencies": _id_tuples, "expected_output_ids": _id_tuples, "options": _options,
    "retry_of_ids": _id_tuples, "initial_task_id": _ids, "owner_pod_id": _ids, "ended_at": st.none() | st.floats(),
})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_dispatched, st.integers(0, 9), st.lists(_ids, max_size=3)), max_size=40),
       st.integers(0, 2**64 - 1))
def test_a_dispatch_message_is_written_as_the_bytes_msgpack_makes_of_its_task_dicts(tasks, rid):
    """``DispatchMessage`` (compiled) writes what ``request`` packed from one dict per task, byte for byte: each task
    names its options by their index in the message's list of distinct options maps, in the order first seen."""
    message = DispatchMessage(pack)
    dicts = []
    options = []
    for row, session_status, inline in tasks:
        packed = pack(row["options"])
        message.add(row, session_status, packed, inline)
        if packed not in options:
            options.append(packed)
        dicts.append({
            "task_id": row["task_id"], "attempt": row["attempt"], "session_id": row["session_id"],
            "session_status": session_status, "status": row["status"], "payload_id": row["payload_id"],
            "data_dependencies": row["data_dependencies"], "expected_output_ids": row["expected_output_ids"],
            "options": options.index(packed), "retry_of_ids": row["retry_of_ids"],
            "initial_task_id": row["initial_task_id"], "inline": inline,
        })
    counts = [len(inline) for _, _, inline in tasks]
    assert all(list(d) == list(DISPATCH_TASK_KEYS) for d in dicts)
    assert message.n_tasks == len(tasks)
    maps = [msgpack.unpackb(packed, raw=False) for packed in options]
    assert message.header(Op.DISPATCH, rid, PROTOCOL_VERSION, counts) == request(Op.DISPATCH, rid, tasks=dicts,
                                                                                  options=maps, frames=counts)


def test_a_task_that_cannot_be_written_leaves_a_dispatch_message_as_it_was():
    message = DispatchMessage(pack)
    row = {"task_id": "t", "attempt": 1, "session_id": "s", "status": 2, "payload_id": "p", "data_dependencies": (),
           "expected_output_ids": ("o",), "retry_of_ids": (), "initial_task_id": "t"}
    message.add(row, 1, pack({}), [])
    before = message.header(Op.DISPATCH, 0, PROTOCOL_VERSION, [0])
    with pytest.raises(KeyError):  # nor its options, when no other task uses them
        message.add({k: v for k, v in row.items() if k != "payload_id"}, 1, pack({"other": 1}), [])
    with pytest.raises(TypeError):
        message.add({**row, "task_id": object()}, 1, pack({"other": 2}), [])
    assert message.n_tasks == 1
    assert message.header(Op.DISPATCH, 0, PROTOCOL_VERSION, [0]) == before
