"""LMDB robustness (RELIABILITY.md section 6): T8 map growth with a cross-process reader, T9 stale readers
and file growth, T15 throughput floor and restart time. Real broker, agent and worker processes, real
LMDB files; the monitor and the stale readers are separate processes opening the directory read-only.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from armonik_zmq.client import (ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, Result, Task, TaskDefinition,
                                TaskOptions, TaskStatus, connect)
from armonik_zmq.protocol import Op
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
        # the monitor watches before the first write: a fast submission once outran its start-up (every growth
        # done before it opened the map: none to survive)
        deadline = time.monotonic() + 30
        while not monitor.snapshots:
            assert time.monotonic() < deadline and monitor.proc.poll() is None, "the monitor did not start watching"
            time.sleep(0.02)
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


# -- T9 ----------------------------------------------------------------------------------------------

READER = """
import sys, time, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=16, map_size=0)
txn = env.begin()  # a read snapshot, held until this process is killed
print("ready", flush=True)
time.sleep(600)
"""


def _cleared_slots(log: str) -> int:
    return sum(int(n) for n in re.findall(r"cleared (\d+) stale LMDB reader slot", log))


def _completed_session(conn, k: int, payload: bytes) -> tuple[str, list[str]]:
    """A session with ``k`` tasks run to completion; return its id and output ids."""
    sessions, results, tasks, events = ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn), ArmoniKEvents(conn)
    sid = sessions.create_session(OPTIONS)
    p = results.create_results({"p": payload}, sid)["p"].result_id
    outs = results.create_results_metadata([f"o{i}" for i in range(k)], sid, batch_size=k)
    ids = [o.result_id for o in outs.values()]
    tasks.submit_tasks(sid, [TaskDefinition(payload_id=p, expected_output_ids=[o]) for o in ids], chunk_size=k)
    events.wait_for_result_availability(ids, sid, bucket_size=k)
    return sid, ids


def test_t9_stale_readers_are_cleared_and_the_file_stops_growing(tmp_path, scale):
    """T9: 20 readers holding a read snapshot are SIGKILLed; the broker's reader_check clears their 20 slots
    within 10 s; then update/delete churn on completed tasks keeps the data file within 2x its steady size.
    """
    total_ops = int(200_000 * scale)
    k = 500  # tasks per cycle; each cycle: k completions, k result-data deletions, k tasks + k+1 results deleted
    ops_per_cycle = 4 * k
    log_path = str(tmp_path / "broker.log")
    # Replies of keyed requests are kept for the idempotency TTL (900 s by default): rows the churn adds on
    # purpose. A 1 s TTL lets them expire within the churn, so the size it reaches is the steady state.
    ttl = 1.0
    cluster = make_cluster(tmp_path, workers=2, log_level="INFO", broker_log=log_path,
                           broker_args=("--idempotency-ttl", str(ttl)))
    readers: list[subprocess.Popen] = []
    data_file = os.path.join(cluster.data_dir, "data.mdb")
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=120) as conn:
            _completed_session(conn, k, b"sha256:t9")  # rows for the readers' snapshots to pin
            readers = [subprocess.Popen([sys.executable, "-c", READER, cluster.data_dir], stdout=subprocess.PIPE,
                                        text=True) for _ in range(20)]
            for r in readers:
                assert r.stdout.readline().strip() == "ready"
            held = _inspect_once(cluster.data_dir)["readers"]
            before = _cleared_slots(_read_log(log_path))
            for r in readers:
                r.kill()
            killed_at = time.monotonic()
            for r in readers:
                r.wait()
            while _cleared_slots(_read_log(log_path)) - before < 20 and time.monotonic() - killed_at < 15:
                time.sleep(0.05)
            clear_s = time.monotonic() - killed_at
            cleared = _cleared_slots(_read_log(log_path)) - before
            # churn: run k tasks, delete their results' data, delete the session. The steady state is the size
            # once the first keys have expired (2 TTLs into the churn); the churn lasts at least 4 TTLs.
            results, sessions = ArmoniKResults(conn), ArmoniKSessions(conn)
            churn_started = time.monotonic()
            sizes, steady, c = [], None, 0
            while c < max(3, total_ops // ops_per_cycle) or time.monotonic() - churn_started < 4 * ttl:
                sid, ids = _completed_session(conn, k, f"sha256:t9-{c}".encode())
                results.delete_result_data(ids, sid, batch_size=k)
                sessions.delete_session(sid)
                sizes.append(os.path.getsize(data_file))
                if steady is None and time.monotonic() - churn_started >= 2 * ttl:
                    steady = sizes[-1]
                c += 1
            cycles = c
            entries = _inspect_once(cluster.data_dir)["entries"]
        log = _read_log(log_path)
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait()
        cluster.cleanup()
    growth = max(sizes) / steady
    figure("T9", "rows left after the churn (every session deleted; idempotency keys of the last TTL)",
           sum(entries.values()), "rows", "informative", True)
    figure("T9", "reader slots held by the 20 readers before the kill", held, "slots", ">= 20", held >= 20)
    figure("T9", "stale reader slots cleared by the broker", cleared, "slots", "= 20", cleared >= 20)
    figure("T9", "time from SIGKILL to slots cleared", round(clear_s, 2), "s", "<= 10 s", clear_s <= 10)
    figure("T9", "update/delete operations on completed tasks", cycles * ops_per_cycle, "ops",
           f">= {total_ops}", cycles * ops_per_cycle >= total_ops)
    figure("T9", "data file growth over the churn (max / steady state)", round(growth, 2), "x", "<= 2", growth <= 2)
    figure("T9", "MDB_READERS_FULL", int("READERS_FULL" in log), "occurrences", "= 0", "READERS_FULL" not in log)
    assert held >= 20
    assert growth <= 2, sizes  # without reader_check, the pinned snapshot makes it grow with every cycle
    assert cleared >= 20 and clear_s <= 10, (cleared, clear_s, log[-2000:])
    assert "READERS_FULL" not in log and "Traceback" not in log, log[-3000:]


# -- T15 ---------------------------------------------------------------------------------------------


def _rss_mib(pid: int) -> dict[str, float]:
    """Return a process's memory figures in MiB: VmRSS (resident), VmHWM (peak resident), RssAnon (its own
    memory) and RssFile (mapped file pages: LMDB pages it read, shared with the page cache)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _agents_registered(conn) -> int:
    header, _ = conn.call(Op.HEALTH, timeout=5)
    return int(header["checks"][1]["message"].split()[0])


