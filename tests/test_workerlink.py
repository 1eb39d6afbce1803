"""The agent <-> worker link (worker/link.py): framing over real Unix sockets, the limits a worker's messages
are read with, and what the agent does with a connection that breaks them or poses as a worker."""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from armonik_zmq.protocol import MAX_HEADER_SIZE, ErrorCode, Op, decode_header, request
from armonik_zmq.worker.link import BIG_FRAME, MAX_FRAMES, Link, LinkClosed, encode
from armonik_zmq.cluster import LocalProcesses
from conftest import WORKER_ENV, Api
from test_fuzz import LinkPeer, worker_socket
from test_outcomes import children_of


def _pair(max_frame=None, copy_big=False):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    return Link(a), Link(b, max_frame=max_frame, copy_big=copy_big)


def _exchange(sender: Link, receiver: Link, messages: list) -> list:
    """Send ``messages`` without ever waiting on the sender's side, reading as they come; return what came."""
    got: list = []
    for frames in messages:
        sender.send(frames)
        got.extend(receiver.read())
    while len(got) < len(messages):
        sender.flush()
        got.extend(receiver.read())
        assert receiver.closed is None, receiver.closed
    return got


@pytest.mark.parametrize("copy_big", [False, True], ids=["agent side", "worker side"])
def test_messages_of_every_shape_come_through_whole_and_in_order(copy_big):
    """Empty frames, frames bigger than the socket buffer (sent without waiting: the rest goes on ``flush``),
    more frames than one sendmsg takes, many small messages read in one go."""
    big = os.urandom(3 << 20)
    messages = [[b""], [b"h", b"", big, b"tail"], [b"h", *(bytes([i % 256]) * (i % 7) for i in range(1500))],
                [b"h", memoryview(big)[:BIG_FRAME + 1]], *([b"tiny", b"x"] for _ in range(200)),
                [bytearray(b"header"), big[:100]]]
    sender, receiver = _pair(copy_big=copy_big)
    got = _exchange(sender, receiver, messages)
    assert [[bytes(f) for f in m] for m in got] == [[bytes(f) for f in m] for m in messages]
    if copy_big:  # a processor gets bytes, big inputs included
        assert all(type(f) is bytes for m in got for f in m)
    assert sender.pending == 0
    sender.close()
    assert receiver.read() == [] and receiver.closed == "the other end closed the link"
    with pytest.raises(LinkClosed):
        receiver.send([b"late"])


def test_a_waiting_read_takes_what_comes_and_ends_empty_at_the_sockets_receive_timeout():
    """The worker's wait for its agent's next message is the read itself (``wait=True``): it returns the message
    that comes, a big one whole, and nothing once the socket's SO_RCVTIMEO passed (the worker then checks that its
    agent lives), on a socket left blocking."""
    sender, receiver = _pair(copy_big=True)
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
    assert receiver.sock.getblocking()
    assert receiver.read(wait=True) == [] and receiver.closed is None  # nothing came within 50 ms
    big = os.urandom(BIG_FRAME * 4)
    sender.send([b"h", big])
    got: list = []
    while not got:
        sender.flush()
        got = receiver.read(wait=True)
        assert receiver.closed is None
    assert [bytes(f) for f in got[0]] == [b"h", big]
    sender.close()
    assert receiver.read(wait=True) == [] and receiver.closed == "the other end closed the link"


def test_a_stream_cut_at_every_point_gives_the_same_messages():
    """The reader cuts the complete messages of a read in one go and carries an incomplete one over to the next
    read: the same stream, arriving in pieces of every size (a size table, a header or a frame cut anywhere,
    several messages and a part of the next in one piece), gives the same messages in order."""
    messages = [[b"h"], [b"header", b"", b"data" * 5], [b"h", *(bytes([i]) * i for i in range(20))], [b"", b"x"]]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = bytearray()
    for frames in messages:
        buffers, _ = encode(frames)
        stream += b"".join(bytes(x) for x in buffers)
    for piece in [*range(1, 40), len(stream) - 1]:
        receiver = Link(b, max_frame=1000)
        got: list = []
        for at in range(0, len(stream), piece):
            a.sendall(stream[at:at + piece])
            got.extend(receiver.read())
            assert receiver.closed is None, receiver.closed
        assert got == messages, piece
    a.close()


