"""Unix-socket links between the broker and the agents and clients of its host (unixlink.py): the transport on
its own (real sockets, in this process), then real broker, agent, worker and client processes on links: tasks
run, a broker killed and started again is reconnected to, a peer that breaks the framing or the size limit is
dropped while others are served, a reader that reads nothing meets a bounded buffer, agents on a link and on
ZeroMQ share the work."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest
import zmq

import armonik_zmq
from armonik_zmq.broker import Broker
from armonik_zmq.client import connect
from armonik_zmq.config import BrokerConfig
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.protocol import Op, request
from armonik_zmq.security import create_keys
from armonik_zmq.unixlink import LinkDealer, LinkRouter, link_path
from armonik_zmq.worker.link import Link
from conftest import WORKER_ENV

MiB = 1 << 20


def _until(condition, timeout: float = 10.0, pump=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if pump is not None:
            pump()
        time.sleep(0.005)


def _router_messages(router: LinkRouter, n: int, timeout: float = 10.0) -> list:
    got = []

    def take():
        while router.readable():
            got.append(router.recv())
        return len(got) >= n

    _until(take, timeout)
    return [[f.bytes for f in m] for m in got]


def _routed(router: LinkRouter, dealer: LinkDealer, message: list) -> list:
    """Send ``message`` (identity first) through the router; return the frames the dealer receives."""
    router.send(message)
    _until(dealer.readable, pump=router.pump)
    return [f.bytes for f in dealer.recv()]


def _assert_unreachable(router: LinkRouter, identity: bytes) -> None:
    """A send to a peer the router does not have fails at once, as on a ROUTER_MANDATORY socket."""
    with pytest.raises(zmq.ZMQError) as info:
        router.send([identity, b"reply"])
    assert info.value.errno == zmq.EHOSTUNREACH


def test_dealer_queues_until_the_router_exists_and_the_router_routes_by_identity(tmp_path):
    """Sent before the broker listens: held, then delivered in order once connected (IMMEDIATE=0's behaviour);
    replies reach the peer named; an unknown peer is EHOSTUNREACH, as on a ROUTER_MANDATORY socket."""
    endpoint = f"unix://{tmp_path}/private/agents.sock"
    dealer = LinkDealer(endpoint, b"agent-1")
    assert not dealer.connected
    dealer.send([b"first", b"data"])
    dealer.send([b"second"])
    router = LinkRouter(endpoint, max_frame=MiB)
    try:
        assert os.stat(os.path.dirname(link_path(endpoint))).st_mode & 0o777 == 0o700
        _until(lambda: dealer.connected, pump=dealer.tick)
        assert _router_messages(router, 2) == [[b"agent-1", b"first", b"data"], [b"agent-1", b"second"]]
        assert _routed(router, dealer, [b"agent-1", b"reply", b"x" * 100_000]) == [b"reply", b"x" * 100_000]
        _assert_unreachable(router, b"nobody")
    finally:
        dealer.close()
        router.close()


def test_waiting_tells_of_messages_read_without_reading_and_the_descriptor_of_what_the_socket_holds(tmp_path):
    """What the agent and the client rely on to read a link once per wake-up: ``waiting`` never reads the socket
    (a message in it is told by the poll of ``fileno()``, level-triggered), ``readable`` reads it all."""
    endpoint = f"unix://{tmp_path}/agents.sock"
    router = LinkRouter(endpoint, max_frame=MiB)
    dealer = LinkDealer(endpoint, b"agent-1")
    poller = select.poll()
    poller.register(dealer.fileno(), select.POLLIN)
    try:
        dealer.send([b"hello"])
        assert _router_messages(router, 1) == [[b"agent-1", b"hello"]]
        for text in (b"one", b"two"):
            router.send([b"agent-1", text])
        _until(lambda: len(dealer.link.sock.recv(64, socket.MSG_PEEK)) >= 2 * (4 + 8 + 3), pump=router.pump)
        assert poller.poll(0) and poller.poll(0)  # level-triggered: it keeps telling until the socket is read
        assert not dealer.waiting()
        assert dealer.readable()  # one read took both
        assert [f.bytes for f in dealer.recv()] == [b"one"]
        assert dealer.waiting() and not poller.poll(0)
        assert [f.bytes for f in dealer.recv()] == [b"two"]
        assert not dealer.waiting()
        router.send([b"agent-1", b"three"])
        _until(lambda: poller.poll(0), pump=router.pump)
        assert not dealer.waiting() and dealer.readable()
        assert [f.bytes for f in dealer.recv()] == [b"three"]
    finally:
        dealer.close()
        router.close()


def test_a_new_connection_takes_an_identity_over_and_a_gone_peer_is_unreachable(tmp_path):
    endpoint = f"unix://{tmp_path}/clients.sock"
    router = LinkRouter(endpoint, max_frame=MiB)
    old, new = LinkDealer(endpoint, b"same"), LinkDealer(endpoint, b"same")
    try:
        old.send([b"from old"])
        assert _router_messages(router, 1) == [[b"same", b"from old"]]
        new.send([b"from new"])
        assert _router_messages(router, 1) == [[b"same", b"from new"]]
        assert router.stats["handed_over"] == 1
        assert _routed(router, new, [b"same", b"to the new one"]) == [b"to the new one"]
        _until(lambda: not old.readable() and not old.connected)  # the broker closed the old connection
        new.close()
        _until(lambda: not router.pump() and b"same" not in router.peers)
        _assert_unreachable(router, b"same")
    finally:
        old.close()
        router.close()


def test_a_peer_that_reads_nothing_fills_a_bounded_buffer_then_gets_eagain(tmp_path):
    """The broker's sends never wait: what the socket does not take waits, up to ``max_pending`` bytes; then a
    send fails with EAGAIN before anything of it is queued, as on a full ZeroMQ pipe."""
    endpoint = f"unix://{tmp_path}/agents.sock"
    router = LinkRouter(endpoint, max_frame=MiB, max_pending=256 << 10)
    dealer = LinkDealer(endpoint, b"sleepy")
    try:
        dealer.send([b"hello"])
        _router_messages(router, 1)
        chunk = b"z" * (64 << 10)
        sent = 0
        with pytest.raises(zmq.ZMQError) as info:
            for _ in range(10_000):  # far more than the socket buffers and the bound together
                router.send([b"sleepy", chunk])
                sent += 1
        assert info.value.errno == zmq.EAGAIN
        link = router.peers[b"sleepy"]
        assert 256 << 10 < link.pending <= (256 << 10) + len(chunk) + 64
        # once the peer reads, what waited goes out, and sends succeed again
        got = 0
        deadline = time.monotonic() + 10
        while got < sent:
            assert time.monotonic() < deadline
            router.pump()
            while dealer.readable():
                assert dealer.recv()[0].bytes == chunk
                got += 1
        assert link.pending == 0
        router.send([b"sleepy", b"again"])
    finally:
        dealer.close()
        router.close()


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    """A cluster whose client and agent use links; a small link buffer for the slow-reader test."""
    with _cluster(tmp_path_factory.mktemp("linked"), broker_args=("--link-buffer", str(64 << 10))) as cluster:
        yield cluster


def _cluster(tmp_path, **kwargs) -> LocalProcesses:
    """Client and agent on links; workers run functions (the futures API) and can import this module."""
    return LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=2, env=WORKER_ENV, links=True, **kwargs)


def _raw(endpoint: str, hello: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(link_path(endpoint))
    if hello:
        sock.sendall(struct.pack("<IQ", 1, len(hello)) + hello)
    return sock


def _closed_by_the_broker(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the broker closes ``sock`` (reads and drops whatever it sent first)."""
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    while time.monotonic() < deadline:
        select.select([sock], [], [], 0.2)
        try:
            if sock.recv(1 << 16) == b"":
                return True
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return True
    return False


def _parent_pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getppid()


def test_client_and_agent_on_links_run_tasks_beside_an_agent_on_zeromq(linked):
    """Mixed peers: one agent on a link, one on ZeroMQ, a client on a link; both agents run tasks."""
    zmq_agent = linked.start_extra_agent("on-zeromq", workers=1, link=False)
    try:
        with armonik_zmq.Client(linked.endpoint) as client:
            parents: set = set()
            deadline = time.monotonic() + 60
            while parents != {linked.agent.pid, zmq_agent.pid} and time.monotonic() < deadline:
                parents |= set(client.gather(client.map(_parent_pid_after, [0.05] * 12), timeout=60))
        assert parents == {linked.agent.pid, zmq_agent.pid}
    finally:
        linked.extra_agents.remove(zmq_agent)
        linked._stop(zmq_agent, 10)


@pytest.mark.parametrize("garbage", ["no hello", "a message of 0 frames", "an oversized frame", "an oversized hello"])
def test_a_peer_breaking_the_framing_is_dropped_and_the_others_are_served(linked, garbage):
    for endpoint in (linked.client_link, linked.agent_link):
        if garbage == "no hello":
            sock = _raw(endpoint)
            sock.sendall(struct.pack("<I2Q", 2, 1, 1) + b"ab")
        elif garbage == "a message of 0 frames":
            sock = _raw(endpoint, b"peer")
            sock.sendall(struct.pack("<I", 0) + b"junk" * 10)
        elif garbage == "an oversized frame":  # the size table alone is enough: the body never has to come
            sock = _raw(endpoint, b"peer")
            sock.sendall(struct.pack("<I2Q", 2, 10, 65 * MiB) + request(Op.HEALTH, 1)[:10])
        else:
            sock = _raw(endpoint)
            sock.sendall(struct.pack("<IQ", 1, 300) + b"x" * 300)
        try:
            assert _closed_by_the_broker(sock), f"{garbage} on {endpoint}: the connection stayed open"
        finally:
            sock.close()
    assert linked.broker.poll() is None
    with armonik_zmq.Client(linked.endpoint) as client:
        assert client.submit(abs, -3).result(30) == 3


def test_a_client_that_reads_nothing_does_not_hold_the_broker_up(linked):
    """Its replies fill the socket, then the broker's bounded buffer (64 KiB here); then they fail as on a
    full ZeroMQ pipe (EAGAIN, counted) and are dropped, while another client is answered all along."""
    with connect(linked.endpoint, timeout=30) as polite:
        before = polite.call(Op.HEALTH, metrics=True)[0]["metrics"]["send_failures"].get("EAGAIN", 0)
        sock = _raw(linked.client_link, b"sleepy-client")
        try:
            sender = Link(sock)
            for rid in range(1, 2001):  # each reply carries the metrics: MiBs in all, more than any buffer
                sender.send([request(Op.HEALTH, rid, metrics=True)])
            _until(lambda: polite.call(Op.HEALTH, metrics=True, timeout=10)[0]["metrics"]["send_failures"]
                   .get("EAGAIN", 0) > before, timeout=60)
            header, _ = polite.call(Op.HEALTH, timeout=10)
            assert header["healthy"]
        finally:
            sock.close()
    assert linked.broker.poll() is None


def test_clients_and_agents_on_links_survive_a_broker_kill(tmp_path):
    """As T1 over ZeroMQ: the broker is killed (SIGKILL) and started again; the agent and the client reconnect
    through their links and the work finishes."""
    with _cluster(tmp_path) as processes:
        with armonik_zmq.Client(processes.endpoint) as client:
            assert client.submit(abs, -1).result(30) == 1
            later = client.map(time.sleep, [0.1] * 10)
            processes.kill_broker()
            processes.start_broker()
            processes.wait_ready()
            assert client.gather(later, timeout=60) == [None] * 10
            assert client.submit(abs, -2).result(30) == 2


def test_a_broker_with_keys_refuses_links(tmp_path):
    """A link's peer has no authenticated identity: with CURVE on, links would let any local process past it."""
    create_keys(str(tmp_path / "keys"), ["alice"], ["node"])
    config = BrokerConfig(data_dir=str(tmp_path / "lmdb"), endpoint=f"ipc://{tmp_path}/frontend",
                          agents_endpoint=f"ipc://{tmp_path}/backend", agent_link=f"unix://{tmp_path}/agents.sock",
                          server_secret=str(tmp_path / "keys" / "server.key_secret"),
                          client_keys=str(tmp_path / "keys" / "clients"), agent_keys=str(tmp_path / "keys" / "agents"))
    with pytest.raises(RuntimeError, match="cannot serve links"):
        Broker(config)
    assert not os.path.exists(tmp_path / "agents.sock")
