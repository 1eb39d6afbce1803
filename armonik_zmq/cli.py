"""The ``armonik-zmq`` command: up | broker | agent | demo | keys."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Optional

import click

from .config import (DEFAULT_AGENT_NICE, DEFAULT_AGENTS_ENDPOINT, DEFAULT_PARTITION, DEFAULT_PROCESSOR, AgentConfig,
                     BrokerConfig, default_endpoint, load_partitions)

LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
OBJECT_STORAGE_HELP = ("A directory of existing objects that clients may import as result data "
                       "(import_data: opaque ids are paths relative to it). The broker reads, never deletes, them.")


def _setup_logging(level: str, who: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {who}[%(process)d] %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=LOG_LEVELS, default="INFO", show_default=True, help="How much to log (to stderr).")
@click.version_option(package_name="armonik_zmq")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """armonik_zmq: fan compute tasks out to many worker processes, with ArmoniK's semantics.

    Start a local cluster with `armonik-zmq up`, or run `armonik-zmq demo` to see it work.
    """
    ctx.obj = {"log_level": log_level}


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
               "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


class ByteSize(click.ParamType):
    """A size in bytes: 1048576, 1MiB, 64GiB, 1.5TB (powers of 1024 for KiB/MiB/GiB/TiB and K/M/G/T)."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        try:
            size = int(float(number) * _SIZE_UNITS[text[len(number):]])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size: write bytes, or a number with KiB, MiB, GiB or TiB (e.g. 64GiB)",
                      param, ctx)
        if size < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return size


def _partitions(values: tuple[str, ...]) -> tuple[str, ...]:
    parts = tuple(p for v in values for p in v.split(",") if p)
    return parts or (DEFAULT_PARTITION,)


def _configured_partitions(config_file: Optional[str], values: tuple[str, ...]) -> tuple[tuple[str, ...], tuple]:
    """Return the broker's partition ids (the file's, then --partition's new ones) and the file's details."""
    try:
        details = load_partitions(config_file) if config_file else ()
    except ValueError as exc:
        raise click.ClickException(str(exc))
    ids = [p.id for p in details]
    ids += [p for v in values for p in v.split(",") if p and p not in ids]
    return tuple(ids) or (DEFAULT_PARTITION,), details


def _broker_keys(keys: Optional[str], server_secret: Optional[str], client_keys: Optional[str],
                 agent_keys: Optional[str]) -> dict:
    """Return the BrokerConfig key fields: --keys DIR's files, each overridden by its own option."""
    from .security import AGENTS, CLIENTS

    found = {}
    if keys:
        found = {"server_secret": os.path.join(keys, "server.key_secret"), "client_keys": os.path.join(keys, CLIENTS),
                 "agent_keys": os.path.join(keys, AGENTS)}
    for name, value in (("server_secret", server_secret), ("client_keys", client_keys), ("agent_keys", agent_keys)):
        if value:
            found[name] = value
    if found and not found.get("server_secret"):
        raise click.UsageError("--client-keys/--agent-keys need the broker's own key: --server-secret FILE "
                               "(or --keys DIR)")
    return found


KEYS_HELP = ("Turn CURVE on with the key directory made by `armonik-zmq keys DIR`: the broker's secret key "
             "DIR/server.key_secret, the client allow-list DIR/clients/*.key, the agent allow-list DIR/agents/*.key. "
             "Without keys only loopback and ipc:// endpoints may be served.")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--clients", type=click.IntRange(0, 10_000), default=None,
              help="Client key pairs to add, named client-1, client-2, ... [default: 1 for a new directory]")
@click.option("--agents", type=click.IntRange(0, 10_000), default=None,
              help="Agent key pairs to add, named agent-1, agent-2, ... [default: 1 for a new directory]")
@click.option("--client", "client_names", multiple=True, help="Add a client key pair with this name (User-Id "
              "client:NAME); repeatable.")
@click.option("--agent", "agent_names", multiple=True, help="Add an agent key pair with this name (User-Id "
              "agent:NAME); repeatable.")
