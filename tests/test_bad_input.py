"""Bad input to the broker gets an error reply naming the problem, and the broker keeps serving."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from armonik_zmq.protocol import ErrorCode, Op, request


@pytest.fixture
def raw(cluster):
    """A bare DEALER on the broker's client endpoint."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(cluster.zmq_endpoint)
    yield sock
    sock.close()
    ctx.term()


def ask(sock, *frames) -> dict:
    sock.send_multipart(list(frames))
    reply = sock.recv_multipart()
    return msgpack.unpackb(reply[0], raw=False)


def error_of(reply: dict) -> tuple[ErrorCode, str]:
    assert "error" in reply, reply
    return ErrorCode(reply["error"]["code"]), reply["error"]["message"]


def test_not_msgpack(raw):
    code, message = error_of(ask(raw, b"\xc1\xc1 this is not msgpack"))
    assert code == ErrorCode.MALFORMED and "msgpack" in message


def test_not_a_map(raw):
    code, _ = error_of(ask(raw, msgpack.packb([1, 2, 3])))
    assert code == ErrorCode.MALFORMED


def test_wrong_version(raw):
    reply = ask(raw, msgpack.packb({"v": 99, "op": int(Op.HEALTH), "rid": 7}))
    assert reply["rid"] == 7
    assert error_of(reply)[0] == ErrorCode.UNSUPPORTED_VERSION


def test_unknown_op(raw):
    reply = ask(raw, request(9999, 5))
    assert reply["rid"] == 5 and error_of(reply)[0] == ErrorCode.UNIMPLEMENTED


def test_agent_op_on_client_endpoint(raw):
    code, message = error_of(ask(raw, request(Op.AGENT_REGISTER, 1, agent_id="x", capacity=1)))
    assert code == ErrorCode.UNIMPLEMENTED and "AGENT_REGISTER" in message


def test_missing_field(raw):
    code, message = error_of(ask(raw, request(Op.CREATE_RESULTS_METADATA, 2, results=[{"name": "a"}])))
    assert code == ErrorCode.INVALID_ARGUMENT and "session_id" in message


def test_wrong_type(raw):
    code, message = error_of(ask(raw, request(Op.GET_TASKS, 3, task_ids="not-a-list")))
    assert code == ErrorCode.INVALID_ARGUMENT and "task_ids" in message


def test_unknown_session(raw):
    code, message = error_of(ask(raw, request(Op.CREATE_RESULTS_METADATA, 4, session_id="nope", results=[{"name": "a"}])))
    assert code == ErrorCode.NOT_FOUND and "nope" in message


def test_frames_do_not_match_header(raw):
    sid = ask(raw, request(Op.CREATE_SESSION, 1, default_task_options={"max_duration": 5.0, "priority": 1,
                                                                         "max_retries": 1}))["session_id"]
    code, _ = error_of(ask(raw, request(Op.CREATE_RESULTS, 2, session_id=sid, results=[{"name": "a"}], frames=[2]),
                           b"only one frame"))
    assert code == ErrorCode.MALFORMED
    # all-or-nothing: nothing of that request exists
    reply = ask(raw, request(Op.GET_SESSIONS, 3, session_ids=[sid]))
    assert reply["ok"]


def test_no_header_frame_is_answered(raw):
    raw.send_multipart([b""])
    reply = msgpack.unpackb(raw.recv_multipart()[0], raw=False)
    assert "error" in reply


def test_broker_survives_and_still_serves(raw, cluster):
    pid = cluster.broker.pid
    for junk in (b"", b"\x00", b"\xff" * 100, msgpack.packb({"v": 1}), msgpack.packb({"v": 1, "op": "x", "rid": 1}),
                 msgpack.packb({"v": 1, "op": 1, "rid": -1}), msgpack.packb({1: 2}), msgpack.packb("x" * 1000)):
        assert "error" in ask(raw, junk)
    reply = ask(raw, request(Op.HEALTH, 42))
    assert reply["ok"] and reply["rid"] == 42
    assert cluster.broker.poll() is None and cluster.broker.pid == pid
