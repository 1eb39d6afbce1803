"""The broker alone: submit + dispatch + complete, durable, with no worker in the way.

A real broker process (LMDB, fsync on unless --no-sync), a fake agent process (a DEALER that
registers a large capacity and acknowledges every DISPATCH at once, one TASKS_DONE per batch it
drained, one in flight at a time like the real agent), and this process as the client: it creates the
outputs and submits every task in bulk, then waits for all results.

Each task goes through four task state transitions in the broker (SUBMITTED, DISPATCHED, PROCESSING,
COMPLETED; PROCESSING rides with the completion) and its output result one (COMPLETED):

    python -m bench.broker_alone --tasks 50000 --runs 3

prints tasks/s, task state transitions/s and the broker's CPU time per task, and writes JSON.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import statistics
import time
from datetime import timedelta

import click
from rich.console import Console
from rich.table import Table

from .common import write_json
from .cpu import tree_cpu

#: task status transitions per task that the broker performs and stores or announces
TRANSITIONS_PER_TASK = 4


def fake_agent(endpoint: str, capacity: int, stop) -> None:
    """Register, then complete every dispatched task at once (empty output), batched per drain."""
    import zmq

    from armonik_zmq.protocol import Op, decode_header, request

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    agent_id = f"fake-agent-{os.getpid()}"
    sock.setsockopt(zmq.IDENTITY, agent_id.encode())
    sock.connect(endpoint)
    rid = 1
    sock.send_multipart([request(Op.AGENT_REGISTER, rid, agent_id=agent_id, capacity=capacity, hostname="bench")])
    done: list = []
    in_flight = None
    next_heartbeat = time.monotonic() + 1.0
    while not stop.is_set():
        if sock.poll(50):
            for _ in range(10_000):
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                header = decode_header(frames[0])
                if header["op"] == Op.DISPATCH:
                    for t in header["tasks"]:
                        now = time.time()
                        done.append({"task_id": t["task_id"], "attempt": t["attempt"], "ok": True,
                                     "timestamps": {"fetched_at": now, "started_at": now, "processed_at": now},
                                     "results": [{"result_id": t["expected_output_ids"][0], "frames": 1}]})
                elif "error" in header:
                    raise SystemExit(f"broker refused {header['op']}: {header['error']}")
                elif header["rid"] == in_flight:
                    in_flight = None
        if done and in_flight is None:
            rid += 1
            in_flight = rid
            sock.send_multipart([request(Op.TASKS_DONE, rid, agent_id=agent_id, tasks=done), *([b""] * len(done))])
            done = []
        if time.monotonic() >= next_heartbeat:
            rid += 1
            sock.send_multipart([request(Op.AGENT_HEARTBEAT, rid, agent_id=agent_id)])
            next_heartbeat = time.monotonic() + 1.0
    sock.close()
    ctx.term()


def run_once(endpoint: str, broker_pid: int, n: int) -> dict:
    from armonik_zmq.client import (ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, TaskDefinition,
                                    TaskOptions, connect)

    with connect(endpoint, timeout=300) as conn:
        sessions, results, tasks, events = (ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn),
                                            ArmoniKEvents(conn))
        session_id = sessions.create_session(TaskOptions(max_duration=timedelta(minutes=10), priority=1, max_retries=1))
        payload = results.create_results({"payload": b""}, session_id)["payload"].result_id
        cpu_before = tree_cpu([broker_pid]).get(broker_pid, 0.0)
        started = time.perf_counter()
        outputs = results.create_results_metadata([f"o{i}" for i in range(n)], session_id, batch_size=n)
        out_ids = [outputs[f"o{i}"].result_id for i in range(n)]
        created = time.perf_counter()
        tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload, expected_output_ids=[o]) for o in out_ids],
                           chunk_size=n)
        submitted = time.perf_counter()
        events.wait_for_result_availability(out_ids, session_id, bucket_size=n)
        seconds = time.perf_counter() - started
        broker_cpu = tree_cpu([broker_pid]).get(broker_pid, 0.0) - cpu_before
        sessions.close_session(session_id)
    return {"tasks": n, "seconds": seconds, "create_outputs_s": created - started, "submit_s": submitted - created,
            "tasks_per_s": n / seconds,
            "transitions_per_s": TRANSITIONS_PER_TASK * n / seconds, "broker_cpu_us_per_task": broker_cpu / n * 1e6,
            "transitions_per_broker_cpu_s": TRANSITIONS_PER_TASK * n / broker_cpu if broker_cpu else 0.0}


@click.command()
@click.option("--tasks", "n", default=50_000, show_default=True, help="Tasks per run.")
@click.option("--runs", default=3, show_default=True, help="Runs; the median is reported.")
@click.option("--capacity", default=10_000, show_default=True, help="Credit the fake agent registers.")
@click.option("--no-sync", is_flag=True, help="Broker without fsync (fast mode).")
@click.option("--durability", type=click.Choice(["wal", "lmdb"]), default=None,
              help="How the broker makes a commit durable (its --durability; default: the broker's own default).")
@click.option("--py-spy", "pyspy", default="", help="Record the broker with py-spy (raw collapsed stacks) into this file.")
@click.option("--native", is_flag=True, help="With --py-spy: sample C frames too (msgpack, LMDB, libc), pausing the broker.")
@click.option("--json", "json_path", default="", help="Where to write the JSON (default bench/results/broker_alone.json).")
def main(n: int, runs: int, capacity: int, no_sync: bool, durability: str | None, pyspy: str, native: bool,
         json_path: str) -> None:
    """Measure the broker's own task path (submit, dispatch, complete) with an agent that answers at once."""
    from armonik_zmq.cluster import LocalProcesses

    console = Console()
    broker_args = ["--no-sync"] if no_sync else []
    if durability:
        broker_args += ["--durability", durability]
    cluster = LocalProcesses(broker_args=broker_args)
    mp = multiprocessing.get_context("spawn")
    stop = mp.Event()
    agent = recorder = None
    try:
        cluster.start_broker()
        agent = mp.Process(target=fake_agent, args=(cluster.agents_endpoint, capacity, stop), daemon=True)
        agent.start()
        cluster.wait_ready()
        if pyspy:
            recorder = subprocess.Popen([shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                         "record", "-p", str(cluster.broker.pid), "-r", "250", "-f", "raw",
                                         "-o", pyspy, *(["--native"] if native else ["--nonblocking"])], stdout=subprocess.DEVNULL)
        rows = []
        for i in range(runs):
            with console.status(f"run {i + 1}/{runs}: {n} tasks through the broker alone..."):
                rows.append(run_once(cluster.endpoint, cluster.broker.pid, n))
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(30)
        stop.set()
        if agent is not None:
            agent.join(5)
        cluster.cleanup()
    table = Table(title=f"broker alone: {n} tasks, fake agent (capacity {capacity}), durable={'no' if no_sync else durability or 'yes'}")
    for col in ("run", "seconds", "create+submit s", "tasks/s", "transitions/s", "broker cpu us/task", "transitions per broker cpu s"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        table.add_row(str(i + 1), f"{r['seconds']:.3f}", f"{r['create_outputs_s']:.2f}+{r['submit_s']:.2f}",
                      f"{r['tasks_per_s']:,.0f}", f"{r['transitions_per_s']:,.0f}",
                      f"{r['broker_cpu_us_per_task']:.1f}", f"{r['transitions_per_broker_cpu_s']:,.0f}")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "tasks"}
    table.add_row("median", f"{med['seconds']:.3f}", "", f"{med['tasks_per_s']:,.0f}", f"{med['transitions_per_s']:,.0f}",
                  f"{med['broker_cpu_us_per_task']:.1f}", f"{med['transitions_per_broker_cpu_s']:,.0f}")
    console.print(table)
    path = write_json(json_path, "broker_alone", {"median": med, "runs": rows},
                      {"tasks": n, "capacity": capacity, "sync": not no_sync, "durability": durability or "",
                       "transitions_per_task": TRANSITIONS_PER_TASK})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
