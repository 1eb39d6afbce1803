"""The broker's turn batches (broker/fairness.py): clients' requests ahead of agents' reports.

The queue is fed real ZeroMQ frames as the broker's sockets receive them (routing id, header, data);
the turn test runs a real broker (its sockets and LMDB) one turn at a time.
"""

from __future__ import annotations

import contextlib
import time

import zmq

from armonik_zmq.broker.fairness import CLIENTS, LOOK_EVERY, FairQueue
from armonik_zmq.broker.server import Broker
from armonik_zmq.config import BrokerConfig
from armonik_zmq.protocol import Op, decode_header, request

AGENTS = 1


def message(peer: bytes, header_bytes: int) -> list:
    return [zmq.Frame(peer), zmq.Frame(b"h" * header_bytes)]


def peers_of(batch: list) -> list:
    return [frames[0].bytes for _, frames in batch]


def test_clients_requests_come_before_the_agents_reports_they_arrived_with():
    ctx = zmq.Context.instance()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        fair = FairQueue(budget=0.01, max_messages=100)
        for a in range(4):  # four agents' reports of many completions, received before the client's request
            fair.add(AGENTS, backend, message(b"agent%d" % a, 1000))
        fair.add(CLIENTS, frontend, message(b"client", 100))
        batch, _ = fair.take()
        # the client's request first, then the agents' reports in the order they came
        assert peers_of(batch) == [b"client", b"agent0", b"agent1", b"agent2", b"agent3"]
        assert fair.waiting == 0 and fair.clients_ahead(batch) == 1
    finally:
        frontend.close(0)
        backend.close(0)


def test_a_newcomer_replaces_the_rest_of_the_turn_which_comes_first_in_the_next():
    ctx = zmq.Context.instance()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        fair = FairQueue(budget=0.01, max_messages=100)
        for a in range(3):
            fair.add(AGENTS, backend, message(b"agent%d" % a, 10))
        fair.add(AGENTS, backend, message(b"agent2", 10))
        batch, _ = fair.take()
        assert peers_of(batch) == [b"agent0", b"agent1", b"agent2", b"agent2"]
        fair.add(CLIENTS, frontend, message(b"client", 100))  # arrives while agent0's report is handled
        fair.preempt(batch, 1)
        assert peers_of(batch) == [b"agent0", b"client"]
        # the reports put back come first in the next turn, each peer's in its order
        batch, _ = fair.take()
        assert peers_of(batch) == [b"agent1", b"agent2", b"agent2"] and fair.waiting == 0
    finally:
        frontend.close(0)
        backend.close(0)


def test_a_light_client_comes_first_in_the_short_turn_made_for_it():
    """T15's pattern: four agents each have reports waiting, and the client's next request comes after them (a
    peer with nothing waiting joins at the back of the rotation). The turn is cut short for the client: it must be
    in that turn, not behind one short turn per agent (each a commit of its own). The agents' rotation goes on
    where it was."""
    ctx = zmq.Context.instance()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        fair = FairQueue(budget=0.01, max_messages=100)
        fair.record(0.01, 10_000)  # 1 us per unit: a report below is ~1.3 ms, a short turn (2.5 ms) holds two
        for _ in range(4):
            for a in range(4):
                fair.add(AGENTS, backend, message(b"agent%d" % a, 1000))
        batch, _ = fair.take()  # a full turn (10 ms): two reports of each agent, in rotation
        assert peers_of(batch) == [b"agent%d" % a for a in range(4)] * 2
        fair.add(CLIENTS, frontend, message(b"client", 1000))
        batch, _ = fair.take()
        # a short turn, and the client's request in it: first, then the next agent's report
        assert peers_of(batch) == [b"client", b"agent0"] and fair.clients_ahead(batch) == 1
        # the agents' rotation is unchanged by the client's turn
        fair.add(AGENTS, backend, message(b"agent4", 1000))  # a light agent: the turn is short, in rotation order
        batch, _ = fair.take()
        assert peers_of(batch) == [b"agent1", b"agent2"]
    finally:
        frontend.close(0)
        backend.close(0)


OPTIONS = {"max_duration": 5.0, "priority": 1, "max_retries": 1}


@contextlib.contextmanager
def serving(tmp_path, *sides: str):
    """A broker on a fresh LMDB directory, and one DEALER connected to it per side ("client" or "agent")."""
    config = BrokerConfig(data_dir=str(tmp_path / "lmdb"), endpoint=f"ipc://{tmp_path}/f",
                          agents_endpoint=f"ipc://{tmp_path}/b", map_size=1 << 24)
    broker = Broker(config)
    ctx = zmq.Context.instance()
    socks = [ctx.socket(zmq.DEALER) for _ in sides]
    try:
        for sock, side in zip(socks, sides):
            sock.connect(config.endpoint if side == "client" else config.agents_endpoint)
        yield broker, socks
    finally:
        for sock in socks:
            sock.close(0)
        broker.close()


