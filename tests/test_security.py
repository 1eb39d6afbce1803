"""T13: authentication (CurveZMQ + ZAP allow-lists) and authorization (each client sees only its own sessions).

Real broker processes with CURVE on, real sockets; peers that should not get in are plain pyzmq
sockets whose handshakes the test watches with socket monitors.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from datetime import timedelta

import msgpack
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from armonik_zmq import errors
from armonik_zmq.client import ArmoniKSessions, Task, TaskDefinition, TaskOptions, connect
from armonik_zmq.protocol import ErrorCode, Op, request
from armonik_zmq.security import create_keys, is_private_endpoint

from conftest import Api, broker_only, make_cluster
from reliability import figure

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

OPTIONS = TaskOptions(max_duration=timedelta(minutes=1), priority=1, max_retries=1)
FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A broker with CURVE on and no agent of its own; clients alice and bob, agents a1 and a2."""
    # "guarded": only the routing-id test's scripted agent serves it; that agent sends no heartbeats of its own,
    # so the lease is long enough for a loaded CI machine
    with broker_only(tmp_path_factory, "--no-sync", "--partition", "default,guarded", secure=True,
                     lease=120.0) as cluster:
        create_keys(cluster.keys_dir, ["alice", "bob"], ["a1", "a2"])
        yield cluster


def key(cluster, role: str, name: str) -> str:
    return os.path.join(cluster.keys_dir, role, f"{name}.key_secret")


def server_key(cluster) -> str:
    return os.path.join(cluster.keys_dir, "server.key")


def client(cluster, name: str):
    return connect(cluster.endpoint, timeout=20, server_key=server_key(cluster), secret=key(cluster, "clients", name))


class Peer:
    """A raw DEALER with its own CURVE keys (or none), whose handshake a monitor watches."""

    def __init__(self, endpoint: str, keys=None, identity: bytes = b""):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        if keys is not None:
            server, public, secret = keys
            self.sock.curve_serverkey = server
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(endpoint)
        self._rids = itertools.count(1)
        self.pushes: list[dict] = []

    def handshake(self, timeout: float = 10.0) -> int:
        """Return the first handshake event (succeeded or one of the failures)."""
        if not self.monitor.poll(int(timeout * 1000)):
            raise AssertionError("no handshake event in time")
        return recv_monitor_message(self.monitor)["event"]

    def send(self, op: Op, frames=(), **fields) -> int:
        rid = next(self._rids)
        self.sock.send_multipart([request(op, rid, **fields), *frames])
        return rid

    def call(self, op: Op, frames=(), timeout: float = 10.0, **fields) -> dict:
        rid = self.send(op, frames, **fields)
        deadline = time.monotonic() + timeout
        while True:
            if not self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise AssertionError(f"no reply to {op.name} in time")
            header = msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)
            if header["op"] == op and header["rid"] == rid:
                return header
            self.pushes.append(header)

    def received(self, timeout: float) -> list[dict]:
        """Everything that arrives within ``timeout`` seconds (plus what was kept)."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            self.pushes.append(msgpack.unpackb(self.sock.recv_multipart()[0], raw=False))
        return self.pushes

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()


def peer_keys(cluster, role: str, name: str) -> tuple:
    public, secret = zmq.auth.load_certificate(key(cluster, role, name))
    return zmq.auth.load_certificate(server_key(cluster))[0], public, secret


def denied(header: dict) -> str:
    assert header.get("error", {}).get("code") == ErrorCode.PERMISSION_DENIED, header
    return header["error"]["message"]


# -- authentication ----------------------------------------------------------------------------------


def broker_figures(probe: Peer) -> dict:
    """The broker's authentication counters, read by an agent key (clients may not read the broker's metrics)."""
    return probe.call(Op.HEALTH, metrics=True)["metrics"]["auth"]


def test_strangers_fail_the_handshake_and_reach_nothing(secure, tmp_path):
    stranger_public, stranger_secret = zmq.auth.load_certificate(zmq.auth.create_certificates(tmp_path, "x")[1])
    server, alice_public, alice_secret = peer_keys(secure, "clients", "alice")
    cases = {
        "unknown key": ((server, stranger_public, stranger_secret), {zmq.EVENT_HANDSHAKE_FAILED_AUTH}),
        "NULL client": (None, FAILED),  # PROTOCOL (mechanism mismatch) on tcp, NO_DETAIL on ipc
        # the broker cannot open the client's HELLO: the client only sees its connection fail
        "wrong server key": ((stranger_public, alice_public, alice_secret), FAILED),
    }
    endpoints = (secure.endpoint, secure.agents_endpoint)

    def counted(before: dict, after: dict) -> bool:
        """Whether the broker counted the strangers' failures (on its own thread: maybe after they saw theirs)."""
        return after["zap_denied"] - before["zap_denied"] >= 2 and all(
            after["handshakes"][e]["failed_auth"] - before["handshakes"][e]["failed_auth"] >= 1
            and after["handshakes"][e]["failed_protocol"] - before["handshakes"][e]["failed_protocol"] >= 2
            for e in endpoints)  # failed_protocol: NULL, and the wrong server key

    probe = Peer(secure.agents_endpoint, peer_keys(secure, "agents", "a2"))
    try:
        before = broker_figures(probe)
        for endpoint in endpoints:
            for name, (keys, expected) in cases.items():
                peer = Peer(endpoint, keys)
                try:
                    for _ in range(20):  # requests queue behind the handshake; none may get through
                        peer.send(Op.CREATE_SESSION if endpoint == secure.endpoint else Op.AGENT_REGISTER,
                                  agent_id="stranger", capacity=1, default_task_options=OPTIONS.to_wire())
                    event = peer.handshake()
                    assert event in expected, (name, endpoint, zmq.Event(event).name)
                    assert peer.received(0.3) == [], name
                finally:
                    peer.close()
        reads, deadline = 1, time.monotonic() + 10
        while True:
            after = broker_figures(probe)
            reads += 1
            if counted(before, after) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        probe.close()
    # Only the probe's own HEALTH requests reached the broker's loop in between: not one frame of the strangers.
    leaked = after["requests"] - before["requests"] - (reads - 1)
    figure("T13", "messages of 3 bad peers x 2 endpoints (120 sent) that reached the broker's loop", leaked,
           "messages", "= 0", leaked == 0)
    assert leaked == 0
    assert counted(before, after), (before, after)
    failures = sum(after["handshakes"][e][k] - before["handshakes"][e][k]
                   for e in endpoints for k in ("failed_auth", "failed_protocol", "failed_other"))
    figure("T13", "handshake failures the broker counted for them", failures, "handshakes", ">= 6", failures >= 6)
    with client(secure, "alice") as conn:
        info, _ = conn.call(Op.AUTH_INFO)
    assert info["user"] == "client:alice" and info["secure"] is True