def keys(directory, clients, agents, client_names, agent_names) -> None:
    """Make CurveZMQ keys in DIRECTORY: the broker's pair (once), and client and agent pairs.

    Files are mode 0600 in directories of mode 0700. Start the broker with `--keys DIRECTORY`;
    give each client DIRECTORY/server.key and its own clients/NAME.key_secret, each agent
    DIRECTORY/server.key and its own agents/NAME.key_secret. Run again to add keys; delete a
    NAME.key file to revoke that key (the broker notices at the next handshake).
    """
    from .security import AGENTS, CLIENTS, SecurityError, create_keys, next_names

    fresh = not os.path.exists(os.path.join(directory, "server.key_secret"))
    if clients is None:
        clients = 1 if fresh and not client_names else 0
    if agents is None:
        agents = 1 if fresh and not agent_names else 0
    try:
        client_list = list(client_names) + next_names(directory, CLIENTS, "client", clients)
        agent_list = list(agent_names) + next_names(directory, AGENTS, "agent", agents)
        created = create_keys(directory, client_list, agent_list)
    except SecurityError as exc:
        raise click.ClickException(str(exc))
    for path in created:
        click.echo(f"created {path}")
    if not created:
        click.echo("nothing to create (the server key exists; ask for --client NAME or --agent NAME)")
    click.echo(f"broker: armonik-zmq broker --keys {directory} ...")
    click.echo(f"agent:  armonik-zmq agent --server-key {os.path.join(directory, 'server.key')} "
               f"--agent-secret {os.path.join(directory, AGENTS, 'NAME.key_secret')} ...")
    click.echo(f"client: armonik_zmq.connect(endpoint, server_key='{os.path.join(directory, 'server.key')}', "
               f"secret='{os.path.join(directory, CLIENTS, 'NAME.key_secret')}')")


@main.command()
@click.option("--data-dir", default="./armonik-zmq-data", show_default=True, type=click.Path(file_okay=False),
              help="LMDB directory holding sessions, tasks, results and data (created if missing).")
@click.option("--endpoint", default=default_endpoint, show_default="$ARMONIK_ZMQ_ENDPOINT or tcp://127.0.0.1:5555",
              help="Where clients connect.")
@click.option("--agents-endpoint", default=DEFAULT_AGENTS_ENDPOINT, show_default=True, help="Where agents connect.")
@click.option("--client-link", default="", metavar="unix:///PATH",
              help="Also serve clients of this host on a Unix socket (its directory is made 0700: the access "
                   "control): no ZeroMQ I/O threads on their messages' way. Clients connect to the same endpoint.")
@click.option("--agent-link", default="", metavar="unix:///PATH",
              help="Also serve agents of this host on a Unix socket (as --client-link); agents use it as --broker.")
@click.option("--link-buffer", type=click.IntRange(1024), default=64 << 20, hidden=True,
              help="Bytes that may wait for one link peer before a send to it fails as a full ZeroMQ pipe does.")
@click.option("--partition", "partitions", multiple=True, help="A partition to serve (repeat or comma-separate); "
              "the first is the default. [default: default]")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Seconds between an agent's heartbeats (any message from it counts as one).")
