"""LMDB robustness (RELIABILITY.md section 6): T8 map growth with a cross-process reader, T9 stale readers
and file growth, T15 throughput floor and restart time. Real broker, agent and worker processes, real
LMDB files; the monitor and the stale readers are separate processes opening the directory read-only.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

from armonik_zmq.client import (ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, Task, TaskDefinition,
                                TaskOptions, TaskStatus, connect)
from conftest import make_cluster
from reliability import figure

OPTIONS = TaskOptions(max_duration=timedelta(minutes=5), priority=1, max_retries=1)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "armonik_zmq.cli", *args]


def _read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _inspect_once(data_dir: str) -> dict:
    """One snapshot of the directory by a fresh read-only process (it adopts the map size LMDB recorded)."""
    out = subprocess.run(_cli("inspect", data_dir, "--json", "--tasks", "0"), capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Monitor:
    """``armonik-zmq inspect --watch``: a separate read-only process listing tasks while the broker writes."""

    def __init__(self, data_dir: str, interval: float = 0.1):
        self.proc = subprocess.Popen(_cli("inspect", data_dir, "--watch", str(interval), "--tasks", "100", "--json"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.snapshots: list[dict] = []
        self.bad_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.snapshots.append(json.loads(line))
            except ValueError:
                self.bad_lines.append(line)

    def stop(self) -> tuple[int, str]:
        """Stop it (SIGTERM ends a watch cleanly); return its exit code and stderr."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        return (code if alive else -1000 - code), self.proc.stderr.read()


# -- T8 ----------------------------------------------------------------------------------------------


