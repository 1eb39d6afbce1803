"""A subscription's snapshot goes out in slices between the broker's turns, and events in pushes of bounded size.

The broker runs in this process, turn by turn (``test_fairness.serving``), on real sockets and a real LMDB
directory: which messages a turn sees, and in which order the client receives replies and pushes, is then
exact, with no timing involved.
"""

from __future__ import annotations

import time

import pytest

from armonik_zmq.broker.events import EVENTS_PER_PUSH
from armonik_zmq.protocol import Op, decode_header, request
from armonik_zmq.status import EventTypes, ResultStatus
from armonik_zmq.broker.server import SLICES_PUT_OFF
from test_fairness import OPTIONS, serving

_STATUS = int(EventTypes.RESULT_STATUS_UPDATE)
_NEW = int(EventTypes.NEW_RESULT)


class Client:
    """A bare DEALER on an in-process broker: each request is handled by one turn of the broker."""

    def __init__(self, broker, sock):
        self.broker = broker
        self.sock = sock
        self.rid = 0
        #: what arrived, in order: ("reply", rid, header) or ("events", subscription, events)
        self.received: list = []

    def send(self, op: Op, *frames: bytes, **fields) -> int:
        """Send a request and run the broker's next turn once it is there; return its rid."""
        self.rid += 1
        self.sock.send_multipart([request(op, self.rid, **fields), *frames])
        while not self.broker.poller.arrived(self.broker.frontend):  # its own look: see broker/readiness.py
            time.sleep(0.001)
        self.broker.turn(0)
        return self.rid

    def read(self) -> None:
        """Take what the broker has sent so far."""
        while self.sock.poll(200):
            header = decode_header(self.sock.recv_multipart()[0])
            if header["op"] == Op.EVENT:
                self.received.append(("events", header["rid"], header["events"]))
            else:
                assert header.get("error") is None, header
                self.received.append(("reply", header["rid"], header))

    def reply(self, rid: int) -> dict:
        self.read()
        return next(h for kind, r, h in self.received if kind == "reply" and r == rid)

    def pushes(self, subscription: int) -> list:
        return [events for kind, r, events in self.received if kind == "events" and r == subscription]

    def statuses(self, subscription: int, result_id: str) -> list:
        """The statuses one result had in the subscription's events, in order."""
        return [body["status"] for events in self.pushes(subscription) for etype, body in events
                if etype in (_STATUS, _NEW) and body["result_id"] == result_id]


def _session_with_results(client: Client, n: int) -> tuple[str, list[str]]:
    session_id = client.reply(client.send(Op.CREATE_SESSION, default_task_options=OPTIONS))["session_id"]
    rows = client.reply(client.send(Op.CREATE_RESULTS_METADATA, session_id=session_id,
                                    results=[{"name": f"r{i}"} for i in range(n)]))["results"]
    return session_id, [row["result_id"] for row in rows]


def _id_frame(ids: list) -> bytes:
    return "".join(rid + "\0" for rid in ids).encode()


@pytest.mark.parametrize("sent_as", ["header", "frame"])
def test_a_request_sent_after_a_big_subscribe_is_answered_before_its_snapshot_ends(tmp_path, sent_as):
    """The snapshot of a subscription naming many results is read a slice per turn, each slice one push: a
    request that arrives meanwhile waits for one slice, not for the whole snapshot. Every result's status
    arrives once, in pushes of at most EVENTS_PER_PUSH events. The ids come as a header list, or as one data
    frame (``result_ids_frame``: what the client sends, decoded a slice at a time)."""
    n = 3 * EVENTS_PER_PUSH + 10
    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        session_id, ids = _session_with_results(client, n)
        if sent_as == "header":
            sub = client.send(Op.SUBSCRIBE_EVENTS, session_id=session_id, event_types=[_STATUS], result_ids=ids,
                              snapshot=True)
        else:
            sub = client.send(Op.SUBSCRIBE_EVENTS, _id_frame(ids), session_id=session_id, event_types=[_STATUS],
                              result_ids_frame=True, snapshot=True)
        assert client.reply(sub)["subscription"] == sub
        broker.turn(0)  # the first slice
        probe = client.send(Op.GET_SESSIONS, session_ids=[session_id])
        client.reply(probe)
        for _ in range(10):  # the rest of the slices, one per turn
            broker.turn(0)
        client.read()
        order = [(kind, r) for kind, r, _ in client.received if r in (sub, probe)]
        pushes = client.pushes(sub)
        assert order.index(("reply", probe)) < len(order) - 1, order  # answered before the last slice
        assert [len(p) for p in pushes] == [EVENTS_PER_PUSH] * 3 + [10]
        assert [body["result_id"] for p in pushes for _, body in p] == ids
        assert {body["status"] for p in pushes for _, body in p} == {int(ResultStatus.CREATED)}
        assert not broker.state.events.snapshots


