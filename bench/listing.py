"""Listing out of a million tasks: time per call, the broker's memory, and how it serves others meanwhile.

The rows are written straight into the LMDB directory with the broker's own store API (submitting
a million tasks would measure submission instead), then a broker is started on it. A list streams
the table and keeps one page-deep heap, so the broker's anonymous memory (RssAnon: the mapped LMDB
file does not count) should barely move while it scans a million rows; and since a long scan runs
between turns, other requests are still answered within milliseconds while it runs.

    python -m bench.listing --tasks 1000000
"""

from __future__ import annotations

import threading
import time
import uuid

import click
from rich.console import Console
from rich.table import Table

from armonik_zmq.broker.store import Store
from armonik_zmq.client import ArmoniKTasks, Direction, Task, TaskStatus, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.protocol import Op
from armonik_zmq.status import SessionStatus

from .common import write_json

_ROWS_PER_TXN = 50_000


def fill(data_dir: str, n: int, sessions: int) -> list[str]:
    """Write ``n`` COMPLETED task rows over ``sessions`` sessions into a stopped broker's LMDB; return the sessions."""
    store = Store(data_dir, sync=False)
    session_ids = [str(uuid.uuid4()) for _ in range(sessions)]
    now = time.time()
    options = {"max_duration": 60.0, "priority": 1, "max_retries": 1, "partition_id": "default",
               "application_name": None, "application_version": None, "application_namespace": None,
               "application_service": None, "engine_type": None}
    try:
        with store.write() as txn:
            for sid in session_ids:
                txn.put_session({"session_id": sid, "status": int(SessionStatus.RUNNING), "client_submission": True,
                                 "worker_submission": True, "partition_ids": ["default"], "options": options,
                                 "created_at": now, "cancelled_at": None, "closed_at": None, "purged_at": None,
                                 "deleted_at": None, "duration": None, "owner": ""})
        # in key order, every insert lands on the last page of the B-tree: ten times faster than random order
        task_ids = sorted(str(uuid.uuid4()) for _ in range(n))
        for start in range(0, n, _ROWS_PER_TXN):
            with store.write() as txn:
                for i in range(start, min(n, start + _ROWS_PER_TXN)):
                    tid = task_ids[i]
                    created = now + i * 1e-3
                    txn.put_task({
                        "task_id": tid, "session_id": session_ids[i % sessions], "owner_pod_id": "bench",
                        "pod_hostname": "bench", "initial_task_id": tid, "created_by": "", "parent_task_ids": [],
                        "payload_id": str(uuid.uuid4()), "data_dependencies": [],
                        "expected_output_ids": [str(uuid.uuid4())], "retry_of_ids": [],
                        "status": int(TaskStatus.COMPLETED), "status_message": "", "error": None,
                        "options": {**options, "priority": 1 + i % 9, "options": {"group": f"g{i % 3}"}},
                        "attempt": 1, "created_at": created, "submitted_at": created, "received_at": created,
                        "acquired_at": created, "fetched_at": created, "started_at": created,
                        "processed_at": created, "ended_at": created + 1.0,
                    }, new=True)
    finally:
        store.close()
    return session_ids


def rss_anon_kb(pid: int) -> int:
    """Return a process's anonymous resident memory (heap and stacks, not mapped files) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError(f"no RssAnon for process {pid}")


class LatencyProbe:
    """Send HEALTH requests one after another on a connection of its own; keep the slowest answer."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with connect(self.endpoint, timeout=600) as conn:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                conn.call(Op.HEALTH)
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.count += 1

    def __enter__(self) -> "LatencyProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class PeakSampler:
    """Sample a process's RssAnon every few milliseconds in a thread; keep the peak."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = rss_anon_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_anon_kb(self.pid))

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_kb(self.pid))


def measure(data_dir: str, n: int, sessions: int) -> dict:
    """Fill ``data_dir``, start a broker on it and time a few list calls; return the figures."""
    started = time.perf_counter()
    session_ids = fill(data_dir, n, sessions)
    fill_seconds = time.perf_counter() - started
    one = Task.session_id == session_ids[0]
    calls = [
        ("all, by priority (table scan)",
         dict(task_filter=Task.status == TaskStatus.COMPLETED, sort_field=Task.options.priority,
              sort_direction=Direction.DESC)),
        ("1 session, by id (index only)", dict(task_filter=one)),
        ("1 session + group, page 10 (index scan)",
         dict(task_filter=one & (Task.options["group"] == "g1"), sort_field=Task.ended_at, page=10)),
    ]
    cluster = LocalProcesses(data_dir=data_dir, broker_args=["--no-sync"])
    cases = []
    try:
        cluster.start_broker()
        cluster.wait_ready(timeout=600)
        pid = cluster.broker.pid
        with connect(cluster.endpoint, timeout=600) as conn:
            tasks = ArmoniKTasks(conn)
            for name, kwargs in calls:
                before = rss_anon_kb(pid)
                t0 = time.perf_counter()
                with PeakSampler(pid) as sampler, LatencyProbe(cluster.endpoint) as probe:
                    total, page = tasks.list_tasks(**kwargs)
                seconds = time.perf_counter() - t0
                cases.append({"call": name, "total": total, "rows": len(page), "seconds": seconds,
                              "rss_anon_before_mb": before / 1024, "rss_anon_growth_mb": (sampler.peak - before) / 1024,
                              "other_requests": probe.count, "other_request_worst_ms": probe.worst * 1e3})
    finally:
        cluster.cleanup()
    return {"tasks": n, "sessions": sessions, "fill_seconds": fill_seconds, "cases": cases}


@click.command()
@click.option("--tasks", "n", default=1_000_000, show_default=True, help="Task rows written.")
@click.option("--sessions", default=10, show_default=True, help="Sessions they are spread over.")
@click.option("--data-dir", default="", help="LMDB directory to fill (default: a temporary one, removed after).")
@click.option("--json", "json_path", default="", help="Where to write the JSON (default bench/results/listing.json).")
def main(n: int, sessions: int, data_dir: str, json_path: str) -> None:
    """Time list calls over a million task rows and show the broker's memory stays bounded."""
    import shutil
    import tempfile

    console = Console()
    tmp = None if data_dir else tempfile.mkdtemp(prefix="armonik-zmq-bench-")
    try:
        with console.status(f"writing {n:,} task rows, then listing..."):
            figures = measure(data_dir or f"{tmp}/lmdb", n, sessions)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"listing: {n:,} task rows in {sessions} sessions (rows written in "
                        f"{figures['fill_seconds']:.1f}s)")
    for col in ("call", "total", "rows", "seconds", "RssAnon before (MiB)", "RssAnon growth (MiB)",
                "HEALTH calls meanwhile", "slowest (ms)"):
        table.add_column(col, justify="right")
    for c in figures["cases"]:
        table.add_row(c["call"], f"{c['total']:,}", str(c["rows"]), f"{c['seconds']:.3f}",
                      f"{c['rss_anon_before_mb']:.1f}", f"{c['rss_anon_growth_mb']:.1f}", f"{c['other_requests']:,}",
                      f"{c['other_request_worst_ms']:.1f}")
    console.print(table)
    path = write_json(json_path, "listing", figures, {"tasks": n, "sessions": sessions})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
