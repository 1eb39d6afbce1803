"""The agent and its workers alone: what a tiny task costs outside the broker and the client.

A real agent process (``armonik-zmq agent``, the function processor, its worker processes) is fed by this
process, which plays the broker on a ROUTER socket: it registers the agent, sends DISPATCHes of futures
no-op calls (the payload inline, the options of a real task) while the agent has credit, and acknowledges
every report at once. Nothing waits for a commit, so the figures are the agent's and the workers' own:

    python -m bench.agent_alone --tasks 40000 --runs 3

prints tasks/s, CPU time per task of the agent (its main thread, and its other threads: ZeroMQ's), of its
workers and of this script, and the agent's reports per 1,000 tasks; writes JSON. CPU per task is the figure
to compare on a shared machine (tasks/s follows the load).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import click
from rich.console import Console
from rich.table import Table

from .common import bench_env, write_json
from .cpu import tree_cpu

#: tasks run before the first measured run: the workers import and the agent's tiny-task credit settles
WARM_UP = 3000


def _thread_seconds(pid: int) -> dict[str, float]:
    """User+system CPU seconds of each thread of ``pid``, by thread id (Linux ``/proc``; empty elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


class ScriptedBroker:
    """The broker's side of the agent protocol, answering at once; tasks are futures no-op calls."""

    def __init__(self, workers: int):
        import zmq

        from armonik_zmq import functions
        from armonik_zmq.common import TaskOptions
        from armonik_zmq.futures import Future
        from bench.tasks import noop

        self.dir = tempfile.mkdtemp(prefix="agent-alone-")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        endpoint = f"ipc://{self.dir}/backend"
        self.sock.bind(endpoint)
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "armonik_zmq.cli", "--log-level", "WARNING", "agent", "--broker", endpoint,
             "--workers", str(workers), "--processor", "armonik_zmq.functions:processor"],
            env={**os.environ, **bench_env()})
        self.payload = functions.dump_call(functions.dump_function(noop), (1,), {}, Future)[0]
        self.options = TaskOptions(max_duration=timedelta(seconds=600), priority=1, max_retries=1,
                                   partition_id="default").to_wire()
        self.peer = None
        self.capacity = 0
        self.held = 0
        self.seq = 0
        self.reports = 0

    def _dispatch(self, wanted: int) -> None:
        from armonik_zmq.protocol import Op, request
        from armonik_zmq.status import SessionStatus, TaskStatus

        k = min(self.capacity - self.held, wanted)
        if k <= 0 or self.peer is None:
            return
        tasks = []
        for _ in range(k):
            self.seq += 1
            tid, pid, oid = f"t{self.seq:010d}", f"p{self.seq:010d}", f"o{self.seq:010d}"
            tasks.append({"task_id": tid, "attempt": 1, "session_id": "bench", "session_status": int(SessionStatus.RUNNING),
                          "status": int(TaskStatus.DISPATCHED), "payload_id": pid, "data_dependencies": [],
                          "expected_output_ids": [oid], "options": 0, "retry_of_ids": [],
                          "initial_task_id": tid, "inline": [pid]})
        self.sock.send_multipart([self.peer, request(Op.DISPATCH, 0, tasks=tasks, options=[self.options], frames=[1] * k),
                                  *[self.payload] * k],
                                 copy=False)
        self.held += k

    def run(self, n: int) -> int:
        """Serve the agent until ``n`` more tasks completed (no more than that dispatched); return how many did."""
        from armonik_zmq.protocol import Op, decode_header, reply_ok

        left, done = n, 0
        self._dispatch(left)
        left -= self.held
        while done < n:
            if not self.sock.poll(30_000):
                raise RuntimeError("the agent sent nothing for 30 s")
            frames = self.sock.recv_multipart()
            self.peer, header = frames[0], decode_header(frames[1])
            op, rid = header["op"], header["rid"]
            if op == Op.AGENT_REGISTER:
                self.capacity = header["capacity"]
                self.sock.send_multipart([self.peer, reply_ok(op, rid, heartbeat_interval=1.0, lease=5.0,
                                                              data_chunk_max_size=8 << 20, kept=0)])
            elif op == Op.TASKS_DONE:
                done += len(header["tasks"])
                self.held -= len(header["tasks"])
                self.reports += 1
                self.sock.send_multipart([self.peer, reply_ok(op, rid, refused=[])])
            elif op == Op.TASKS_RELEASE:  # handed back: sent again later
                self.held -= len(header["tasks"])
                left += len(header["tasks"])
                self.sock.send_multipart([self.peer, reply_ok(op, rid, refused=[])])
            elif op == Op.AGENT_HEARTBEAT:
                self.capacity = header.get("capacity", self.capacity)
                self.sock.send_multipart([self.peer, reply_ok(op, rid)])
            elif op != Op.TASKS_STARTED and op != Op.TASKS_STOPPED:
                self.sock.send_multipart([self.peer, reply_ok(op, rid)])
            before = self.held
            self._dispatch(left)
            left -= self.held - before
        return done

    def close(self) -> None:
        import shutil

        self.agent.terminate()
        try:
            self.agent.wait(10)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        self.sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_once(broker: ScriptedBroker, n: int) -> dict:
    pid = broker.agent.pid
    threads0, tree0 = _thread_seconds(pid), tree_cpu([pid])
    reports0, script0, wall0 = broker.reports, time.process_time(), time.perf_counter()
    done = broker.run(n)
    wall, script = time.perf_counter() - wall0, time.process_time() - script0
    threads1, tree1 = _thread_seconds(pid), tree_cpu([pid])
    agent = tree1.get(pid, 0.0) - tree0.get(pid, 0.0)
    workers = sum(tree1.values()) - tree1.get(pid, 0.0) - (sum(tree0.values()) - tree0.get(pid, 0.0))
    main_thread = threads1.get(str(pid), 0.0) - threads0.get(str(pid), 0.0)
    return {"tasks": done, "seconds": wall, "tasks_per_s": done / wall,
            "agent_cpu_us_per_task": agent / done * 1e6, "agent_main_us_per_task": main_thread / done * 1e6,
            "agent_other_threads_us_per_task": (agent - main_thread) / done * 1e6,
            "workers_cpu_us_per_task": workers / done * 1e6, "script_cpu_us_per_task": script / done * 1e6,
            "reports_per_1000": (broker.reports - reports0) / done * 1000}