def _oversubscribed() -> str:
    """Say why a throughput figure taken now would mean nothing ("" if it would mean something)."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 2 * cpus:
        return f"the machine is oversubscribed (load {load:.1f} on {cpus} CPUs before the test)"
    return ""


#: T15's waiter: wait for every result (ids one per line in a file) with the ArmoniK API, then exit 0
_WAIT_ALL = """
import sys
from armonik_zmq.client import ArmoniKEvents, connect
endpoint, session_id, path = sys.argv[1:4]
ids = open(path).read().split()
with connect(endpoint, timeout=600) as conn:
    ArmoniKEvents(conn).wait_for_result_availability(ids, session_id, bucket_size=len(ids))
"""


def test_t15_throughput_floor(tmp_path, scale):
    """T15: no-op tasks on 4 agents, durable: >= 1,000 tasks/s end to end, submit-ack p99 <= 20 ms, broker RSS
    <= 300 MiB. The two timing floors are judged only when the machine is not already oversubscribed by
    other work (a shared development box); CI runs the suite alone.
    """
    n = int(100_000 * scale)
    batch = 100
    busy = _oversubscribed()
    cluster = make_cluster(tmp_path, workers=1)
    try:
        cluster.start()
        for _ in range(3):
            cluster.start_extra_agent()
        with connect(cluster.endpoint, timeout=120) as conn:
            deadline = time.monotonic() + 60
            while _agents_registered(conn) < 4:
                assert time.monotonic() < deadline, "the 4 agents did not register"
                time.sleep(0.05)
            sessions, results, tasks = ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn)
            sid = sessions.create_session(OPTIONS)
            payload = results.create_results({"p": b"sha256:" + b"x" * 93}, sid)["p"].result_id
            outs = results.create_results_metadata([f"o{i}" for i in range(n)], sid, batch_size=10_000)
            ids = [o.result_id for o in outs.values()]
            broker_pid = cluster.broker.pid
            cpu_before = _cpu_s(broker_pid)
            latencies = []
            # What this process holds by now (pytest's own objects, the harness's 100,000 Result objects and
            # ids) is left out of the collector's full scans, as the broker does with its state (gcpolicy.py):
            # a full collection pauses every thread here, the submitting one included, for time proportional
            # to this heap (50-270 ms under load, several per run): the tail measured the harness, not the
            # system. What the client library allocates from here on is still scanned.
            gc.collect()
            gc.freeze()

            # Results are awaited by a process of their own, as another client would: its events must not delay
            # the submit acks. A thread of this process did: routing the subscription's 100,000-status snapshot
            # held the interpreter lock for tens of ms at a time, and the submits then waited for it, not for
            # the broker (5 of the 12 slowest submits of a traced run at load 3.4).
            ids_path = tmp_path / "ids"
            ids_path.write_text("\n".join(ids))
            started = time.monotonic()
            waiter = subprocess.Popen([sys.executable, "-c", _WAIT_ALL, cluster.endpoint, sid, str(ids_path)],
                                      env=cluster.env)
            try:
                for i in range(0, n, batch):
                    t0 = time.perf_counter()
                    tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[o])
                                             for o in ids[i:i + batch]], chunk_size=batch)
                    latencies.append(time.perf_counter() - t0)
                code = waiter.wait(600)
            finally:
                if waiter.poll() is None:
                    waiter.kill()
                    waiter.wait()
            elapsed = time.monotonic() - started
            assert code == 0, "the tasks did not all complete"
            cpu_per_task_ms = (_cpu_s(broker_pid) - cpu_before) / n * 1000
            rss = _rss_mib(broker_pid)["VmHWM"]
    finally:
        gc.unfreeze()
        cluster.cleanup()
    latencies.sort()
    p99_ms = latencies[int(0.99 * (len(latencies) - 1))] * 1000
    p50_ms = latencies[len(latencies) // 2] * 1000
    rate = n / elapsed
    note = f" ({busy})" if busy else ""
    figure("T15", "end-to-end throughput (4 agents x 1 worker, durable)" + note, round(rate), "tasks/s", ">= 1000",
           rate >= 1000)
    figure("T15", "submit-ack p99 (batches of 100)" + note, round(p99_ms, 2), "ms", "<= 20 ms", p99_ms <= 20)
    figure("T15", "submit-ack p50 (batches of 100)" + note, round(p50_ms, 2), "ms", "informative", True)
    figure("T15", "broker CPU per task (utime + stime)", round(cpu_per_task_ms, 3), "ms", "informative", True)
    figure("T15", "broker peak RSS during the run", round(rss), "MiB", "<= 300 MiB", rss <= 300)
    assert rss <= 300, rss
    if busy:
        pytest.skip(f"{busy}: measured {rate:.0f} tasks/s and submit-ack p99 {p99_ms:.1f} ms, not judged")
    if scale < 1.0:
        # The timing floors are judged at full size (python -m bench.faults -> docs/reliability.md); at CI size
        # the run is too short for a sustained rate and its figures are only recorded.
        return
    assert p99_ms <= 20, latencies[-10:]
    assert rate >= 1000, (rate, elapsed)


def test_t15_restart_with_queued_tasks(tmp_path, scale):
    """T15: with 100,000 (CI: 10,000) tasks queued, the broker's RSS stays <= 300 MiB, a restart rebuilds the
    state in <= 2 s (it reads only the unfinished tasks) and the first dispatch follows at once.
    """
    n = int(100_000 * scale)
    log_path = str(tmp_path / "broker.log")
    cluster = make_cluster(tmp_path, workers=1, log_level="INFO", broker_log=log_path)
    try:
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=120) as conn:
            sessions, results, tasks = ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn)
            sid = sessions.create_session(OPTIONS)
            payload = results.create_results({"p": b"sha256:" + b"x" * 93}, sid)["p"].result_id
            # history the restart must not read: 2 x n finished tasks (cancelled, 10,000 per session)
            for h in range(0, 2 * n, 10_000):
                old = sessions.create_session(OPTIONS)
                old_payload = results.create_results({"p": b"sha256:old"}, old)["p"].result_id
                for i in range(0, 10_000, 1000):
                    outs = results.create_results_metadata([f"h{i + j}" for j in range(1000)], old, batch_size=1000)
                    tasks.submit_tasks(old, [TaskDefinition(payload_id=old_payload, expected_output_ids=[o.result_id])
                                             for o in outs.values()], chunk_size=1000)
                sessions.cancel_session(old)
            for i in range(0, n, 1000):
                outs = results.create_results_metadata([f"o{i + j}" for j in range(1000)], sid, batch_size=1000)
                tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[o.result_id])
                                         for o in outs.values()], chunk_size=1000)
            mem_queued = _rss_mib(cluster.broker.pid)
        cluster.kill_broker()
        log_before = len(_read_log(log_path))
        # an agent already waiting for the broker, as after a broker crash; ZeroMQ queues its registration
        cluster.start_agent()
        time.sleep(2.0)
        restarted = time.time()
        cluster.start_broker()
        log = ""
        while "first dispatch" not in log:
            assert time.time() - restarted < 120, log[-2000:]
            time.sleep(0.05)
            log = _read_log(log_path)[log_before:]
        mem_restarted = _rss_mib(cluster.broker.pid)
    finally:
        cluster.cleanup()
    rebuilt = re.search(r"state rebuilt from \S+ in ([0-9.]+)s: \d+ pending, (\d+) queued", log)
    assert rebuilt, log[:3000]
    rebuild_s, queued = float(rebuilt.group(1)), int(rebuilt.group(2))
    first = re.search(r"^(\S+ \S+) broker\S+ INFO \S+ first dispatch ([0-9.]+)s after the state was loaded", log, re.M)
    dispatch_s = float(first.group(2))
    # process start to first dispatch: the log line's own time stamp (milliseconds) against the start time
    stamp = time.mktime(time.strptime(first.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S"))
    start_to_dispatch_s = stamp + int(first.group(1).split(",")[1]) / 1000 - restarted
    rss = max(mem_queued["VmRSS"], mem_restarted["VmRSS"])
    figure("T15", f"broker RSS with {n} tasks queued (before / after the restart)",
           f"{mem_queued['VmRSS']:.0f} / {mem_restarted['VmRSS']:.0f}", "MiB", "<= 300 MiB", rss <= 300)
    figure("T15", f"broker own memory (RssAnon) with {n} tasks queued (before / after the restart)",
           f"{mem_queued['RssAnon']:.0f} / {mem_restarted['RssAnon']:.0f}", "MiB", "informative", True)
    figure("T15", "broker peak RSS (VmHWM) while building the history and the queue", round(mem_queued["VmHWM"]),
           "MiB", "informative", True)
    figure("T15", f"restart: state rebuilt ({queued} queued, {2 * n} finished)", round(rebuild_s, 3), "s",
           "<= 2 s", rebuild_s <= 2)
    figure("T15", "restart: state loaded to first dispatch (agent waiting)", round(dispatch_s, 3), "s", "<= 2 s",
           dispatch_s <= 2)
    figure("T15", "restart: broker process start to first dispatch (Python start-up included)",
           round(start_to_dispatch_s, 2), "s", "informative", True)
    assert queued == n, log[:3000]
    assert rebuild_s <= 2 and dispatch_s <= 2, log[:3000]
    assert rss <= 300, (mem_queued, mem_restarted)


# -- pieces ------------------------------------------------------------------------------------------


def _task_row(task_id: str, status: TaskStatus) -> dict:
    return {"task_id": task_id, "session_id": "s", "status": int(status),
            "options": {"partition_id": "default", "priority": 3}}


def test_live_task_table_follows_status_and_is_built_for_an_old_directory(tmp_path):
    """The live-task table holds exactly the unfinished tasks; a directory without it gets it on open."""
    from armonik_zmq.broker.store import LIVE_TASKS_DB, Store

    path = str(tmp_path / "lmdb")
    store = Store(path, map_size=1 << 20)
    with store.write() as txn:
        txn.put_task(_task_row("a", TaskStatus.SUBMITTED), new=True)
        txn.put_task(_task_row("b", TaskStatus.PENDING), new=True)
        txn.put_task(_task_row("c", TaskStatus.SUBMITTED), new=True)
    with store.write() as txn:
        txn.put_task(_task_row("a", TaskStatus.COMPLETED))
        txn.put_task(_task_row("c", TaskStatus.DISPATCHED))
    with store.read() as txn:
        # a queued task carries what requeuing it takes; others are read from their row
        assert list(txn.iter_live_tasks()) == [("b", None), ("c", None)]
    with store.write() as txn:
        txn.put_task(_task_row("b", TaskStatus.SUBMITTED), was=TaskStatus.PENDING)
    with store.read() as txn:
        assert list(txn.iter_live_tasks()) == [("b", ("default", 3)), ("c", None)]
    # as written by a broker from before the table: drop it, reopen, and it is rebuilt from the task rows
    with store.env.begin(write=True) as txn:
        txn.drop(store.live_tasks, delete=True)
    store.close()
    store = Store(path, map_size=1 << 20)
    try:
        with store.read() as txn:
            assert txn.txn.get(LIVE_TASKS_DB) is not None
            assert list(txn.iter_live_tasks()) == [("b", ("default", 3)), ("c", None)]
    finally:
        store.close()


def test_inspect_command(tmp_path):
    """``armonik-zmq inspect``: --help, a clear error on a directory that is not a broker's, a JSON snapshot."""
    from armonik_zmq.broker.store import Store

    out = subprocess.run(_cli("inspect", "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "read-only" in out.stdout
    out = subprocess.run(_cli("inspect", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not a broker's data directory" in out.stderr
    path = str(tmp_path / "lmdb")
    store = Store(path, map_size=1 << 20)
    with store.write() as txn:
        txn.put_task(_task_row("t1", TaskStatus.SUBMITTED), new=True)
    store.close()
    snap = _inspect_once(path)
    assert snap["entries"]["tasks"] == 1 and snap["entries"]["live_tasks"] == 1
    out = subprocess.run(_cli("inspect", path, "--tasks", "5", "--by-status", "--readers"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "t1  SUBMITTED" in out.stdout and "SUBMITTED 1" in out.stdout, out


def test_broker_map_size_options(tmp_path):
    """--map-size and --max-map-size take sizes with units and refuse nonsense with a clear message."""
    out = subprocess.run(_cli("broker", "--help"), capture_output=True, text=True, timeout=60)
    assert "--map-size" in out.stdout and "--max-map-size" in out.stdout
    bad = subprocess.run(_cli("broker", "--data-dir", str(tmp_path / "d"), "--map-size", "lots"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "is not a size" in bad.stderr
    bad = subprocess.run(_cli("broker", "--data-dir", str(tmp_path / "d"), "--map-size", "2MiB", "--max-map-size",
                              "1MiB"), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "at least --map-size" in bad.stderr


def test_full_map_at_its_limit_refuses_with_storage_full(tmp_path):
    """A turn that cannot fit in a map already at --max-map-size is refused (STORAGE_FULL), applying nothing;
    the broker keeps serving what fits."""
    from armonik_zmq.errors import StorageFullError

    log_path = str(tmp_path / "broker.log")
    cluster = make_cluster(tmp_path, broker_log=log_path, broker_args=("--map-size", "1MiB", "--max-map-size", "1MiB"))
    try:
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=60) as conn:
            sessions, results = ArmoniKSessions(conn), ArmoniKResults(conn)
            sid = sessions.create_session(OPTIONS)
            with pytest.raises(StorageFullError, match="max-map-size"):
                results.create_results({"big": os.urandom(2 << 20)}, sid)
            assert results.list_results(Result.session_id == sid)[0] == 0  # nothing of it was applied
            small = results.create_results({"small": b"fits"}, sid)["small"].result_id
            assert results.download_result_data(small, sid) == b"fits"
            assert cluster.broker.poll() is None
    finally:
        cluster.cleanup()
    assert "Traceback" not in _read_log(log_path)
