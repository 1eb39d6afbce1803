"""Peers come back by themselves, and nothing acknowledged is lost (RELIABILITY.md T5, T6).

- Idempotency keys: a creating request sent again with its key gets its first reply and creates
  nothing new, across broker restarts; the same key with another body is refused; keys expire.
- The client sends again, after a dropped connection, every request without a reply: each is keyed
  (it changes something: creations, uploads, cancels, session changes) or read-only.
- Agents re-register after a broker outage announcing the attempts they hold; the broker keeps them
  (no retry, no second execution) and tells them to drop what it gave away.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
import warnings
from datetime import timedelta

import pytest

from armonik_zmq import errors
from armonik_zmq.client import ResultStatus, TaskDefinition, TaskOptions, TaskStatus, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.protocol import ErrorCode, Op
from armonik_zmq.status import SessionStatus
from conftest import PROCESSOR, WORKER_ENV, Api, broker_only, make_cluster
from scripted import ScriptedBroker
from reliability import History, figure, read_executions
from test_outcomes import alive, children_of, task_row, wait_for

_T = TaskStatus
OPTIONS = TaskOptions(max_duration=timedelta(minutes=5), priority=1, max_retries=2)


def session_task_rows(conn, session_id: str) -> list[dict]:
    """Every task row of a session (all pages)."""
    rows, page = [], 0
    wire_filter = [[["session_id", "eq", session_id]]]
    while True:
        header, _ = conn.call(Op.LIST_TASKS, filter=wire_filter, page=page, page_size=10_000)
        rows += header["tasks"]
        if not header["tasks"] or len(rows) >= header["total"]:
            return rows
        page += 1


def registered_agents(conn) -> int:
    header, _ = conn.call(Op.HEALTH, timeout=2.0)
    return int(header["checks"][1]["message"].split()[0])


def restart_broker(cluster: LocalProcesses) -> None:
    cluster.kill_broker()
    cluster.start_broker()


# -- idempotency keys on the wire ---------------------------------------------------------------------


def test_a_request_sent_again_with_its_key_gets_its_first_reply_and_creates_nothing(tmp_path_factory):
    with broker_only(tmp_path_factory) as cluster:
        with connect(cluster.endpoint, timeout=30) as conn:
            session = dict(default_task_options=OPTIONS.to_wire(), idempotency_key="k:1")
            sid = conn.call(Op.CREATE_SESSION, **session)[0]["session_id"]
            assert conn.call(Op.CREATE_SESSION, **session)[0]["session_id"] == sid
            meta = dict(session_id=sid, results=[{"name": "out"}], idempotency_key="k:2")
            first = conn.call(Op.CREATE_RESULTS_METADATA, **meta)[0]["results"]
            assert conn.call(Op.CREATE_RESULTS_METADATA, **meta)[0]["results"] == first
            out = first[0]["result_id"]
            payload = json.dumps({"op": "square", "x": 3}).encode()
            data = dict(session_id=sid, results=[{"name": "p"}], idempotency_key="k:3")
            created = conn.call(Op.CREATE_RESULTS, frames=[payload], counts=[1], **data)[0]["results"]
            assert conn.call(Op.CREATE_RESULTS, frames=[payload], counts=[1], **data)[0]["results"] == created
            pid = created[0]["result_id"]
            submit = dict(session_id=sid, tasks=[{"payload_id": pid, "expected_output_ids": [out]}],
                          idempotency_key="k:4")
            tasks = conn.call(Op.SUBMIT_TASKS, **submit)[0]["tasks"]
            assert conn.call(Op.SUBMIT_TASKS, **submit)[0]["tasks"] == tasks
            assert [r["task_id"] for r in session_task_rows(conn, sid)] == [tasks[0]["task_id"]]

            # the same key with another body (header or data) is a client bug: refused, nothing created
            with pytest.raises(errors.ArmoniKZmqError) as refused:
                conn.call(Op.SUBMIT_TASKS, session_id=sid, tasks=[{"payload_id": pid, "expected_output_ids": [out],
                                                                   "data_dependencies": [pid]}],
                          idempotency_key="k:4")
            assert refused.value.code == ErrorCode.IDEMPOTENCY_MISMATCH and "k:4" in refused.value.message
            with pytest.raises(errors.ArmoniKZmqError) as refused:
                conn.call(Op.CREATE_RESULTS, frames=[b"other data"], counts=[1], **data)
            assert refused.value.code == ErrorCode.IDEMPOTENCY_MISMATCH
            assert len(session_task_rows(conn, sid)) == 1
            # a refused request records no key: the key still works for a valid body
            with pytest.raises(errors.NotFoundError):
                conn.call(Op.CREATE_RESULTS_METADATA, session_id="no-such-session", results=[{"name": "x"}],
                          idempotency_key="k:5")
            assert conn.call(Op.CREATE_RESULTS_METADATA, session_id=sid, results=[{"name": "x"}],
                             idempotency_key="k:5")[0]["results"][0]["name"] == "x"
            metrics = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]
            assert metrics["idempotent_replays"] == 4 and metrics["idempotency_mismatches"] == 2

        # the key is durable with the change it made: a SIGKILL and a restart later, the same reply
        restart_broker(cluster)
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=30) as conn:
            assert conn.call(Op.SUBMIT_TASKS, **submit)[0]["tasks"] == tasks
            assert conn.call(Op.CREATE_SESSION, **session)[0]["session_id"] == sid
            assert len(session_task_rows(conn, sid)) == 1


def test_keys_stored_as_reply_fields_by_an_earlier_version_still_replay(tmp_path_factory):
    """The key table used to hold the reply's fields (a map); it now holds the reply's bytes. A data
    directory written before keeps answering its keys with their first reply, after a restart."""
    import lmdb
    import msgpack

    with broker_only(tmp_path_factory) as cluster:
        with connect(cluster.endpoint, timeout=30) as conn:
            session = dict(default_task_options=OPTIONS.to_wire(), idempotency_key="old:1")
            sid = conn.call(Op.CREATE_SESSION, **session)[0]["session_id"]
        cluster.kill_broker()
        env = lmdb.open(cluster.data_dir, max_dbs=16)
        keys = env.open_db(b"idempotency")
        with env.begin(write=True) as txn:
            digest, applied_at, reply = msgpack.unpackb(txn.get(b"old:1", db=keys), raw=False)
            assert isinstance(reply, bytes)  # the reply as sent, stored once
            fields = msgpack.unpackb(reply, raw=False)
            assert fields["session_id"] == sid
            for name in ("v", "op", "rid"):
                fields.pop(name)
            txn.put(b"old:1", msgpack.packb([digest, applied_at, fields]), db=keys)
        env.close()
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=30) as conn:
            conn.call(Op.HEALTH)  # another rid than the first call's
            again = conn.call(Op.CREATE_SESSION, **session)[0]
            assert again["session_id"] == sid and again["ok"] is True
            assert conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["idempotent_replays"] == 1


def test_keys_expire_after_their_ttl(tmp_path_factory):
    with broker_only(tmp_path_factory, "--idempotency-ttl", "1") as cluster:
        with connect(cluster.endpoint, timeout=30) as conn:
            session = dict(default_task_options=OPTIONS.to_wire(), idempotency_key="e:1")
            sid = conn.call(Op.CREATE_SESSION, **session)[0]["session_id"]
            assert conn.call(Op.CREATE_SESSION, **session)[0]["session_id"] == sid
            # collected on the broker's timer (1 s period) once older than the ttl: the key is free again
            wait_for(lambda: conn.call(Op.CREATE_SESSION, **session)[0]["session_id"] != sid,
                     "the idempotency key to expire", timeout=10)


# -- the client across a broker restart -----------------------------------------------------------------


def upload_and_cancel_targets(conn, api: Api) -> tuple[str, str, str, dict]:
    """Two sessions, a result without data ``up`` in the first, and a task there that waits (its payload is
    ``up``, its dependency never gets data): (session, other session, ``up``, the task)."""
    sid, other = api.session(), api.session()
    up, never, out = (r["result_id"] for r in conn.call(
        Op.CREATE_RESULTS_METADATA, session_id=sid, results=[{"name": n} for n in ("up", "never", "out")])[0]["results"])
    (task,) = conn.call(Op.SUBMIT_TASKS, session_id=sid, tasks=[
        {"payload_id": up, "data_dependencies": [never], "expected_output_ids": [out]}])[0]["tasks"]
    return sid, other, up, task


def test_requests_in_flight_when_the_broker_dies(tmp_path_factory):
    """Every request without a reply (keyed or read-only) is sent again after the restart, and applied once."""
    with broker_only(tmp_path_factory, own_groups=True) as cluster:
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            sid, other, up, task = upload_and_cancel_targets(conn, api)
            cluster.broker.send_signal(signal.SIGSTOP)  # what is sent now waits in the broker's socket, unread
            try:
                created = conn.call_async(Op.CREATE_RESULTS_METADATA, session_id=sid, results=[{"name": "late"}])
                read = conn.call_async(Op.GET_SESSIONS, session_ids=[sid])
                close = conn.call_async(Op.CLOSE_SESSIONS, session_ids=[other])
                upload = conn.call_async(Op.UPLOAD_RESULT_DATA, [b"uploaded"], session_id=sid, result_ids=[up])
                cancel = conn.call_async(Op.CANCEL_TASKS, task_ids=[task["task_id"]])
                time.sleep(0.3)
            finally:
                restart_broker(cluster)  # SIGKILL while stopped: the requests die unread with it
            assert read.result(30)[0]["sessions"][0]["session_id"] == sid
            (row,) = created.result(30)[0]["results"]
            names = [r["name"] for r in conn.call(Op.LIST_RESULTS, filter=[[["session_id", "eq", sid]]],
                                                  page=0, page_size=100)[0]["results"]]
            assert names.count("late") == 1 and row["name"] == "late"
            assert close.result(30)[0]["sessions"][0]["status"] == SessionStatus.CLOSED
            assert upload.result(30)[0]["results"][0]["status"] == ResultStatus.COMPLETED
            assert api.results.download_result_data(up, sid) == b"uploaded"
            assert cancel.result(30)[0]["tasks"][0]["status"] == _T.CANCELLED
            assert conn.stats["resent"] >= 5 and conn.stats["lost"] == 0


def test_uploads_cancels_and_session_changes_sent_again_with_their_key_apply_once(tmp_path_factory):
    """A reply lost after the broker committed (killed before it could answer): the client sends the request
    again with its key. Without the key an upload would be refused (the result has its data) and a cancel of
    a session answered FAILED_PRECONDITION (already cancelled), for changes the client itself made."""
    with broker_only(tmp_path_factory) as cluster:
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            sid, other, up, task = upload_and_cancel_targets(conn, api)
            sent = {
                Op.UPLOAD_RESULT_DATA: (dict(session_id=sid, result_ids=[up], idempotency_key="r:1"), [b"first"], "results"),
                Op.CANCEL_TASKS: (dict(task_ids=[task["task_id"]], idempotency_key="r:2"), [], "tasks"),
                Op.CANCEL_SESSIONS: (dict(session_ids=[other], idempotency_key="r:3"), [], "sessions"),
            }
            first = {op: conn.call(op, frames=frames, **fields)[0][key] for op, (fields, frames, key) in sent.items()}
            assert first[Op.UPLOAD_RESULT_DATA][0]["status"] == ResultStatus.COMPLETED
            assert first[Op.CANCEL_TASKS][0]["status"] == _T.CANCELLED
            assert first[Op.CANCEL_SESSIONS][0]["status"] == SessionStatus.CANCELLED
            for op, (fields, frames, key) in sent.items():
                assert conn.call(op, frames=frames, **fields)[0][key] == first[op], op.name
            # the same requests under new keys (the client's own) meet the changes the first ones made
            with pytest.raises(errors.ArmoniKZmqError) as refused:
                conn.call(Op.UPLOAD_RESULT_DATA, frames=[b"first"], session_id=sid, result_ids=[up])
            assert refused.value.code == ErrorCode.FAILED_PRECONDITION
            with pytest.raises(errors.ArmoniKZmqError) as refused:
                conn.call(Op.CANCEL_SESSIONS, session_ids=[other])
            assert refused.value.code == ErrorCode.FAILED_PRECONDITION
            # a key names one request: another body under it is refused, and changes nothing
            with pytest.raises(errors.ArmoniKZmqError) as refused:
                conn.call(Op.UPLOAD_RESULT_DATA, frames=[b"other"], session_id=sid, result_ids=[up], idempotency_key="r:1")
            assert refused.value.code == ErrorCode.IDEMPOTENCY_MISMATCH
            assert conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["idempotent_replays"] == 3

        # the keys are durable with the changes they made: a SIGKILL and a restart later, the same replies
        restart_broker(cluster)
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=30) as conn:
            for op, (fields, frames, key) in sent.items():
                assert conn.call(op, frames=frames, **fields)[0][key] == first[op], op.name
            assert Api(conn).results.download_result_data(up, sid) == b"first"


# -- T5: durable submit acks ------------------------------------------------------------------------------


def test_t5_durable_submit_acks_across_broker_kills(tmp_path_factory, scale):
    """N tasks in batches of 100, each with its key; SIGKILL the broker 5 times during the submission."""
    n = int(10_000 * scale)
    batch = 100
    kills = 5
    window = 4  # batches in flight at once, so that kills land on requests the broker has not answered
    history = History()
    with broker_only(tmp_path_factory) as cluster:
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            sid = api.session()
            payload = api.results.create_results({"p": b"sha256:t5"}, sid)["p"].result_id
            names = [f"o{i}" for i in range(n)]
            outs = api.results.create_results_metadata(names, sid, batch_size=5000)
            out_ids = [outs[name].result_id for name in names]
            batches = [out_ids[i:i + batch] for i in range(0, n, batch)]
            # the killer strikes when the acks reach evenly spaced marks (the next batches are in flight)
            marks = [len(batches) * (k + 1) // (kills + 1) for k in range(kills)]
            acked = [0]
            acked_cv = threading.Condition()
            # each outage: from the kill to the new broker's first reply on this connection. Not to the end of
            # restart_broker(): that only spawns the process, and a batch sent while it started up (its ack
            # waited for the start-up, ~0.3 s) counted as fault-free. libzmq reconnects with a backoff, so the
            # connection may come back a while after the new broker serves.
            outages: list[tuple[float, float]] = []

            def killer():
                for mark in marks:
                    with acked_cv:
                        acked_cv.wait_for(lambda: acked[0] >= mark, timeout=120)
                    killed = time.perf_counter()
                    restart_broker(cluster)
                    conn.call(Op.HEALTH, timeout=60)
                    outages.append((killed, time.perf_counter()))

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            spans: list[tuple[float, float]] = []  # each batch: (sent, its reply reached the client)
            in_flight = []
            replies = {}
            answered: dict[int, float] = {}  # batch -> when its reply reached the client (I/O thread)

            def settle(i, sent_at, fut):
                header, _ = fut.result(120)
                spans.append((sent_at, answered[i]))
                ids = [t["task_id"] for t in header["tasks"]]
                assert [t["expected_output_ids"] for t in header["tasks"]] == [[o] for o in batches[i]]
                replies[i] = ids
                history.acknowledge(batches[i])
                with acked_cv:
                    acked[0] += 1
                    acked_cv.notify_all()

            for i, outs_of_batch in enumerate(batches):
                history.attempt(outs_of_batch)
                tasks = [{"payload_id": payload, "expected_output_ids": [o]} for o in outs_of_batch]
                # the client names the batch; the connection also sends it again by itself after a restart
                fut = conn.call_async(Op.SUBMIT_TASKS, session_id=sid, tasks=tasks,
                                      idempotency_key=f"t5:{conn.client_id}:{i}")
                fut.add_done_callback(lambda _, i=i: answered.__setitem__(i, time.perf_counter()))
                in_flight.append((i, time.perf_counter(), fut))
                if len(in_flight) >= window:
                    settle(*in_flight.pop(0))
            while in_flight:
                settle(*in_flight.pop(0))
            thread.join(120)
            assert len(outages) == kills, f"only {len(outages)} of {kills} kills happened"
            cluster.wait_ready()

            rows = session_task_rows(conn, sid)
            for row in rows:
                history.complete(row["expected_output_ids"])
            report = history.report()
            stored = {r["task_id"] for r in rows}
            acked_ids = {t for ids in replies.values() for t in ids}
            # a batch that no outage touched: for each one, answered before it began or sent after it ended
            clean = sorted(answered_at - sent_at for sent_at, answered_at in spans
                           if all(answered_at < killed or sent_at > back for killed, back in outages))
            # at CI scale few batches escape the kills: more fault-free batches (another session) for the p99
            extra_sid = api.session() if len(clean) < 100 else None
            if extra_sid:
                extra_payload = api.results.create_results({"p": b"sha256:t5"}, extra_sid)["p"].result_id
            for i in range(100 - len(clean)):
                outs_of_batch = [r.result_id for r in api.results.create_results_metadata(
                    [f"x{i}-{j}" for j in range(batch)], extra_sid).values()]
                tasks = [{"payload_id": extra_payload, "expected_output_ids": [o]} for o in outs_of_batch]
                started = time.perf_counter()
                conn.call(Op.SUBMIT_TASKS, session_id=extra_sid, tasks=tasks)
                clean.append(time.perf_counter() - started)
            clean.sort()
    p99 = clean[min(len(clean) - 1, int(len(clean) * 0.99))] * 1000
    figure("T5", "lost acknowledged submissions", report["lost"], "tasks", "= 0", report["lost"] == 0)
    figure("T5", "final task count", len(rows), "tasks", f"= {n}", len(rows) == n)
    figure("T5", "duplicated tasks", report["duplicated"], "tasks", "= 0", report["duplicated"] == 0)
    figure("T5", f"submit-ack p99 (batches of 100, durable; load average {os.getloadavg()[0]:.1f})", round(p99, 2),
           "ms", "<= 20 ms", p99 <= 20)
    figure("T5", "submit-ack median", round(statistics.median(clean) * 1000, 2), "ms", "(info)", True)
    assert report == {"lost": 0, "unexpected": 0, "duplicated": 0, "recovered": 0}, history.explain()
    assert len(rows) == n and acked_ids == stored
    load = os.getloadavg()[0]
    if scale < 1.0:
        # At CI size the p99 rests on a few dozen batches, half of them next to a broker kill: recorded above,
        # judged at full size (python -m bench.faults writes it to docs/reliability.md).
        return
    if load > 2 * (os.cpu_count() or 1):
        # Other processes hold the CPUs (a shared machine): a wall-clock latency says nothing about the broker.
        # The criterion is judged on a machine that is not oversubscribed (CI runs one suite at a time).
        warnings.warn(f"T5 submit-ack p99 {p99:.1f} ms not judged: load average {load:.1f} on "
                      f"{os.cpu_count()} CPUs (criterion 20 ms)")
        return
    assert p99 <= 20, f"submit-ack p99 {p99:.1f} ms (criterion 20 ms; load average {load:.1f})"


# -- agents across broker outages ---------------------------------------------------------------------------


def cluster_with_log(tmp_path, exec_log, workers: int = 1, **kwargs) -> LocalProcesses:
    return LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=workers, processor=PROCESSOR,
                          env={**WORKER_ENV, "ARMONIK_ZMQ_EXEC_LOG": str(exec_log)}, **kwargs)


def submit_sleeps(api: Api, sid: str, count: int, seconds: float, tag: str) -> list[tuple[str, str]]:
    """Submit ``count`` sleeping tasks; return their (task id, output id)."""
    payloads = api.results.create_results(
        {f"{tag}p{i}": json.dumps({"op": "sleep", "seconds": seconds, "value": i}).encode() for i in range(count)},
        sid, batch_size=count)
    outs = api.results.create_results_metadata([f"{tag}o{i}" for i in range(count)], sid)
    tasks = api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payloads[f"{tag}p{i}"].result_id,
                                                        expected_output_ids=[outs[f"{tag}o{i}"].result_id])
                                         for i in range(count)])
    return [(t.id, outs[f"{tag}o{i}"].result_id) for i, t in enumerate(tasks)]


def test_agent_registering_again_keeps_its_running_task(tmp_path):
    """A broker silent past the agent's lease (SIGSTOP): the agent registers again while the broker still
    knows it; its running task is kept (no retry, one execution)."""
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=1, agent_id="a1", own_groups=True)
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            sid = api.session()
            ((task_id, out),) = submit_sleeps(api, sid, 1, 9.0, "k")
            wait_for(lambda: task_row(conn, task_id)["status"] == _T.PROCESSING, "the task to start")
            cluster.broker.send_signal(signal.SIGSTOP)
            time.sleep(6.5)  # past the agent's 5 s lease: it registers again, announcing its running task
            cluster.broker.send_signal(signal.SIGCONT)
            assert api.value(sid, out) == 0
            row = task_row(conn, task_id)
            assert row["status"] == _T.COMPLETED and row["owner_pod_id"] == "a1", row
            assert [r["task_id"] for r in session_task_rows(conn, sid)] == [task_id]  # no retry
            assert [e[0] for e in read_executions(str(log))] == [task_id]
            # kept by every REGISTER the broker read: the agent sends one again (a new socket) each time its
            # backoff expires without a reply, so a loaded machine may deliver two or more after the SIGCONT
            assert conn.call(Op.HEALTH, metrics=True)[0]["metrics"]["attempts_kept"] >= 1
    finally:
        cluster.cleanup()


def test_agent_drops_the_attempt_the_broker_gave_away(tmp_path):
    """An agent stopped past its lease loses its task to another agent; once resumed, it registers again and
    kills the worker still running the old attempt (STOP_TASKS)."""
    cluster = make_cluster(tmp_path, workers=1, agent_id="first", lease=2.0, own_groups=True)
    stopped = False
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            sid = api.session()
            p = api.results.create_results({"p": json.dumps({"op": "pid", "sleep": 30}).encode()}, sid)["p"]
            out = api.results.create_results_metadata(["out"], sid)["out"].result_id
            (task,) = api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=p.result_id, expected_output_ids=[out])])
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.PROCESSING, "the task to start")
            (old_worker,) = children_of(cluster.agent.pid)
            cluster.start_extra_agent("second", workers=1)
            cluster.agent.send_signal(signal.SIGSTOP)
            stopped = True
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.RETRIED, "the task to be taken back")
            wait_for(lambda: task_row(conn, f"{task.id}###1")["status"] == _T.PROCESSING, "the retry to start")
            cluster.agent.send_signal(signal.SIGCONT)
            stopped = False
            wait_for(lambda: not alive(old_worker), "the resumed agent to kill the old attempt's worker", timeout=15)
            assert cluster.agent.poll() is None
            wait_for(lambda: registered_agents(conn) == 2, "the resumed agent to be registered again")
    finally:
        if stopped:
            cluster.agent.send_signal(signal.SIGCONT)
        cluster.cleanup()


def test_agent_runs_nothing_dispatched_to_the_registration_its_register_replaces(tmp_path):
    """Speak the broker's side by hand, the way the broker behaves: an agent that registers again (its broker
    silent past the lease) gets, on its new connection, a DISPATCH the broker sent to the previous registration
    before it read the new REGISTER (the new connection took over the routing id). The broker queues that task
    again (the REGISTER did not announce it) and hands it out anew: the agent must not have run it meanwhile,
    or the attempt runs twice (T4 saw a poison task run 5 times under load)."""
    log = tmp_path / "exec.log"
    cluster = cluster_with_log(tmp_path, log, workers=1, agent_id="a1", links=False)
    broker = ScriptedBroker(cluster.agents_endpoint)  # a ROUTER: the agent on ZeroMQ (links=False)
    try:
        cluster.start_agent()
        peer = broker.register(*broker.next_request(Op.AGENT_REGISTER), lease=1.0)
        # silent past its 1 s lease: the agent registers again, on a new connection
        peer, again = broker.next_request(Op.AGENT_REGISTER)
        assert again["holds"] == []
        broker.dispatch(peer, [("ghost", 1)])  # sent to the first registration, before the broker read the new REGISTER
        for sender, header in broker.requests(1.0):  # an idle worker starts a task it is given within milliseconds
            if header["op"] == Op.AGENT_REGISTER:  # sent again, unanswered (the agent's backoff)
                peer, again = sender, header
        assert read_executions(str(log)) == [], "the agent ran a task dispatched to the registration it replaces"
        peer = broker.register(peer, again, lease=60.0)
        broker.dispatch(peer, [("ghost", 2)])  # the broker queued it again and hands it to the new registration
        peer, done = broker.next_request(Op.TASKS_DONE)
        broker.ack_done(peer, done)
        assert [(c["task_id"], c["attempt"], c["ok"]) for c in done["tasks"]] == [("ghost", 2, True)]
        assert [row[0] for row in read_executions(str(log))] == ["ghost"]  # once: for attempt 2 only
        assert cluster.agent.poll() is None
    finally:
        cluster.cleanup()
        broker.close()


def test_attempts_of_an_agent_that_does_not_come_back_are_retried_after_the_grace(tmp_path):
    cluster = make_cluster(tmp_path, workers=1, agent_id="gone", broker_args=("--agent-grace", "2"))
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            sid = api.session()
            ((task_id, out),) = submit_sleeps(api, sid, 1, 60.0, "g")
            wait_for(lambda: task_row(conn, task_id)["status"] == _T.PROCESSING, "the task to start")
            workers = children_of(cluster.agent.pid)
            cluster.agent.kill()
            cluster.agent.wait()
            cluster.agent = None
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            restart_broker(cluster)
            cluster.wait_ready()
            restarted = time.monotonic()
            # held for its agent during the grace, then retried (it had started) on a new agent
            assert task_row(conn, task_id)["status"] == _T.PROCESSING
            cluster.start_extra_agent("new", workers=1)
            wait_for(lambda: task_row(conn, task_id)["status"] == _T.RETRIED, "the grace to end", timeout=15)
            assert time.monotonic() - restarted >= 1.5
            assert task_row(conn, f"{task_id}###1")["owner_pod_id"] == "new"
    finally:
        cluster.cleanup()


# -- T6: broker outage with live peers -------------------------------------------------------------------------


def test_t6_broker_outage_with_live_peers(tmp_path):
    """4 agents busy, 2 clients waiting; the broker is killed, stays down 5 s, then restarts."""
    log = tmp_path / "exec.log"
    agents = 4
    per_client = 16
    seconds = 0.75
    outage = 5.0
    cluster = cluster_with_log(tmp_path, log, workers=1, agent_id="t6-0")
    peers: list = []
    try:
        cluster.start()
        for k in range(1, agents):
            cluster.start_extra_agent(f"t6-{k}", workers=1)
        peers = [cluster.agent, *cluster.extra_agents]
        conns = [connect(cluster.endpoint, timeout=60) for _ in range(2)]
        monitor = connect(cluster.endpoint, timeout=60)
        try:
            wait_for(lambda: registered_agents(monitor) == agents, "the agents to register")
            worker_pids = wait_for(lambda: (pids := {p.pid: children_of(p.pid) for p in peers})
                                   and all(pids.values()) and pids, "every agent's worker to start")
            work = []
            for c, conn in enumerate(conns):
                api = Api(conn)
                sid = api.session()
                work.append((api, sid, submit_sleeps(api, sid, per_client, seconds, f"c{c}")))
            history = History(str(log))
            for _, _, tasks in work:
                history.attempt(t for t, _ in tasks)
                history.acknowledge(t for t, _ in tasks)
            outcome: dict = {}

            def wait_client(c, api, sid, tasks):
                try:
                    api.events.wait_for_result_availability([o for _, o in tasks], sid)
                    outcome[c] = [api.value(sid, o) for _, o in tasks]
                except BaseException as exc:  # reported by the main thread
                    outcome[c] = exc

            waiters = [threading.Thread(target=wait_client, args=(c, *w), daemon=True) for c, w in enumerate(work)]
            for t in waiters:
                t.start()
            wait_for(lambda: sum(1 for p in peers if any(e[1] in worker_pids[p.pid]
                                                         for e in read_executions(str(log)))) == agents,
                     "every agent to run a task")
            cluster.kill_broker()
            down_at = time.monotonic()
            down_wall = time.time()
            # a request made during the outage: answered once the broker is back (sent again by the client)
            late = {}
            asker = threading.Thread(target=lambda: late.update(ids=submit_sleeps(work[1][0], work[1][1], 1, 0.0,
                                                                                  "late")), daemon=True)
            asker.start()
            time.sleep(outage)
            cluster.start_broker()
            spawned = time.monotonic()
            back = None
            while back is None:
                try:
                    monitor.call(Op.HEALTH, timeout=0.5)
                    back = time.monotonic()
                except errors.BrokerUnavailableError:
                    pass
            back_wall = time.time()
            wait_for(lambda: registered_agents(monitor) == agents, "every agent to register again", timeout=10)
            reregistered = time.monotonic() - back
            from_spawn = time.monotonic() - spawned
            # tasks that ran while the broker was down: their results travelled after it came back
            during = [e for e in read_executions(str(log)) if down_wall <= e[2] <= back_wall]
            for t in [*waiters, asker]:
                t.join(60)
            for c in range(2):
                assert not isinstance(outcome.get(c), BaseException), outcome.get(c)
                assert outcome.get(c) == list(range(per_client)), outcome.get(c)
            (late_task, late_out) = late["ids"][0]
            history.attempt([late_task])
            history.acknowledge([late_task])
            assert work[1][0].value(work[1][1], late_out) == 0
            rows = [r for _, sid, _ in work for r in session_task_rows(monitor, sid)]
            for row in rows:
                if row["status"] == _T.COMPLETED:
                    history.complete([row["task_id"]])
            report = history.report()
            extra = history.extra_executions()
            retried = [r["task_id"] for r in rows if r["status"] == _T.RETRIED]
            restarted = [p.pid for p in peers if p.poll() is not None]
            restarted += [w for p in peers for w in worker_pids[p.pid] if not alive(w)]
        finally:
            for conn in [*conns, monitor]:
                conn.close()
    finally:
        cluster.cleanup()
    down = back - down_at
    figure("T6", "agents registered again after the broker is back", round(reregistered, 2), "s", "<= 3 s",
           reregistered <= 3.0)
    figure("T6", "finished results lost (extra executions)", extra, "tasks", "= 0", extra == 0)
    figure("T6", "lost / duplicated tasks", report["lost"] + report["duplicated"], "tasks", "= 0",
           report["lost"] + report["duplicated"] == 0)
    figure("T6", "peer processes restarted", len(restarted), "", "= 0", not restarted)
    figure("T6", "broker down", round(down, 2), "s", "(setup: 5 s + start)", True)
    figure("T6", "agents registered again after the broker process started", round(from_spawn, 2), "s",
           "(info: includes the broker's own start)", True)
    figure("T6", "tasks run during the outage", len(during), "tasks", f">= {agents} (every agent kept working)",
           len(during) >= agents)
    assert len(during) >= agents, f"only {len(during)} task(s) ran during the outage"
    assert reregistered <= 3.0, f"agents registered again {reregistered:.2f}s after the broker was back"
    assert report == {"lost": 0, "unexpected": 0, "duplicated": 0, "recovered": 0}, history.explain()
    assert extra == 0 and not retried, (history.explain(), retried)
    assert not restarted


def test_agent_stops_its_tasks_past_the_outage_tolerance(tmp_path):
    """Through a short outage an agent keeps running its tasks; past --outage-tolerance it stops them."""
    cluster = make_cluster(tmp_path, workers=1, agent_args=("--outage-tolerance", "2"))
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            sid = api.session()
            p = api.results.create_results({"p": json.dumps({"op": "pid", "sleep": 60}).encode()}, sid)["p"]
            out = api.results.create_results_metadata(["out"], sid)["out"].result_id
            (task,) = api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=p.result_id, expected_output_ids=[out])])
            wait_for(lambda: task_row(conn, task.id)["status"] == _T.PROCESSING, "the task to start")
        (worker,) = children_of(cluster.agent.pid)
        cluster.kill_broker()
        killed_at = time.monotonic()
        time.sleep(1.0)
        assert alive(worker), "the agent stopped its task before the outage tolerance"
        wait_for(lambda: not alive(worker), "the agent to stop its task past the outage tolerance", timeout=10)
        stopped_after = time.monotonic() - killed_at
        assert cluster.agent.poll() is None
        # silence counts from the agent's last word from the broker (a heartbeat reply, <= 1 s before the kill)
        assert 1.0 <= stopped_after <= 4.0, stopped_after
    finally:
        cluster.cleanup()