@click.command()
@click.option("--tasks", "n", default=40_000, show_default=True, help="Tasks per run.")
@click.option("--workers", default=2, show_default=True, help="Worker processes of the agent.")
@click.option("--runs", default=3, show_default=True, help="Runs; the median is reported.")
@click.option("--json", "json_path", default="", help="Where to write the JSON (default bench/results/agent_alone.json).")
def main(n: int, workers: int, runs: int, json_path: str) -> None:
    """Measure the agent's and its workers' CPU per tiny task, fed by a scripted broker that answers at once."""
    console = Console()
    broker = ScriptedBroker(workers)
    try:
        with console.status("warming up..."):
            broker.run(WARM_UP)
        rows = []
        for i in range(runs):
            with console.status(f"run {i + 1}/{runs}: {n} tasks..."):
                rows.append(run_once(broker, n))
    finally:
        broker.close()
    columns = {"tasks_per_s": ("tasks/s", "{:,.0f}"), "agent_cpu_us_per_task": ("agent us/task", "{:.1f}"),
               "agent_main_us_per_task": ("agent main thread", "{:.1f}"),
               "agent_other_threads_us_per_task": ("agent other threads", "{:.1f}"),
               "workers_cpu_us_per_task": ("workers us/task", "{:.1f}"), "script_cpu_us_per_task": ("script us/task", "{:.1f}"),
               "reports_per_1000": ("TASKS_DONE per 1,000", "{:.1f}")}
    table = Table(title=f"agent alone: {n} futures no-op tasks per run, {workers} workers, scripted broker")
    table.add_column("run", justify="right")
    for title, _ in columns.values():
        table.add_column(title, justify="right")
    med = {k: statistics.median(r[k] for r in rows) for k in columns}
    for label, r in [*((str(i + 1), r) for i, r in enumerate(rows)), ("median", med)]:
        table.add_row(label, *(fmt.format(r[k]) for k, (_, fmt) in columns.items()))
    console.print(table)
    path = write_json(json_path, "agent_alone", {"median": med, "runs": rows}, {"tasks": n, "workers": workers})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
