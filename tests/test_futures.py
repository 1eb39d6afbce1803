"""The Python-native API against a real cluster, checked against the stdlib's own future semantics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import sys
import threading
import time

import cloudpickle
import pytest

import armonik_zmq
from armonik_zmq.protocol import Op
from armonik_zmq.client import ArmoniKTasks, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.errors import TaskCancelledError, TaskTimeoutError, WorkerLostError
from armonik_zmq.status import TaskStatus

# Workers cannot import this test module: its functions travel by value, as a notebook's would.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a, b):
    return a + b


def fail(message):
    raise KeyError(message)


class TwoArgumentError(Exception):
    """An exception pickle cannot rebuild (its constructor takes two arguments, its args hold one)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def fail_unpicklable():
    raise TwoArgumentError("x", "y")


def test_submit_returns_stdlib_futures(client):
    fut = client.submit(add, 2, b=40)
    assert isinstance(fut, concurrent.futures.Future)
    seen = []
    fut.add_done_callback(seen.append)
    assert fut.result(timeout=30) == 42
    assert seen == [fut]
    assert client.submit(lambda: {"nested": [1, 2]}).result(30) == {"nested": [1, 2]}


def nap_then_add(seconds, a, b):
    time.sleep(seconds)
    return a + b


def test_a_submitted_function_is_not_kept_alive_by_the_client(client):
    """The client keeps each function's pickle for its next submit, never the function itself: a closure over
    a big value goes with its last reference."""
    import gc
    import weakref

    big = bytearray(1 << 20)

    def closure(i):
        return len(big) + i

    assert client.submit(closure, 1).result(30) == (1 << 20) + 1
    assert client.submit(closure, 2).result(30) == (1 << 20) + 2  # the same function again (its pickle kept)
    gone = weakref.ref(closure)
    del closure
    gc.collect()
    assert gone() is None
    assert client.submit(add, 1, 2).result(30) == 3


def test_a_done_callback_may_call_the_client(client):
    """A small value is set by the connection's I/O thread as its completion event arrives, but not when the
    future has callbacks: one that submits and waits would wait for a reply that thread has to deliver."""
    got = queue.Queue()
    fut = client.submit(nap_then_add, 0.5, 1, 2)  # still running when the callback is added
    fut.add_done_callback(lambda f: got.put(client.submit(add, f.result(), 1).result(timeout=30)))
    assert got.get(timeout=60) == 4
    assert client.submit(add, 2, 2).result(timeout=30) == 4  # and the client still serves the others


def test_futures_as_arguments_build_a_dag(client):
    a = client.submit(add, 1, 2)
    b = client.submit(add, a, 10)
    total = client.submit(sum, [a, b, client.submit(add, b, b)])  # futures nested in a list too
    assert total.result(30) == 3 + 13 + 26
    tasks = ArmoniKTasks(client._conn)
    assert set(tasks.get_task(total.task_id).data_dependencies) >= {a.result_id, b.result_id}


def test_map_batches_and_gather(client):
    futures = client.map(add, range(50), range(50), chunksize=20)
    assert client.gather(futures) == [2 * i for i in range(50)]
    assert len({f.task_id for f in futures}) == 50


class Probe:
    """An argument that notes, when it is pickled, whether the requests sent before it were answered."""

    submitted: list = []
    seen: list = []

    def __init__(self, i):
        self.i = i

    def __reduce__(self):
        Probe.seen.append((self.i, [f.done() for f in Probe.submitted]))
        return int, (self.i,)


def test_map_pickles_its_next_batch_while_the_broker_handles_the_previous_one(client):
    """One SUBMIT_INLINE in flight at a time, and the next one ready to leave when its reply comes."""
    conn = client._conn
    submit = conn._submit

    def noting(op, fields, frames, rid=None):
        rid, fut = submit(op, fields, frames, rid)
        if op == Op.SUBMIT_INLINE:
            Probe.submitted.append(fut)
        return rid, fut

    Probe.submitted, Probe.seen = [], []
    conn._submit = noting
    try:
        futures = client.map(add, [Probe(i) for i in range(3)], range(3), chunksize=1)
    finally:
        del conn._submit
    # call i is pickled while request i - 1 awaits its reply, and once every earlier one is answered
    assert Probe.seen == [(0, []), (1, [False]), (2, [True, False])]
    assert client.gather(futures, timeout=60) == [0, 2, 4]


