"""Processors the tests run in real worker processes (the demo's ops plus a few that tests need)."""

from __future__ import annotations

import json
import os
import time

from armonik_zmq.demo import processor as demo_processor
from armonik_zmq.worker import Output, TaskDefinition


def processor(task_handler) -> Output:
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
    if op == "raise":
        raise ValueError("raised on purpose")
    if op == "pid":
        time.sleep(payload.get("sleep", 0))
        task_handler.send_results({out: json.dumps(os.getpid()).encode()})
        return Output()
    if op == "concat-deps":
        data = b"".join(task_handler.data_dependencies[d] for d in payload["order"])
        task_handler.send_results({out: data})
        return Output()
    return demo_processor(task_handler)
