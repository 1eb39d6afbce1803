"""The broker's metrics: counters read over the socket (HEALTH metrics) and over HTTP (Prometheus)."""

from __future__ import annotations

import socket
import urllib.request

import msgpack
import pytest
import zmq

from armonik_zmq.protocol import Op, request

from conftest import broker_only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
    port = _free_port()
    with broker_only(tmp_path_factory, "--metrics-port", str(port)) as cluster:
        cluster.metrics_port = port
        yield cluster


@pytest.fixture
def raw(lone):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(lone.zmq_endpoint)
    yield sock
    sock.close()
    ctx.term()


def ask(sock, *frames) -> dict:
    sock.send_multipart(list(frames))
    return msgpack.unpackb(sock.recv_multipart()[0], raw=False)


def metrics(sock) -> dict:
    reply = ask(sock, request(Op.HEALTH, 1, metrics=True))
    assert reply["ok"] and reply["healthy"]
    return reply["metrics"]


def test_health_without_the_flag_has_no_metrics(raw):
    assert "metrics" not in ask(raw, request(Op.HEALTH, 1))


def test_rejected_frames_and_error_replies_are_counted_by_reason_and_code(raw):
    before = metrics(raw)
    sent = {
        "malformed": [b"\xc1 not msgpack", msgpack.packb([1, 2]), b""],
        "unsupported_version": [msgpack.packb({"v": 7, "op": int(Op.HEALTH), "rid": 1})],
        "unknown_op": [request(9999, 2), request(Op.AGENT_REGISTER, 3, agent_id="a", capacity=1)],
        "invalid": [request(Op.GET_TASKS, 4), request(Op.GET_TASKS, 5, task_ids="x", extra=1)],
    }
    for frames in sent.values():
        for frame in frames:
            assert "error" in ask(raw, frame)
    assert "error" in ask(raw, request(Op.GET_TASKS, 6, task_ids=["no-such-task"]))  # valid, refused by its handler
    after = metrics(raw)
    for reason, frames in sent.items():
        assert after["rejected"][reason] - before["rejected"][reason] == len(frames), reason
    codes = {"MALFORMED": 3, "UNSUPPORTED_VERSION": 1, "UNIMPLEMENTED": 2, "INVALID_ARGUMENT": 2, "NOT_FOUND": 1}
    for name, n in codes.items():
        assert after["errors"].get(name, 0) - before["errors"].get(name, 0) == n, name
    assert after["requests"]["GET_TASKS"] - before["requests"].get("GET_TASKS", 0) == 1
    assert after["requests"]["HEALTH"] - before["requests"]["HEALTH"] == 1  # the first metrics call
    assert after["turns"] > before["turns"] and after["turn_seconds"]["buckets"][-1][0] == "+Inf"
    assert sum(n for _, n in after["turn_seconds"]["buckets"]) == after["turns"]
    assert after["rss_bytes"] > 10 << 20


def test_read_only_requests_commit_nothing(raw):
    before = metrics(raw)["lmdb_last_txnid"]
    for i in range(20):
        ask(raw, request(Op.GET_TASKS, i, task_ids=["missing"]))
        ask(raw, b"garbage")
    assert metrics(raw)["lmdb_last_txnid"] == before


def test_submitted_tasks_are_counted(lone):
    from conftest import Api
    from armonik_zmq.client import connect

    with connect(lone.endpoint, timeout=30) as conn:
        api = Api(conn)
        before = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]
        session = api.session()
        for _ in range(3):
            api.submit(session, {"square": 2})
        after = conn.call(Op.HEALTH, metrics=True)[0]["metrics"]
    assert after["tasks_submitted"] - before["tasks_submitted"] == 3
    assert after["lmdb_last_txnid"] > before["lmdb_last_txnid"]


def test_prometheus_endpoint_serves_the_same_counters(raw, lone):
    ask(raw, b"\xc1")
    m = metrics(raw)
    body = urllib.request.urlopen(f"http://127.0.0.1:{lone.metrics_port}/metrics", timeout=10).read().decode()
    lines = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    assert float(lines['armonik_zmq_broker_frames_rejected_total{reason="malformed"}']) >= m["rejected"]["malformed"]
    assert float(lines['armonik_zmq_broker_error_replies_total{code="MALFORMED"}']) >= 1
    assert 'armonik_zmq_broker_requests_total{op="HEALTH"}' in lines
    assert "armonik_zmq_broker_turn_seconds_bucket{le=\"+Inf\"}" in lines
    assert float(lines["armonik_zmq_broker_process_resident_memory_bytes"]) > 0
    assert "armonik_zmq_broker_lmdb_last_txnid" in lines


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "armonik_zmq.cli", "broker", "--data-dir", str(tmp_path / "d"),
                              "--endpoint", f"ipc://{tmp_path}/f", "--agents-endpoint", f"ipc://{tmp_path}/b",
                              "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
