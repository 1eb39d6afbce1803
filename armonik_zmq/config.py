"""Tunables of the broker and the agent, as frozen dataclasses with the defaults a user gets."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from .protocol import DATA_CHUNK_MAX_SIZE

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_AGENTS_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_PARTITION = "default"
DEFAULT_PROCESSOR = "armonik_zmq.processors:processor"


def default_endpoint() -> str:
    """The client endpoint: env ``ARMONIK_ZMQ_ENDPOINT``, else ``tcp://127.0.0.1:5555``."""
    return os.environ.get("ARMONIK_ZMQ_ENDPOINT") or DEFAULT_ENDPOINT


@dataclass(frozen=True)
class PartitionConfig:
    """A partition as ArmoniK's PartitionRaw describes it.

    Only ``id`` drives behaviour (routing); the other fields are informative, shown by
    ``ListPartitions``/``GetPartition``.
    """

    id: str
    parent_partition_ids: tuple[str, ...] = ()
    pod_reserved: int = 0
    pod_max: int = 0
    pod_configuration: tuple[tuple[str, str], ...] = ()
    preemption_percentage: int = 0
    priority: int = 0


_PARTITION_INTS = ("pod_reserved", "pod_max", "preemption_percentage", "priority")


def _partition_from_toml(table: object, where: str) -> PartitionConfig:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(table) - {"id", "parent_partition_ids", "pod_configuration", *_PARTITION_INTS})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    pid = table.get("id")
    if not isinstance(pid, str) or not pid or "," in pid:
        raise ValueError(f"{where}.id must be a non-empty string without commas")
    for name in _PARTITION_INTS:
        value = table.get(name, 0)
        if type(value) is not int or value < 0:
            raise ValueError(f"{where}.{name} must be a non-negative integer, got {value!r}")
    if not 0 <= table.get("preemption_percentage", 0) <= 100:
        raise ValueError(f"{where}.preemption_percentage must be within 0..100")
    parents = table.get("parent_partition_ids", [])
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ValueError(f"{where}.parent_partition_ids must be a list of strings")
    pod_configuration = table.get("pod_configuration", {})
    if not isinstance(pod_configuration, dict) or not all(isinstance(v, str) for v in pod_configuration.values()):
        raise ValueError(f"{where}.pod_configuration must be a table of strings")
    return PartitionConfig(id=pid, parent_partition_ids=tuple(parents),
                           pod_configuration=tuple(sorted(pod_configuration.items())),
                           **{name: table.get(name, 0) for name in _PARTITION_INTS})


