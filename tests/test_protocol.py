"""The wire module on its own: envelope, schemas, limits."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from armonik_zmq.protocol import (FRONTEND_OPS, ErrorCode, Op, ProtocolError, chunks, decode_header, reply_ok,
                                  request, split_frames, validate, with_field)


def test_roundtrip():
    header = decode_header(request(Op.GET_TASKS, 12, task_ids=["a"]))
    assert validate(header, FRONTEND_OPS) == Op.GET_TASKS and header["rid"] == 12


def test_unknown_field_is_refused():
    with pytest.raises(ProtocolError, match="unknown field 'bogus'"):
        validate(decode_header(request(Op.GET_TASKS, 1, task_ids=[], bogus=1)), FRONTEND_OPS)


def test_nested_field_named_in_error():
    with pytest.raises(ProtocolError, match=r"tasks\[0\].expected_output_ids"):
        validate(decode_header(request(Op.SUBMIT_TASKS, 1, session_id="s", tasks=[{"payload_id": "p",
                                                                                  "expected_output_ids": []}])),
                 FRONTEND_OPS)


def test_ext_types_refused():
    with pytest.raises(ProtocolError) as exc:
        decode_header(msgpack.packb({"v": 1, "op": 1, "rid": 1, "x": msgpack.ExtType(5, b"x")}))
    assert exc.value.code == ErrorCode.MALFORMED


def test_split_frames():
    assert split_frames([1, 2, 3], [2, 0, 1]) == [[1, 2], [], [3]]
    with pytest.raises(ProtocolError):
        split_frames([1, 2], [1])


def test_chunks():
    data = bytes(range(10))
    assert b"".join(bytes(c) for c in chunks(data, 3)) == data and len(chunks(data, 3)) == 4
    assert chunks(b"", 3) == [b""]


@pytest.mark.parametrize("n", [0, 3, 14, 15, 16, 300])
def test_a_field_added_to_a_packed_map_decodes_as_if_packed_with_it(n):
    """with_field appends an entry (a list of packed maps) to a packed map without decoding it: the held acks of
    an agent ride inside its next DISPATCH (broker/server.py _send_all)."""
    fields = {f"k{i}": i for i in range(n)}
    acks = [reply_ok(Op.TASKS_DONE, rid, accepted=["t"], refused=[]) for rid in (7, 8)]
    carrying = with_field(msgpack.packb(fields), "acks", acks)
    if n == 15:  # a fixmap of 15 entries has no room for a 16th in its one byte: not extended
        assert carrying is None
        return
    assert msgpack.unpackb(carrying) == {**fields, "acks": [msgpack.unpackb(a) for a in acks]}
    assert with_field(msgpack.packb([1, 2]), "acks", acks) is None and with_field(b"", "acks", acks) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_exceptions(blob):
    try:
        header = decode_header(blob)
        validate(header, FRONTEND_OPS)
    except ProtocolError:
        pass
