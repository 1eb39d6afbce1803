"""Fault injection on real processes (RELIABILITY.md section 6: T1, T2, T3, T4, T7).

Every fault is a signal sent to a process this test started (SIGKILL, SIGSTOP/SIGCONT) or a task
that misbehaves on purpose (spins, aborts). Each test records its figures with ``figure()``
(``python -m bench.faults`` turns them into docs/reliability.md) and asserts the criterion.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import threading
import time
import warnings
from datetime import timedelta

import pytest

from armonik_zmq.client import ResultStatus, TaskDefinition, TaskOptions, TaskStatus, connect
from armonik_zmq.client.filters import Direction, to_wire_filter, to_wire_sort
from armonik_zmq.client.tasks import Task
from armonik_zmq.errors import ArmoniKZmqError
from armonik_zmq.protocol import Op
from armonik_zmq.cluster import LocalProcesses
from conftest import PROCESSOR, WORKER_ENV, Api, make_cluster
from reliability import History, figure, overloaded, read_executions
from test_outcomes import alive, children_of, result_row, task_row, wait_for

_T = TaskStatus


def cluster_with_log(tmp_path, exec_log, workers: int = 2, **kwargs) -> LocalProcesses:
    """A cluster whose workers log every execution to ``exec_log`` (see tests/reliability.py)."""
    return LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=workers, processor=PROCESSOR,
                          env={**WORKER_ENV, "ARMONIK_ZMQ_EXEC_LOG": str(exec_log)}, **kwargs)


def options(max_retries: int = 1, max_duration: float = 300) -> TaskOptions:
    return TaskOptions(max_duration=timedelta(seconds=max_duration), priority=1, max_retries=max_retries)


def session_tasks(conn, session_id: str) -> list[dict]:
    """Every task row of a session (wire form: float timestamps), all pages."""
    rows, page = [], 0
    wire_filter = to_wire_filter(Task.session_id == session_id, "task", "task_filter")
    while True:
        header, _ = conn.call(Op.LIST_TASKS, filter=wire_filter, sort=to_wire_sort(Task.id, Direction.ASC, "task"),
                              page=page, page_size=10_000, with_errors=True, detailed=True)
        rows += header["tasks"]
        if not header["tasks"] or len(rows) >= header["total"]:
            return rows
        page += 1


def sha_payload(key: str, size: int = 100, sleep: float = 0.0) -> bytes:
    """A ``sha256:KEY:`` payload of ``size`` bytes (tests/processors.py answers with its sha256, after
    sleeping ``sleep`` seconds)."""
    head = (f"sha256:{key}:sleep={sleep:g}:" if sleep else f"sha256:{key}:").encode()
    return head + os.urandom(max(0, size - len(head)))


def submit_sha(api: Api, session_id: str, keys: list[str], opts=None) -> dict[str, tuple[str, str, bytes]]:
    """Submit one no-op task per key in one call; return key -> (task id, output id, payload)."""
    payloads = {k: sha_payload(k) for k in keys}
    created = api.results.create_results(payloads, session_id, batch_size=len(keys))
    outs = api.results.create_results_metadata([f"out-{k}" for k in keys], session_id)
    tasks = api.tasks.submit_tasks(session_id, [
        TaskDefinition(payload_id=created[k].result_id, expected_output_ids=[outs[f"out-{k}"].result_id], options=opts)
        for k in keys])
    return {k: (t.id, outs[f"out-{k}"].result_id, payloads[k]) for k, t in zip(keys, tasks)}


def ended(conn, task_id: str) -> float:
    row = task_row(conn, task_id)
    return row["ended_at"] if row["ended_at"] else 0.0


# -- T3: hung agent and fencing --------------------------------------------------------------------------


def test_t3a_stopped_agent_loses_its_task_and_its_late_result_is_refused(tmp_path, capfd, scale):
    """SIGSTOP an agent holding a task (10 s; CI 5 s, still past its 3 s lease), then SIGCONT it."""
    stop_for = 10.0 if scale == 1.0 else 5.0
    # own_groups: launched in the background by a shell that exits meanwhile, the test's process group is orphaned,
    # and the kernel would then send the stopped agent SIGHUP (killing it: nothing logged after SIGCONT) and SIGCONT
    cluster = make_cluster(tmp_path, workers=1, agent_id="first", own_groups=True)
    stopped = False
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options())
            # the task runs until the agent is stopped (the test opens its gate then): the stopped agent's worker
            # finishes it meanwhile, and its agent cannot report it. (It slept 2 s instead: on a loaded machine the
            # SIGSTOP came after the report once, and the task ended COMPLETED on the first agent.)
            gate = tmp_path / "gate"
            p = api.results.create_results({"p": json.dumps({"op": "gate", "gate": str(gate),
                                                             "then": {"op": "pid"}}).encode()}, session_id)["p"]
            out = api.results.create_results_metadata(["out"], session_id)["out"].result_id
            (task,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                         expected_output_ids=[out])])
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.PROCESSING, "the task to run on the first agent")
            (first_worker,) = children_of(cluster.agent.pid)
            second = cluster.start_extra_agent("second", workers=1)
            cluster.agent.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            stopped = True
            gate.touch()

            wait_for(lambda: ended(conn, task.id), "the stopped agent's task to be taken back", timeout=stop_for)
            requeue = ended(conn, task.id) - stopped_at
            assert task_row(conn, task.id)["status"] == _T.RETRIED
            value = api.value(session_id, out)
            assert value in children_of(second.pid) and value != first_worker
            written = result_row(conn, out)
            retry = task_row(conn, f"{task.id}###1")
            assert written["completed_by"] == retry["task_id"] and retry["owner_pod_id"] == "second"

            time.sleep(max(0.0, stopped_at + stop_for - time.time()))
            refused_before = fenced_refusals(metrics(conn))
            cluster.agent.send_signal(signal.SIGCONT)
            stopped = False
            # its late report (old attempt, finished while it was stopped) is refused; nothing changes. Or, when the
            # broker's word to drop that attempt (its registration again) is read before the worker's output, the
            # agent kills the worker: the late result is fenced off at the agent instead. Watched at the broker's
            # counters and the worker's pid, not by polling capfd: its readouterr() truncates the file the processes
            # write their log to (one offset shared with them), so a line they write during one is lost (1-4 of
            # 3,000 lines, polled every 20 ms). The log is read once they have all exited.
            try:
                outcome = wait_for(lambda: ("refused" if fenced_refusals(metrics(conn)) > refused_before else
                                            "killed" if not alive(first_worker) else None),
                                   "the resumed agent's late result to be refused or its worker killed", timeout=15)
            except AssertionError as exc:  # what the processes said since the start tells which way it went
                code = cluster.agent.poll()
                died = "" if code is None else f" (the agent exited with code {code})"
                cluster.cleanup()
                raise AssertionError(f"{exc}{died}; their log:\n" + capfd.readouterr().err[-6000:]) from None
            second.send_signal(signal.SIGTERM)
            second.wait(10)
            # the resumed agent carries on: the next task runs there
            later = submit_sha(api, session_id, ["after-resume"])["after-resume"]
            api.events.wait_for_result_availability(later[1], session_id)
            assert task_row(conn, later[0])["owner_pod_id"] == "first"
            # the result keeps the data and completer of the retry (one record: the late one was not applied)
            assert result_row(conn, out) == written
            assert api.value(session_id, out) == value
            assert task_row(conn, task.id)["status"] == _T.RETRIED and task_row(conn, retry["task_id"]) == retry
    finally:
        if stopped:
            cluster.agent.send_signal(signal.SIGCONT)
        cluster.cleanup()
    # Every process has exited: the log is whole. The resumed agent told what became of its late result.
    said = capfd.readouterr().err
    line = (f"broker refused the report of task {task.id}: [STALE_ATTEMPT]" if outcome == "refused"
            else f"task {task.id}: killing worker process {first_worker}")
    assert line in said, f"the late result was {outcome} but the agent's log does not say so:\n{said[-6000:]}"
    figure("T3", "(a) requeued after SIGSTOP", requeue, "s", "<= 4 s", requeue <= 4.0)
    figure("T3", "(a) late result of the old attempt",
           "refused (STALE_ATTEMPT)" if outcome == "refused" else "fenced at the agent (worker killed)", "",
           "refused, 1 stored result", True)
    assert requeue <= 4.0, f"the stopped agent's task was taken back {requeue:.2f}s after SIGSTOP (criterion 4 s)"


def test_t3b_spinning_worker_is_killed_at_max_duration(tmp_path):
    """A worker spinning past max_duration is killed at max_duration + <= 1 s; the task ends TIMEOUT.

    ArmoniK (ARMONIK.md) ends a task past its max_duration in TIMEOUT without retry; RELIABILITY.md T3(b)
    says "retried". We keep ArmoniK's semantics: the task is not retried, even with retries left.
    """
    max_duration = 1.5
    cluster = make_cluster(tmp_path, workers=1)
    marker = tmp_path / "spinner.pid"
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options(max_retries=2, max_duration=max_duration))
            p = api.results.create_results({"p": json.dumps({"op": "spin", "marker": str(marker)}).encode()},
                                           session_id)["p"]
            out = api.results.create_results_metadata(["out"], session_id)["out"].result_id
            (task,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                         expected_output_ids=[out])])
            wait_for(marker.exists, "the spinning task to start", timeout=30)
            started = marker.stat().st_mtime
            pid = int(marker.read_text())
            deadline = time.monotonic() + max_duration + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            killed = time.time()
            late = killed - started - max_duration
            assert not alive(pid), "the spinning worker was never killed"
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.TIMEOUT, "the task to end in TIMEOUT")
            row = task_row(conn, task.id)
            assert "max_duration" in row["status_message"]
            assert [r["task_id"] for r in session_tasks(conn, session_id)] == [task.id]  # no retry
    finally:
        cluster.cleanup()
    figure("T3", "(b) worker killed after max_duration", late, "s late", "<= 1 s (then TIMEOUT, no retry: ArmoniK)",
           late <= 1.0)
    assert late <= 1.0, f"the worker was killed {late:.2f}s after its max_duration (criterion 1 s)"


# -- T4: poison task -------------------------------------------------------------------------------------


def test_t4_poison_task_ends_in_error_after_exactly_four_attempts(tmp_path, scale):
    """1,000 (CI 200) tasks: one whose worker calls os.abort() on every attempt (max_retries=3), the others normal."""
    n = (1000 if scale == 1.0 else 200) - 1
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=2)
    try:
        cluster.start()
        broker_pid = cluster.broker.pid
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options(max_retries=3))
            p = api.results.create_results({"p": json.dumps({"op": "abort"}).encode()}, session_id)["p"]
            poison_out = api.results.create_results_metadata(["poison"], session_id)["poison"].result_id
            (poison,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                           expected_output_ids=[poison_out])])
            normal = submit_sha(api, session_id, [f"n{i}" for i in range(n)])
            final_id = f"{poison.id}###3"
            wait_for(lambda: ended(conn, final_id) if any(r["task_id"] == final_id
                                                         for r in session_tasks(conn, session_id)) else 0,
                     "the poison task's last attempt to end", timeout=120)
            api.events.wait_for_result_availability([o for _, o, _ in normal.values()], session_id)
            rows = {r["task_id"]: r for r in session_tasks(conn, session_id)}
            attempts = [rows[poison.id]] + [rows[f"{poison.id}###{i}"] for i in (1, 2, 3)]
            assert [r["status"] for r in attempts] == [_T.RETRIED] * 3 + [_T.ERROR]
            assert f"{poison.id}###4" not in rows
            # every attempt keeps its own error: the worker died of SIGABRT
            assert all("died (exit code -6)" in r["status_message"] for r in attempts), [
                r["status_message"] for r in attempts]
            execs = [row for row in read_executions(str(log)) if row[0].split("###")[0] == poison.id]
            first_run = min(t for _, _, t, _ in execs)
            took = attempts[-1]["ended_at"] - first_run
            completed = sum(1 for tid, _, _ in normal.values() if rows[tid]["status"] == _T.COMPLETED)
            digests_ok = all(api.results.download_result_data(o, session_id) == hashlib.sha256(pl).digest()
                             for _, o, pl in list(normal.values())[:50])
            assert cluster.broker.poll() is None and cluster.broker.pid == broker_pid
    finally:
        cluster.cleanup()
    per_attempt = took / 4
    figure("T4", "attempts of the poison task", len(execs), "", "= 4, then Error", len(execs) == 4)
    figure("T4", "poison task: first attempt to Error", took, "s", "<= 4 x (detection + respawn) = 4 x 2 s",
           took <= 8.0)
    figure("T4", "detection + respawn per attempt", per_attempt, "s", "(measured)", True)
    figure("T4", "other tasks Completed", completed, "tasks", f"= {n}", completed == n)
    assert len(execs) == 4, f"the poison task ran {len(execs)} times (criterion: exactly 4)"
    assert completed == n and digests_ok
    assert took <= 8.0, f"the poison task took {took:.2f}s from its first attempt to Error (criterion 8 s)"


# -- T1: broker kill -9 storm ----------------------------------------------------------------------------

AGENTS = 4
PREFETCH = 64  # the agent's default (config.AgentConfig.prefetch)
WINDOW = 1


def start_agents(cluster: LocalProcesses, n: int) -> None:
    """The cluster's own agent plus n - 1 more, each with one worker (2 cores: 4 agents x 1 worker)."""
    cluster.start_agent()
    for _ in range(n - 1):
        cluster.start_extra_agent(workers=cluster.workers)


