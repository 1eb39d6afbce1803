"""The broker's side of the agents' protocol, spoken by hand on a real ROUTER socket, to test a real agent.

A test binds it where the agent connects, answers the agent's REGISTER, sends DISPATCHes and reads the
agent's requests, answering (or not) exactly as the case it checks needs.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Iterator

import zmq

from armonik_zmq.client import TaskOptions
from armonik_zmq.protocol import DATA_CHUNK_MAX_SIZE, Op, decode_header, reply_ok, request
from armonik_zmq.status import SessionStatus, TaskStatus

OPTIONS = TaskOptions(max_duration=timedelta(seconds=60), priority=1, max_retries=1).to_wire()


class ScriptedBroker:
    """A ROUTER bound to ``endpoint``, with the broker's socket options."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the broker's (broker/server.py)
        self.sock.bind(endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def requests(self, seconds: float) -> Iterator[tuple[bytes, dict]]:
        """The agent's requests (sender, header) for ``seconds``; none is answered here."""
        deadline = time.monotonic() + seconds
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            peer, raw, *_ = self.sock.recv_multipart()
            yield peer, decode_header(raw)

    def next_request(self, op: Op, seconds: float = 30) -> tuple[bytes, dict]:
        for peer, header in self.requests(seconds):
            if header["op"] == op:
                return peer, header
        raise AssertionError(f"no {op.name} from the agent in time")

    def register(self, peer: bytes, header: dict, lease: float) -> bytes:
        """Answer a REGISTER (and the ones the agent sends again meanwhile) until the agent heartbeats: registered."""
        while True:
            self.sock.send_multipart([peer, reply_ok(Op.AGENT_REGISTER, header["rid"], heartbeat_interval=0.2,
                                                     lease=lease, data_chunk_max_size=DATA_CHUNK_MAX_SIZE, kept=0)])
            for peer, header in self.requests(30):
                if header["op"] in (Op.AGENT_HEARTBEAT, Op.AGENT_REGISTER):
                    break
            else:
                raise AssertionError("the agent neither registered nor asked again in time")
            if header["op"] == Op.AGENT_HEARTBEAT:
                return peer

    def dispatch(self, peer: bytes, attempts: list[tuple[str, int]]) -> None:
        """Hand the agent one DISPATCH of ``sha256:TASK_ID:`` tasks (tests/processors.py), payloads inline."""
        tasks = [{"task_id": task_id, "attempt": attempt, "session_id": "s",
                  "session_status": int(SessionStatus.RUNNING), "status": int(TaskStatus.DISPATCHED),
                  "payload_id": f"{task_id}-in", "data_dependencies": [], "expected_output_ids": [f"{task_id}-out"],
                  "options": 0, "retry_of_ids": [], "initial_task_id": task_id, "inline": [f"{task_id}-in"]}
                 for task_id, attempt in attempts]
        self.sock.send_multipart([peer, request(Op.DISPATCH, 0, tasks=tasks, options=[OPTIONS], frames=[1] * len(tasks)),
                                  *(f"sha256:{task_id}:".encode() for task_id, _ in attempts)])

    def ack_done(self, peer: bytes, header: dict) -> None:
        """Accept every completion of a TASKS_DONE."""
        self.sock.send_multipart([peer, reply_ok(Op.TASKS_DONE, header["rid"],
                                                 accepted=[c["task_id"] for c in header["tasks"]], refused=[])])
