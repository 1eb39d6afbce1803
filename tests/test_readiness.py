"""The broker's poller (broker/readiness.py): with its peers on links it reads no ROUTER's ZMQ_EVENTS, and a ZeroMQ
peer that comes later is served all the same, also when its messages outnumber a turn's batch and its replies go
out on the ROUTER between them. In-process broker driven turn by turn, a real link peer and a real DEALER."""

from __future__ import annotations

import contextlib
import select
import time

import zmq

from armonik_zmq.broker import Broker
from armonik_zmq.config import BrokerConfig
from armonik_zmq.protocol import Op, decode_header, request
from armonik_zmq.unixlink import LinkDealer


def _linked_broker(tmp_path) -> Broker:
    return Broker(BrokerConfig(data_dir=str(tmp_path / "lmdb"), endpoint=f"ipc://{tmp_path}/f",
                               agents_endpoint=f"ipc://{tmp_path}/b", client_link=f"unix://{tmp_path}/clients.sock",
                               agent_link=f"unix://{tmp_path}/agents.sock", map_size=1 << 24, max_batch_messages=4))


def _served(broker: Broker, replied, timeout: float = 10.0) -> None:
    """Run the broker's turns until ``replied()``."""
    deadline = time.monotonic() + timeout
    while not replied():
        assert time.monotonic() < deadline, "no reply"
        broker.turn(10)


def test_link_peers_leave_the_routers_unread_and_a_zeromq_client_coming_later_is_served(tmp_path):
    broker = _linked_broker(tmp_path)
    linked = LinkDealer(broker.config.client_link, b"linked-client")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        got: list = []

        def link_replies(n: int):
            def replied() -> bool:
                while linked.readable():
                    got.append(decode_header(linked.recv()[0].bytes))
                return len(got) >= n
            return replied

        for rid in range(1, 6):
            linked.send([request(Op.HEALTH, rid)])
            _served(broker, link_replies(rid))
            # every ROUTER was found empty, and nothing fired its fd since: the next turns do not read them
            assert not broker.poller.maybe
        assert [h["rid"] for h in got] == [1, 2, 3, 4, 5]

        # A ZeroMQ client comes now: its messages outnumber a turn's batch (4), so turns leave some in the ROUTER
        # while its replies go out on it; link requests come between.
        dealer.connect(broker.config.endpoint)
        n = 30
        for rid in range(1, n + 1):
            dealer.send(request(Op.HEALTH, rid))
        linked.send([request(Op.HEALTH, 6)])
        answered: list = []

        def dealer_replies() -> bool:
            while dealer.poll(0):
                answered.append(decode_header(dealer.recv())["rid"])
            return len(answered) == n

        _served(broker, dealer_replies)
        _served(broker, link_replies(6))
        assert answered == list(range(1, n + 1)) and got[-1]["rid"] == 6

        # and again after the broker idled on links alone
        _served(broker, lambda: not broker.poller.maybe)
        dealer.send(request(Op.HEALTH, n + 1))
        _served(broker, lambda: dealer.poll(0) and decode_header(dealer.recv())["rid"] == n + 1)
    finally:
        dealer.close(0)
        linked.close()
        broker.close()


@contextlib.contextmanager
def _link_client_and_zeromq_client(tmp_path):
    """A linked broker (a fair queue of 4), a link client it has served once, and a ZeroMQ client connected."""
    broker = _linked_broker(tmp_path)
    linked = LinkDealer(broker.config.client_link, b"linked-client")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        linked.send([request(Op.HEALTH, 1)])
        _served(broker, linked.readable)  # connected and accepted
        assert decode_header(linked.recv()[0].bytes)["rid"] == 1
        dealer.connect(broker.config.endpoint)
        yield broker, linked, dealer
    finally:
        dealer.close(0)
        linked.close()
        broker.close()


def _arrived(broker: Broker) -> None:
    """Wait until the ZeroMQ client's first request, then the link's input, reached the broker (and a moment for the
    rest of what they sent)."""
    deadline = time.monotonic() + 10
    while not broker.poller.arrived(broker.frontend):
        assert time.monotonic() < deadline, "the ZeroMQ client's request did not reach the broker"
        time.sleep(0.01)
    assert select.select([broker.links[broker.frontend].fileno()], [], [], 10)[0], "the link request did not come"
    time.sleep(0.2)


def test_a_link_clients_request_is_taken_in_the_next_turn_while_a_zeromq_client_keeps_the_router_full(tmp_path):
    """The client link is read with the ROUTER: a link client's request joins the next turn even when a ZeroMQ
    client's waiting requests outnumber the fair queue's room (4), which the link used to wait for until the ROUTER
    ran dry (T12b: a polite client on a link, a flooder on ZeroMQ)."""
    with _link_client_and_zeromq_client(tmp_path) as (broker, linked, dealer):
        for rid in range(1, 41):
            dealer.send(request(Op.HEALTH, rid))
        linked.send([request(Op.HEALTH, 2)])
        _arrived(broker)
        broker.turn(0)
        assert select.select([linked.fileno()], [], [], 10)[0] and linked.readable(), \
            "the link client's request waited behind the ZeroMQ client's"
        assert decode_header(linked.recv()[0].bytes)["rid"] == 2
        assert broker.poller.readable(broker.frontend)  # the ZeroMQ client's requests were still waiting


def test_a_zeromq_clients_request_is_taken_in_the_next_turn_while_a_link_client_floods(tmp_path):
    """The converse: a link client's waiting requests outnumber the fair queue's room (4), and a ZeroMQ client's
    request still joins the next turn (the link's and the ROUTER's messages are taken in turn)."""
    with _link_client_and_zeromq_client(tmp_path) as (broker, linked, dealer):
        dealer.send(request(Op.HEALTH, 1))
        for rid in range(2, 42):
            linked.send([request(Op.HEALTH, rid)])
        _arrived(broker)
        broker.turn(0)
        assert dealer.poll(10_000), "the ZeroMQ client's request waited behind the link client's"
        assert decode_header(dealer.recv())["rid"] == 1