def test_a_client_sees_nothing_of_the_broker_beyond_its_own_sessions(secure):
    """The broker's metrics count every client's work (requests by op, tasks, handshakes and refusals of every
    peer) and its health check named its data directory: with CURVE, a client key gets neither."""
    with client(secure, "alice") as conn:
        sid = ArmoniKSessions(conn).create_session(OPTIONS)
    with client(secure, "bob") as conn:
        health, _ = conn.call(Op.HEALTH)
        assert "metrics" not in health and secure.data_dir not in repr(health)
        assert {c["name"] for c in health["checks"]} == {"lmdb", "agents"}
        with pytest.raises(errors.PermissionDeniedError, match="metrics count every client's work"):
            conn.call(Op.HEALTH, metrics=True)
        info, _ = conn.call(Op.AUTH_INFO)
        assert {k: v for k, v in info.items() if k not in ("v", "op", "rid")} == {
            "user": "client:bob", "secure": True, "ok": True}
        assert sid not in repr(health) + repr(info)
    probe = Peer(secure.agents_endpoint, peer_keys(secure, "agents", "a2"))
    try:  # an agent key (the operator's side) reads them
        reply = probe.call(Op.HEALTH, metrics=True)
        assert reply["metrics"]["requests"]["CREATE_SESSION"] >= 1 and reply["metrics"]["auth"]["denied"] >= 1
        assert reply["checks"][0]["message"] == secure.data_dir
    finally:
        probe.close()


