"""Batched task path between agent and workers: RUNS (several tasks per message), W_OUTPUTS (several outputs
per message), the deeper queue for tiny tasks, and what a worker death or a long task does to a batch."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import cloudpickle
import pytest

import armonik_zmq
from armonik_zmq.client import TaskDefinition, TaskStatus, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.protocol import ErrorCode, Op, ProtocolError, WORKER_OPS, validate
from conftest import Api
from scripted import ScriptedBroker
from reliability import read_executions
from test_faults import cluster_with_log, options, session_tasks, submit_sha
from test_outcomes import children_of, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module

def _noop(x):
    return x


def _nap(seconds):
    time.sleep(seconds)
    return seconds


def test_worker_death_in_a_batch_is_charged_to_the_task_it_was_running(tmp_path):
    """One worker, tiny tasks in batches, one of them aborts its worker: only that one is retried.

    Outputs of the tasks that ran before it in the batch may still be held by the worker when it dies: the
    agent reads the worker's run-state file to charge the death to the right task, and runs the others
    again without counting an attempt.
    """
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=1)
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            session_id = api.sessions.create_session(options(max_retries=3))
            warm = submit_sha(api, session_id, [f"w{i}" for i in range(300)])  # tiny tasks: deeper queue
            api.events.wait_for_result_availability([o for _, o, _ in warm.values()], session_id)
            p = api.results.create_results({"p": json.dumps({"op": "abort"}).encode()}, session_id)["p"]
            poison_out = api.results.create_results_metadata(["poison"], session_id)["poison"].result_id
            before = submit_sha(api, session_id, [f"a{i}" for i in range(40)])
            (poison,) = api.tasks.submit_tasks(session_id, [TaskDefinition(payload_id=p.result_id,
                                                                           expected_output_ids=[poison_out])])
            after = submit_sha(api, session_id, [f"b{i}" for i in range(40)])
            api.events.wait_for_result_availability([o for _, o, _ in [*before.values(), *after.values()]],
                                                    session_id)
            final_id = f"{poison.id}###3"
            wait_for(lambda: any(r["task_id"] == final_id and r["ended_at"] for r in session_tasks(conn, session_id)),
                     "the poison task's last attempt to end", timeout=60)
            rows = {r["task_id"]: r for r in session_tasks(conn, session_id)}
    finally:
        cluster.cleanup()
    attempts = [rows[poison.id]] + [rows[f"{poison.id}###{i}"] for i in (1, 2, 3)]
    assert [r["status"] for r in attempts] == [TaskStatus.RETRIED] * 3 + [TaskStatus.ERROR]
    normal = {tid for tid, _, _ in [*warm.values(), *before.values(), *after.values()]}
    retried = sorted(tid for tid in rows if "###" in tid and tid.split("###")[0] in normal)
    assert not retried, f"tasks charged with a worker death they did not cause: {retried[:5]}"
    assert all(rows[tid]["status"] == TaskStatus.COMPLETED for tid in normal)
    poison_runs = [row for row in read_executions(str(log)) if row[0].split("###")[0] == poison.id]
    assert len(poison_runs) == 4


def test_tiny_tasks_do_not_wait_behind_a_long_one(client):
    """Tiny tasks go to workers in deep batches; a long task gives the ones queued behind it back, beyond
    the window (1): the other worker runs them instead of letting them wait for the long one."""
    client.gather(client.map(_noop, range(500)))  # tasks run under a millisecond: the deep queue is on
    long = client.submit(_nap, 6.0)
    tiny = client.map(_noop, range(200))
    done, not_done = armonik_zmq.wait(tiny, timeout=4.0)
    assert len(not_done) <= 1, f"{len(not_done)} tiny tasks waited behind the long one (window: 1)"
    assert long.result(timeout=60) == 6.0
    assert client.gather(tiny) == list(range(200))


def _cpu_while_napping(seconds):
    """The worker process's CPU time (all its threads) while this task sleeps."""
    before = time.process_time()
    time.sleep(seconds)
    return time.process_time() - before


