"""The rest of the futures API against real clusters: the default dispatcher processor, progress bars,
subtasks submitted from inside a task (and the ownership transfer of a returned future), cancel(force=)."""

from __future__ import annotations

import io
import json
import os
import sys
import time

import cloudpickle
import pytest

import armonik_zmq
from armonik_zmq.client import ArmoniKResults, ArmoniKTasks, TaskDefinition
from armonik_zmq.client.filters import Task
from armonik_zmq.status import ResultStatus, TaskStatus
from test_outcomes import alive

# Workers cannot import this test module: its functions travel by value, as a notebook's would.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a, b):
    return a + b


def square(x):
    return x * x


def test_default_processor_serves_calls_and_demo_payloads(client, default_cluster):
    assert client.submit(square, 7).result(30) == 49
    results, tasks = ArmoniKResults(client._conn), ArmoniKTasks(client._conn)
    payload = results.create_results({"p": json.dumps({"op": "square", "x": 5}).encode()}, client.session_id)["p"]
    out = results.create_results_metadata(["o"], client.session_id)["o"].result_id
    tasks.submit_tasks(client.session_id, [TaskDefinition(payload_id=payload.result_id, expected_output_ids=[out])])
    from armonik_zmq.client import ArmoniKEvents

    ArmoniKEvents(client._conn).wait_for_result_availability(out, client.session_id)
    assert json.loads(results.download_result_data(out, client.session_id)) == 25


def test_as_completed_shows_a_progress_bar(client):
    futures = client.map(square, range(3))
    bar = io.StringIO()
    done = list(client.as_completed(futures, timeout=30, progress={"file": bar, "desc": "squares"}))
    assert set(done) == set(futures)
    assert "squares" in bar.getvalue() and "3/3" in bar.getvalue()
    # the module-level function is the same, and progress=False is the stdlib's own iterator
    assert set(armonik_zmq.as_completed(futures, timeout=30)) == set(futures)


def fan_out(n):
    client = armonik_zmq.get_client()
    parts = client.map(square, range(n))
    return client.submit(sum, parts)  # returned: the sum subtask computes this task's result


def fib(n):
    if n < 2:
        return n
    with armonik_zmq.worker_client() as client:
        return client.submit(add, client.submit(fib, n - 1), client.submit(fib, n - 2))


def test_a_returned_subtask_future_takes_over_the_parent_output(client):
    fut = client.submit(fan_out, 10)
    assert fut.result(60) == sum(i * i for i in range(10))
    results, tasks = ArmoniKResults(client._conn), ArmoniKTasks(client._conn)
    owner = results.get_owner_task_id([fut.result_id], client.session_id)[fut.result_id]
    assert owner != fut.task_id  # ownership moved to the subtask
    sub = tasks.get_task(owner)
    assert fut.result_id in sub.expected_output_ids and len(sub.data_dependencies) == 10
    assert sub.created_by == fut.task_id


def test_recursive_delegation_through_worker_client(client):
    assert client.submit(fib, 7).result(120) == 13


def wait_inside():
    return armonik_zmq.get_client().submit(square, 3).result()


def submit_then_fail():
    armonik_zmq.get_client().map(square, range(5))
    raise ValueError("failed after submitting")


def return_in_a_list():
    return [armonik_zmq.get_client().submit(square, 3)]


def test_subtask_misuse_fails_the_call_with_a_clear_error(client):
    with pytest.raises(RuntimeError, match="cannot be waited for"):
        client.submit(wait_inside).result(30)
    failing = client.submit(submit_then_fail)
    with pytest.raises(ValueError, match="failed after submitting"):
        failing.result(30)
    counts = ArmoniKTasks(client._conn).count_tasks_by_status(Task.session_id == client.session_id)
    assert sum(counts.values()) == 2  # the two calls; the failed one submitted nothing
    with pytest.raises(TypeError, match="can be returned by its task"):
        client.submit(return_in_a_list).result(30)
    with pytest.raises(ValueError, match="inside a task"):
        with armonik_zmq.worker_client():
            pass


def test_get_client_outside_a_task_is_the_last_client_opened(client):
    assert armonik_zmq.get_client() is client