@pytest.mark.parametrize("named_by", ["result_ids", "result_filter"])
def test_events_between_slices_follow_their_results_snapshot_status(tmp_path, named_by):
    """A result that changes while the snapshot is in progress: read already, its event follows its snapshot
    status; not read yet, its snapshot status (read later, from a commit that holds the change) is the
    first thing said about it, and its event is not sent as well. Either way: in order, once per change.
    The results are named by ``result_ids``, or by ``result_id eq`` terms of a filter with other terms."""
    n = 2 * EVENTS_PER_PUSH
    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        session_id, ids = _session_with_results(client, n)
        first, last = ids[0], ids[-1]
        named = ({"result_ids": ids} if named_by == "result_ids" else
                 {"result_filter": [[["result_id", "eq", rid], ["name", "startswith", "r"]] for rid in ids]})
        sub = client.send(Op.SUBSCRIBE_EVENTS, session_id=session_id, event_types=[_STATUS, _NEW], snapshot=True,
                          **named)
        client.reply(sub)
        broker.turn(0)  # the first slice
        # then one result of each slice completes
        done = client.send(Op.UPLOAD_RESULT_DATA, b"a", b"b", session_id=session_id, result_ids=[first, last],
                           frames=[1, 1])
        client.reply(done)
        assert broker.state.events.snapshots  # the second slice is still to come
        broker.turn(0)
        client.read()
        created, completed = int(ResultStatus.CREATED), int(ResultStatus.COMPLETED)
        assert client.statuses(sub, first) == [created, completed]
        assert client.statuses(sub, last) == [completed]
        assert all(client.statuses(sub, rid) == [created] for rid in ids[1:-1])


def test_an_old_style_wait_filter_gets_the_same_snapshot(tmp_path):
    """A result filter of nothing but ``result_id eq`` clauses (how waits were sent before ``result_ids``) names
    the same results, read in the same slices; its events are those of the named results only."""
    n = EVENTS_PER_PUSH + 1
    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        session_id, ids = _session_with_results(client, n)
        sub = client.send(Op.SUBSCRIBE_EVENTS, session_id=session_id, event_types=[_STATUS], snapshot=True,
                          result_filter=[[["result_id", "eq", rid]] for rid in ids[:-1] + ["unknown"]])
        client.reply(sub)
        broker.turn(0)  # a slice per turn
        broker.turn(0)
        client.read()
        pushes = client.pushes(sub)
        assert [len(p) for p in pushes] == [EVENTS_PER_PUSH, 1]
        assert pushes[-1] == [[_STATUS, {"result_id": "unknown", "status": int(ResultStatus.NOTFOUND)}]]
        client.reply(client.send(Op.UPLOAD_RESULT_DATA, b"a", b"b", session_id=session_id,
                                 result_ids=[ids[0], ids[-1]], frames=[1, 1]))
        assert client.statuses(sub, ids[0])[-1] == int(ResultStatus.COMPLETED)
        assert client.statuses(sub, ids[-1]) == []  # not named