def result_rows(conn, result_ids: list[str]) -> list[dict]:
    rows = []
    for i in range(0, len(result_ids), 1000):
        rows += conn.call(Op.GET_RESULTS, result_ids=result_ids[i:i + 1000])[0]["results"]
    return rows


class StormClient:
    """Submits keyed no-op tasks in batches through broker kills, without ever submitting a key twice.

    A batch is three calls (payloads, outputs, tasks). When the submit call gets no answer, the
    outputs it named tell whether it was committed: a committed submission made a task their owner.
    Until the idempotency keys of the `resubmit` parcel exist, this is how the test resubmits exactly
    the batches that were not committed.
    """

    def __init__(self, conn, api: Api, session_id: str, history: History, sleep: float = 0.0, size: int = 100):
        self.conn, self.api, self.session_id, self.history = conn, api, session_id, history
        self.sleep, self.size = sleep, size
        #: key -> (output id, payload)
        self.outputs: dict[str, tuple[str, bytes]] = {}
        self.unanswered = 0

    def _retry(self, call):
        while True:
            try:
                return call()
            except ArmoniKZmqError:
                self.unanswered += 1
                time.sleep(0.05)

    def submit(self, keys: list[str]) -> None:
        self.history.attempt(keys)
        payloads = {k: sha_payload(k, size=self.size, sleep=self.sleep) for k in keys}
        created = self._retry(lambda: self.api.results.create_results(payloads, self.session_id,
                                                                      batch_size=len(keys)))
        outs = self._retry(lambda: self.api.results.create_results_metadata([f"out-{k}" for k in keys],
                                                                            self.session_id))
        for k in keys:
            self.outputs[k] = (outs[f"out-{k}"].result_id, payloads[k])
        definitions = [TaskDefinition(payload_id=created[k].result_id,
                                      expected_output_ids=[outs[f"out-{k}"].result_id]) for k in keys]
        while True:
            try:
                self.api.tasks.submit_tasks(self.session_id, definitions)
                self.history.acknowledge(keys)
                return
            except ArmoniKZmqError:
                self.unanswered += 1
            # no answer: was it committed? (all or nothing: one request, one nested transaction)
            owners = self._retry(lambda: result_rows(self.conn, [self.outputs[k][0] for k in keys]))
            if all(r["owner_task_id"] for r in owners):
                return  # committed though never acknowledged: History reports these as "recovered"
            assert not any(r["owner_task_id"] for r in owners), "a submission was committed in part"

    def completed_count(self) -> int:
        rows = self._retry(lambda: result_rows(self.conn, [o for o, _ in self.outputs.values()]))
        return sum(r["status"] == ResultStatus.COMPLETED for r in rows)


