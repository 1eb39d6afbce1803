"""The floor of a lone task's round trip: what four Python processes in a chain pay at the least.

A client, a "broker", an "agent" and a "worker" (forked processes) pass one small msgpack message along a
chain of Unix stream sockets and back, with blocking reads: the six hops of a task (client -> broker ->
agent -> worker -> agent -> broker -> client) and nothing else (no tables, no scheduling, no event loop).
Before it answers the client, the broker makes the task durable the way armonik_zmq can:

- ``none``: not at all (``--no-sync``);
- ``direct``: one 4 KiB ``pwrite`` to an O_DIRECT|O_DSYNC file (the write-ahead log's record, docs/durability.md);
- ``flush2``: a 4 KiB ``pwrite`` and ``fdatasync``, then a meta-page ``pwrite`` and ``fdatasync`` (the least
  LMDB's own durable commit does).

    python -m bench.floor --tasks 3000 --runs 3

prints p50 / p99 per mode and writes JSON. Compare with the latency workload (``python -m bench --workloads
latency``): the difference is what armonik_zmq's own software costs on the path.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import statistics
import tempfile
import time

import click
import msgpack
from rich.console import Console
from rich.table import Table

from .common import write_json

MODES = ("none", "direct", "flush2")
BLOCK = 4096
#: the durable file's size: writes cycle through it (preallocated, so a write changes no file size)
FILE_BYTES = 16 << 20


def _relay(up: socket.socket, down: socket.socket) -> None:
    """The agent: decode what comes from above, send it on, and the answer back."""
    while True:
        message = up.recv(65536)
        if not message:
            return
        down.sendall(msgpack.packb(msgpack.unpackb(message)))
        up.sendall(msgpack.packb(msgpack.unpackb(down.recv(65536))))


def _worker(up: socket.socket) -> None:
    while True:
        message = up.recv(65536)
        if not message:
            return
        header = msgpack.unpackb(message)
        up.sendall(msgpack.packb({"task": header["task"], "status": "done", "output": b"\x80\x04N."}))


def _broker(client: socket.socket, agent: socket.socket, mode: str, directory: str) -> None:
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT | os.O_DSYNC if mode == "direct" else 0)
    fd = os.open(os.path.join(directory, f"floor-{mode}"), flags, 0o600)
    os.posix_fallocate(fd, 0, FILE_BYTES)
    block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    offset = 0
    while True:
        message = client.recv(65536)
        if not message:
            return
        header = msgpack.unpackb(message)
        agent.sendall(msgpack.packb({"task": header["task"], "function": header["function"]}))
        answer = msgpack.unpackb(agent.recv(65536))
        if mode != "none":
            block[:len(message)] = message
            os.pwrite(fd, block, offset)
            offset = (offset + BLOCK) % FILE_BYTES
            if mode == "flush2":
                os.fdatasync(fd)
                os.pwrite(fd, block[:512], 0)
                os.fdatasync(fd)
        client.sendall(msgpack.packb({"task": answer["task"], "ok": True, "output": answer["output"]}))


def run_once(mode: str, tasks: int, directory: str) -> list[float]:
    """Round trips in microseconds, after a tenth of ``tasks`` as warm-up."""
    client, broker_up = socket.socketpair()
    broker_down, agent_up = socket.socketpair()
    agent_down, worker_up = socket.socketpair()
    ends = {0: (broker_up, broker_down), 1: (agent_up, agent_down), 2: (worker_up,)}
    roles = [lambda: _broker(broker_up, broker_down, mode, directory), lambda: _relay(agent_up, agent_down),
             lambda: _worker(worker_up)]
    everything = (client, broker_up, broker_down, agent_up, agent_down, worker_up)
    pids = []
    for i, role in enumerate(roles):
        pid = os.fork()
        if pid == 0:
            try:  # each process keeps only its own ends: one that dies is an end of file to its neighbours
                for sock in everything:
                    if sock not in ends[i]:
                        sock.close()
                role()
            finally:
                os._exit(0)
        pids.append(pid)
    for sock in everything[1:]:
        sock.close()
    function = b"f" * 200  # about a pickled function's size
    times = []
    try:
        for task in range(tasks + tasks // 10):
            started = time.perf_counter_ns()
            client.sendall(msgpack.packb({"task": task, "function": function}))
            answer = client.recv(65536)
            if not answer:
                raise click.ClickException(f"the chain broke at task {task} (a process of it exited)")
            msgpack.unpackb(answer)
            times.append((time.perf_counter_ns() - started) / 1000)
    finally:
        client.close()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return times[tasks // 10:]


def check_direct(directory: str) -> None:
    """O_DIRECT needs a file system that takes it (not tmpfs)."""
    path = os.path.join(directory, "probe")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_DSYNC, 0o600))
    except OSError as e:
        raise click.ClickException(f"{directory} refuses O_DIRECT ({e.strerror}): pass --dir on a disk's file "
                                   "system, or leave out the mode direct") from None
    finally:
        if os.path.exists(path):
            os.unlink(path)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@click.command()
@click.option("--tasks", default=3000, show_default=True, help="Round trips per run (a tenth more as warm-up).")
@click.option("--runs", default=3, show_default=True, help="Runs per mode; the median of their p50 and p99.")
@click.option("--modes", default=",".join(MODES), show_default=True,
              help="Comma-separated: none (no durable write), direct (O_DIRECT|O_DSYNC), flush2 (two fdatasyncs).")
@click.option("--dir", "directory", default="", help="Where the durable file goes (default: a temporary "
              "directory, on the file system LocalCluster's data directory uses).")
@click.option("--json", "json_path", default="", help="Where to write the JSON (default bench/results/floor.json).")
def main(tasks: int, runs: int, modes: str, directory: str, json_path: str) -> None:
    """The floor of a lone task's round trip through four Python processes, with each durable write."""
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        raise click.BadParameter(f"unknown mode(s) {', '.join(unknown)}; choose among {', '.join(MODES)}",
                                 param_hint="--modes")
    console = Console()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-floor-", dir=directory or None) as where:
        if "direct" in chosen:
            check_direct(where)
        for mode in chosen:
            p50s, p99s = [], []
            for i in range(runs):
                with console.status(f"{mode}: run {i + 1}/{runs}, {tasks} round trips..."):
                    times = run_once(mode, tasks, where)
                p50s.append(percentile(times, 0.50))
                p99s.append(percentile(times, 0.99))
            figures[mode] = {"p50_us": statistics.median(p50s), "p99_us": statistics.median(p99s),
                             "runs": [{"p50_us": a, "p99_us": b} for a, b in zip(p50s, p99s)]}
    table = Table(title=f"the floor of a lone task: 4 Python processes, 6 hops on Unix sockets, {tasks} round trips")
    for column in ("durable write", "p50 (us)", "p99 (us)", "runs' p50"):
        table.add_column(column, justify="right" if column != "durable write" else "left")
    for mode, fig in figures.items():
        table.add_row(mode, f"{fig['p50_us']:.0f}", f"{fig['p99_us']:.0f}",
                      " / ".join(f"{r['p50_us']:.0f}" for r in fig["runs"]))
    console.print(table)
    path = write_json(json_path, "floor", figures, {"tasks": tasks, "runs": runs, "modes": chosen})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