def test_t8_map_growth_with_a_cross_process_reader(tmp_path, scale):
    """T8: from a 1 MiB map, submit tasks with 1 KiB of metadata each while a read-only monitor lists tasks.

    0 failed requests; every MapFullError is followed by abort, growth and replay; the monitor survives the
    resizes; the final map is at most 4x the bytes in use; the tasks then all run (held ones kept their agent).
    """
    n = int(50_000 * scale)
    clients, batch = 4, 50
    log_path = str(tmp_path / "broker.log")
    cluster = make_cluster(tmp_path, workers=2, log_level="INFO", broker_log=log_path,
                           broker_args=("--map-size", "1MiB"))
    monitor = None
    try:
        cluster.start()
        monitor = Monitor(cluster.data_dir)
        failures: list[str] = []
        outputs: dict[str, list[str]] = {}
        metadata = {"blob": "m" * 1024}

        def submit(k: int) -> None:
            try:
                with connect(cluster.endpoint, timeout=120) as conn:
                    sessions, results, tasks = ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn)
                    sid = sessions.create_session(OPTIONS)
                    payload = results.create_results({"p": b"sha256:t8"}, sid)["p"].result_id
                    mine = outputs.setdefault(sid, [])
                    for start in range(0, n // clients, batch):
                        count = min(batch, n // clients - start)
                        outs = results.create_results_metadata([f"o{start + i}" for i in range(count)], sid,
                                                               batch_size=count)
                        ids = [outs[f"o{start + i}"].result_id for i in range(count)]
                        opts = TaskOptions(max_duration=timedelta(minutes=5), priority=1, max_retries=1,
                                           options=metadata)
                        tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[o],
                                                                options=opts) for o in ids], chunk_size=count)
                        mine.extend(ids)
            except Exception as exc:  # counted: the criterion is 0 failed requests
                failures.append(f"client {k}: {exc!r}")

        started = time.monotonic()
        threads = [threading.Thread(target=submit, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        submit_s = time.monotonic() - started
        with connect(cluster.endpoint, timeout=120) as conn:
            events, results = ArmoniKEvents(conn), ArmoniKResults(conn)
            for sid, ids in outputs.items():
                events.wait_for_result_availability(ids, sid, bucket_size=len(ids))
            some_sid, some_ids = next(iter(outputs.items()))
            assert results.download_result_data(some_ids[0], some_sid) == hashlib.sha256(b"sha256:t8").digest()
        code, err = monitor.stop()
        monitor_snapshots, monitor_resized = len(monitor.snapshots), max(s["resized"] for s in monitor.snapshots)
        cluster.stop()
        snap = _inspect_once(cluster.data_dir)
        log = _read_log(log_path)
    finally:
        if monitor is not None and monitor.proc.poll() is None:
            monitor.stop()
        cluster.cleanup()
    growths = len(re.findall(r"LMDB map grown from", log))
    replays = len(re.findall(r"after MapFullError: replaying", log))
    ratio = snap["map_size"] / snap["used_bytes"]
    submitted = sum(len(v) for v in outputs.values())
    figure("T8", "failed client requests", len(failures), "requests", "= 0", not failures)
    figure("T8", "tasks submitted and completed", submitted, "tasks", f"= {n}", submitted == n)
    figure("T8", "map growths (ahead of a turn or after MapFullError)", growths, "growths", ">= 1", growths >= 1)
    figure("T8", "turns aborted by MapFullError and replayed", replays, "turns", "each one replayed", True)
    figure("T8", "monitor crashes", 0 if code == 0 and not monitor.bad_lines else 1, "crashes", "= 0",
           code == 0 and not monitor.bad_lines)
    figure("T8", "MapResizedError survived by the monitor", monitor_resized, "resizes", ">= 1", monitor_resized >= 1)
    figure("T8", "final map_size / bytes in use", round(ratio, 2), "x", "<= 4", ratio <= 4)
    figure("T8", "submission time", round(submit_s, 2), "s", "informative", True)
    assert not failures, failures[:3]
    assert submitted == n
    assert code == 0 and not monitor.bad_lines, (code, err[-2000:], monitor.bad_lines[:3])
    assert monitor_snapshots >= 5 and monitor_resized >= 1, (monitor_snapshots, monitor_resized, err[-2000:])
    assert growths >= 5, log[-3000:]  # 1 MiB to the tens of MiB the tasks need
    assert "Traceback" not in log, log[-3000:]
    assert ratio <= 4, snap


def test_map_full_mid_turn_is_replayed_and_agents_keep_their_tasks(tmp_path):
    """A turn that overflows the map (cancelling a big session) is aborted, the map grows, the turn is replayed.

    Meanwhile an agent holds running tasks: after the replay it still holds them (each runs once, and
    completes), and the cancel is answered OK with every task of the big session CANCELLED.
    """
    log_path = str(tmp_path / "broker.log")
    exec_log = str(tmp_path / "exec.log")
    cluster = make_cluster(tmp_path, workers=2, log_level="INFO", broker_log=log_path,
                           broker_args=("--map-size", "1MiB"))
    cluster.env["ARMONIK_ZMQ_EXEC_LOG"] = exec_log
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=120) as conn:
            sessions, results, tasks, events = (ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn),
                                                ArmoniKEvents(conn))
            busy = sessions.create_session(OPTIONS)
            sleepers = results.create_results({f"p{i}": json.dumps({"op": "sleep", "seconds": 4, "value": i}).encode()
                                               for i in range(2)}, busy)
            sleeper_outs = results.create_results_metadata(["o0", "o1"], busy)
            held = tasks.submit_tasks(busy, [TaskDefinition(payload_id=sleepers[f"p{i}"].result_id,
                                                            expected_output_ids=[sleeper_outs[f"o{i}"].result_id])
                                             for i in range(2)])
            deadline = time.monotonic() + 30
            while any(tasks.get_task(t.id).status not in (TaskStatus.DISPATCHED, TaskStatus.PROCESSING) for t in held):
                assert time.monotonic() < deadline, "the agent never took the sleeping tasks"
                time.sleep(0.05)
            # a big session of tasks that wait for an input never uploaded: queued in LMDB, never dispatched
            big = sessions.create_session(OPTIONS)
            never = results.create_results_metadata(["never"], big)["never"].result_id
            opts = TaskOptions(max_duration=timedelta(minutes=5), priority=1, max_retries=1, options={"m": "x" * 1024})
            # from a 1 MiB map, the first of these submissions overflows it while the agent holds the sleepers
            waiting = 0
            for _ in range(10):
                outs = results.create_results_metadata([f"w{waiting + i}" for i in range(100)], big, batch_size=100)
                tasks.submit_tasks(big, [TaskDefinition(payload_id=never, expected_output_ids=[o.result_id], options=opts)
                                         for o in outs.values()], chunk_size=100)
                waiting += 100
            sessions.cancel_session(big)
            replays = _read_log(log_path).count("after MapFullError: replaying")
            counts = tasks.count_tasks_by_status(Task.session_id == big)
            events.wait_for_result_availability([o.result_id for o in sleeper_outs.values()], busy)
            values = [json.loads(results.download_result_data(sleeper_outs[f"o{i}"].result_id, busy)) for i in range(2)]
            statuses = {tasks.get_task(t.id).status for t in held}
        log = _read_log(log_path)
    finally:
        cluster.cleanup()
    with open(exec_log) as f:
        executions = [line.split("\t")[0] for line in f]
    assert replays >= 1, log[-3000:]
    assert counts == {TaskStatus.CANCELLED: waiting}, counts
    assert values == [0, 1] and statuses == {TaskStatus.COMPLETED}
    # the agent kept its tasks through the reload: each ran once, no re-registration, no stale report
    assert sorted(executions) == sorted(t.id for t in held), executions
    assert "registers again" not in log and "could not be reached" not in log and "Traceback" not in log, log[-3000:]
