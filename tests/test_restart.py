"""SIGKILL the broker between submission and completion: nothing acknowledged is lost."""

from __future__ import annotations

import json

from armonik_zmq.client import TaskDefinition, TaskStatus, connect
from conftest import Api, make_cluster


def test_broker_sigkill_between_submission_and_completion(tmp_path):
    cluster = make_cluster(tmp_path, workers=2)
    try:
        cluster.start()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            n = 40
            payloads = api.results.create_results(
                {f"p{i}": json.dumps({"op": "sleep", "seconds": 0.05, "value": i}).encode() for i in range(n)},
                session_id, batch_size=n)
            outs = api.results.create_results_metadata([f"o{i}" for i in range(n)], session_id)
            # a pending task, waiting for data that is uploaded only after the restart
            late = api.results.create_results_metadata(["late-p", "late-o"], session_id)
            tasks = api.tasks.submit_tasks(session_id, [
                TaskDefinition(payload_id=payloads[f"p{i}"].result_id, expected_output_ids=[outs[f"o{i}"].result_id])
                for i in range(n)] + [TaskDefinition(payload_id=late["late-p"].result_id,
                                                     expected_output_ids=[late["late-o"].result_id])], chunk_size=n + 1)
            # wait for some, but not all, to complete: the kill lands between submission and completion
            api.events.wait_for_result_availability(outs["o0"].result_id, session_id)

        cluster.kill_broker()
        cluster.start_broker()
        cluster.wait_ready()

        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            assert api.tasks.get_task(tasks[-1].id).status == TaskStatus.PENDING
            api.results.upload_result_data(late["late-p"].result_id, session_id,
                                           json.dumps({"op": "square", "x": 3}).encode())
            ids = [outs[f"o{i}"].result_id for i in range(n)]
            api.events.wait_for_result_availability(ids + [late["late-o"].result_id], session_id)
            assert [api.value(session_id, r) for r in ids] == list(range(n))
            assert api.value(session_id, late["late-o"].result_id) == 9
            for t in tasks:
                row = api.tasks.get_task(t.id)
                assert row.status == TaskStatus.COMPLETED, (t.id, row.status, row.status_message)
    finally:
        cluster.cleanup()