def load_partitions(path: str) -> tuple[PartitionConfig, ...]:
    """Read the partitions of a broker configuration file (TOML), in order; the first is the default one.

    The file holds one ``[[partitions]]`` table per partition, with PartitionRaw's fields::

        [[partitions]]
        id = "gpu"
        priority = 2
        pod_max = 10
        pod_configuration = { image = "worker:gpu" }

    Raises:
        ValueError: the file cannot be read or is not such a configuration (the message says where).
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"partitions"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} (expected [[partitions]] tables)")
    tables = doc.get("partitions", [])
    if not isinstance(tables, list):
        raise ValueError(f"{path}: 'partitions' must be an array of tables ([[partitions]])")
    partitions = tuple(_partition_from_toml(t, f"{path}: partitions[{i}]") for i, t in enumerate(tables))
    ids = [p.id for p in partitions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: a partition id appears twice in {ids}")
    return partitions


@dataclass(frozen=True)
class BrokerConfig:
    data_dir: str = "./armonik-zmq-data"
    #: where clients connect (ROUTER "frontend")
    endpoint: str = DEFAULT_ENDPOINT
    #: where agents connect (ROUTER "backend")
    agents_endpoint: str = DEFAULT_AGENTS_ENDPOINT
    #: Unix-socket links (unixlink.py) where clients and agents of this host may connect too, beside the
    #: ZeroMQ endpoints ("unix:///path/to.sock"; "" = none)
    client_link: str = ""
    agent_link: str = ""
    #: bytes that may wait for one link peer before a send to it fails as a full ZeroMQ pipe does (EAGAIN)
    link_buffer: int = 64 << 20
    #: partitions that exist; sessions may only use these. The first is the default one.
    partitions: tuple[str, ...] = (DEFAULT_PARTITION,)
    #: the informative fields of some of ``partitions`` (from ``--config``); the others have zeros
    partition_details: tuple[PartitionConfig, ...] = ()
    #: LMDB map size at start; it is only reserved address space until pages are written. It doubles
    #: when it fills, up to ``max_map_size``.
    map_size: int = 64 << 30
    #: the map never grows beyond this (0: 64 times ``map_size``, at least 1 TiB)
    max_map_size: int = 0
    #: seconds between two sweeps of the reader slots left by dead processes (LMDB reader_check)
    reader_check_interval: float = 5.0
    #: make commits durable (``durability``); False: nothing is flushed, which survives process crashes but not
    #: power loss (durability "none")
    sync: bool = True
    #: how a commit is made durable when ``sync`` (store.DURABILITY_MODES, docs/durability.md): "wal" (a
    #: write-ahead log record, one small flush) or "lmdb" (LMDB's own two flushes of the commit's pages)
    durability: str = "lmdb"
    #: with the write-ahead log: seconds between two checkpoints (broker/wal.py says why 1 s)
    checkpoint_interval: float = 1.0
    data_chunk_max_size: int = DATA_CHUNK_MAX_SIZE
    #: directory that ImportResultsData takes existing objects from ("" = no object storage)
    object_storage: str = ""
    #: inputs up to this size travel inside DISPATCH; larger ones are fetched by the agent
    inline_limit: int = 1 << 20
    #: agents send a heartbeat this often (seconds)
    heartbeat_interval: float = 1.0
    #: heartbeats an agent may miss (any message counts as one) before it loses its tasks (Paranoid Pirate)
    liveness: int = 3
    #: an agent silent for this long loses its tasks (seconds); 0 = heartbeat_interval x liveness
    lease: float = 0.0
    #: messages queued for one agent before a send fails with EAGAIN (its tasks then go back to the queue)
    backend_sndhwm: int = 100_000
    #: test only (hidden flag): False shows what silent ROUTER drops look like (RELIABILITY.md T7 guard)
    router_mandatory: bool = True
    #: most messages received and held waiting for a turn (the rest wait in ZeroMQ's pipes)
    max_batch_messages: int = 1024
    #: seconds of request handling a loop turn aims at: peers take turns within it, so one peer's flood
    #: or big requests delay the others by about this much (broker/fairness.py)
    turn_budget: float = 0.01
    #: seconds a turn that gave an idle agent its only task may wait, before its commit, for that task's report
    #: (one commit for the submit and the completion of a short task; 0: never wait; broker/reportwait.py)
    report_wait: float = 0.002
    #: a nice value the broker asks for at start when lower than its own (more CPU when the host is busy: it
    #: serves every task). Needs CAP_SYS_NICE or RLIMIT_NICE; without, it stays. 0: as started (the default:
    #: -5 showed no gain in T15 measured under other load, see broker/server.py ask_for_nice).
    nice: int = 0
    #: largest message frame a peer may send (bytes): a bigger one disconnects the peer (ZMQ_MAXMSGSIZE).
    #: Data travels in frames of data_chunk_max_size, so only a broken or hostile peer reaches it.
    max_message_size: int = 64 << 20
    #: serve Prometheus metrics over HTTP on this port (0: off)
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    #: seconds an idempotency key (and the reply it replays) is kept after its request was applied
    idempotency_ttl: float = 900.0
    #: after a restart, seconds an agent has to register again and keep the tasks it held
    agent_grace: float = 10.0
    #: CURVE: the broker's secret key file (server.key_secret); "" = NULL security, loopback/ipc endpoints only
    server_secret: str = ""
    #: CURVE: directory of the allowed client public keys (*.key); each key's User-Id is client:<file name>
    client_keys: str = ""
    #: CURVE: directory of the allowed agent public keys (*.key); each key's User-Id is agent:<file name>
    agent_keys: str = ""
    #: results at least this big move as sealed memfds between processes of this host (0: off; shm.py)
    shm_threshold: int = 256 << 10
    #: fsync a shared-memory result's file before acknowledging its task (survives power loss; slower)
    shm_fsync: bool = False
    #: seconds a segment file no result names is kept (a report re-sent after a restart may still claim it)
    shm_grace: float = 600.0

    def __post_init__(self):
        if self.heartbeat_interval <= 0 or self.liveness < 1:
            raise ValueError(f"heartbeat_interval must be > 0 and liveness >= 1 (got {self.heartbeat_interval:g}, "
                             f"{self.liveness})")
        if not self.lease:
            # frozen: the derived default is set once, here
            object.__setattr__(self, "lease", self.heartbeat_interval * self.liveness)


#: the agents' and workers' nice value by default (AgentConfig.nice)
DEFAULT_AGENT_NICE = 10


@dataclass(frozen=True)
class AgentConfig:
    #: the broker's backend endpoint
    broker: str = DEFAULT_AGENTS_ENDPOINT
    workers: int = 2
    processor: str = DEFAULT_PROCESSOR
    partitions: tuple[str, ...] = (DEFAULT_PARTITION,)
    #: tasks queued at each worker beyond the running one, so a worker never waits for the next
    window: int = 1
    #: the window while tasks run under a millisecond: they travel and are reported in batches this deep
    tiny_window: int = 64
    #: tasks held (inputs fetched) beyond those queued at workers: one broker round trip then moves
    #: this many tasks instead of a handful, which is what keeps short tasks flowing
    prefetch: int = 64
    #: the prefetch while tasks run under a millisecond: the broker then moves hundreds of tasks per turn (one
    #: commit), not a few dozen; the agent asks for it, and for its own back once tasks get longer
    tiny_prefetch: int = 512
    #: most completions in one TASKS_DONE: the broker handles a report in one piece, a client's request that
    #: comes meanwhile waits for it (about 20 us per completion), so reports of many tiny tasks go in pieces
    report_max: int = 64
    agent_id: str = ""
    #: seconds between re-registration attempts when the broker does not answer (capped backoff)
    reconnect_max: float = 2.0
    #: seconds without any word from the broker after which the agent stops the tasks it holds (until
    #: then they keep running through the outage and are reported once the broker is back)
    outage_tolerance: float = 60.0
    #: extra environment for worker processes
    worker_env: dict = field(default_factory=dict)
    #: messages the broker may queue at this agent (0: no limit); tests lower it (RELIABILITY.md T7)
    rcvhwm: int = 0
    #: CURVE: the broker's public key file (server.key) and this agent's secret key file ("" = NULL security)
    server_key: str = ""
    agent_secret: str = ""
    #: nice value of the agent and its workers (agent/pool.py run_below): on a busy host the broker and the
    #: clients run first, idle CPUs still run the tasks. 0: as started
    nice: int = DEFAULT_AGENT_NICE

    def __post_init__(self):
        if self.report_max < 1:
            raise ValueError(f"report_max must be >= 1 (got {self.report_max})")