def _executions(log) -> int:
    """How many executions the workers logged so far (a line each): the storm's progress, read without the broker."""
    with open(log, "rb") as f:
        return f.read().count(b"\n")


def run_storm(cluster: LocalProcesses, n: int, kills: int, log, sleep: float = 0.0, batch: int = 100) -> dict:
    """Submit n keyed tasks (each sleeping ``sleep`` s, ``batch`` per submission), SIGKILL the broker ``kills`` times
    meanwhile; return what happened."""
    open(log, "w").close()  # this run's executions only
    history = History(exec_log=str(log))
    with connect(cluster.endpoint, timeout=3) as conn:
        api = Api(conn)
        session_id = api.sessions.create_session(options(max_retries=5))
        client = StormClient(conn, api, session_id, history, sleep=sleep)
        prefix = f"{'storm' if kills else 'base'}{os.getpid()}-"
        batches = [[f"{prefix}{i}" for i in range(j, min(n, j + batch))] for j in range(0, n, batch)]
        started = time.time()
        restarts: list[tuple[float, float]] = []  # (killed at, restarted at)
        done = threading.Event()

        def submitter():
            for keys in batches:
                client.submit(keys)
            done.set()

        thread = threading.Thread(target=submitter, daemon=True)
        thread.start()
        rng = random.Random(n * 7 + kills)
        # Kill at random moments of the work: the k-th kill once the workers have run between k + 0.25 and
        # k + 0.75 (kills + 1)-ths of the tasks. Marks of progress, not of time: a kill lands while there is
        # work (a schedule of seconds outlasted the whole run once the broker got faster, and the wall-time
        # ratio then measured the schedule), and each restart dispatches before the next kill (measured below).
        marks = [int(n * (k + rng.uniform(0.25, 0.75)) / (kills + 1)) for k in range(kills)]
        for mark in marks:
            deadline = time.monotonic() + 120
            while _executions(log) < mark:
                assert time.monotonic() < deadline, f"the workers ran {_executions(log)} of {mark} tasks in 120 s"
                time.sleep(0.02)
            killed = time.time()
            cluster.kill_broker()
            cluster.start_broker()
            restarts.append((killed, time.time()))
        thread.join(timeout=600)
        assert done.is_set(), "the submitter did not finish"
        deadline = time.monotonic() + 600
        while client.completed_count() < n:
            assert time.monotonic() < deadline, "tasks still unfinished after 600 s"
            time.sleep(0.5)
        wall = time.time() - started
        conn.timeout = 60
        early = metrics(conn)["dispatches_before_commit"]  # since the last restart
        rows = session_tasks(conn, session_id)
        key_of = {o: k for k, (o, _) in client.outputs.items()}
        completed_rows = [r for r in rows if r["status"] == _T.COMPLETED]
        history.complete(key_of.get(r["expected_output_ids"][0], r["task_id"]) for r in completed_rows)
        stray = [r["task_id"] for r in rows if r["expected_output_ids"][0] not in key_of]
        results = result_rows(conn, [o for o, _ in client.outputs.values()])
        wrong = [r["result_id"] for r in results
                 if r["status"] != ResultStatus.COMPLETED or api.results.download_result_data(
                     r["result_id"], session_id) != hashlib.sha256(client.outputs[key_of[r["result_id"]]][1]).digest()]
        statuses = collections.Counter(_T(r["status"]).name for r in rows)
        # the first dispatch after each restart: the earliest dispatch stamp between it and the next kill
        firsts = []
        for i, (_, restarted) in enumerate(restarts):
            until = restarts[i + 1][0] if i + 1 < len(restarts) else float("inf")
            stamps = [r["acquired_at"] for r in rows if r["acquired_at"] and restarted <= r["acquired_at"] < until]
            if stamps:
                firsts.append(min(stamps) - restarted)
            elif until - restarted >= 2.0 and any(r["acquired_at"] and r["acquired_at"] >= until for r in rows):
                firsts.append(until - restarted)  # work was left, yet nothing was dispatched before the next kill
            # else: killed again within 2 s, before a dispatch could be seen: not measured
    known = {r["task_id"] for r in rows}
    phantoms = sum(1 for task_id, *_ in read_executions(str(log)) if task_id not in known)
    return {"history": history, "wall": wall, "restarts": restarts, "firsts": firsts, "wrong": wrong,
            "stray": stray, "statuses": statuses, "unanswered": client.unanswered, "early": early,
            "phantoms": phantoms}