@click.option("--liveness", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Heartbeats an agent may miss before its tasks go back to the queue.")
@click.option("--lease", type=click.FloatRange(min=0), default=0.0, show_default="heartbeat interval x liveness",
              help="Seconds without a message after which an agent loses its tasks (overrides --liveness).")
@click.option("--backend-sndhwm", type=click.IntRange(1), default=100_000, hidden=True,
              help="Messages queued per agent before a send fails (EAGAIN) and its tasks are requeued.")
@click.option("--no-router-mandatory", is_flag=True, hidden=True,
              help="Test only: let ROUTER sockets drop unroutable messages silently (shows what T7 guards).")
@click.option("--durability", type=click.Choice(["wal", "lmdb"]), default="lmdb", show_default=True,
              help="How a commit is made durable before anything acknowledges it: wal = LMDB commits unflushed and "
                   "the commit's changes are appended to a write-ahead log, flushed once (one small flush; "
                   "checkpoints flush LMDB every second); lmdb = LMDB flushes the commit's pages, then its meta page.")
@click.option("--checkpoint-interval", type=click.FloatRange(min=0.01), default=1.0, hidden=True,
              help="With --durability wal: seconds between two checkpoints (LMDB flushed, the log before recycled).")
@click.option("--no-sync", is_flag=True, help="Flush nothing (no log, no fsync): survives process crashes, not "
              "power loss. Overrides --durability.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="A TOML file of [[partitions]] (id, priority, pod_max, ...); --partition adds more.")
@click.option("--object-storage", type=click.Path(exists=True, file_okay=False), default=None,
              help=OBJECT_STORAGE_HELP)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Serve Prometheus metrics over HTTP on this port (0: off).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True,
              help="Address the metrics HTTP server binds (keep it private: metrics reveal activity).")
@click.option("--turn-budget", type=click.FloatRange(0.0005, 10.0), default=0.01, show_default=True,
              help="Seconds of request handling one loop turn aims at; clients take turns within it, so a "
                   "flooding client delays the others by about this much.")
@click.option("--report-wait", type=click.FloatRange(0.0, 60.0), default=0.002, show_default=True,
              help="Seconds a turn that gave an idle agent its only task may wait, before its commit, for that "
                   "task's report: a short task's submit and completion then take one commit (0: never wait).")
@click.option("--nice", type=click.IntRange(-20, 0), default=0, show_default=True,
              help="A nice value the broker asks for at start (e.g. -5), when lower than its own: it serves every "
                   "task, so on a busy host it would get the CPU first. Needs CAP_SYS_NICE (or RLIMIT_NICE); "
                   "without it the broker keeps its priority. 0: as started.")
@click.option("--max-message-size", type=click.IntRange(1024, 1 << 31), default=64 << 20, show_default=True,
              help="Largest message frame (bytes) a peer may send; a bigger one disconnects the peer.")
@click.option("--map-size", type=ByteSize(), default="64GiB", show_default=True,
              help="Starting LMDB map size (reserved address space, not disk). It doubles when it fills.")
@click.option("--max-map-size", type=ByteSize(), default="0", show_default="64 x --map-size, at least 1TiB",
              help="The LMDB map never grows beyond this; once full there, writes are refused (STORAGE_FULL).")
@click.option("--agent-grace", type=click.FloatRange(0), default=10.0, show_default=True,
              help="After a restart, seconds an agent has to register again and keep the tasks it was running.")
@click.option("--idempotency-ttl", type=click.FloatRange(1), default=900.0, show_default=True,
              help="Seconds a retried creating request (same idempotency key) still gets its first reply.")
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--server-secret", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CURVE: the broker's secret key file (instead of --keys DIR/server.key_secret).")
@click.option("--client-keys", type=click.Path(exists=True, file_okay=False), default=None,
              help="CURVE: directory of allowed client public keys, *.key (instead of --keys DIR/clients).")
@click.option("--agent-keys", type=click.Path(exists=True, file_okay=False), default=None,
              help="CURVE: directory of allowed agent public keys, *.key (instead of --keys DIR/agents).")
@click.option("--shm-threshold", type=click.IntRange(0), default=256 << 10, show_default=True,
              help="Results of at least this many bytes move between processes of this host as sealed memfds "
                   "(never through a socket); 0 turns shared memory off.")
@click.option("--shm-fsync", is_flag=True, help="fsync a shared-memory result's file before acknowledging its task "
              "(survives power loss, costs ~5 ms per MiB here); without it results survive a broker crash.")
@click.option("--shm-grace", type=click.FloatRange(0), default=600.0, show_default=True,
              help="Seconds a shared-memory segment no result names is kept before it is swept (the report of "
                   "its task may still come after a restart); deleted and purged results go at once.")