@pytest.mark.parametrize("prefix, why", [
    (struct.pack("<I", 0), "a message of 0 frames"),
    (struct.pack("<I", MAX_FRAMES + 1), f"a message of {MAX_FRAMES + 1} frames"),
    (struct.pack("<IQ", 1, MAX_HEADER_SIZE + 1), f"a header of {MAX_HEADER_SIZE + 1} bytes"),
    (struct.pack("<IQQ", 2, 10, 1001), "a data frame of 1001 bytes (at most 1000)"),
], ids=["no frame", "too many frames", "header too big", "data frame too big"])
def test_a_message_out_of_the_limits_closes_the_link_after_the_good_ones(prefix, why):
    """The limits are checked on a message's size table, before any of its bytes are taken in."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = Link(b, max_frame=1000)
    Link(a).send([b"good", b"x" * 1000])
    a.sendall(prefix)
    assert receiver.read() == [[b"good", b"x" * 1000]]
    assert receiver.malformed and receiver.closed.startswith(why), receiver.closed
    a.close()


def _raw_reply(sock: socket.socket) -> tuple[dict, bytes]:
    """Read one reply on a raw connection, then what follows it (b"" once the agent closed the connection)."""
    peer = Link(sock)
    got: list = []
    while not got:
        assert select.select([sock], [], [], 20)[0], "no reply within 20 s"
        got.extend(peer.read())
        assert got or peer.closed is None, f"the agent closed the connection without a reply: {peer.closed}"
    assert select.select([sock], [], [], 20)[0], "the agent kept the connection open"
    return decode_header(got[0][0]), sock.recv(1)


def test_the_agent_answers_a_connection_out_of_the_limits_cuts_it_off_and_lets_none_pose_as_a_worker(tmp_path):
    """Its worker waits at its start (importing its processor) for a file the test makes at the end: meanwhile
    the agent has a worker that has not connected, whose place a process claiming its pid would take but for
    the pid the kernel saw connect."""
    gate = tmp_path / "go"
    (tmp_path / "gated.py").write_text("import os, sys, time\n"  # the agent imports it too, to check it
                                       "worker = sys.argv[0].endswith(os.path.join('worker', '__main__.py'))\n"
                                       f"while worker and not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)\n"
                                       "from processors import processor\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), WORKER_ENV["PYTHONPATH"]])}
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, processor="gated:processor", env=env) as cluster:
        path = worker_socket(cluster.agent.pid)
        (worker_pid,) = children_of(cluster.agent.pid)
        # A size table beyond the limits: the stream cannot be read on, so the agent says why and hangs up.
        for prefix in (struct.pack("<I", 0), struct.pack("<IQ", 1, MAX_HEADER_SIZE + 1)):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                sock.sendall(prefix)
                header, rest = _raw_reply(sock)
                assert header["error"]["code"] == ErrorCode.MALFORMED and rest == b"", header
                assert "link closed: a " in header["error"]["message"], header
        peer = LinkPeer(path)
        peer.send_multipart([request(Op.WORKER_READY, 7, pid=worker_pid)])
        header = decode_header(peer.recv_multipart()[0])
        assert header["error"]["code"] == ErrorCode.PERMISSION_DENIED and header["rid"] == 7, header
        gate.touch()
        # The agent and its worker (never replaced) serve.
        from armonik_zmq.client import connect
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session = api.session()
            _, outs = api.submit(session, {"op": "square", "x": 9})
            assert api.value(session, outs[0]) == 81
        assert cluster.agent.poll() is None and children_of(cluster.agent.pid) == [worker_pid]
        peer.close()