def storms_on_four_agents(tmp_path, *runs: dict) -> list[dict]:
    """Start a broker and 4 one-worker agents that share an execution log, then ``run_storm(**run)`` for each run
    in turn; return their outcomes."""
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=1)
    try:
        cluster.start_broker()
        start_agents(cluster, AGENTS)
        cluster.wait_ready()
        return [run_storm(cluster, log=log, **run) for run in runs]
    finally:
        cluster.cleanup()


def extra_executions_bound(kills: int) -> int:
    """T1's bound on extra executions: kills x agents x what an agent of one worker may hold."""
    return kills * AGENTS * (1 + WINDOW + PREFETCH)


def assert_storm_kept_its_promises(storm: dict, n: int) -> None:
    """Nothing acknowledged lost, nothing unexpected or duplicated, every result right, all n tasks Completed."""
    report = storm["history"].report()
    assert report == {**report, "lost": 0, "unexpected": 0, "duplicated": 0}, storm["history"].explain()
    assert not storm["stray"] and not storm["wrong"], (storm["stray"][:5], storm["wrong"][:5])
    assert storm["statuses"]["COMPLETED"] == n and set(storm["statuses"]) <= {"COMPLETED", "RETRIED"}, storm["statuses"]


def test_t1_broker_kill_storm(tmp_path, scale):
    """20,000 (CI 2,000) no-op tasks, 4 agents, 1 client; SIGKILL the broker 10 (CI 3) times, restart at once."""
    n, kills = (20_000, 10) if scale == 1.0 else (2_000, 3)
    # At CI size no-op tasks take about a second: 10 ms tasks (~5 s on 4 workers) leave each restart time to
    # reach its first dispatch before the next kill.
    sleep = 0.0 if scale == 1.0 else 0.01
    baseline, storm = storms_on_four_agents(tmp_path, dict(n=n, kills=0, sleep=sleep), dict(n=n, kills=kills, sleep=sleep))
    h: History = storm["history"]
    report = h.report()
    bound = extra_executions_bound(kills)
    extra = h.extra_executions()
    restart_gap = max(r - k for k, r in storm["restarts"])
    slowest_first = max(storm["firsts"], default=float("nan"))
    ratio = storm["wall"] / baseline["wall"]
    figure("T1", "lost (acknowledged, never completed)", report["lost"], "tasks", "= 0", report["lost"] == 0)
    figure("T1", "unexpected", report["unexpected"] + len(storm["stray"]), "tasks", "= 0",
           report["unexpected"] + len(storm["stray"]) == 0)
    figure("T1", "duplicated (more than one Completed task per key)", report["duplicated"], "tasks", "= 0",
           report["duplicated"] == 0)
    figure("T1", "recovered (committed, never acknowledged)", report["recovered"], "tasks", "(information)", True)
    figure("T1", "wrong or missing results", len(storm["wrong"]), "results", "= 0", not storm["wrong"])
    figure("T1", "extra executions", extra, "", f"<= kills x agents x prefetch = {bound}", extra <= bound)
    figure("T1", "kill to restart", restart_gap, "s", "<= 0.5 s", restart_gap <= 0.5)
    figure("T1", f"restart to first dispatch (slowest of {len(storm['firsts'])})", slowest_first, "s", "<= 2 s",
           slowest_first <= 2.0)
    figure("T1", "wall time / fault-free baseline", ratio, "x",
           f"<= 3 (baseline {baseline['wall']:.1f} s, storm {storm['wall']:.1f} s)", ratio <= 3.0)
    assert_storm_kept_its_promises(storm, n)
    assert baseline["history"].report()["lost"] == 0
    assert extra <= bound, f"{extra} extra executions (bound {bound})"
    assert restart_gap <= 0.5
    assert storm["firsts"], "no restart got to dispatch before the next kill"
    # a restart starts a Python process and its agents register again: seconds only on a machine not oversubscribed
    if not overloaded():
        assert slowest_first <= 2.0, storm["firsts"]
    # The ratio compares the storm with the work it interrupts: judged at full size, where ten restarts (a
    # Python start each) weigh against 20,000 tasks as RELIABILITY.md means; at CI size three restarts weigh
    # against 2,000, and the figure is only recorded.
    if scale == 1.0 and not overloaded():
        assert ratio <= 3.0, f"storm {storm['wall']:.1f}s vs fault-free {baseline['wall']:.1f}s"
    elif slowest_first > 2.0 or ratio > 3.0:
        warnings.warn(f"restart to dispatch {storm['firsts']}, wall ratio {ratio:.2f}: not judged (size {scale}, "
                      f"load average {os.getloadavg()[0]:.1f})")


