"""The demo: a processor that understands small JSON payloads, and a workload that exercises it.

Payloads are JSON objects with an ``op``:

- ``{"op": "square", "x": 3}``: output ``9``;
- ``{"op": "sum"}``: output the sum of the data dependencies (each a JSON number);
- ``{"op": "fanout", "xs": [1, 2, 3]}``: submit one ``square`` subtask per x and one ``sum`` subtask
  over their outputs, which takes over this task's expected output (ownership transfer);
- ``{"op": "fail", "message": "..."}``: return ``Output(message)`` (the task ends in ERROR);
- ``{"op": "echo"}``: output the payload itself.

Agents run it behind ``armonik_zmq.processors.processor``, which sends calls of the futures API
(``armonik_zmq.functions``) to the function processor, so a default cluster serves both.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Optional

from .common import Output, ResultStatus, TaskDefinition, TaskOptions, TaskStatus


def processor(task_handler) -> Output:
    """Run one demo task."""
    payload = json.loads(task_handler.payload)
    op = payload.get("op")
    out = task_handler.expected_results[0]
    if op == "square":
        task_handler.send_results({out: json.dumps(payload["x"] ** 2).encode()})
    elif op == "sum":
        total = sum(json.loads(bytes(v)) for v in task_handler.data_dependencies.values())
        task_handler.send_results({out: json.dumps(total).encode()})
    elif op == "echo":
        task_handler.send_results({out: task_handler.payload})
    elif op == "fail":
        return Output(payload.get("message", "failed on purpose"))
    elif op == "fanout":
        xs = payload["xs"]
        names = [f"square-{i}" for i in range(len(xs))]
        outputs = task_handler.create_results_metadata(names)
        payloads = task_handler.create_results(
            {f"payload-{i}": json.dumps({"op": "square", "x": x}).encode() for i, x in enumerate(xs)}
            | {"payload-sum": json.dumps({"op": "sum"}).encode()})
        tasks = [TaskDefinition(payload_id=payloads[f"payload-{i}"].result_id,
                                expected_output_ids=[outputs[names[i]].result_id]) for i in range(len(xs))]
        # The aggregation takes over this task's own output: this task completes without writing it.
        tasks.append(TaskDefinition(payload_id=payloads["payload-sum"].result_id, expected_output_ids=[out],
                                    data_dependencies=[outputs[n].result_id for n in names]))
        task_handler.submit_tasks(tasks)
    else:
        return Output(f"unknown demo op {op!r}")
    return Output()


def run_demo(endpoint: Optional[str] = None, n: int = 20, echo=print) -> dict:
    """Run the demo workload against a cluster and report what happened; return the figures."""
    from .client import ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, connect

    figures: dict = {}
    with connect(endpoint) as conn:
        sessions, results, tasks, events = (ArmoniKSessions(conn), ArmoniKResults(conn), ArmoniKTasks(conn),
                                            ArmoniKEvents(conn))
        options = TaskOptions(max_duration=timedelta(minutes=5), priority=1, max_retries=2)
        session_id = sessions.create_session(options)
        echo(f"session {session_id} created; data chunk size {results.get_service_config()} bytes")

        # 1. fan-out: n independent tasks, submitted in one call
        started = time.perf_counter()
        payloads = results.create_results({f"p{i}": json.dumps({"op": "square", "x": i}).encode() for i in range(n)},
                                          session_id, batch_size=n)
        outputs = results.create_results_metadata([f"o{i}" for i in range(n)], session_id)
        submitted = tasks.submit_tasks(session_id, [
            TaskDefinition(payload_id=payloads[f"p{i}"].result_id, expected_output_ids=[outputs[f"o{i}"].result_id])
            for i in range(n)])
        ids = [outputs[f"o{i}"].result_id for i in range(n)]
        events.wait_for_result_availability(ids, session_id)
        squares = [json.loads(results.download_result_data(r, session_id)) for r in ids]
        elapsed = time.perf_counter() - started
        assert squares == [i * i for i in range(n)], squares
        echo(f"fan-out: {len(submitted)} tasks computed squares 0..{n - 1} in {elapsed * 1000:.1f} ms")
        figures["fanout_tasks"] = len(submitted)

        # 2. a task with dependencies: the sum of every square, queued once they all exist
        total = results.create_results_metadata(["total"], session_id)["total"].result_id
        sum_payload = results.create_results({"sum": json.dumps({"op": "sum"}).encode()}, session_id)["sum"]
        tasks.submit_tasks(session_id, [TaskDefinition(payload_id=sum_payload.result_id, expected_output_ids=[total],
                                                       data_dependencies=ids)])
        events.wait_for_result_availability(total, session_id)
        figures["sum"] = json.loads(results.download_result_data(total, session_id))
        echo(f"dependencies: a task over {n} results summed them to {figures['sum']}")

        # 3. delayed upload: submit first, upload the payload afterwards
        late = results.create_results_metadata(["late-payload", "late-out"], session_id)
        task = tasks.submit_tasks(session_id, [TaskDefinition(payload_id=late["late-payload"].result_id,
                                                              expected_output_ids=[late["late-out"].result_id])])[0]
        status_before = tasks.get_task(task.id).status
        results.upload_result_data(late["late-payload"].result_id, session_id, json.dumps({"op": "square", "x": 12}).encode())
        events.wait_for_result_availability(late["late-out"].result_id, session_id)
        figures["late"] = json.loads(results.download_result_data(late["late-out"].result_id, session_id))
        echo(f"delayed upload: task waited {TaskStatus(status_before).name} until its payload arrived, then gave {figures['late']}")

        # 4. subtasks: a task fans out and hands its own output to an aggregation subtask
        fan = results.create_results_metadata(["fan-out"], session_id)["fan-out"].result_id
        fan_payload = results.create_results({"fan": json.dumps({"op": "fanout", "xs": [1, 2, 3, 4]}).encode()},
                                             session_id)["fan"]
        parent = tasks.submit_tasks(session_id, [TaskDefinition(payload_id=fan_payload.result_id,
                                                                expected_output_ids=[fan])])[0]
        events.wait_for_result_availability(fan, session_id)
        figures["subtasks"] = json.loads(results.download_result_data(fan, session_id))
        owner = results.get_result(fan).owner_task_id
        echo(f"subtasks: task {parent.id} spawned 5 subtasks; subtask {owner} took over its output = "
             f"{figures['subtasks']}")

        # 5. an error: the output is aborted and the waiting client is told
        bad = results.create_results_metadata(["bad"], session_id)["bad"].result_id
        bad_payload = results.create_results({"bad": json.dumps({"op": "fail", "message": "demo failure"}).encode()},
                                             session_id)["bad"]
        failed = tasks.submit_tasks(session_id, [TaskDefinition(payload_id=bad_payload.result_id,
                                                                expected_output_ids=[bad])])[0]
        try:
            events.wait_for_result_availability(bad, session_id)
            raise AssertionError("a failed task's output must not become available")
        except RuntimeError as exc:
            row = tasks.get_task(failed.id)
            echo(f"error: {exc} (task {TaskStatus(row.status).name}: {row.status_message!r}, "
                 f"result {ResultStatus(results.get_result(bad).status).name})")

        sessions.close_session(session_id)
        sessions.purge_session(session_id)
        sessions.delete_session(session_id)
        echo(f"session {session_id} closed, purged and deleted")
    return figures