@click.pass_context
def broker(ctx, data_dir, endpoint, agents_endpoint, client_link, agent_link, link_buffer, partitions, heartbeat_interval,
           liveness, lease, backend_sndhwm, no_router_mandatory, durability, checkpoint_interval, no_sync, config_file, object_storage, metrics_port, metrics_address, max_message_size,
           map_size, max_map_size, agent_grace, idempotency_ttl, keys_dir, server_secret, client_keys,
           agent_keys, shm_threshold, shm_fsync, shm_grace, turn_budget, report_wait, nice) -> None:
    """Run the broker (the control plane) in the foreground."""
    from .broker import Broker
    from .unixlink import is_link

    _setup_logging(ctx.obj["log_level"], "broker")
    if map_size < 64 << 10:
        raise click.BadParameter("must be at least 64KiB", param_hint="--map-size")
    if max_map_size and max_map_size < map_size:
        raise click.BadParameter(f"must be at least --map-size ({map_size} bytes)", param_hint="--max-map-size")
    ids, details = _configured_partitions(config_file, partitions)
    for option, value in (("--client-link", client_link), ("--agent-link", agent_link)):
        if value and not is_link(value):
            raise click.BadParameter(f"expected unix:///PATH, got {value!r}", param_hint=option)
    config = BrokerConfig(data_dir=data_dir, endpoint=endpoint, agents_endpoint=agents_endpoint,
                          client_link=client_link, agent_link=agent_link, link_buffer=link_buffer,
                          partitions=ids, partition_details=details, heartbeat_interval=heartbeat_interval,
                          liveness=liveness, lease=lease, backend_sndhwm=backend_sndhwm,
                          router_mandatory=not no_router_mandatory, sync=not no_sync, durability=durability,
                          checkpoint_interval=checkpoint_interval,
                          object_storage=object_storage or "", metrics_port=metrics_port,
                          metrics_address=metrics_address, max_message_size=max_message_size, map_size=map_size,
                          max_map_size=max_map_size, agent_grace=agent_grace, idempotency_ttl=idempotency_ttl,
                          shm_threshold=shm_threshold, shm_fsync=shm_fsync, shm_grace=shm_grace,
                          turn_budget=turn_budget, report_wait=report_wait, nice=nice, **_broker_keys(keys_dir, server_secret, client_keys, agent_keys))
    try:
        server = Broker(config)
    except RuntimeError as exc:
        raise click.ClickException(str(exc))
    server.install_signal_handlers()
    server.run()


@main.command()
@click.option("--broker", "broker_endpoint", default=DEFAULT_AGENTS_ENDPOINT, show_default=True,
              help="The broker's agents endpoint, or on the broker's host its agent link (unix:///PATH: "
                   "broker --agent-link).")
@click.option("--workers", type=click.IntRange(1, 4096), default=os.cpu_count() or 1,
              show_default="number of CPUs", help="Worker processes to start.")
@click.option("--processor", default=DEFAULT_PROCESSOR, show_default=True,
              help="The task processor, as MODULE:FUNCTION (it must be importable by the workers).")
@click.option("--partition", "partitions", multiple=True, help="A partition to serve (repeat or comma-separate). "
              "[default: default]")
@click.option("--window", type=click.IntRange(0, 64), default=1, show_default=True,
              help="Tasks queued at each worker beyond the running one.")
@click.option("--tiny-window", type=click.IntRange(0, 256), default=64, show_default=True,
              help="The window while tasks run under a millisecond (sent and reported in batches); not with "
              "--window 0.")
@click.option("--prefetch", type=click.IntRange(0, 100_000), default=64, show_default=True,
              help="Tasks held with their inputs fetched, beyond those queued at workers.")
@click.option("--tiny-prefetch", type=click.IntRange(0, 100_000), default=512, show_default=True,
              help="The prefetch while tasks run under a millisecond (when larger than --prefetch).")