def test_remote_exception_keeps_type_and_traceback(client):
    fut = client.submit(fail, "missing")
    with pytest.raises(KeyError) as info:
        fut.result(30)
    assert "in fail" in info.value.remote_traceback
    assert "raise KeyError(message)" in info.value.remote_traceback
    # a call over a failed future fails the same way, without running
    with pytest.raises(KeyError):
        client.submit(add, fut, 1).result(30)
    with pytest.raises(RuntimeError, match="TwoArgumentError: x/y"):
        client.submit(fail_unpicklable).result(30)


def test_futures_share_their_clients_condition_yet_wait_for_their_own_value(client):
    """A client's futures share one Condition: a thread waiting on one is woken when another settles, and waits
    on; it gets its own value, not a TimeoutError."""
    mid, short = client.submit(time.sleep, 0.8), client.submit(time.sleep, 0.3)
    assert mid._condition is short._condition
    outcome = []

    def follow() -> None:
        time.sleep(0.1)  # the main thread reads by then: this one waits on the condition
        try:
            outcome.append(mid.result(timeout=10))
        except BaseException as exc:
            outcome.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    assert mid.result(timeout=10) is None  # reads; settles `short` meanwhile, which wakes the follower early
    follower.join(10)
    assert outcome == [None] and short.result(timeout=10) is None


def test_a_future_owns_its_state_and_inherits_no_method_of_the_stdlib_future(client):
    """Every method of concurrent.futures.Future is this class's own, over its own state: none reads the stdlib's
    private fields. The stdlib's wait() and as_completed() read three fields of any future (its condition, state
    and waiters): a stdlib future still has them, and they work on ours (the other tests here)."""
    methods = [name for name, value in vars(concurrent.futures.Future).items()
               if callable(value) and not name.startswith("__") and not name.startswith("_Future__")]
    inherited = [name for name in methods if name != "_invoke_callbacks"
                 and getattr(armonik_zmq.Future, name) is getattr(concurrent.futures.Future, name)]
    assert not inherited
    assert {"_condition", "_state", "_waiters"} <= set(vars(concurrent.futures.Future()))
    assert {"_result", "_exception", "_done_callbacks"}.isdisjoint(vars(client.submit(add, 1, 2)))
    fut = client.submit(add, 1, 2)
    assert concurrent.futures.wait([fut], timeout=30).done == {fut} and fut.result() == 3
    assert "finished" in repr(fut) and not fut.running()
    with pytest.raises(RuntimeError):
        fut.set_running_or_notify_cancel()
    with pytest.raises(concurrent.futures.InvalidStateError):
        fut.set_result(4)


def test_done_callbacks_never_run_on_the_thread_that_routes_the_connection(client):
    """A callback runs on the listener, or at once on the thread that adds it to a settled future: never on the
    connection's I/O thread, which routes the messages (a callback may call the broker and wait). Added while the
    futures settle, some to futures settled already."""
    n = 2000
    names, lock, left, done = set(), threading.Lock(), [n], threading.Event()

    def note(_fut) -> None:
        with lock:
            names.add(threading.current_thread().name)
            left[0] -= 1
            if not left[0]:
                done.set()
    futures = client.map(add, range(n), range(n), chunksize=500)
    for fut in futures:
        fut.add_done_callback(note)
    assert done.wait(30) and [f.result(0) for f in futures] == [2 * i for i in range(n)]
    assert names and names <= {threading.current_thread().name, "armonik-zmq-futures"}, names


def test_as_completed_yields_in_completion_order_and_times_out_without_cancelling(client):
    slow = client.submit(time.sleep, 1.0)
    fast = client.submit(add, 1, 1)
    with pytest.raises(TimeoutError):
        for done in client.as_completed([slow, fast], timeout=0.3):
            assert done is fast
    assert not slow.cancelled()
    assert slow.result(30) is None  # it ran to the end
    assert list(concurrent.futures.as_completed([fast, slow])) and fast.result() == 2