def test_the_client_says_why_its_handshake_failed(secure, tmp_path):
    _, stranger = zmq.auth.create_certificates(tmp_path, "stranger")
    with connect(secure.endpoint, timeout=10, server_key=server_key(secure), secret=stranger) as conn:
        started = time.monotonic()
        with pytest.raises(errors.AuthenticationError, match="allow-list"):
            conn.call(Op.HEALTH)
        assert time.monotonic() - started < 5  # failed at the handshake, not at the timeout
    with connect(secure.endpoint, timeout=10) as conn:  # no keys at all
        with pytest.raises(errors.AuthenticationError, match="requires CURVE"):
            conn.call(Op.HEALTH)


def test_a_call_made_after_the_refusal_fails_at_once(secure):
    """The refusal's event can come before the first call: that call must not wait for its timeout."""
    for _ in range(3):
        with connect(secure.endpoint, timeout=10) as conn:  # no keys at all
            deadline = time.monotonic() + 5
            while conn._handshake_error is None and time.monotonic() < deadline:  # the refusal has been seen
                time.sleep(0.01)
            time.sleep(0.3)  # and the pipe is gone: libzmq does not retry a refused mechanism, no event comes
            started = time.monotonic()
            with pytest.raises(errors.AuthenticationError, match="requires CURVE"):
                conn.call(Op.HEALTH)
            assert time.monotonic() - started < 1


def test_a_deleted_key_is_refused_from_its_next_handshake(secure):
    create_keys(secure.keys_dir, ["carol"], [])
    with client(secure, "carol") as conn:
        assert conn.call(Op.AUTH_INFO)[0]["user"] == "client:carol"
    os.unlink(os.path.join(secure.keys_dir, "clients", "carol.key"))
    peer = Peer(secure.endpoint, peer_keys(secure, "clients", "carol"))
    try:
        assert peer.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    finally:
        peer.close()


# -- roles -------------------------------------------------------------------------------------------


def test_a_client_key_cannot_pull_tasks(secure):
    peer = Peer(secure.agents_endpoint, peer_keys(secure, "clients", "alice"))
    try:
        assert peer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert "not an agent key" in denied(peer.call(Op.AGENT_REGISTER, agent_id="sneaky", capacity=4))
        assert "not an agent key" in denied(peer.call(Op.AGENT_HEARTBEAT, agent_id="sneaky"))
        assert peer.received(0.3) == []  # no DISPATCH
        figure("T13", "client key on the agents endpoint: registered / tasks pulled", 0, "", "= 0 (PERMISSION_DENIED)",
               True)
    finally:
        peer.close()


def test_an_agent_key_cannot_create_sessions(secure):
    peer = Peer(secure.endpoint, peer_keys(secure, "agents", "a1"))
    try:
        assert peer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert "not a client key" in denied(peer.call(Op.CREATE_SESSION, default_task_options=OPTIONS.to_wire()))
        assert "not a client key" in denied(peer.call(Op.LIST_SESSIONS))
        figure("T13", "agent key on the clients endpoint: sessions created", 0, "", "= 0 (PERMISSION_DENIED)", True)
    finally:
        peer.close()


# -- authorization -----------------------------------------------------------------------------------


def test_sessions_record_their_creators_user_id(secure):
    with client(secure, "alice") as conn:
        sid = ArmoniKSessions(conn).create_session(OPTIONS)
        header, _ = conn.call(Op.GET_SESSIONS, session_ids=[sid])
        assert header["sessions"][0]["owner"] == "client:alice"