@click.option("--report-max", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Most completions in one report to the broker: a client's request waits at most for one report.")
@click.option("--agent-id", default="", help="This agent's name, shown as the owner of the tasks it runs. "
              "[default: HOSTNAME-PID-RANDOM]")
@click.option("--outage-tolerance", type=click.FloatRange(1), default=60.0, show_default=True,
              help="Seconds the agent keeps running its tasks while the broker is unreachable; past that it stops "
              "them.")
@click.option("--rcvhwm", type=click.IntRange(0), default=0, hidden=True,
              help="Messages from the broker queued here before it must wait (0: no limit; tests lower it).")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CURVE: the broker's public key file (server.key of the broker's key directory).")
@click.option("--agent-secret", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CURVE: this agent's secret key file (agents/NAME.key_secret); its User-Id is agent:NAME.")
@click.option("--nice", type=click.IntRange(0, 19), default=DEFAULT_AGENT_NICE, show_default=True,
              help="Nice value of the agent and its workers: on a busy host the broker and the clients run first; "
              "idle CPUs still run the tasks. 0 keeps the nice value the agent was started with.")
@click.pass_context
def agent(ctx, broker_endpoint, workers, processor, partitions, window, tiny_window, prefetch, tiny_prefetch, report_max,
          agent_id, outage_tolerance, rcvhwm, server_key, agent_secret, nice) -> None:
    """Run an agent and its worker processes (one per node of a multi-node cluster)."""
    from .agent import Agent
    from .worker.runtime import load_processor

    _setup_logging(ctx.obj["log_level"], "agent")
    try:
        load_processor(processor)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    try:
        server = Agent(AgentConfig(broker=broker_endpoint, workers=workers, processor=processor,
                                   partitions=_partitions(partitions), window=window, tiny_window=tiny_window, prefetch=prefetch,
                                   tiny_prefetch=tiny_prefetch, report_max=report_max,
                                   agent_id=agent_id, outage_tolerance=outage_tolerance, rcvhwm=rcvhwm,
                                   server_key=server_key or "", agent_secret=agent_secret or "", nice=nice))
    except RuntimeError as exc:
        raise click.ClickException(str(exc))
    server.install_signal_handlers()
    server.run()


@main.command()
@click.option("--data-dir", default="./armonik-zmq-data", show_default=True, type=click.Path(file_okay=False),
              help="LMDB directory (created if missing; reused across restarts).")
@click.option("--endpoint", default=default_endpoint, show_default="$ARMONIK_ZMQ_ENDPOINT or tcp://127.0.0.1:5555",
              help="Where clients connect.")
@click.option("--agents-endpoint", default=DEFAULT_AGENTS_ENDPOINT, show_default=True, help="Where the agent connects.")
@click.option("--workers", type=click.IntRange(1, 4096), default=os.cpu_count() or 1, show_default="number of CPUs",
              help="Worker processes.")
@click.option("--processor", default=DEFAULT_PROCESSOR, show_default=True, help="The task processor, MODULE:FUNCTION.")
@click.option("--object-storage", type=click.Path(exists=True, file_okay=False), default=None,
              help=OBJECT_STORAGE_HELP)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="A TOML file of [[partitions]] for the broker; the agent serves all of them.")
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Turn CURVE on with this key directory (see `armonik-zmq keys`): the broker uses it as with "
              "`broker --keys`, the agent the first key of DIR/agents. Needed to serve a non-loopback address.")
@click.option("--links/--no-links", default=None, show_default="--links unless --keys",
              help="Wire the agent through a Unix-socket link (broker --agent-link) and serve clients of this host on "
                   "one too (broker --client-link), instead of ZeroMQ: no ZeroMQ I/O threads on those hops. Not "
                   "with --keys (a link has no authenticated identity).")