def test_an_agent_holds_more_tasks_while_they_are_tiny_and_hands_them_back_when_they_get_long(tmp_path):
    """While its tasks run under a millisecond the agent asks the broker for ``--tiny-prefetch`` tasks beyond
    those at its workers (a broker turn then moves hundreds of tasks, not a few dozen). Once they run longer,
    it asks for its own capacity back and hands back the tasks it holds beyond it that no worker has."""
    cluster = armonik_zmq.LocalCluster(n_workers=1)
    cluster.processes.agent_args = ["--prefetch", "8", "--tiny-prefetch", "100", "--tiny-window", "16"]
    own, tiny = 1 * (1 + 1) + 8, 1 * (1 + 16) + 100  # workers x (1 + window or tiny window) + prefetch

    with cluster as client:
        def capacity() -> int:
            return client._conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["agents_capacity"]

        def held() -> int:
            counts = client._conn.call(Op.COUNT_TASKS_BY_STATUS, filter=[[["session_id", "eq", client.session_id]]])
            return sum(n for status, n in counts[0]["counts"] if status in (TaskStatus.DISPATCHED, TaskStatus.PROCESSING))

        assert capacity() == own
        client.gather(client.map(_noop, range(300)))
        wait_for(lambda: capacity() == tiny, "the agent to ask for its tiny-task capacity", timeout=30)
        # One worker: the agent takes many more of these than its own capacity while they still look tiny. The
        # first one to end shows they are not: the agent then keeps its own capacity's worth, a few seconds of
        # work, and hands the others back, well before its worker could have run them (60 x 0.3 s).
        naps = client.map(_nap, [0.3] * 60)
        wait_for(lambda: held() > 2 * own, f"the agent to hold more than {2 * own} tasks", timeout=30)
        assert held() <= tiny
        wait_for(lambda: capacity() == own, "the agent to ask for its own capacity back", timeout=10)
        wait_for(lambda: held() <= own, f"the agent to hand back what it holds beyond {own} tasks", timeout=5)
        client.cancel(naps)


def test_an_agent_whose_workers_all_run_long_tasks_hands_back_the_tiny_ones_it_holds(tmp_path):
    """Tasks are tiny, but the only worker runs a long one: the tiny tasks the agent took beyond its own capacity
    go back to the broker (another agent may run them), not wait for the long task to end."""
    cluster = armonik_zmq.LocalCluster(n_workers=1)
    cluster.processes.agent_args = ["--prefetch", "8", "--tiny-prefetch", "100", "--tiny-window", "16"]
    own, tiny = 1 * (1 + 1) + 8, 1 * (1 + 16) + 100

    with cluster as client:
        def held() -> int:
            counts = client._conn.call(Op.COUNT_TASKS_BY_STATUS, filter=[[["session_id", "eq", client.session_id]]])
            return sum(n for status, n in counts[0]["counts"] if status in (TaskStatus.DISPATCHED, TaskStatus.PROCESSING))

        client.gather(client.map(_noop, range(300)))
        wait_for(lambda: client._conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["agents_capacity"] == tiny,
                 "the agent to ask for its tiny-task capacity", timeout=30)
        long = client.submit(_nap, 8.0)
        wait_for(lambda: held() == 1, "the long task to be dispatched", timeout=30)
        short = client.map(_noop, range(100))
        started = time.monotonic()
        wait_for(lambda: held() <= own, f"the agent to hand back what it holds beyond {own} tasks", timeout=6)
        assert not long.done() and time.monotonic() - started < 6
        assert client.gather(short, timeout=60) == list(range(100))


def test_an_agent_reports_many_completions_in_pieces_and_the_full_ones_without_waiting_for_acks(tmp_path):
    """A broker handles a TASKS_DONE in one piece, and a client's request that comes meanwhile waits for it: an
    agent sends at most ``--report-max`` completions per report. A full report goes while others wait for their
    ack (the broker then finds the next one waiting); what does not fill one waits for the acks in flight, and
    every completion is reported exactly once."""
    cluster = cluster_with_log(tmp_path, tmp_path / "exec.log", workers=1, agent_id="a1", links=False,
                               agent_args=("--report-max", "50", "--tiny-window", "64"))
    broker = ScriptedBroker(cluster.agents_endpoint)  # a ROUTER: the agent on ZeroMQ (links=False)
    attempts = [(f"t{i}", 1) for i in range(230)]
    try:
        cluster.start_agent()
        peer = broker.register(*broker.next_request(Op.AGENT_REGISTER), lease=60.0)
        broker.dispatch(peer, attempts)
        unacked: list[dict] = []
        for _, header in broker.requests(3.0):  # none is answered: what the agent sends on its own
            if header["op"] == Op.TASKS_DONE:
                unacked.append(header)
        sizes = [len(h["tasks"]) for h in unacked]
        assert len(unacked) >= 2 and max(sizes) <= 50, sizes
        assert sum(sizes) < len(attempts), f"the last {len(attempts) - sum(sizes)} did not wait for the acks: {sizes}"
        reported = [c["task_id"] for h in unacked for c in h["tasks"]]
        for header in unacked:
            broker.ack_done(peer, header)
        while len(reported) < len(attempts):
            _, header = broker.next_request(Op.TASKS_DONE, seconds=10)
            assert len(header["tasks"]) <= 50
            reported += [c["task_id"] for c in header["tasks"]]
            broker.ack_done(peer, header)
        assert sorted(reported) == sorted(task_id for task_id, _ in attempts)
    finally:
        cluster.cleanup()
        broker.close()