def test_a_client_cannot_touch_another_clients_sessions(secure):
    with client(secure, "alice") as a, client(secure, "bob") as b:
        alice = Api(a)
        sid = alice.session()
        payload = alice.results.create_results({"payload": b"secret"}, sid)["payload"].result_id
        output = alice.results.create_results_metadata(["out"], sid)["out"].result_id
        task = alice.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload, expected_output_ids=[output])])[0]
        bob = Api(b)
        own = bob.session()
        bob.results.create_results({"mine": b"1"}, own)
        refused = {
            "get_session": lambda: bob.sessions.get_session(sid),
            "cancel_session": lambda: bob.sessions.cancel_session(sid),
            "pause_session": lambda: bob.sessions.pause_session(sid),
            "close_session": lambda: bob.sessions.close_session(sid),
            "purge_session": lambda: bob.sessions.purge_session(sid),
            "delete_session": lambda: bob.sessions.delete_session(sid),
            "stop_submission": lambda: bob.sessions.stop_submission_session(sid, True, True),
            "create_results_metadata": lambda: bob.results.create_results_metadata(["x"], sid),
            "create_results": lambda: bob.results.create_results({"x": b"x"}, sid),
            "upload_result_data": lambda: bob.results.upload_result_data(output, sid, b"forged"),
            "download_result_data": lambda: bob.results.download_result_data(payload, sid),
            "download through own session": lambda: bob.results.download_result_data(payload, own),
            "get_result": lambda: bob.results.get_result(payload),
            "get_owner_task_id": lambda: bob.results.get_owner_task_id([output], sid),
            "get_results_ids": lambda: bob.results.get_results_ids(sid, ["out"]),
            "import_data": lambda: bob.results.import_data(sid, [(output, "some/file")]),
            "delete_result_data": lambda: bob.results.delete_result_data([payload], sid),
            "submit_tasks": lambda: bob.tasks.submit_tasks(sid, [TaskDefinition(payload_id=payload,
                                                                                expected_output_ids=[output])]),
            "get_task": lambda: bob.tasks.get_task(task.id),
            "cancel_tasks": lambda: bob.tasks.cancel_tasks([task.id]),
            "get_result_ids": lambda: bob.tasks.get_result_ids([task.id]),
            "list_tasks of the session": lambda: bob.tasks.list_tasks(Task.session_id == sid),
            "count_tasks_by_status": lambda: bob.tasks.count_tasks_by_status(Task.session_id == sid),
            "events": lambda: b.subscribe(sid),
        }
        denials = 0
        for name, call in refused.items():
            with pytest.raises(errors.PermissionDeniedError, match="belongs to another client"):
                call()
                pytest.fail(f"{name} was allowed")
            denials += 1
        figure("T13", "client B's calls on client A's session, tasks, results, events refused", denials,
               f"of {len(refused)}", "= all (PERMISSION_DENIED)", denials == len(refused))
        # Lists show bob only his own things, whatever the filter.
        total, sessions = bob.sessions.list_sessions()
        assert total == 1 and [s.session_id for s in sessions] == [own]
        assert {r.session_id for r in bob.results.list_results()[1]} == {own}
        assert bob.tasks.list_tasks()[0] == 0
        assert bob.tasks.count_tasks_by_status() == {}
        # Nothing of alice's changed; she still sees and reads all of it.
        assert alice.sessions.get_session(sid).status == 1  # RUNNING
        assert alice.results.download_result_data(payload, sid) == b"secret"
        assert alice.tasks.get_task(task.id).status == 2  # SUBMITTED, not cancelled
        total, tasks = alice.tasks.list_tasks()
        assert total == 1 and tasks[0].id == task.id
        assert sid in {s.session_id for s in alice.sessions.list_sessions()[1]}


def test_a_client_gets_one_share_of_the_turns_however_many_connections_it_opens(tmp_path_factory):
    """With CURVE the broker takes turns between client keys, not connections: bob's 4 connections together
    get about as many turns as alice's one, where by connection they would get 4 in 5. Session ids grow
    with time (UUIDv7, per process), so sorting them gives the order the broker handled the requests in."""
    n = 150
    with broker_only(tmp_path_factory, "--no-sync", secure=True, own_groups=True) as cluster:
        create_keys(cluster.keys_dir, ["alice", "bob"], [])
        alice = Peer(cluster.endpoint, peer_keys(cluster, "clients", "alice"))
        bobs = [Peer(cluster.endpoint, peer_keys(cluster, "clients", "bob")) for _ in range(4)]
        peers = [alice, *bobs]
        try:
            for peer in peers:
                assert peer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
            cluster.broker.send_signal(signal.SIGSTOP)  # the backlogs wait for the broker, all together
            try:
                for peer in peers:
                    for _ in range(n):
                        peer.send(Op.CREATE_SESSION, default_task_options=OPTIONS.to_wire())
            finally:
                cluster.broker.send_signal(signal.SIGCONT)
            owner = {}
            for peer in peers:
                for _ in range(n):
                    assert peer.sock.poll(60_000), "a reply did not come"
                    header = msgpack.unpackb(peer.sock.recv_multipart()[0], raw=False)
                    owner[header["session_id"]] = peer is alice
        finally:
            for peer in peers:
                peer.close()
    first = [owner[sid] for sid in sorted(owner)[:2 * n]]
    share = sum(first) / len(first)
    figure("T12", "alice's share of the first turns vs bob's 4 connections (CURVE)", round(share * 100), "%",
           ">= 35 % (by connection: 20 %)", share >= 0.35)
    assert share >= 0.35, f"alice (1 connection) got {share:.0%} of the first {2 * n} requests handled beside bob (4)"