def sleep_and_mark(path, seconds):
    """Write this worker's pid, sleep, then write 'done' (so a test sees whether the run reached its end)."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write("done\n")
    return os.getpid()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.05)


def _started(path):
    return lambda: path.exists() and path.read_text().strip()


def test_cancel_lets_a_running_task_end_and_drops_its_value(client, tmp_path):
    mark = tmp_path / "soft"
    fut = client.submit(sleep_and_mark, str(mark), 1.5)
    _wait_for(_started(mark), 30, "the task's start")
    pid = int(mark.read_text().split()[0])
    assert fut.cancel() and fut.cancelled()
    tasks, results = ArmoniKTasks(client._conn), ArmoniKResults(client._conn)
    assert tasks.get_task(fut.task_id).status == TaskStatus.CANCELLING  # still running on its worker
    _wait_for(lambda: tasks.get_task(fut.task_id).status == TaskStatus.CANCELLED, 30, "CANCELLED")
    assert mark.read_text().endswith("done\n")  # the run reached its end...
    assert alive(pid)  # ...on a worker that lives on
    assert results.get_result(fut.result_id).status == ResultStatus.ABORTED  # and its value was dropped
    assert client.submit(add, 1, 2).result(30) == 3


def test_cancel_force_kills_the_worker_and_the_agent_replaces_it(client, tmp_path):
    mark = tmp_path / "hard"
    fut = client.submit(sleep_and_mark, str(mark), 60)
    _wait_for(_started(mark), 30, "the task's start")
    pid = int(mark.read_text().split()[0])
    assert fut.cancel(force=True) and fut.cancelled()
    tasks = ArmoniKTasks(client._conn)
    _wait_for(lambda: tasks.get_task(fut.task_id).status == TaskStatus.CANCELLED, 15, "CANCELLED")
    _wait_for(lambda: not alive(pid), 10, "the worker's death")
    assert "done" not in mark.read_text()
    seen: set = set()

    def two_workers_answer():  # the replacement needs a moment to start
        seen.update(client.gather(client.map(_slow_pid, [0.3] * 4), timeout=60))
        return len(seen) >= 2

    _wait_for(two_workers_answer, 60, "two live workers")
    assert pid not in seen  # the killed one was replaced


def _slow_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


class CountsItsUnpickling:
    """A callable whose every unpickling appends a line to a file: how often a worker rebuilt it."""

    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, x):
        return x + 1


def test_workers_unpickle_a_function_once_and_cache_it(client, tmp_path):
    log = tmp_path / "unpickled"
    fn = CountsItsUnpickling(str(log))
    assert client.gather(client.map(fn, range(40), chunksize=10), timeout=60) == list(range(1, 41))
    assert client.submit(fn, 100).result(30) == 101
    pids = log.read_text().split()
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids)  # at most once per worker process


def _keep_client():
    armonik_zmq.subtasks._kept_by_a_test = armonik_zmq.get_client()
    return armonik_zmq.get_client() is armonik_zmq.subtasks._kept_by_a_test  # one client per task


def _submit_through_the_kept_client():
    armonik_zmq.subtasks._kept_by_a_test.submit(square, 2)


def _fill(**kwargs):
    kwargs["filled"] = True
    return kwargs


def test_a_task_client_is_made_when_asked_and_ends_with_its_task():
    """The function processor run in-process on real task handlers: a call that never asks for its client has
    none made; one that asks gets one client for its task, which refuses to submit once that task ended."""
    from armonik_zmq import functions, subtasks
    from armonik_zmq.futures import Future
    from armonik_zmq.worker.taskhandler import TaskHandler

    def run(fn, *args, **kwargs):
        payload, _ = functions.dump_call(functions.dump_function(fn), args, kwargs, Future)
        header = {"token": "t", "session_id": "s", "task_id": "t1", "options": {}, "expected_output_ids": ["out"],
                  "payload_id": "p", "data_dependencies": [], "configuration": {}}
        handler = TaskHandler(header, [payload], None)
        assert functions.processor(handler).success
        assert subtasks._current is None and subtasks._handler is None
        return functions.load_result(handler.output_message()[1][0])

    assert run(_fill) == {"filled": True} and run(_fill) == {"filled": True}  # no kwargs shared between calls
    assert run(square, 3) == 9 and run(_keep_client) is True
    with pytest.raises(RuntimeError, match="this task has ended"):
        run(_submit_through_the_kept_client)
    del subtasks._kept_by_a_test