def test_t1_broker_kills_while_tasks_are_dispatched_before_their_commit(tmp_path, scale):
    """T1 with one task per submission (1,000; CI 300), 4 agents, 10 (CI 5) SIGKILLs of the broker: each submission's
    turn sends its DISPATCH before its commit (broker/server.py _dispatch_early), so kills land between the two.
    Nothing acknowledged is lost, no task has two results, extra executions stay within the T1 bound."""
    n, kills = (1_000, 10) if scale == 1.0 else (300, 5)
    baseline, storm = storms_on_four_agents(tmp_path, dict(n=50, kills=0, batch=1), dict(n=n, kills=kills, batch=1))
    h: History = storm["history"]
    report = h.report()
    bound = extra_executions_bound(kills)
    extra = h.extra_executions()
    figure("T1", "(dispatch before commit) DISPATCHes sent before their commit, fault-free run of 50", baseline["early"],
           "", ">= 25", baseline["early"] >= 25)
    figure("T1", "(dispatch before commit) lost / unexpected / duplicated", f"{report['lost']} / "
           f"{report['unexpected'] + len(storm['stray'])} / {report['duplicated']}", "tasks", "0 / 0 / 0",
           report["lost"] == report["unexpected"] == report["duplicated"] == 0 and not storm["stray"])
    figure("T1", "(dispatch before commit) wrong or missing results", len(storm["wrong"]), "results", "= 0",
           not storm["wrong"])
    figure("T1", "(dispatch before commit) extra executions", extra, "", f"<= {bound}", extra <= bound)
    figure("T1", "(dispatch before commit) executions of tasks never committed", storm["phantoms"], "",
           "(information)", True)
    # the fault-free tasks were dispatched before their commits (an agent registering in that turn: after)
    assert baseline["early"] >= 25, baseline["early"]
    assert_storm_kept_its_promises(storm, n)
    assert extra <= bound, f"{extra} extra executions (bound {bound})"


