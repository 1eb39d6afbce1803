"""Tunables of the broker and the agent, as frozen dataclasses with the defaults a user gets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .protocol import DATA_CHUNK_MAX_SIZE

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_AGENTS_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_PARTITION = "default"
DEFAULT_PROCESSOR = "armonik_zmq.demo:processor"


def default_endpoint() -> str:
    """The client endpoint: env ``ARMONIK_ZMQ_ENDPOINT``, else ``tcp://127.0.0.1:5555``."""
    return os.environ.get("ARMONIK_ZMQ_ENDPOINT") or DEFAULT_ENDPOINT


@dataclass(frozen=True)
class BrokerConfig:
    data_dir: str = "./armonik-zmq-data"
    #: where clients connect (ROUTER "frontend")
    endpoint: str = DEFAULT_ENDPOINT
    #: where agents connect (ROUTER "backend")
    agents_endpoint: str = DEFAULT_AGENTS_ENDPOINT
    #: partitions that exist; sessions may only use these. The first is the default one.
    partitions: tuple[str, ...] = (DEFAULT_PARTITION,)
    #: LMDB map size; it is only reserved address space until pages are written.
    map_size: int = 64 << 30
    #: fsync every commit (durable). False survives process crashes but not power loss.
    sync: bool = True
    data_chunk_max_size: int = DATA_CHUNK_MAX_SIZE
    #: inputs up to this size travel inside DISPATCH; larger ones are fetched by the agent
    inline_limit: int = 1 << 20
    #: agents send a heartbeat this often (seconds)
    heartbeat_interval: float = 1.0
    #: an agent silent for this long loses its tasks (seconds)
    lease: float = 5.0
    #: most messages handled per loop turn (one LMDB transaction per turn)
    max_batch_messages: int = 1024
    #: largest message a peer may send (bytes)
    max_message_size: int = 1 << 30


@dataclass(frozen=True)
class AgentConfig:
    #: the broker's backend endpoint
    broker: str = DEFAULT_AGENTS_ENDPOINT
    workers: int = 2
    processor: str = DEFAULT_PROCESSOR
    partitions: tuple[str, ...] = (DEFAULT_PARTITION,)
    #: tasks queued at each worker beyond the running one, so a worker never waits for the next
    window: int = 1
    #: tasks held (inputs fetched) beyond those queued at workers: one broker round trip then moves
    #: this many tasks instead of a handful, which is what keeps short tasks flowing
    prefetch: int = 64
    agent_id: str = ""
    #: seconds between re-registration attempts when the broker does not answer (capped backoff)
    reconnect_max: float = 2.0
    #: extra environment for worker processes
    worker_env: dict = field(default_factory=dict)
