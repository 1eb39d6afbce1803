"""The broker's turn batches (broker/fairness.py): clients' requests ahead of agents' reports.

The queue is fed real ZeroMQ frames as the broker's sockets receive them (routing id, header, data).
"""

from __future__ import annotations

import zmq

from armonik_zmq.broker.fairness import CLIENTS, FairQueue

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
        assert fair.waiting == 0
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