# -- T2: agent kill -9 -----------------------------------------------------------------------------------


def test_t2_agent_kill_storm(tmp_path, scale):
    """10,000 (CI 1,000) tasks of 50 ms on 4 agents; SIGKILL a random agent every 2 s, a supervisor respawns it."""
    n = int(10_000 * scale)
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=2)
    kills: dict[str, float] = {}  # agent id -> SIGKILL time
    try:
        cluster.start_broker()
        live = {f"a{i}-0": cluster.start_extra_agent(f"a{i}-0") for i in range(AGENTS)}
        cluster.wait_ready()
        history = History(exec_log=str(log))
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options(max_retries=5))
            client = StormClient(conn, api, session_id, history, sleep=0.05)
            started = time.time()
            for j in range(0, n, 500):
                client.submit([f"t2-{i}" for i in range(j, min(n, j + 500))])
            rng = random.Random(n)
            generation = 0
            next_kill = time.monotonic() + 1.0  # then every 2 s
            deadline = time.monotonic() + 900
            next_check = 0.0
            while True:
                if time.monotonic() >= next_check:  # polling n results is not free: twice a second
                    next_check = time.monotonic() + 0.5
                    if client.completed_count() == n:
                        break
                assert time.monotonic() < deadline, "tasks still unfinished after 900 s"
                if time.monotonic() >= next_kill:
                    # the supervisor: kill one, start its replacement at once (a new name: a new agent)
                    next_kill += 2.0
                    victim = rng.choice(sorted(live))
                    live.pop(victim).kill()
                    kills[victim] = time.time()
                    generation += 1
                    slot = victim.split("-")[0]
                    live[f"{slot}-{generation}"] = cluster.start_extra_agent(f"{slot}-{generation}")
                time.sleep(0.05)
            wall = time.time() - started
            rows = session_tasks(conn, session_id)
            key_of = {o: k for k, (o, _) in client.outputs.items()}
            history.complete(key_of[r["expected_output_ids"][0]] for r in rows if r["status"] == _T.COMPLETED)
            results = result_rows(conn, [o for o, _ in client.outputs.values()])
            by_id = {r["task_id"]: r for r in rows}
            one_result = all(r["status"] == ResultStatus.COMPLETED and by_id[r["completed_by"]]["status"] == _T.COMPLETED
                             for r in results)
    finally:
        cluster.cleanup()
    statuses = collections.Counter(_T(r["status"]).name for r in rows)
    errors = [r for r in rows if r["status"] == _T.ERROR]
    # how long each task running on a killed agent took to be back in the queue (its RETRIED stamp)
    delays = []
    for r in rows:
        if r["status"] == _T.RETRIED:
            agent = r["status_message"].split(" ")[1]
            if agent in kills:
                delays.append(r["ended_at"] - kills[agent])
    worst = max(delays, default=float("nan"))
    report = history.report()
    figure("T2", "agents killed", len(kills), "", "one every 2 s", len(kills) >= 2)
    figure("T2", "tasks Completed, one result each", statuses["COMPLETED"], "tasks", f"= {n}",
           statuses["COMPLETED"] == n and one_result)
    figure("T2", f"back in the queue after the kill (worst of {len(delays)})", worst, "s",
           "<= heartbeat x liveness + 1 s = 4 s", worst <= 4.0)
    figure("T2", "left Dispatched or Processing", statuses["DISPATCHED"] + statuses["PROCESSING"], "tasks", "= 0",
           statuses["DISPATCHED"] + statuses["PROCESSING"] == 0)
    figure("T2", "Error without exceeding max_retries", sum(len(r["retry_of_ids"]) < 5 for r in errors), "tasks",
           "= 0", all(len(r["retry_of_ids"]) >= 5 for r in errors))
    figure("T2", "wall time", wall, "s", "(information)", True)
    assert len(kills) >= 2, "the run ended before two agents were killed: raise the count"
    assert report == {**report, "lost": 0, "unexpected": 0, "duplicated": 0}, history.explain()
    assert statuses["COMPLETED"] == n and one_result, statuses
    assert set(statuses) <= {"COMPLETED", "RETRIED", "ERROR"}, statuses
    assert all(len(r["retry_of_ids"]) >= 5 for r in errors), [r["status_message"] for r in errors]
    assert delays and worst <= 4.0, sorted(delays)[-5:]


