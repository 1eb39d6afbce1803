"""What CurveZMQ costs: 1 KiB messages between two processes, NULL vs CURVE; then tasks end to end.

    python -m bench.curve                       # messages only (T13's figure: CURVE >= 60 % of NULL)
    python -m bench.curve --tasks 5000          # and a broker + agent + 2 workers, without and with CURVE

Messages: a DEALER process sends messages of ``--size`` bytes to ROUTER sockets over loopback tcp
(the broker's socket types), one NULL and one CURVE connection, in bursts that alternate between
the two, so that load from other processes hits both alike. CURVE's share is NULL's total time over CURVE's total time for the same messages (all
runs); each run's rates are shown, and the CPU time per message of both processes (user + system)
is reported too: on a shared machine it moves less than the rate.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from datetime import timedelta

import click
import zmq
import zmq.auth
from rich.console import Console
from rich.table import Table

from .common import bench_env, write_json


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _sender(endpoints: dict, size: int, keys: tuple, pipe) -> None:
    """Send a burst of messages on the socket the receiver names, each time it asks; report CPU per mechanism."""
    ctx = zmq.Context()
    socks = {}
    for mech, endpoint in endpoints.items():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, -1)
        if mech == "CURVE":
            server_public, public, secret = keys
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
        sock.connect(endpoint)
        sock.send(b"hello")  # the handshake happens before any timed burst
        socks[mech] = sock
    payload = os.urandom(size)
    cpu = dict.fromkeys(socks, 0.0)
    while True:
        order = pipe.recv()
        if order is None:
            break
        mech, count = order
        sock, started = socks[mech], _cpu()
        for _ in range(count):
            sock.send(payload, copy=size > 65536)
        sock.recv()  # the receiver got them all
        cpu[mech] += _cpu() - started
    pipe.send(cpu)
    for sock in socks.values():
        sock.close()
    ctx.term()


def compare(n: int = 200_000, size: int = 1024, runs: int = 3, burst: int = 1000) -> dict:
    """Send ``n`` messages of ``size`` bytes per mechanism, in bursts alternating NULL and CURVE.

    Both connections are up in the same two processes the whole time, and bursts of ``burst``
    messages alternate (the order flips every round), so whatever else loads the machine falls on
    both alike. Each of ``runs`` runs yields a rate per mechanism.
    """
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="bench-curve-")
    server_public, server_secret = zmq.auth.load_certificate(zmq.auth.create_certificates(tmp, "server")[1])
    public, secret = zmq.auth.load_certificate(zmq.auth.create_certificates(tmp, "client")[1])
    routers, endpoints = {}, {}
    for mech in ("NULL", "CURVE"):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        if mech == "CURVE":
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = server_public, server_secret
        endpoints[mech] = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
        routers[mech] = sock
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=_sender, args=(endpoints, size, (server_public, public, secret), child))
    proc.start()
    rows = []
    try:
        peers = {mech: sock.recv_multipart()[0] for mech, sock in routers.items()}
        receiver_cpu = {"NULL": 0.0, "CURVE": 0.0}
        for run in range(runs):
            seconds = {"NULL": 0.0, "CURVE": 0.0}
            for rnd in range(max(1, n // burst)):
                for mech in (("NULL", "CURVE") if rnd % 2 == 0 else ("CURVE", "NULL")):
                    sock, cpu = routers[mech], _cpu()
                    started = time.perf_counter()
                    parent.send((mech, burst))
                    for _ in range(burst):
                        sock.recv_multipart(copy=False)
                    seconds[mech] += time.perf_counter() - started
                    receiver_cpu[mech] += _cpu() - cpu
                    sock.send_multipart([peers[mech], b"ok"])
            count = max(1, n // burst) * burst
            for mech in ("NULL", "CURVE"):
                rows.append({"mechanism": mech, "run": run + 1, "messages": count, "size": size,
                             "seconds": seconds[mech], "msgs_per_s": count / seconds[mech],
                             "mib_per_s": count * size / seconds[mech] / 2**20})
        parent.send(None)
        sender_cpu = parent.recv()
        proc.join()
    finally:
        if proc.is_alive():
            proc.kill()
        for sock in routers.values():
            sock.close()
        ctx.term()
    total = max(1, n // burst) * burst * runs
    cpu_us = {m: (receiver_cpu[m] + sender_cpu[m]) / total * 1e6 for m in ("NULL", "CURVE")}
    best = {m: max((r for r in rows if r["mechanism"] == m), key=lambda r: r["msgs_per_s"]) for m in ("NULL", "CURVE")}
    for m in best:
        best[m] = {**best[m], "cpu_us_per_msg": cpu_us[m]}
    spent = {m: sum(r["seconds"] for r in rows if r["mechanism"] == m) for m in ("NULL", "CURVE")}
    # The same messages for both, in interleaved bursts: the ratio of total times spreads any disturbance
    # evenly, where a ratio of best runs would compare two different moments.
    return {"rows": rows, "best": best, "ratio": spent["NULL"] / spent["CURVE"],
            "best_ratio": best["CURVE"]["msgs_per_s"] / best["NULL"]["msgs_per_s"],
            "cpu_ratio": cpu_us["CURVE"] / cpu_us["NULL"]}


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

    # both on ZeroMQ: the figure is CURVE's own cost, not that of a transport (NULL clusters use links by default)
    cluster = LocalProcesses(workers=workers, processor="bench.curve:noop", env=bench_env(), secure=secure,
                             links=False)
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
    table = Table(title=f"{size} B messages, DEALER -> ROUTER over loopback tcp, {n:,} per mechanism per run, "
                        f"alternating bursts")
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
