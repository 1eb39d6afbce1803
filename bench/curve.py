"""What CurveZMQ costs: 1 KiB messages between two processes, NULL vs CURVE; then tasks end to end.

    python -m bench.curve                       # messages only (T13's figure: CURVE >= 60 % of NULL)
    python -m bench.curve --tasks 5000          # and a broker + agent + 2 workers, without and with CURVE

Messages: a DEALER process sends N messages of ``--size`` bytes to a ROUTER over loopback tcp (the
broker's socket types), which counts them; the rate is N over the time from the first to the last
message received. Runs alternate NULL and CURVE so that load from other processes hits both alike;
the best run of each is kept (the least disturbed), and the CPU time per message of both processes
(user + system) is reported too: on a shared machine it moves less than the rate.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from datetime import timedelta
from typing import Optional

import click
import zmq
import zmq.auth
from rich.console import Console
from rich.table import Table

from .common import bench_env, write_json


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _sender(endpoint: str, n: int, size: int, keys: Optional[tuple], done) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, -1)
    if keys is not None:
        server_public, public, secret = keys
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    sock.connect(endpoint)
    payload = os.urandom(size)
    cpu = _cpu()
    for _ in range(n):
        sock.send(payload, copy=size > 65536)
    sock.recv()  # the receiver's "all received"
    done.send(_cpu() - cpu)
    sock.close()
    ctx.term()


def measure(n: int = 200_000, size: int = 1024, curve: bool = False) -> dict:
    """Send ``n`` messages of ``size`` bytes from another process; return the rate and CPU time per message."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    keys = None
    tmp = tempfile.mkdtemp(prefix="bench-curve-")
    if curve:
        server_public, server_secret = zmq.auth.load_certificate(zmq.auth.create_certificates(tmp, "server")[1])
        public, secret = zmq.auth.load_certificate(zmq.auth.create_certificates(tmp, "client")[1])
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = server_public, server_secret
        keys = (server_public, public, secret)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=_sender, args=(f"tcp://127.0.0.1:{port}", n, size, keys, child))
    proc.start()
    try:
        peer, _ = sock.recv_multipart()  # the first one starts the clock (after connect and handshake)
        started, cpu = time.perf_counter(), _cpu()
        for _ in range(n - 1):
            sock.recv_multipart(copy=False)
        elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
        sock.send_multipart([peer, b"done"])
        sender_cpu = parent.recv()
        proc.join()
    finally:
        if proc.is_alive():
            proc.kill()
        sock.close()
        ctx.term()
    return {"mechanism": "CURVE" if curve else "NULL", "messages": n, "size": size, "seconds": elapsed,
            "msgs_per_s": (n - 1) / elapsed, "mib_per_s": (n - 1) * size / elapsed / 2**20,
            "cpu_us_per_msg": (cpu + sender_cpu) / n * 1e6}


def compare(n: int = 200_000, size: int = 1024, runs: int = 3) -> dict:
    """Alternate NULL and CURVE runs; return the best of each and CURVE's share of NULL's rate."""
    rows = []
    for _ in range(runs):
        rows.append(measure(n, size, curve=False))
        rows.append(measure(n, size, curve=True))
    best = {m: max((r for r in rows if r["mechanism"] == m), key=lambda r: r["msgs_per_s"]) for m in ("NULL", "CURVE")}
    return {"rows": rows, "best": best, "ratio": best["CURVE"]["msgs_per_s"] / best["NULL"]["msgs_per_s"],
            "cpu_ratio": best["CURVE"]["cpu_us_per_msg"] / best["NULL"]["cpu_us_per_msg"]}


def _tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes and all their descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent_of, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    wanted, total = set(pids), 0.0
    for pid in cpu:
        p = pid
        while p > 1 and p not in wanted:
            p = parent_of.get(p, 0)
        if p in wanted:
            total += cpu[pid]
    return total