# -- T7: no silent ROUTER drops --------------------------------------------------------------------------


def metrics(conn) -> dict:
    return conn.call(Op.HEALTH, metrics=True)[0]["metrics"]


def fenced_refusals(snapshot: dict) -> int:
    """Completions the broker refused as late: their task had ended, or their attempt was replaced."""
    return snapshot["completions_duplicate"] + snapshot["completions_stale"]


def turn_p99(before: dict, after: dict) -> float:
    """The 99th percentile of the broker's loop-turn durations between two snapshots (bucket upper bound)."""
    counts = [n1 - n0 for (_, n0), (_, n1) in zip(before["turn_seconds"]["buckets"], after["turn_seconds"]["buckets"])]
    bounds = [float("inf") if b == "+Inf" else b for b, _ in after["turn_seconds"]["buckets"]]
    total, seen = sum(counts), 0
    for bound, n in zip(bounds, counts):
        seen += n
        if seen >= 0.99 * total:
            return bound
    return float("inf")


def test_t7a_send_to_a_killed_agent_requeues_its_task_at_once(tmp_path):
    """SIGKILL an agent, then give the broker a task for it: the send fails (EHOSTUNREACH), the task is requeued."""
    cluster = make_cluster(tmp_path, workers=1, agent_id="victim")
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options())
            before = metrics(conn)
            cluster.agent.kill()
            cluster.agent.wait()
            time.sleep(0.3)  # the broker's ROUTER has seen the connection go; the broker still counts on it
            key, (task_id, out, payload) = next(iter(submit_sha(api, session_id, ["t7a"]).items()))
            acked = time.time()
            wait_for(lambda: metrics(conn)["send_failure_requeues"] > before["send_failure_requeues"],
                     "the failed send to be noticed", timeout=10)
            row = task_row(conn, task_id)
            requeue = row["submitted_at"] - acked
            assert row["status"] == _T.SUBMITTED and row["status_message"] == "agent victim could not be reached"
            after = metrics(conn)
            cluster.start_extra_agent("rescuer", workers=1)
            api.events.wait_for_result_availability(out, session_id)
            assert api.results.download_result_data(out, session_id) == hashlib.sha256(payload).digest()
            done = task_row(conn, task_id)
            assert done["owner_pod_id"] == "rescuer" and done["attempt"] == 2 and done["retry_of_ids"] == []
    finally:
        cluster.cleanup()
    failures = after["send_failures"]["EHOSTUNREACH"] - before["send_failures"]["EHOSTUNREACH"]
    figure("T7", "(a) requeued after the failed send (EHOSTUNREACH)", max(0.0, requeue), "s", "<= 1 s", requeue <= 1.0)
    assert failures >= 1 and requeue <= 1.0, (failures, requeue)


