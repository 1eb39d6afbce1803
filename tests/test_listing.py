"""List, count and look-up calls (ARMONIK.md 1.1-1.3, 1.5, 1.8), partitions and priorities (3.9), on real processes.

Every filter and sort is checked against an oracle: the same question answered in Python over the
session's tasks fetched in one unfiltered page.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from armonik_zmq.client import (ArmoniKHealthChecks, ArmoniKPartitions, ArmoniKVersions, Direction, FilterError,
                                Partition, Result, ResultStatus, ServiceHealthCheckStatus, Session, SessionStatus,
                                Task, TaskDefinition, TaskOptions, TaskStatus, connect)
from armonik_zmq.broker.listing import INLINE_ROWS
from armonik_zmq.errors import InvalidArgumentError, NotFoundError
from armonik_zmq.protocol import Op
from conftest import PROCESSOR, WORKER_ENV, Api, make_cluster

N_TASKS = 240
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def options(priority: int, **kv: str) -> TaskOptions:
    return TaskOptions(max_duration=timedelta(minutes=1), priority=priority, max_retries=1, options=kv)


@pytest.fixture(scope="module")
def data(cluster):
    """A session of 240 tasks: a quarter completed, the rest PENDING on a result never uploaded, one failed."""
    with connect(cluster.endpoint, timeout=30) as conn:
        api = Api(conn)
        session_id = api.session()
        gate = api.results.create_results_metadata(["gate"], session_id)["gate"].result_id
        payloads = api.results.create_results({"square": json.dumps({"op": "square", "x": 3}).encode(),
                                               "fail": json.dumps({"op": "fail"}).encode()}, session_id)
        outs = api.results.create_results_metadata([f"out-{i:03d}" for i in range(N_TASKS + 1)], session_id)
        definitions = [
            TaskDefinition(payload_id=payloads["square"].result_id,
                           expected_output_ids=[outs[f"out-{i:03d}"].result_id],
                           data_dependencies=[] if i % 4 == 0 else [gate],
                           options=options(1 + i % 7, group=f"g{i % 3}"))
            for i in range(N_TASKS)
        ]
        definitions.append(TaskDefinition(payload_id=payloads["fail"].result_id,
                                          expected_output_ids=[outs[f"out-{N_TASKS:03d}"].result_id],
                                          options=options(9, group="bad")))
        api.tasks.submit_tasks(session_id, definitions)
        api.events.wait_for_result_availability([outs[f"out-{i:03d}"].result_id for i in range(0, N_TASKS, 4)],
                                                session_id)
        with pytest.raises(RuntimeError, match="aborted"):
            api.events.wait_for_result_availability(outs[f"out-{N_TASKS:03d}"].result_id, session_id)
        total, tasks = api.tasks.list_tasks(Task.session_id == session_id, with_errors=True, page_size=10_000)
        assert total == len(tasks) >= N_TASKS + 1
        yield {"session_id": session_id, "tasks": tasks, "gate": gate, "payload": payloads["square"].result_id}


def ids(tasks) -> list:
    return [t.id for t in tasks]


def test_pages_cover_every_task_once_in_id_order(api, data):
    sid, everything = data["session_id"], sorted(ids(data["tasks"]))
    mine = Task.session_id == sid
    for direction, expected in ((Direction.ASC, everything), (Direction.DESC, everything[::-1])):
        pages = []
        for page in range(len(everything) // 50 + 1):
            total, tasks = api.tasks.list_tasks(mine, page=page, page_size=50, sort_direction=direction)
            assert total == len(everything)
            pages += ids(tasks)
        assert pages == expected
        # a filter with one more condition takes the general path (heap over every row): same answer
        total, tasks = api.tasks.list_tasks(mine & (Task.options.priority >= 1), page_size=10_000,
                                            sort_direction=direction)
        assert (total, ids(tasks)) == (len(everything), expected)
    assert api.tasks.list_tasks(mine, page=100, page_size=50) == (len(everything), [])


def test_sort_on_option_fields_and_generic_option_keys(api, data):
    tasks = data["tasks"]
    mine = Task.session_id == data["session_id"]
    cases = [
        (Task.options.priority, lambda t: t.options.priority),
        (Task.options["group"], lambda t: t.options.options["group"]),
        (Task.status, lambda t: t.status),
        (Task.created_at, lambda t: t.created_at),
    ]
    for field, key in cases:
        for direction in Direction:
            expected = sorted(tasks, key=lambda t: (key(t), t.id), reverse=direction == Direction.DESC)
            got = []
            for page in range(3):  # paging the heap path gives the single page, cut
                got += ids(api.tasks.list_tasks(mine, page=page, page_size=100, sort_field=field,
                                                sort_direction=direction)[1])
            assert got == ids(expected), (field, direction)


def test_rows_without_the_sort_field_come_last_both_ways(api, data):
    mine = Task.session_id == data["session_id"]
    ended = [t for t in data["tasks"] if t.ended_at is not None]
    assert 0 < len(ended) < len(data["tasks"])
    for direction in Direction:
        _, tasks = api.tasks.list_tasks(mine, page_size=10_000, sort_field=Task.ended_at, sort_direction=direction)
        stamps = [t.ended_at for t in tasks]
        head = stamps[:len(ended)]
        assert None not in head and all(s is None for s in stamps[len(ended):])
        assert head == sorted(head, reverse=direction == Direction.DESC)


def test_filters_match_a_python_oracle(api, data):
    tasks, sid = data["tasks"], data["session_id"]
    first = min(t.created_at for t in tasks)
    first_end = min(t.ended_at for t in tasks if t.ended_at)
    group = lambda t: t.options.options["group"]  # noqa: E731
    cases = [
        (Task.status == TaskStatus.COMPLETED, lambda t: t.status == TaskStatus.COMPLETED),
        ((Task.status == TaskStatus.COMPLETED) | (Task.options.priority >= 6),
         lambda t: t.status == TaskStatus.COMPLETED or t.options.priority >= 6),
        ((Task.options["group"] == "g1") & ~(Task.options.priority < 3),
         lambda t: group(t) == "g1" and not t.options.priority < 3),
        (~((Task.status == TaskStatus.PENDING) & (Task.options["group"] != "g2")),
         lambda t: not (t.status == TaskStatus.PENDING and group(t) != "g2")),
        (Task.options["group"].startswith("g") & Task.options["group"].endswith("2"),
         lambda t: group(t).startswith("g") and group(t).endswith("2")),
        (Task.options["group"].contains("ba"), lambda t: "ba" in group(t)),
        (~Task.options["group"].contains("g"), lambda t: "g" not in group(t)),
        (Task.options["missing-key"] != "x", lambda t: True),
        (Task.options["missing-key"] == "x", lambda t: False),
        (Task.created_at >= first, lambda t: True),
        (Task.created_at < EPOCH.replace(tzinfo=None), lambda t: False),
        (Task.ended_at <= first_end, lambda t: t.ended_at is not None and t.ended_at <= first_end),
        (Task.creation_to_end_duration > timedelta(0), lambda t: t.ended_at is not None),
        (Task.options.max_duration == timedelta(minutes=1), lambda t: True),
        (Task.output.error.contains("on purpose"),
         lambda t: t.output is not None and "on purpose" in (t.output.error or "")),
        (Task.owner_pod_id != "", lambda t: t.owner_pod_id != ""),
        (Task.payload_id == data["payload"], lambda t: t.payload_id == data["payload"]),
        ((Task.status == TaskStatus.ERROR) ^ (Task.options.priority == 9),
         lambda t: (t.status == TaskStatus.ERROR) != (t.options.priority == 9)),
    ]
    for flt, predicate in cases:
        expected = sorted(t.id for t in tasks if predicate(t))
        total, got = api.tasks.list_tasks((Task.session_id == sid) & flt, page_size=10_000)
        assert (total, ids(got)) == (len(expected), expected), str(flt)
    assert any(t.status == TaskStatus.PENDING for t in tasks) and any(t.status == TaskStatus.COMPLETED for t in tasks)


def test_count_tasks_by_status(api, data):
    sid, tasks = data["session_id"], data["tasks"]
    assert api.tasks.count_tasks_by_status(Task.session_id == sid) == Counter(t.status for t in tasks)
    g0 = Counter(t.status for t in tasks if t.options.options["group"] == "g0")
    counts = api.tasks.count_tasks_by_status((Task.session_id == sid) & (Task.options["group"] == "g0"))
    assert counts == g0 and all(isinstance(s, TaskStatus) for s in counts)


def test_summaries_and_errors(api, data):
    mine = Task.session_id == data["session_id"]
    _, summaries = api.tasks.list_tasks(mine, detailed=False, page_size=10_000)
    by_id = {t.id: t for t in data["tasks"]}
    for s in summaries:
        full = by_id[s.id]
        assert s.data_dependencies is None and s.expected_output_ids is None
        assert s.count_expected_output_ids == 1 == full.count_expected_output_ids
        assert s.count_data_dependencies == len(full.data_dependencies)
        assert s.status == full.status and s.options == full.options
    failed = mine & (Task.status == TaskStatus.ERROR)
    _, [plain] = api.tasks.list_tasks(failed)
    _, [detailed] = api.tasks.list_tasks(failed, with_errors=True)
    assert not plain.output.success and plain.output.error == ""
    assert not detailed.output.success and "failed on purpose" in detailed.output.error


def test_list_results(api, data):
    sid = data["session_id"]
    total, results = api.results.list_results(Result.session_id == sid, page_size=10_000)
    assert total == len(results) == N_TASKS + 4  # gate, two payloads, the outputs
    assert [r.status for r in results] == sorted(r.status for r in results)  # default: by status
    cases = [
        (Result.name.startswith("out-"), lambda r: r.name.startswith("out-")),
        (Result.status == ResultStatus.COMPLETED, lambda r: r.status == ResultStatus.COMPLETED),
        ((Result.size > 0) & ~Result.name.contains("-"), lambda r: r.size > 0 and "-" not in r.name),
        (Result.owner_task_id == "", lambda r: r.owner_task_id == ""),
        (Result.result_id == data["gate"], lambda r: r.result_id == data["gate"]),
    ]
    for flt, predicate in cases:
        expected = sorted(r.result_id for r in results if predicate(r))
        got = api.results.list_results((Result.session_id == sid) & flt, page_size=10_000, sort_field=Result.result_id)
        assert (got[0], [r.result_id for r in got[1]]) == (len(expected), expected), str(flt)
    _, by_size = api.results.list_results(Result.session_id == sid, page_size=10, sort_field=Result.size,
                                          sort_direction=Direction.DESC)
    assert [r.size for r in by_size] == sorted((r.size for r in results), reverse=True)[:10]


def test_list_sessions(api):
    tag = f"team-{time.monotonic_ns()}"
    made = [api.sessions.create_session(options(i + 1, team=tag)) for i in range(4)]
    api.sessions.cancel_session(made[1])
    api.sessions.close_session(made[2])
    mine = Session.options["team"] == tag
    total, sessions = api.sessions.list_sessions(mine, sort_field=Session.created_at)
    assert total == 4 and [s.session_id for s in sessions] == made
    assert [s.session_id for s in api.sessions.list_sessions(mine)[1]][0] in (made[0], made[3])  # RUNNING first
    assert api.sessions.list_sessions(mine & (Session.status == SessionStatus.CANCELLED))[1][0].session_id == made[1]
    closed = api.sessions.list_sessions(mine & ~Session.client_submission)[1]
    assert {s.session_id for s in closed} == {made[1], made[2]}
    assert api.sessions.list_sessions(mine & Session.partition_ids.contains("default"))[0] == 4
    assert api.sessions.list_sessions(mine & ~Session.partition_ids.contains("default"))[0] == 0
    assert api.sessions.list_sessions(mine & (Session.options.priority > 2))[0] == 2
    assert made[2] in {s.session_id for s in api.sessions.list_sessions(mine & (Session.duration >= timedelta(0)))[1]}
    _, top = api.sessions.list_sessions(mine, page_size=1, sort_field=Session.options.priority,
                                        sort_direction=Direction.DESC)
    assert [s.session_id for s in top] == [made[3]]


def test_result_ids_of_tasks_and_ids_of_names(api, data):
    sample = data["tasks"][:3]
    assert api.tasks.get_result_ids([t.id for t in sample]) == {t.id: t.expected_output_ids for t in sample}
    with pytest.raises(NotFoundError, match="no-such-task"):
        api.tasks.get_result_ids(["no-such-task"])
    named = api.results.get_results_ids(data["session_id"], ["x", "y"])
    assert set(named) == {"x", "y"} and api.results.get_result(named["x"]).name == "x"


def test_bad_filters_and_sorts_are_refused_naming_them(api, conn, data):
    bad = [
        ([[["bogus", "eq", 1]]], "unknown field 'bogus'"),
        ([[["status", "lt", 1]]], "operator 'lt' does not apply to the status field 'status'"),
        ([[["status", "eq", "done"]]], "'status'.*must be int, got str"),
        ([[["created_at", "gt", True]]], "'created_at'.*got bool"),
        ([[["options[]", "eq", "x"]]], "unknown field 'options\\[\\]'"),
        ([[["session_id", "eq"]]], "filter\\[0\\]\\[0\\]: a term must be"),
    ]
    for flt, message in bad:
        with pytest.raises(InvalidArgumentError, match=message):
            conn.call(Op.LIST_TASKS, filter=flt)
    with pytest.raises(InvalidArgumentError, match="sort.field: unknown field 'nope'"):
        conn.call(Op.LIST_RESULTS, sort={"field": "nope"})
    with pytest.raises(InvalidArgumentError, match="page_size"):
        api.tasks.list_tasks(page_size=10_001)
    with pytest.raises(InvalidArgumentError, match="unknown field 'name' for tasks"):
        api.events.get_events(data["session_id"], [], [lambda *_: True], task_filter=[[["name", "eq", "x"]]])
    with pytest.raises(FilterError, match="must filter tasks, not results"):
        api.tasks.list_tasks(Result.name == "x")
    with pytest.raises(FilterError, match="sort_field must be a field of results"):
        api.results.list_results(sort_field=Task.id)
    with pytest.raises(FilterError, match="no inverted equivalent"):  # as in the official package
        api.results.list_results(~Result.name.startswith("x"))
    with pytest.raises(FilterError, match="not available as a filter"):
        api.tasks.list_tasks(Task.data_dependencies.contains("x"))


def test_scans_longer_than_a_turn_run_between_turns(api):
    """More rows than INLINE_ROWS: lists and counts become scan jobs, answered on a snapshot after the commit."""
    n = INLINE_ROWS + 500
    session_id = api.session()
    gate = api.results.create_results_metadata(["gate"], session_id)["gate"].result_id
    outs = api.results.create_results_metadata([f"big-{i:05d}" for i in range(n)], session_id, batch_size=n)
    api.tasks.submit_tasks(session_id, [
        TaskDefinition(payload_id=gate, expected_output_ids=[o.result_id], options=options(1 + i % 3))
        for i, o in enumerate(outs.values())], chunk_size=n)
    mine = Task.session_id == session_id
    assert api.tasks.count_tasks_by_status(mine) == {TaskStatus.PENDING: n}
    total, top = api.tasks.list_tasks(mine & (Task.options.priority == 3), page=2, page_size=100,
                                      sort_field=Task.created_at, sort_direction=Direction.DESC)
    assert total == len(range(2, n, 3)) and len(top) == 100 and {t.options.priority for t in top} == {3}
    names = sorted((name for name in outs if name.endswith("7")), reverse=True)
    big_sevens = Result.name.startswith("big-") & Result.name.endswith("7")  # not pinned: the whole table
    total, results = api.results.list_results(big_sevens, page=1, page_size=50, sort_field=Result.name,
                                              sort_direction=Direction.DESC)
    assert total == len(names) and [r.name for r in results] == names[50:100]
    with pytest.raises(InvalidArgumentError, match="operator 'gt' does not apply"):  # checked on arrival
        api.tasks.count_tasks_by_status([[["session_id", "eq", session_id], ["options[x]", "gt", "a"]]])


def test_versions_and_health(conn):
    from armonik_zmq import __version__

    assert ArmoniKVersions(conn).list_versions() == {"core": __version__, "api": "1"}
    health = ArmoniKHealthChecks(conn).check_health()
    assert health["agents"]["status"] == ServiceHealthCheckStatus.HEALTHY and "lmdb" in health


# -- partitions ---------------------------------------------------------------------------------

CONFIG = """
[[partitions]]
id = "fast"
priority = 2
pod_max = 4
pod_reserved = 1
preemption_percentage = 50
parent_partition_ids = ["base"]
pod_configuration = { image = "worker:fast" }