def test_cancelled_future_is_yielded_by_as_completed(client):
    blocker = client.submit(time.sleep, 30)
    waiting = client.submit(add, blocker, 1)
    assert waiting.cancel()
    assert waiting.cancelled()
    assert next(client.as_completed([waiting, blocker], timeout=10)) is waiting
    with pytest.raises(concurrent.futures.CancelledError):
        waiting.result()
    assert client.cancel([blocker], force=True) == 1  # its worker is killed: the 30 s sleep ends now
    done, not_done = client.wait([blocker, waiting], timeout=10)
    assert not not_done
    tasks = ArmoniKTasks(client._conn)
    assert tasks.get_task(waiting.task_id).status == TaskStatus.CANCELLED


def test_cancelled_elsewhere_raises_task_cancelled(client, default_cluster):
    blocker = client.submit(time.sleep, 30)
    dependent = client.submit(add, blocker, 1)
    with connect(default_cluster.endpoint) as conn:
        ArmoniKTasks(conn).cancel_tasks([blocker.task_id])
    with pytest.raises(TaskCancelledError):
        blocker.result(30)
    with pytest.raises(TaskCancelledError):
        dependent.result(30)


def test_timeout_and_worker_loss_have_their_own_errors(client):
    with pytest.raises(TaskTimeoutError):
        client.submit(time.sleep, 30, timeout=0.5, retries=1).result(30)
    with pytest.raises(WorkerLostError, match="died"):
        client.submit(os._exit, 3, retries=1).result(30)
    assert client.submit(add, 1, 1).result(30) == 2  # the agent replaced the worker


def test_futures_are_awaitable(client):
    async def main():
        one = await client.submit(add, 1, 2)
        rest = await asyncio.gather(*(client.submit(add, i, 0) for i in range(5)))
        return one, rest

    assert asyncio.run(main()) == (3, [0, 1, 2, 3, 4])


def test_client_context_closes_or_cancels_its_session(default_cluster):
    from armonik_zmq.client import ArmoniKSessions
    from armonik_zmq.status import SessionStatus

    with armonik_zmq.Client(default_cluster.endpoint) as c:
        assert c.submit(add, 1, 1).result(30) == 2
    with pytest.raises(RuntimeError, match="closed"):
        c.submit(add, 1, 1)
    with pytest.raises(ZeroDivisionError):
        with armonik_zmq.Client(default_cluster.endpoint) as failing:
            pending = failing.submit(time.sleep, 30)
            raise ZeroDivisionError("the block fails")
    assert pending.cancelled()
    with armonik_zmq.Client(default_cluster.endpoint) as parent:
        with parent.session(priority=2) as inner:
            assert inner.session_id != parent.session_id
            assert inner.submit(add, 3, 3).result(30) == 6
        assert parent.submit(add, 4, 4).result(30) == 8  # the shared connection stays open
    with connect(default_cluster.endpoint) as conn:
        sessions = ArmoniKSessions(conn)
        assert sessions.get_session(c.session_id).status == SessionStatus.CLOSED
        assert sessions.get_session(failing.session_id).status == SessionStatus.CANCELLED
        assert sessions.get_session(inner.session_id).status == SessionStatus.CLOSED


def test_local_cluster_yields_a_connected_client_and_passes_broker_options():
    cluster = armonik_zmq.LocalCluster(n_workers=2, broker_args=("--durability", "wal"))
    with cluster as client:
        assert isinstance(client, armonik_zmq.Client)
        assert client.gather(client.map(abs, [-1, -2, 3])) == [1, 2, 3]
        # the broker took the option: its commits go through a write-ahead log beside data.mdb
        assert os.listdir(os.path.join(cluster.processes.data_dir, "wal"))


def test_futures_survive_a_broker_restart(tmp_path):
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=2) as processes:
        with armonik_zmq.Client(processes.endpoint) as c:
            first = c.submit(add, 1, 1)
            assert first.result(30) == 2
            later = c.map(time.sleep, [0.1] * 10)
            processes.kill_broker()
            processes.start_broker()
            processes.wait_ready()
            assert c.gather(later, timeout=60) == [None] * 10
            assert c.submit(add, 2, 2).result(30) == 4