def stopped_agent_run(tmp_path, mandatory: bool, n_batches: int, links: bool = False) -> dict:
    """SIGSTOP an agent (RCVHWM 100, room for 100,000 tasks) while the broker keeps pushing tasks to it.

    On ZeroMQ the broker's pipe to it holds 10 messages (--backend-sndhwm); with ``links`` the agent is on a
    Unix-socket link whose buffer at the broker holds 64 KiB (--link-buffer): either way, once full, a send
    fails with EAGAIN.

    The broker's lease is long (600 s): only a failed send can take the stopped agent's tasks back, so
    silent drops (ROUTER_MANDATORY off) leave tasks that never complete. Durable commits are off: the
    loop lag measured is the broker's own work and sends, not the disk's fsync.
    """
    broker_args = ["--lease", "600", "--backend-sndhwm", "10", "--link-buffer", str(64 << 10), "--no-sync"]
    if not mandatory:
        broker_args.append("--no-router-mandatory")
    cluster = make_cluster(tmp_path, workers=1, agent_id="stopped", broker_args=tuple(broker_args),
                           agent_args=("--rcvhwm", "100", "--prefetch", "100000"), links=links,
                           own_groups=True)  # (the stopped agent: see T3a)
    history = History()
    stopped = False
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            # the tiny HWM may also cut off the rescuer now and then (dropped, its running tasks retried)
            session_id = api.sessions.create_session(options(max_retries=20))
            cluster.agent.send_signal(signal.SIGSTOP)
            stopped = True
            before = metrics(conn)
            # 50 KB payloads travel inside DISPATCH: a few messages fill the socket buffers, then the pipe
            client = StormClient(conn, api, session_id, history, size=50_000)
            # many small submissions: one broker turn, and one DISPATCH to the stopped agent, each
            for j in range(n_batches):
                client.submit([f"t7b-{j}-{i}" for i in range(5)])
            pushed = metrics(conn)
            # the rescuer holds few tasks at a time: small DISPATCH messages, which the tiny HWM lets through
            cluster.agent_args = ["--prefetch", "0"]
            rescuer = cluster.start_extra_agent("rescuer", workers=2)
            n = 5 * n_batches
            last, still = -1, time.monotonic()
            while True:  # until every task is done, or nothing moves for 5 s
                count = client.completed_count()
                if count == n:
                    break
                if count != last:
                    last, still = count, time.monotonic()
                elif time.monotonic() - still > 5:
                    break
                time.sleep(0.2)
            cluster.agent.send_signal(signal.SIGCONT)
            stopped = False
            # the resumed agent works off what reached it (silently dropped tasks never do)
            last, still = -1, time.monotonic()
            while True:
                count = client.completed_count()
                if count == n or time.monotonic() - still > 3:
                    break
                if count != last:
                    last, still = count, time.monotonic()
                time.sleep(0.2)
            rows = session_tasks(conn, session_id)
            key_of = {o: k for k, (o, _) in client.outputs.items()}
            history.complete(key_of[r["expected_output_ids"][0]] for r in rows if r["status"] == _T.COMPLETED)
            after = metrics(conn)
            assert rescuer.poll() is None
    finally:
        if stopped:
            cluster.agent.send_signal(signal.SIGCONT)
        cluster.cleanup()
    return {"history": history, "before": before, "pushed": pushed, "after": after, "n": n, "completed": count}


@pytest.mark.parametrize("links", [False, True], ids=["zeromq", "link"])
def test_t7b_full_pipe_to_a_stopped_agent_requeues_never_drops(tmp_path, links):
    run = stopped_agent_run(tmp_path, mandatory=True, n_batches=60, links=links)
    before, pushed, after = run["before"], run["pushed"], run["after"]
    eagain = after["send_failures"]["EAGAIN"] - before["send_failures"]["EAGAIN"]
    failed = after["agent_send_failures"] - before["agent_send_failures"]
    handled = after["agent_send_failures_handled"] - before["agent_send_failures_handled"]
    p99 = turn_p99(before, pushed)
    report = run["history"].report()
    b = "(b, link)" if links else "(b)"
    figure("T7", f"{b} EAGAIN on sends to agents", eagain, "", ">= 1 (the pipe filled)", eagain >= 1)
    figure("T7", f"{b} failed sends to registered agents / requeues that followed", f"{failed} / {handled}", "",
           "equal", failed == handled)
    figure("T7", f"{b} broker loop turn p99 while pushing", p99 * 1000, "ms", "<= 10 ms", p99 <= 0.010)
    figure("T7", f"{b} lost", report["lost"], "tasks", "= 0", report["lost"] == 0)
    assert eagain >= 1, "the stopped agent's pipe never filled: push more"
    assert failed == handled and failed >= 1
    assert report == {**report, "lost": 0, "unexpected": 0, "duplicated": 0}, run["history"].explain()
    assert run["completed"] == run["n"]
    # Turn durations are wall time: on a machine loaded far beyond its cores (e.g. several test suites at
    # once) preemption alone exceeds 10 ms. The figure above records the raw value either way.
    if not overloaded():
        assert p99 <= 0.010, f"loop turn p99 {p99 * 1000:g} ms"
    elif p99 > 0.010:
        warnings.warn(f"loop turn p99 {p99 * 1000:g} ms not judged: load average {os.getloadavg()[0]:.1f}")


def test_t7_guard_without_router_mandatory_drops_are_seen(tmp_path):
    """The same run with ROUTER_MANDATORY off: the full pipe drops DISPATCH messages silently, and the checks
    above catch it (tasks that never complete, no EAGAIN counted). So the T7(b) test can fail."""
    run = stopped_agent_run(tmp_path, mandatory=False, n_batches=60)
    before, after = run["before"], run["after"]
    eagain = after["send_failures"]["EAGAIN"] - before["send_failures"]["EAGAIN"]
    report = run["history"].report()
    figure("T7", "guard (ROUTER_MANDATORY off): lost", report["lost"], "tasks", "> 0 (the test can fail)",
           report["lost"] > 0)
    assert eagain == 0
    assert report["lost"] > 0, "with ROUTER_MANDATORY off nothing was lost: the T7(b) scenario proves nothing"