@click.pass_context
def up(ctx, data_dir, endpoint, agents_endpoint, workers, processor, object_storage, config_file, keys_dir,
       links) -> None:
    """Run a local cluster in the foreground: broker + one agent + N workers. Ctrl-C stops it."""
    from .cluster import LocalProcesses

    partitions, _ = _configured_partitions(config_file, ())
    if links and keys_dir:
        raise click.BadParameter("links carry no authenticated identity: use --no-links with --keys",
                                 param_hint="--links")
    try:
        cluster = LocalProcesses(data_dir=data_dir, endpoint=endpoint, agents_endpoint=agents_endpoint,
                                 workers=workers, processor=processor, log_level=ctx.obj["log_level"],
                                 broker_args=(("--object-storage", object_storage) if object_storage else ())
                                 + (("--config", config_file) if config_file else ()),
                                 agent_args=("--partition", ",".join(partitions)), keys_dir=keys_dir, links=links)
    except RuntimeError as exc:
        raise click.ClickException(str(exc))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        cluster.start()
        on_host = f" (on this host also {cluster.client_link})" if cluster.links else ""
        click.echo(f"armonik_zmq is up: clients connect to {endpoint}{on_host} ({workers} workers, data in "
                   f"{data_dir}). Ctrl-C to stop.", err=True)
        while not stopping:
            for name, proc in (("broker", cluster.broker), ("agent", cluster.agent)):
                if proc.poll() is not None:
                    raise click.ClickException(f"the {name} exited with code {proc.returncode}; stopping")
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc))
    finally:
        click.echo("stopping the cluster...", err=True)
        cluster.cleanup()


@main.command()
@click.option("--endpoint", default=None, help="A running cluster to use. Without it, a local cluster is started "
              "on a temporary LMDB directory for the demo and stopped after.")
@click.option("--tasks", "n", type=click.IntRange(1, 100_000), default=20, show_default=True,
              help="Tasks in the fan-out.")
@click.option("--workers", type=click.IntRange(1, 4096), default=2, show_default=True,
              help="Workers of the local cluster (when one is started).")
@click.pass_context
def demo(ctx, endpoint, n, workers) -> None:
    """Run a small real workload and print what happened.

    A fan-out of tasks, a task with dependencies, a delayed upload, a task whose subtasks take over
    its output, and a task that fails.
    """
    from .cluster import LocalProcesses
    from .demo import run_demo

    cluster = None
    if endpoint is None:
        click.echo(f"starting a local cluster ({workers} workers) on a temporary LMDB directory...")
        cluster = LocalProcesses(workers=workers, log_level="WARNING")
        try:
            cluster.start()
        except (RuntimeError, TimeoutError) as exc:
            cluster.cleanup()
            raise click.ClickException(str(exc))
        endpoint = cluster.endpoint
    try:
        run_demo(endpoint, n=n, echo=click.echo)
        click.echo("demo finished: every step behaved as expected.")
    finally:
        if cluster is not None:
            cluster.cleanup()


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--tasks", "n_tasks", type=click.IntRange(0), default=20, show_default=True,
              help="List this many unfinished tasks (id and status).")
@click.option("--by-status", is_flag=True, help="Count every task by status (reads every task row).")
@click.option("--readers", "show_readers", is_flag=True, help="Show LMDB's reader slots (pid, snapshot).")
@click.option("--watch", type=click.FloatRange(min=0.01), default=None, metavar="SECONDS",
              help="Repeat every SECONDS until Ctrl-C or SIGTERM.")
@click.option("--count", type=click.IntRange(1), default=None, help="With --watch: stop after this many snapshots.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per snapshot, one per line.")
def inspect(data_dir, n_tasks, by_status, show_readers, watch, count, as_json) -> None:
    """Show what a broker's LMDB directory DATA_DIR holds, read-only (safe while the broker runs).

    Table sizes, map size and use, reader slots, and the unfinished tasks. When the broker grows
    its map meanwhile, the next snapshot picks up the new size (MapResizedError handled).
    """
    import json

    from .inspector import Inspector, format_snapshot

    try:
        inspector = Inspector(data_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    shown = 0
    try:
        while not stopping:
            snap = inspector.snapshot(tasks=n_tasks, by_status=by_status)
            shown += 1
            if as_json:
                click.echo(json.dumps(snap, separators=(",", ":")))
            else:
                click.echo(format_snapshot(snap, inspector.readers() if show_readers else None))
            if watch is None or (count is not None and shown >= count):
                break
            time.sleep(watch)
    except KeyboardInterrupt:
        pass
    finally:
        inspector.close()


if __name__ == "__main__":
    main()