def _turn_with(broker: Broker, sent: list) -> None:
    """Run one broker turn once every message of ``sent`` (DEALER, broker's socket, header) waits on the broker."""
    for sock, _, header in sent:
        sock.send(header)
    deadline = time.monotonic() + 10
    while not all(broker.poller.arrived(theirs) for _, theirs, _ in sent):  # its own look: see broker/readiness.py
        assert time.monotonic() < deadline, "the messages did not reach the broker"
        time.sleep(0.01)
    broker.turn(0)


def test_a_turn_commits_and_answers_its_clients_before_it_handles_the_agents_reports(tmp_path):
    """A turn with a client's request and an agent's report is two commits, the client's first; a turn with only
    one kind is one commit."""
    with serving(tmp_path, "client", "agent") as (broker, (client, agent)):
        order: list = []
        state = broker.state

        def handled_by(kind):  # what the client had received, and the commits done, when a request is handled
            def wrap(fn):
                def handle(req, txn):
                    order.append((kind, broker.stats["commits"], bool(client.poll(2000 if kind == "agent" else 0))))
                    return fn(req, txn)
                return handle
            return wrap

        broker.handlers[Op.CREATE_SESSION] = handled_by("client")(broker.handlers[Op.CREATE_SESSION])
        broker.handlers[Op.AGENT_REGISTER] = handled_by("agent")(broker.handlers[Op.AGENT_REGISTER])
        _turn_with(broker, [(agent, broker.backend, request(Op.AGENT_REGISTER, 1, agent_id="a1", capacity=1)),
                            (client, broker.frontend, request(Op.CREATE_SESSION, 1, default_task_options=OPTIONS))])
        assert broker.state is state and broker.stats["turns"] == 1 and broker.stats["commits"] == 2
        # the client's request was handled first, committed and answered before the agent's report was handled
        assert order == [("client", 0, False), ("agent", 1, True)]
        assert decode_header(client.recv_multipart()[-1])["ok"] and decode_header(agent.recv_multipart()[-1])["ok"]
        _turn_with(broker, [(client, broker.frontend, request(Op.CREATE_SESSION, 2, default_task_options=OPTIONS))])
        assert broker.stats["turns"] == 2 and broker.stats["commits"] == 3
        _turn_with(broker, [(agent, broker.backend, request(Op.AGENT_HEARTBEAT, 2, agent_id="a1"))])
        assert broker.stats["turns"] == 3 and broker.stats["commits"] == 4
        reply = decode_header(client.recv_multipart()[-1])
        assert reply["rid"] == 2 and reply["ok"]


def test_a_client_that_comes_during_a_parts_last_message_joins_its_commit(tmp_path):
    """A client whose request arrives while the last message of a turn's part is handled (for longer than
    LOOK_EVERY) is handled in that part and answered after its commit: one commit, both clients answered by
    the end of the turn (it used to wait for that commit, then a turn of its own)."""
    with serving(tmp_path, "client", "client") as (broker, (first, late)):
        create = broker.handlers[Op.CREATE_SESSION]

        def slow_first(req, txn):  # the late client's request reaches the broker while this one is handled
            if req.rid == 1:
                late.send(request(Op.CREATE_SESSION, 2, default_task_options=OPTIONS))
                deadline = time.monotonic() + 10
                while not broker.poller.arrived(broker.frontend):
                    assert time.monotonic() < deadline, "the late request did not reach the broker"
                    time.sleep(0.001)
                time.sleep(2 * LOOK_EVERY)  # handled for longer than LOOK_EVERY, even when the request came at once
            return create(req, txn)

        broker.handlers[Op.CREATE_SESSION] = slow_first
        _turn_with(broker, [(first, broker.frontend, request(Op.CREATE_SESSION, 1, default_task_options=OPTIONS))])
        assert broker.stats["turns"] == 1 and broker.stats["commits"] == 1
        for sock, rid in ((first, 1), (late, 2)):
            # sent in the turn (no other turn runs); ZeroMQ's I/O thread delivers it a moment later
            assert sock.poll(2000), f"client {rid} was not answered at the end of the turn ({broker.stats})"
            reply = decode_header(sock.recv_multipart()[-1])
            assert reply["rid"] == rid and reply["ok"]