def test_a_worker_burns_no_cpu_while_its_task_waits(client):
    """While a long task runs, the worker's guard thread (held outputs, runs given back) looks less and less
    often: it must not spin (it once did, once its deadlines from the run's start had passed: a 256 MiB
    result took 6 s instead of 1)."""
    client.gather(client.map(_noop, range(200)))  # the deep queue is on: the guard watches every run
    assert client.submit(_cpu_while_napping, 1.5).result(timeout=60) < 0.2


def _guard_switches():
    """The voluntary context switches of this worker's guard thread so far (its wake-ups)."""
    guard = next(t for t in threading.enumerate() if t.name == "output-guard")
    with open(f"/proc/self/task/{guard.native_id}/status") as f:
        return int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])


def test_the_guard_sleeps_through_runs_that_end_before_its_deadlines(tmp_path):
    """A run that ends before the guard's first deadline (held outputs, runs to give back) does not wake the
    guard thread: its start sets an alarm, where it used to wake the guard, which then slept until the
    deadline (one or two wake-ups per run on an idle worker: ~80 for these 100)."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1) as cluster, \
            armonik_zmq.Client(cluster.endpoint) as one_worker:
        before = one_worker.submit(_guard_switches).result(timeout=60)
        for i in range(100):  # one at a time: each starts on an idle worker
            assert one_worker.submit(_noop, i).result(timeout=60) == i
        woken = one_worker.submit(_guard_switches).result(timeout=60) - before
    assert woken < 20, f"the guard woke {woken} times for 100 runs of a no-op"


def test_a_short_task_reports_its_start_with_its_completion(client):
    """A task that ends within the agent's START_REPORT_DELAY sends no TASKS_STARTED of its own: its completion
    carries the start (one broker turn, one commit, on its way to its result). A longer task is PROCESSING
    while it runs."""
    def starts_reported() -> int:
        return client._conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["requests"].get("TASKS_STARTED", 0)

    assert client.submit(_noop, -1).result(30) == -1  # the workers are warm
    before = starts_reported()
    for i in range(20):  # one at a time: each starts on an idle worker
        assert client.submit(_noop, i).result(30) == i
    # before the delay, each of them had its own: 20 (a loaded machine may stretch a few past the delay)
    assert starts_reported() - before < 10
    # A batch: the workers get queues of tiny tasks and report their outputs in batches; the starts of the
    # queued ones used to ride with every completion report (30-47 TASKS_STARTED for 2,000 tasks at any
    # load). Now only a run stretched past TINY_START_REPORT_DELAY has its start reported (16 at load 8).
    before = starts_reported()
    assert client.gather(client.map(_noop, range(2000))) == list(range(2000))
    assert starts_reported() - before < 25
    long = client.submit(_nap, 5.0)

    def status() -> int:
        return client._conn.call(Op.GET_TASKS, task_ids=[long.task_id])[0]["tasks"][0]["status"]

    wait_for(lambda: status() == TaskStatus.PROCESSING, "the long task to be PROCESSING", timeout=4.0)
    assert not long.done()
    assert long.result(timeout=60) == 5.0


def test_a_task_is_reported_started_once_its_worker_runs_it(tmp_path):
    """The agent reports a start (the task becomes PROCESSING) when its worker's run state shows the task
    running: a task whose worker has not taken it up (here: a stopped worker) stays DISPATCHED however long it
    waits there. Before, a task at the head of its worker's queue for START_REPORT_DELAY was reported, which
    under load also reported tasks that had ended and whose outputs were on their way."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, own_groups=True) as cluster, \
            armonik_zmq.Client(cluster.endpoint) as client:
        assert client.submit(_noop, 0).result(timeout=60) == 0  # the worker is up and idle
        (worker,) = children_of(cluster.agent.pid)

        def status() -> int:
            return client._conn.call(Op.GET_TASKS, task_ids=[nap.task_id])[0]["tasks"][0]["status"]

        os.kill(worker, signal.SIGSTOP)
        try:
            nap = client.submit(_nap, 2.0)
            wait_for(lambda: status() != TaskStatus.SUBMITTED, "the task to reach the agent")
            time.sleep(0.5)  # 250 times START_REPORT_DELAY
            assert status() == TaskStatus.DISPATCHED
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: status() == TaskStatus.PROCESSING, "the task to be PROCESSING while it runs", timeout=10.0)
        assert not nap.done()
        assert nap.result(timeout=60) == 2.0


