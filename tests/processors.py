"""Processors the tests run in real worker processes (the demo's ops plus a few that tests need)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time

from armonik_zmq.demo import processor as demo_processor
from armonik_zmq.worker import Output, TaskDefinition

# reliability tests (tests/reliability.py) read this log: one line per execution,
# "task id\tpid\ttime\tkey", key being the KEY of a b"sha256:KEY:..." payload (else empty)
EXEC_LOG = os.environ.get("ARMONIK_ZMQ_EXEC_LOG")


def record_execution(task_id: str, payload: bytes = b"") -> None:
    """One write on an O_APPEND descriptor, so that lines of concurrent workers never interleave."""
    key = payload.split(b":", 2)[1].decode(errors="replace") if payload.startswith(b"sha256:") else ""
    fd = os.open(EXEC_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{task_id}\t{os.getpid()}\t{time.time():.6f}\t{key}\n".encode())
    finally:
        os.close(fd)


def processor(task_handler) -> Output:
    if EXEC_LOG:
        record_execution(task_handler.task_id, bytes(task_handler.payload[:64]))
    return _process(task_handler)


def _process(task_handler) -> Output:
    if task_handler.payload.startswith(b"sha256:"):
        # reliability tests' no-op: the result is the payload's sha256, a cheap proof of the right data;
        # b"sha256:KEY:sleep=S:..." sleeps S seconds first
        rest = task_handler.payload.split(b":", 3)
        if len(rest) > 3 and rest[2].startswith(b"sleep="):
            time.sleep(float(rest[2][6:]))
        task_handler.send_results({task_handler.expected_results[0]: hashlib.sha256(task_handler.payload).digest()})
        return Output()
    payload = json.loads(task_handler.payload)
    op = payload.get("op")
    out = task_handler.expected_results[0] if task_handler.expected_results else None
    if op == "sleep":
        time.sleep(payload["seconds"])
        task_handler.send_results({out: json.dumps(payload.get("value", 0)).encode()})
        return Output()
    if op == "two-step":
        # 21.5: create a result without data, send its data later, hand it to a subtask as input
        meta = task_handler.create_results_metadata(["intermediate"])["intermediate"]
        task_handler.send_results({meta.result_id: json.dumps(payload["x"] + 1).encode()})
        child_payload = task_handler.create_results({"child": json.dumps({"op": "sum"}).encode()})["child"]
        task_handler.submit_tasks([TaskDefinition(payload_id=child_payload.result_id, expected_output_ids=[out],
                                                  data_dependencies=[meta.result_id])])
        return Output()
    if op == "crash":
        os._exit(3)
    if op == "abort":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a poison task, not a bug to debug: no core file
        os.abort()
    if op == "raise":
        raise ValueError("raised on purpose")
    if op == "pid":
        time.sleep(payload.get("sleep", 0))
        task_handler.send_results({out: json.dumps(os.getpid()).encode()})
        return Output()
    if op == "raise-n-times":
        # the marker file counts attempts across retries (one line each)
        with open(payload["marker"], "a+") as f:
            f.seek(0)
            attempt = len(f.readlines()) + 1
            f.write(f"{os.getpid()}\n")
        if attempt <= payload["n"]:
            raise ValueError(f"attempt {attempt} raised on purpose")
        task_handler.send_results({out: json.dumps(attempt).encode()})
        return Output()
    if op == "hang-first-time":
        # the first attempt writes its worker's pid to the marker and hangs (the test kills that worker)
        if not os.path.exists(payload["marker"]):
            _write_atomically(payload["marker"], str(os.getpid()))
            time.sleep(3600)
        task_handler.send_results({out: json.dumps("second attempt").encode()})
        return Output()
    if op == "spin":
        if "marker" in payload:
            _write_atomically(payload["marker"], str(os.getpid()))
        while True:  # busy, never yields: only killing the process stops it
            pass
    if op == "create-then-raise":
        # everything a task can create, then an exception: none of it may be committed
        metas = task_handler.create_results_metadata(["made-meta", "sub-out"])
        made, sub_out = metas["made-meta"].result_id, metas["sub-out"].result_id
        with_data = task_handler.create_results({"made-data": json.dumps({"op": "square", "x": 1}).encode()})
        with_data = with_data["made-data"].result_id
        task_handler.send_results({made: b"written", out: b"output"})
        subtasks = task_handler.submit_tasks([TaskDefinition(payload_id=with_data, expected_output_ids=[sub_out])])
        raise RuntimeError("created " + json.dumps({"results": [made, sub_out, with_data],
                                                    "tasks": [t.id for t in subtasks]}))
    if op == "concat-deps":
        data = b"".join(task_handler.data_dependencies[d] for d in payload["order"])
        task_handler.send_results({out: data})
        return Output()
    if op == "echo-options":
        task_handler.send_results({out: json.dumps(task_handler.task_options.to_wire()).encode()})
        return Output()
    if op == "echo-run":  # what the worker handed this run: its options and the agent's configuration
        task_handler.send_results({out: json.dumps({"options": task_handler.task_options.to_wire(),
                                                    "configuration": task_handler.configuration}).encode()})
        return Output()
    if op == "reverse-dep":
        (data,) = task_handler.data_dependencies.values()
        task_handler.send_results({out: bytes(data)[::-1]})
        return Output()
    if op == "record":
        # one line per run, so a test sees which tasks ran and how many times
        with open(payload["path"], "a") as f:
            f.write(task_handler.task_id + "\n")
        task_handler.send_results({out: json.dumps(payload.get("value", 0)).encode()})
        return Output()
    if op == "gate":
        # the test decides when the task goes on: it creates the gate file; then the task runs `then`
        if "pid_file" in payload:
            _write_atomically(payload["pid_file"], str(os.getpid()))
        deadline = time.monotonic() + payload.get("timeout", 60)
        while not os.path.exists(payload["gate"]):
            if time.monotonic() > deadline:
                return Output("the gate never opened")
            time.sleep(0.01)
        return _process(_WithPayload(task_handler, json.dumps(payload["then"]).encode()))
    return demo_processor(task_handler)


class _WithPayload:
    """A task handler seen with another payload: an op that goes on with another op."""

    def __init__(self, handler, payload: bytes):
        self._handler = handler
        self.payload = payload

    def __getattr__(self, name):
        return getattr(self._handler, name)


def _write_atomically(path: str, text: str) -> None:
    """Write a file that a test polls for, so that it never reads it half written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