[[partitions]]
id = "slow"
priority = 1
"""


def _agent(cluster, agent_id: str, partition: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "armonik_zmq", "--log-level", "WARNING", "agent", "--broker",
                             cluster.agents_endpoint, "--processor", PROCESSOR, "--partition", partition,
                             "--agent-id", agent_id, *extra], env=cluster.env)


@pytest.fixture(scope="module")
def two_partitions(tmp_path_factory):
    """A broker configured with partitions "fast" and "slow", one agent on each ("fast": one worker, no backlog)."""
    tmp = tmp_path_factory.mktemp("partitions")
    (tmp / "broker.toml").write_text(CONFIG)
    cluster = make_cluster(tmp, broker_args=("--config", str(tmp / "broker.toml")))
    agents = []
    try:
        cluster.start_broker()
        agents = [_agent(cluster, "agent-fast", "fast", "--workers", "1", "--window", "0", "--prefetch", "0"),
                  _agent(cluster, "agent-slow", "slow", "--workers", "2")]
        cluster.wait_ready()
        yield cluster
    finally:
        for proc in agents:
            proc.terminate()
        for proc in agents:
            proc.wait(30)
        cluster.cleanup()


def test_partitions_come_from_the_configuration_file(two_partitions):
    with connect(two_partitions.endpoint) as conn:
        partitions = ArmoniKPartitions(conn)
        total, listed = partitions.list_partitions()
        assert total == 2 and [p.id for p in listed] == ["slow", "fast"]  # by priority
        fast = partitions.get_partition("fast")
        assert fast == Partition(id="fast", parent_partition_ids=["base"], pod_reserved=1, pod_max=4,
                                 pod_configuration={"image": "worker:fast"}, preemption_percentage=50, priority=2)
        assert partitions.get_partition("slow").pod_configuration == {}
        assert [p.id for p in partitions.list_partitions(Partition.priority > 1)[1]] == ["fast"]
        children = partitions.list_partitions(Partition.parent_partition_ids.contains("base"))[1]
        assert [p.id for p in children] == ["fast"]
        assert [p.id for p in partitions.list_partitions(sort_field=Partition.id, sort_direction=Direction.DESC)[1]] \
            == ["slow", "fast"]
        with pytest.raises(NotFoundError, match="partition default not found"):
            partitions.get_partition("default")


def test_each_task_runs_on_an_agent_of_its_partition(two_partitions):
    with connect(two_partitions.endpoint) as conn:
        api = Api(conn)
        session_id = api.sessions.create_session(options(1), partition_ids=["fast", "slow"])
        payload = api.results.create_results({"p": json.dumps({"op": "pid"}).encode()}, session_id)["p"].result_id
        outs = api.results.create_results_metadata([f"o{i}" for i in range(12)], session_id)
        api.tasks.submit_tasks(session_id, [
            TaskDefinition(payload_id=payload, expected_output_ids=[outs[f"o{i}"].result_id],
                           options=TaskOptions(max_duration=timedelta(minutes=1), priority=1, max_retries=1,
                                               partition_id="fast" if i % 2 else "slow"))
            for i in range(12)])
        api.events.wait_for_result_availability([o.result_id for o in outs.values()], session_id)
        for partition in ("fast", "slow"):
            total, tasks = api.tasks.list_tasks((Task.session_id == session_id)
                                                & (Task.options.partition_id == partition))
            assert total == 6 and {t.owner_pod_id for t in tasks} == {f"agent-{partition}"}


def test_higher_priority_runs_first_within_a_partition(two_partitions):
    """One worker, no backlog at the agent: each dispatch takes the best priority left in the queue."""
    with connect(two_partitions.endpoint) as conn:
        api = Api(conn)
        session_id = api.sessions.create_session(options(1), partition_ids=["fast"])
        gate = api.results.create_results_metadata(["gate"], session_id)["gate"].result_id
        payload = api.results.create_results({"p": json.dumps({"op": "square", "x": 2}).encode()},
                                             session_id)["p"].result_id
        priorities = [3, 7, 1, 9, 5, 7, 2, 8, 4, 6]
        outs = api.results.create_results_metadata([f"o{i}" for i in range(len(priorities))], session_id)
        submitted = api.tasks.submit_tasks(session_id, [
            TaskDefinition(payload_id=payload, expected_output_ids=[outs[f"o{i}"].result_id], data_dependencies=[gate],
                           options=options(p)) for i, p in enumerate(priorities)])
        # every task becomes ready in the same turn, when the gate gets its data
        api.results.upload_result_data(gate, session_id, b"open")
        api.events.wait_for_result_availability([o.result_id for o in outs.values()], session_id)
        _, ran = api.tasks.list_tasks(Task.session_id == session_id, sort_field=Task.started_at)
        assert [t.options.priority for t in ran] == sorted(priorities, reverse=True)
        # same priority: first submitted, first run
        sevens = [t.id for t in ran if t.options.priority == 7]
        assert sevens == [submitted[1].id, submitted[5].id]


def test_up_with_a_configuration_file_serves_its_partitions(tmp_path):
    (tmp_path / "broker.toml").write_text(CONFIG)
    endpoint, agents = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    up = subprocess.Popen([sys.executable, "-m", "armonik_zmq", "--log-level", "WARNING", "up", "--data-dir",
                           str(tmp_path / "data"), "--endpoint", endpoint, "--agents-endpoint", agents,
                           "--workers", "1", "--processor", PROCESSOR, "--config", str(tmp_path / "broker.toml")],
                          env={**os.environ, **WORKER_ENV})
    try:
        with connect(endpoint, timeout=30) as conn:
            health = ArmoniKHealthChecks(conn)
            deadline = time.monotonic() + 60
            while health.check_health()["agents"]["status"] != ServiceHealthCheckStatus.HEALTHY:
                assert up.poll() is None and time.monotonic() < deadline, "the cluster did not come up"
                time.sleep(0.05)
            _, listed = ArmoniKPartitions(conn).list_partitions(sort_field=Partition.id)
            assert [p.id for p in listed] == ["fast", "slow"]
            api = Api(conn)
            session_id = api.sessions.create_session(options(1), partition_ids=["slow", "fast"])
            task, [out] = api.submit(session_id, {"op": "square", "x": 6})
            assert api.value(session_id, out) == 36
            assert api.tasks.get_task(task.id).options.partition_id == "slow"  # the session's first partition
    finally:
        up.terminate()
        up.wait(60)
    assert up.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_configuration_file_is_refused(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[partitions]]\nid = "a"\npod_max = -1\n')
    out = subprocess.run([sys.executable, "-m", "armonik_zmq", "broker", "--config", str(config), "--data-dir",
                          str(tmp_path / "data"), "--endpoint", f"ipc://{tmp_path}/f", "--agents-endpoint",
                          f"ipc://{tmp_path}/b"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "partitions[0].pod_max must be a non-negative integer" in out.stderr


# -- a million rows -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ARMONIK_ZMQ_SLOW"), reason="half a minute: set ARMONIK_ZMQ_SLOW=1")
def test_a_page_of_a_million_tasks_keeps_the_broker_small(tmp_path):
    from bench.listing import measure

    figures = measure(str(tmp_path / "lmdb"), n=1_000_000, sessions=10)
    for case in figures["cases"]:
        # loading a million rows would take gigabytes; the heap of one page takes a few megabytes
        assert case["rss_anon_growth_mb"] < 64, case
        # the scan runs between turns: other requests are still answered meanwhile
        assert case["other_request_worst_ms"] < 500, case
    assert figures["cases"][0]["total"] == 1_000_000