def test_one_turn_s_events_go_out_in_pushes_of_bounded_size(tmp_path):
    """A turn that makes more events than EVENTS_PER_PUSH for one subscription sends them in several pushes, in
    order: the subscriber decodes each push in one call, holding its interpreter meanwhile."""
    n = 2 * EVENTS_PER_PUSH + 5
    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        session_id = client.reply(client.send(Op.CREATE_SESSION, default_task_options=OPTIONS))["session_id"]
        sub = client.send(Op.SUBSCRIBE_EVENTS, session_id=session_id, event_types=[_NEW])
        client.reply(sub)
        made = client.reply(client.send(Op.CREATE_RESULTS_METADATA, session_id=session_id,
                                        results=[{"name": f"r{i}"} for i in range(n)]))["results"]
        pushes = client.pushes(sub)
        assert [len(p) for p in pushes] == [EVENTS_PER_PUSH, EVENTS_PER_PUSH, 5]
        assert [body["result_id"] for p in pushes for _, body in p] == [row["result_id"] for row in made]


def test_a_bad_result_ids_frame_is_refused(tmp_path):
    """The ids frame is checked when the subscription arrives: each id ended by a NUL, at most one frame and only
    with ``result_ids_frame``. A refused subscription does not exist. An id that is empty, not UTF-8 or longer than
    any key names no result: its status is NOTFOUND."""
    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        session_id, ids = _session_with_results(client, 2)
        bad = [((b"a\0b",), {"result_ids_frame": True}, "end each id with a NUL"),
               ((_id_frame(ids), b"x\0"), {"result_ids_frame": True}, "one data frame"),
               ((_id_frame(ids),), {"result_ids_frame": True, "result_ids": ids}, "without result_ids"),
               ((_id_frame(ids),), {}, "without result_ids_frame")]
        for frames, fields, message in bad:
            rid = client.send(Op.SUBSCRIBE_EVENTS, *frames, session_id=session_id, snapshot=True, **fields)
            client.sock.poll(2000)
            reply = decode_header(client.sock.recv_multipart()[0])
            assert reply["rid"] == rid and message in reply["error"]["message"], (message, reply)
        assert not broker.state.events.by_key and not broker.state.events.snapshots
        sub = client.send(Op.SUBSCRIBE_EVENTS, b"\0\xff\0" + _id_frame(["x" * 600] + ids[:1]), session_id=session_id,
                          event_types=[_STATUS], result_ids_frame=True, snapshot=True)
        client.reply(sub)
        broker.turn(0)
        client.read()
        assert client.pushes(sub) == [[[_STATUS, {"result_id": "", "status": int(ResultStatus.NOTFOUND)}],
                                       [_STATUS, {"result_id": "\ufffd", "status": int(ResultStatus.NOTFOUND)}],
                                       [_STATUS, {"result_id": "x" * 600, "status": int(ResultStatus.NOTFOUND)}],
                                       [_STATUS, {"result_id": ids[0], "status": int(ResultStatus.CREATED)}]]]


def test_a_waiting_request_goes_before_the_next_slice_but_cannot_hold_the_snapshot(tmp_path):
    """A turn that starts with a client's request waiting serves it before the next slice, which waits for the
    turn after; a slice is put off at most SLICES_PUT_OFF turns in a row, so a stream of requests cannot hold
    the snapshot back for ever."""
    n = 3 * EVENTS_PER_PUSH
    with serving(tmp_path, "client") as (broker, (sock,)):
        client = Client(broker, sock)
        session_id, ids = _session_with_results(client, n)
        sub = client.send(Op.SUBSCRIBE_EVENTS, session_id=session_id, event_types=[_STATUS], result_ids=ids,
                          snapshot=True)
        client.reply(sub)
        probes = [client.send(Op.GET_SESSIONS, session_ids=[session_id]) for _ in range(SLICES_PUT_OFF + 1)]
        client.read()
        order = [(kind, r) for kind, r, _ in client.received if r in (sub, *probes)]
        assert order[1:] == ([("reply", p) for p in probes[:SLICES_PUT_OFF]]
                             + [("events", sub), ("reply", probes[-1])]), order