def test_w_outputs_schema():
    ok = {"v": 1, "op": int(Op.W_OUTPUTS), "rid": 1,
          "outputs": [{"token": "a", "ok": True, "result_ids": ["r"], "frames": [1], "started_at": 1.0,
                       "ended_at": 2.0}],
          "returned": ["b", "c"]}
    assert validate(ok, WORKER_OPS) == Op.W_OUTPUTS
    for bad in ({**ok, "outputs": [{"ok": True}]}, {**ok, "returned": [1]}, {**ok, "outputs": "x"}):
        with pytest.raises(ProtocolError) as exc:
            validate(bad, WORKER_OPS)
        assert exc.value.code == ErrorCode.INVALID_ARGUMENT


def test_a_worker_keeps_the_configuration_and_options_a_runs_leaves_out(tmp_path):
    """A RUNS leaves out the ``configuration`` and ``options`` the previous RUNS on the link had: the worker
    runs its tasks with the last ones it got (a real worker, driven on its link by hand as its agent)."""
    from armonik_zmq.protocol import decode_header, reply_ok, request
    from armonik_zmq.worker.link import Link
    from conftest import PROCESSOR, WORKER_ENV
    import socket
    import subprocess

    path = str(tmp_path / "workers")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    worker = subprocess.Popen([sys.executable, "-m", "armonik_zmq.worker", "--agent", path, "--processor", PROCESSOR,
                               "--agent-pid", str(os.getpid())], env={**os.environ, **WORKER_ENV})
    try:
        sock, _ = listener.accept()
        sock.settimeout(30)
        link = Link(sock)
        inbox: list = []

        def receive() -> tuple[dict, list]:
            while not inbox:
                inbox.extend(link.read(wait=True))
                assert link.closed is None, link.closed
            frames = inbox.pop(0)
            return decode_header(frames[0]), frames[1:]

        ready, _ = receive()
        assert ready["op"] == Op.WORKER_READY
        link.send([reply_ok(Op.WORKER_READY, ready["rid"])])
        first = {"max_duration": 60.0, "priority": 1, "max_retries": 1, "options": {"k": "first"}}
        second = {**first, "options": {"k": "second"}}
        configuration = {"data_chunk_max_size": 12345, "keep": 1}

        def runs(token: str, option_index: int, **fields) -> None:
            run = {"token": token, "task_id": token, "session_id": "s", "payload_id": f"{token}-in",
                   "data_dependencies": [], "expected_output_ids": [f"{token}-out"], "options": option_index}
            link.send([request(Op.RUNS, 0, runs=[run], frames=[1], **fields), b'{"op": "echo-run"}'])

        def output(token: str) -> dict:
            header, frames = receive()
            assert header["op"] == Op.W_OUTPUTS, header
            (out,) = header["outputs"]
            assert out["token"] == token and out["ok"], out
            return json.loads(frames[0])

        runs("a", 0, options=[first], configuration=configuration)
        assert output("a") == {"options": first, "configuration": configuration}
        runs("b", 0)  # neither: the last ones
        assert output("b") == {"options": first, "configuration": configuration}
        runs("c", 1, options=[first, second])  # new options, the same configuration
        assert output("c") == {"options": second, "configuration": configuration}
        runs("d", 0)
        assert output("d") == {"options": first, "configuration": configuration}
    finally:
        worker.kill()
        worker.wait()
        listener.close()


def test_tasks_of_alternating_options_each_run_with_their_own(tmp_path):
    """The agent leaves out of a RUNS what the worker got in the previous one: tasks whose options change
    from one to the next (and repeat) on one worker each still see their own."""
    from datetime import timedelta
    from armonik_zmq.client import TaskOptions
    from conftest import make_cluster
    from test_outcomes import submit

    with make_cluster(tmp_path, workers=1) as cluster:
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            for k in ("x", "x", "y", "x", "y", "y"):
                opts = TaskOptions(max_duration=timedelta(seconds=60), priority=1, max_retries=1, options={"k": k})
                ((_, out),) = submit(api, session_id, ({"op": "echo-run"}, [], opts))
                got = api.value(session_id, out)
                assert got["options"]["options"] == {"k": k}, got
                assert got["configuration"]["data_chunk_max_size"] > 0, got