def _tasks_once(secure: bool, n: int, workers: int) -> dict:
    """Run ``n`` no-op tasks on a fresh local cluster; return tasks/s and the cluster's CPU time per task."""
    from armonik_zmq.client import (ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, TaskDefinition,
                                    TaskOptions, connect)
    from armonik_zmq.cluster import LocalProcesses

    cluster = LocalProcesses(workers=workers, processor="bench.curve:noop", env=bench_env(), secure=secure)
    with cluster:
        pids = [cluster.broker.pid, cluster.agent.pid]
        with connect(cluster.endpoint, timeout=120, **cluster.client_keys) as conn:
            sessions, results, tasks, events = (ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn),
                                                ArmoniKEvents(conn))
            sid = sessions.create_session(TaskOptions(max_duration=timedelta(minutes=10), priority=1, max_retries=1))
            cpu = _tree_cpu(pids)
            started = time.perf_counter()
            payload = results.create_results({"payload": b""}, sid)["payload"].result_id
            outputs = results.create_results_metadata([f"o{i}" for i in range(n)], sid, batch_size=n)
            out_ids = [outputs[f"o{i}"].result_id for i in range(n)]
            tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[o]) for o in out_ids],
                               chunk_size=n)
            events.wait_for_result_availability(out_ids, sid, bucket_size=n)
            elapsed = time.perf_counter() - started
            cpu = _tree_cpu(pids) - cpu
    return {"mechanism": "CURVE" if secure else "NULL", "tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed,
            "cluster_cpu_us_per_task": cpu / n * 1e6}


def noop(task_handler):
    """The benchmark's task: an empty result."""
    from armonik_zmq.worker import Output

    task_handler.send_results({task_handler.expected_results[0]: b""})
    return Output()


@click.command()
@click.option("--messages", "n", default=200_000, show_default=True, help="Messages per run.")
@click.option("--size", default=1024, show_default=True, help="Bytes per message.")
@click.option("--runs", default=3, show_default=True, help="Runs of each mechanism (alternated); the best is kept.")
@click.option("--tasks", default=0, show_default=True, help="Also run this many no-op tasks end to end, "
              "on a local cluster without and with CURVE (0: skip).")
@click.option("--workers", default=2, show_default=True, help="Worker processes of the end-to-end cluster.")
@click.option("--json", "json_path", default="", help="Where to write the JSON (default bench/results/curve.json).")
def main(n: int, size: int, runs: int, tasks: int, workers: int, json_path: str) -> None:
    """Measure what CurveZMQ costs against NULL security (T13: CURVE throughput >= 60 % of NULL)."""
    console = Console()
    with console.status(f"{runs} x 2 runs of {n:,} messages of {size} B..."):
        result = compare(n, size, runs)
    table = Table(title=f"{size} B messages, DEALER -> ROUTER over loopback tcp, {n:,} per run")
    for col in ("mechanism", "msgs/s (best)", "MiB/s", "CPU µs/msg (both sides)", "runs msgs/s"):
        table.add_column(col, justify="right")
    for mech in ("NULL", "CURVE"):
        best = result["best"][mech]
        runs_txt = ", ".join(f"{r['msgs_per_s']:,.0f}" for r in result["rows"] if r["mechanism"] == mech)
        table.add_row(mech, f"{best['msgs_per_s']:,.0f}", f"{best['mib_per_s']:,.1f}", f"{best['cpu_us_per_msg']:.2f}",
                      runs_txt)
    console.print(table)
    verdict = "PASS" if result["ratio"] >= 0.6 else "FAIL"
    console.print(f"CURVE rate = {result['ratio']:.0%} of NULL (criterion >= 60 %: {verdict}); "
                  f"CPU per message x{result['cpu_ratio']:.2f}")
    figures = {"ratio": result["ratio"], "cpu_ratio": result["cpu_ratio"], "messages": result["rows"]}
    if tasks:
        rows = []
        for secure in (False, True):
            with console.status(f"{tasks:,} tasks, {'CURVE' if secure else 'NULL'}..."):
                rows.append(_tasks_once(secure, tasks, workers))
        table = Table(title=f"{tasks:,} no-op tasks end to end, {workers} workers, durable")
        for col in ("mechanism", "tasks/s", "cluster CPU µs/task"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["mechanism"], f"{r['tasks_per_s']:,.0f}", f"{r['cluster_cpu_us_per_task']:,.0f}")
        console.print(table)
        figures["tasks"] = rows
        figures["tasks_ratio"] = rows[1]["tasks_per_s"] / rows[0]["tasks_per_s"]
    path = write_json(json_path, "curve", figures, {"messages": n, "size": size, "runs": runs, "tasks": tasks,
                                                    "workers": workers})
    console.print(f"wrote {path} (figures taken on a shared machine are noisy)")


if __name__ == "__main__":
    main()