# -- agent identity ------------------------------------------------------------------------------------


def test_reusing_a_live_agents_routing_id_takes_nothing_over(secure):
    victim = Peer(secure.agents_endpoint, peer_keys(secure, "agents", "a1"), identity=b"victim")
    thief = impostor = None
    try:
        assert victim.call(Op.AGENT_REGISTER, agent_id="victim", capacity=1, partitions=["guarded"]).get("ok")
        thief = Peer(secure.agents_endpoint, peer_keys(secure, "agents", "a2"), identity=b"victim")
        impostor = Peer(secure.agents_endpoint, peer_keys(secure, "agents", "a2"), identity=b"impostor")
        assert thief.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED  # a valid agent key, a stolen routing id
        assert impostor.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        with client(secure, "alice") as conn:
            api = Api(conn)
            api.options = TaskOptions(max_duration=timedelta(minutes=1), priority=1, max_retries=1,
                                      partition_id="guarded")
            sid = api.sessions.create_session(api.options, ["guarded"])
            first, (out1,) = api.submit(sid, {"n": 1})
            dispatched = [t for h in victim.received(5) if h["op"] == Op.DISPATCH for t in h["tasks"]]
            assert [t["task_id"] for t in dispatched] == [first.id]
            attempt = dispatched[0]["attempt"]
            forged = [{"task_id": first.id, "attempt": attempt, "ok": True, "results": [{"result_id": out1,
                                                                                          "frames": 1}]}]
            # The thief's connection carries the victim's routing id: the broker never routes it anything, and
            # never reads what it sends.
            thief.send(Op.TASKS_DONE, [b"forged"], agent_id="victim", tasks=forged)
            thief.send(Op.AGENT_REGISTER, agent_id="victim", capacity=8)
            # The impostor, on its own routing id, is refused outright.
            assert "live agent of another key" in denied(impostor.call(Op.AGENT_REGISTER, agent_id="victim",
                                                                       capacity=8))
            assert "live agent of another key" in denied(impostor.call(Op.TASKS_DONE, [b"forged"],
                                                                       agent_id="victim", tasks=forged))
            # The victim keeps its task stream and its task: it reports, the broker takes it.
            reply = victim.call(Op.TASKS_DONE, [b"genuine"], agent_id="victim", tasks=[
                {"task_id": first.id, "attempt": attempt, "ok": True, "results": [{"result_id": out1, "frames": 1}]}])
            assert reply.get("accepted") == [first.id], reply
            assert api.results.download_result_data(out1, sid) == b"genuine"
            second, _ = api.submit(sid, {"n": 2})
            dispatched = [t["task_id"] for h in victim.received(5) if h["op"] == Op.DISPATCH for t in h["tasks"]]
            assert second.id in dispatched
        assert thief.received(0.3) == [] and impostor.received(0) == []
        figure("T13", "messages routed to a peer reusing a live agent's routing id", 0, "messages",
               "= 0 (no takeover)", True)
    finally:
        for peer in (victim, thief, impostor):
            if peer is not None:
                peer.close()


# -- a whole cluster ---------------------------------------------------------------------------------


def test_a_cluster_runs_tasks_end_to_end_with_curve(tmp_path):
    with make_cluster(tmp_path, secure=True) as cluster:
        with connect(cluster.endpoint, timeout=30, **cluster.client_keys) as conn:
            api = Api(conn)
            sid = api.session()
            outs = [api.submit(sid, {"op": "square", "x": n})[1][0] for n in range(6)]
            _, (two_step,) = api.submit(sid, {"op": "two-step", "x": 4})  # a subtask, made by a worker
            assert [api.value(sid, out) for out in outs] == [n * n for n in range(6)]
            assert api.value(sid, two_step) == 5
            # A broker restart: the agent comes back on a new connection (its own routing id), the client too.
            cluster.kill_broker()
            cluster.start_broker()
            _, (later,) = api.submit(sid, {"op": "square", "x": 7})
            assert api.value(sid, later) == 49
            public, secret = zmq.auth.load_certificate(cluster._agent_secret)
            probe = Peer(cluster.agents_endpoint, (zmq.auth.load_certificate(server_key(cluster))[0], public, secret))
            try:
                assert broker_figures(probe)["handshakes"][cluster.agents_endpoint]["succeeded"] >= 1  # the agent came back
            finally:
                probe.close()


