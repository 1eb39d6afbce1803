"""The wire module on its own: envelope, schemas, limits."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from armonik_zmq.protocol import (FRONTEND_OPS, ErrorCode, Op, ProtocolError, chunks, decode_header, request,
                                  split_frames, validate)


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


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_exceptions(blob):
    try:
        header = decode_header(blob)
        validate(header, FRONTEND_OPS)
    except ProtocolError:
        pass
