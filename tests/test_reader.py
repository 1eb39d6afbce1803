"""The client connection's reader role: a thread that waits for the broker reads its own messages (no hand-off
from the I/O thread), on real broker, agent and worker processes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import armonik_zmq
from armonik_zmq.client import EventTypes, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.errors import BrokerUnavailableError
from armonik_zmq.protocol import Op


def _io_wakeups(conn) -> int:
    """How many times the connection's I/O thread has slept and woken (its voluntary context switches)."""
    with open(f"/proc/self/task/{conn._thread.native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def _sequential_calls_wake_the_io_thread(conn, calls: int, call) -> int:
    for _ in range(5):  # connected and warm
        call()
    before = _io_wakeups(conn)
    for _ in range(calls):
        call()
    return _io_wakeups(conn) - before


def test_a_waiting_thread_reads_its_own_replies(cluster):
    """200 sequential calls: the caller reads each reply itself, the I/O thread sleeps."""
    with connect(cluster.endpoint, timeout=30) as conn:
        woke = _sequential_calls_wake_the_io_thread(conn, 200, lambda: conn.call(Op.GET_SESSIONS, session_ids=[]))
    # One per call before (it routed every reply). Left: its idle ticks (every 0.5 s), and replies that come while
    # a caller, preempted between its send and its wait on a busy machine, has not taken the role yet.
    assert woke < 100, woke


def test_a_lone_futures_call_leaves_the_descriptor_to_the_next_caller(default_cluster):
    """Sequential lone submits: nothing can come that nobody reads between them, so the I/O thread is not given the
    descriptor back (no epoll_ctl per call); a future that only has a callback, and a call whose caller does not
    read, give it back: both are answered with no thread of the user reading."""
    with armonik_zmq.Client(default_cluster.endpoint) as client:
        conn = client._conn
        for _ in range(20):
            assert client.submit(abs, -1).result(timeout=30) == 1
        assert conn._masked, "a lone call left the I/O thread watching"
        done = threading.Event()
        fut = client.submit(time.sleep, 0.3)  # its value comes later, by an event nobody calls to read
        fut.add_done_callback(lambda f: done.set())
        assert done.wait(30), "a future with only a callback was never settled"
        assert client.submit(abs, -2).result(timeout=30) == 2
        assert conn._masked
        header, _ = conn.call_async(Op.GET_SESSIONS, session_ids=[]).result(timeout=30)
        assert header["op"] == Op.GET_SESSIONS and header["ok"]


def test_an_idle_client_sees_its_link_broker_die(tmp_path):
    """The I/O thread no longer watches an idle futures client's link (above); a broker SIGKILLed meanwhile is still
    seen (the link's end shows at the I/O thread's next tick), and the client goes on once the broker is back."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1) as processes:
        assert processes.endpoint.startswith("unix://")
        with armonik_zmq.Client(processes.endpoint) as client:
            assert client.submit(abs, -1).result(timeout=30) == 1
            conn = client._conn
            assert conn._masked and conn._connected
            processes.kill_broker()
            deadline = time.monotonic() + 10
            while conn._connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not conn._connected, "the broker's death went unnoticed by an idle client"
            processes.start_broker()
            processes.wait_ready()
            assert client.submit(abs, -3).result(timeout=60) == 3


def test_a_request_with_its_fields_built_already_is_read_by_its_caller(cluster):
    """``call_fields`` (what the futures client's submit uses): the fields go as they are, the reply comes back to the
    caller, which reads it itself as ``call``'s does."""
    with connect(cluster.endpoint, timeout=30) as conn:
        header, frames = conn.call_fields(Op.GET_SESSIONS, {"session_ids": []})
        assert header["op"] == Op.GET_SESSIONS and header["ok"] and frames == []
        woke = _sequential_calls_wake_the_io_thread(
            conn, 200, lambda: conn.call_fields(Op.GET_SESSIONS, {"session_ids": []}, timeout=30))
    assert woke < 100, woke


def test_futures_results_are_read_by_the_thread_that_waits(default_cluster):
    """Sequential submit + result on the futures API: the user thread reads both the SUBMIT_INLINE reply and the
    completion event carrying the value; the I/O thread sleeps throughout."""
    with armonik_zmq.Client(default_cluster.endpoint) as client:
        woke = _sequential_calls_wake_the_io_thread(client._conn, 100,
                                                    lambda: client.submit(abs, -1).result(timeout=30))
    assert woke < 100, woke  # two per task before: the SUBMIT_INLINE reply and the completion event


def test_a_thread_waiting_for_events_routes_them(api):
    """The events a thread waits for are routed by that thread (``on_events`` runs on it), not the I/O thread."""
    sid = api.session()
    routed_by = []

    def seen(events):
        routed_by.append(threading.get_ident())
        return events

    sub = api.conn.subscribe(sid, [int(EventTypes.NEW_RESULT)], on_events=seen)
    try:
        api.results.create_results_metadata(["a"], sid)
        sub.get(timeout=30)
    finally:
        sub.close()
    assert routed_by and set(routed_by) == {threading.get_ident()}


def test_a_done_callback_that_calls_the_broker_is_answered(api):
    """A reply routed by a waiting user thread runs its future's done callbacks there; one that calls the broker
    and waits reads its own reply in that same thread, in order, without a deadlock."""
    sid = api.session()
    got = []
    first = api.conn.call_async(Op.GET_SESSIONS, session_ids=[sid])
    first.add_done_callback(lambda _: got.append(api.conn.call(Op.GET_SESSIONS, session_ids=[sid], timeout=10)))
    api.conn.call(Op.GET_SESSIONS, session_ids=[sid], timeout=10)  # reads, and routes the first reply
    first.result(timeout=10)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got and got[0][0]["sessions"][0]["session_id"] == sid


@pytest.mark.parametrize("ends", ["connection", "subscription"])
def test_closing_wakes_a_thread_reading_for_its_events(cluster, api, ends):
    """A thread blocked reading for a subscription's events wakes at once when another thread closes the
    connection (``BrokerUnavailableError``) or the subscription (its iteration ends)."""
    sid = api.session()
    conn = connect(cluster.endpoint, timeout=30)
    try:
        sub = conn.subscribe(sid, [int(EventTypes.NEW_RESULT)])
        outcome = []

        def read() -> None:
            try:
                outcome.append(list(sub))
            except BaseException as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while conn._reader != reader.ident and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn._reader == reader.ident  # it holds the role, blocked in poll
        started = time.monotonic()
        (conn if ends == "connection" else sub).close()
        reader.join(5)
        assert not reader.is_alive() and time.monotonic() - started < 5
    finally:
        conn.close()
    if ends == "connection":
        assert isinstance(outcome[0], BrokerUnavailableError)
    else:
        assert outcome == [[]]


def test_a_reply_settled_by_another_thread_wakes_its_waiter_once_and_keeps_its_outcome():
    """``_Reply`` (the future of a call the connection waits for): a waiter blocks until another thread settles it,
    a wait that ends first raises TimeoutError, an error reply is raised, and a second settle is refused."""
    from concurrent.futures import InvalidStateError

    from armonik_zmq.client.connection import _Reply

    lock = threading.Lock()
    reply = _Reply(lock)
    with pytest.raises(TimeoutError):
        reply.result(0.01)
    assert not reply.done()
    settler = threading.Timer(0.05, reply.set_result, (("header", []),))
    settler.start()
    assert reply.result(10) == ("header", [])  # blocks until the other thread settles it
    settler.join()
    assert reply.done() and reply.result(0) == ("header", []) and not lock.locked()
    with pytest.raises(InvalidStateError):
        reply.set_exception(RuntimeError("late"))
    failed = _Reply(lock)
    failed.set_exception(BrokerUnavailableError("gone"))
    with pytest.raises(BrokerUnavailableError):
        failed.result()


def test_threads_calling_at_once_each_get_their_own_reply(cluster):
    """One thread reads while the others wait for their replies (each on its own lock): every call is answered."""
    with connect(cluster.endpoint, timeout=30) as conn:
        errors = []

        def calls():
            try:
                for _ in range(50):
                    header, _ = conn.call(Op.GET_SESSIONS, session_ids=[])
                    assert header["op"] == Op.GET_SESSIONS and header["ok"]
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=calls) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)


def test_requests_given_up_on_are_forgotten_while_the_broker_does_not_answer(tmp_path):
    """Each call is kept to be sent again until its reply (``_inflight``); those whose callers timed out are swept
    once they outnumber the pending ones, so a client that keeps calling a stopped broker does not grow without
    bound. Then the broker goes on and answers the next call."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1) as processes:
        with connect(processes.endpoint, timeout=30) as conn:
            conn.call(Op.GET_SESSIONS, session_ids=[])
            os.kill(processes.broker.pid, signal.SIGSTOP)
            try:
                for _ in range(1_100):
                    with pytest.raises(BrokerUnavailableError):
                        conn.call(Op.GET_SESSIONS, session_ids=[], timeout=0.001)
                kept = len(conn._inflight)
            finally:
                os.kill(processes.broker.pid, signal.SIGCONT)
            assert kept <= 1_025, f"{kept} requests given up on are still kept"
            header, _ = conn.call(Op.GET_SESSIONS, session_ids=[])
            assert header["ok"]