# -- endpoints and keys --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_loopback_and_ipc_are_private():
    for endpoint in ("ipc:///tmp/x", "inproc://x", "tcp://127.0.0.1:5555", "tcp://localhost:5555",
                     "tcp://[::1]:5555", "tcp://127.0.0.2:1"):
        assert is_private_endpoint(endpoint), endpoint
    for endpoint in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.0.0.1:5555", "tcp://eth0:5555",
                     "tcp://[::]:5555", "udp://127.0.0.1:5555"):
        assert not is_private_endpoint(endpoint), endpoint


def test_the_broker_refuses_an_open_address_without_curve(tmp_path):
    port = _free_port()
    out = subprocess.run([sys.executable, "-m", "armonik_zmq", "broker", "--data-dir", str(tmp_path / "d"),
                          "--endpoint", f"tcp://0.0.0.0:{port}", "--agents-endpoint", f"ipc://{tmp_path}/b"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "without authentication" in out.stderr and "--keys" in out.stderr, out.stderr


def test_an_open_address_is_served_with_curve(tmp_path):
    port = _free_port()
    create_keys(str(tmp_path / "keys"), ["alice"], ["node1"])  # an operator's key directory (`up --keys`)
    cluster = make_cluster(tmp_path, keys_dir=str(tmp_path / "keys"), endpoint=f"tcp://0.0.0.0:{port}")
    try:
        cluster.start_broker()
        with connect(f"tcp://127.0.0.1:{port}", timeout=20, **cluster.client_keys) as conn:
            assert conn.call(Op.AUTH_INFO)[0]["user"] == "client:alice"
    finally:
        cluster.cleanup()


def test_keys_command_makes_private_files(tmp_path):
    keys = tmp_path / "keys"
    run = [sys.executable, "-m", "armonik_zmq", "keys"]
    out = subprocess.run([*run, str(keys), "--clients", "2", "--agents", "1"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    names = sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file())
    assert names == ["agents/agent-1.key", "agents/agent-1.key_secret", "clients/client-1.key",
                     "clients/client-1.key_secret", "clients/client-2.key", "clients/client-2.key_secret",
                     "server.key", "server.key_secret"]
    for path in keys.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    server_before = (keys / "server.key").read_bytes()
    out = subprocess.run([*run, str(keys), "--client", "alice"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and (keys / "clients" / "alice.key_secret").exists(), out.stderr
    assert (keys / "server.key").read_bytes() == server_before  # never regenerated
    out = subprocess.run([*run, str(keys), "--client", "alice"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "exists already" in out.stderr
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Usage:" in out.stdout


# -- what CURVE costs ------------------------------------------------------------------------------


def test_curve_throughput_is_at_least_60_percent_of_null(scale):
    from bench.curve import compare

    n = int(200_000 * scale)
    result = compare(n, 1024, runs=3)
    ratio = result["ratio"]
    load = os.getloadavg()[0]
    figure("T13", f"CURVE throughput / NULL, 1 KiB DEALER->ROUTER messages ({3 * n:,} each, alternating bursts; "
           f"load average {load:.1f})", round(100 * ratio, 1), "%", ">= 60 %", ratio >= 0.6)
    figure("T13", "CURVE CPU time per message / NULL (both processes)", round(result["cpu_ratio"], 2), "x",
           "(info)", True)
    if load > 2 * (os.cpu_count() or 1):
        # Other processes hold the CPUs: CURVE's extra CPU then costs it a share of the machine that says nothing
        # about CURVE. The criterion is judged on a machine that is not oversubscribed (CI runs one suite at a time).
        warnings.warn(f"T13 CURVE/NULL throughput {ratio:.0%} not judged: load average {load:.1f} on "
                      f"{os.cpu_count()} CPUs (criterion 60 %)")
        return
    assert ratio >= 0.6, result
