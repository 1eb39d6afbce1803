"""Tiny tasks: N no-op tasks submitted in bulk through the ArmoniK-style API, every result gathered.

    python -m bench.tiny_tasks --tasks 20000 --workers 2
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta

import click
from rich.console import Console
from rich.table import Table

from armonik_zmq.client import (ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, TaskDefinition,
                                TaskOptions, connect)
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.worker import Output

from .common import bench_env, write_json
from .cpu import CpuMeter


def noop(task_handler) -> Output:
    """Write an empty result."""
    task_handler.send_results({task_handler.expected_results[0]: b""})
    return Output()


def broker_counts(conn) -> dict:
    """Loop turns (one commit each) and requests by op the broker handled so far."""
    from armonik_zmq.protocol import Op

    header, _ = conn.call(Op.HEALTH, metrics=True)
    m = header.get("metrics", {})
    return {"turns": m.get("turns", 0), **{f"requests_{k}": v for k, v in m.get("requests", {}).items()}}


def run_once(endpoint: str, n: int) -> dict:
    with connect(endpoint, timeout=120) as conn:
        before = broker_counts(conn)
        sessions, results, tasks, events = (ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn),
                                            ArmoniKEvents(conn))
        session_id = sessions.create_session(TaskOptions(max_duration=timedelta(minutes=10), priority=1, max_retries=1))
        started = time.perf_counter()
        payload = results.create_results({"payload": b""}, session_id)["payload"].result_id
        outputs = results.create_results_metadata([f"o{i}" for i in range(n)], session_id, batch_size=n)
        out_ids = [outputs[f"o{i}"].result_id for i in range(n)]
        submitted_at = time.perf_counter()
        tasks.submit_tasks(session_id, [TaskDefinition(payload_id=payload, expected_output_ids=[o]) for o in out_ids],
                           chunk_size=n)
        submit_done = time.perf_counter()
        events.wait_for_result_availability(out_ids, session_id, bucket_size=n)
        done = time.perf_counter()
        after = broker_counts(conn)
        sessions.close_session(session_id)
    # broker turns and agent reports per 1,000 tasks: how well each hop batches
    per_1000 = {k: (v - before.get(k, 0)) * 1000 / n for k, v in after.items()
                if k == "turns" or k in ("requests_TASKS_DONE", "requests_TASKS_STARTED")}
    return {"tasks": n, "seconds": done - started, "tasks_per_s": n / (done - started),
            "submit_tasks_per_s": n / (submit_done - submitted_at), "broker_per_1000_tasks": per_1000}


def _by_role(by_pid: dict, cluster: LocalProcesses, n: int) -> dict:
    """CPU us per task of the client, the broker, the agent and the workers (summed)."""
    import os

    roles = {"client": os.getpid(), "broker": cluster.broker.pid, "agent": cluster.agent.pid}
    out = {role: by_pid.get(pid, 0.0) / n * 1e6 for role, pid in roles.items()}
    out["workers"] = sum(v for pid, v in by_pid.items() if pid not in roles.values()) / n * 1e6
    return out


@click.command()
@click.option("--tasks", "n", default=20_000, show_default=True, help="Tasks per run.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--runs", default=3, show_default=True, help="Runs; the median is reported.")
@click.option("--no-sync", is_flag=True, help="Broker without fsync (fast mode).")
@click.option("--json", "json_path", default="", help="Where to write the JSON (default bench/results/tiny_tasks.json).")
def main(n: int, workers: int, runs: int, no_sync: bool, json_path: str) -> None:
    """Measure tiny-task throughput end to end (client -> broker -> agent -> workers -> client)."""
    console = Console()
    cluster = LocalProcesses(workers=workers, processor="bench.tiny_tasks:noop", env=bench_env(),
                             broker_args=["--no-sync"] if no_sync else [])
    with cluster:
        rows = []
        for i in range(runs):
            with console.status(f"run {i + 1}/{runs}: {n} tasks on {workers} workers..."):
                with CpuMeter([cluster.broker.pid, cluster.agent.pid]) as cpu:
                    row = run_once(cluster.endpoint, n)
                # CPU time per task over every process (client, broker, agent, workers): what to compare
                # before/after on a shared machine, where wall figures are noise.
                row["cpu_us_per_task"] = cpu.seconds / n * 1e6
                row["cpu_us_per_task_by_process"] = _by_role(cpu.by_pid, cluster, n)
                rows.append(row)
    table = Table(title=f"tiny tasks: {n} no-op tasks, {workers} workers, durable={'no' if no_sync else 'yes'}")
    for col in ("run", "seconds", "tasks/s", "submit tasks/s", "cpu us/task", "by process (us/task)"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        table.add_row(str(i + 1), f"{r['seconds']:.3f}", f"{r['tasks_per_s']:,.0f}", f"{r['submit_tasks_per_s']:,.0f}",
                      f"{r['cpu_us_per_task']:.0f}",
                      " ".join(f"{k}={v:.0f}" for k, v in r["cpu_us_per_task_by_process"].items()))
    median = statistics.median(r["tasks_per_s"] for r in rows)
    cpu_median = statistics.median(r["cpu_us_per_task"] for r in rows)
    table.add_row("median", "", f"{median:,.0f}", f"{statistics.median(r['submit_tasks_per_s'] for r in rows):,.0f}",
                  f"{cpu_median:.0f}", "")
    console.print(table)
    for i, r in enumerate(rows):
        console.print(f"run {i + 1}: per 1,000 tasks: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["broker_per_1000_tasks"].items()))
    path = write_json(json_path, "tiny_tasks", {"median_tasks_per_s": median, "median_cpu_us_per_task": cpu_median, "runs": rows},
                      {"tasks": n, "workers": workers, "sync": not no_sync})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
