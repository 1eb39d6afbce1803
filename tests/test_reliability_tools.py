"""The reliability tools themselves: the history checker must be able to report every kind of fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from reliability import History, figure, initial_task_id, read_executions

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_clean_history_reports_nothing(tmp_path):
    h = History()
    h.attempt(["a", "b", "c"])
    h.acknowledge(["a", "b", "c"])
    h.complete(["a", "b", "c"])
    assert h.report() == {"lost": 0, "unexpected": 0, "duplicated": 0, "recovered": 0}


def test_each_fault_is_reported():
    h = History()
    h.attempt(["acked-lost", "acked-twice", "unacked-done", "unacked-gone", "fine"])
    h.acknowledge(["acked-lost", "acked-twice", "fine"])
    h.complete(["acked-twice", "acked-twice", "unacked-done", "fine", "never-submitted"])
    assert h.details() == {"lost": {"acked-lost"}, "unexpected": {"never-submitted"}, "duplicated": {"acked-twice"},
                           "recovered": {"unacked-done"}}
    assert h.report() == {"lost": 1, "unexpected": 1, "duplicated": 1, "recovered": 1}
    text = h.explain()
    assert "lost=1 (e.g. acked-lost)" in text and "unexpected=1 (e.g. never-submitted)" in text


def test_an_execution_of_a_task_never_submitted_is_unexpected():
    h = History()
    h.attempt(["a"])
    h.acknowledge(["a"])
    h.complete(["a"])
    h.execute(["a", "a###1", "ghost"])
    assert h.details()["unexpected"] == {"ghost"}
    assert h.extra_executions() == 1


def test_the_execution_log_of_real_workers_counts_retries_as_the_same_task(tmp_path):
    """processors.py writes the log in the worker process; retried attempts fold into their initial id."""
    log = tmp_path / "exec.log"
    code = ("import processors\n"
            "for t in ['t1', 't1###1', 't1###2', 't2']:\n"
            "    processors.record_execution(t)\n"
            "processors.record_execution('t3', b'sha256:k3:xyz')\n")
    env = {**os.environ, "ARMONIK_ZMQ_EXEC_LOG": str(log), "PYTHONPATH": os.pathsep.join([HERE, *sys.path])}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(30) for p in procs] == [0, 0, 0]
    rows = read_executions(str(log))
    assert len(rows) == 15 and {row[1] for row in rows} == {p.pid for p in procs}
    h = History(exec_log=str(log))
    h.attempt(["t1", "t2", "k3"])
    assert h.executed == {"t1": 9, "t2": 3, "k3": 3}
    assert h.extra_executions() == 12
    assert initial_task_id("abc###12") == "abc" and initial_task_id("a#b") == "a#b"


def test_figures_are_appended_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "figures.jsonl"
    monkeypatch.delenv("ARMONIK_ZMQ_FIGURES", raising=False)
    figure("T0", "nothing", 1, "s", "<= 2 s", True)
    assert not path.exists()
    monkeypatch.setenv("ARMONIK_ZMQ_FIGURES", str(path))
    figure("T0", "requeue delay", 1.5, "s", "<= 2 s", True)
    figure("T0", "lost", 3, "tasks", "= 0", False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["name"], r["value"], r["passed"]) for r in rows] == [("requeue delay", 1.5, True), ("lost", 3, False)]
    assert rows[0]["node"].endswith("test_figures_are_appended_only_when_asked")


def test_scale_is_full_or_ci(scale, request):
    assert scale == {"full": 1.0, "ci": 0.1}[request.node.callspec.id]
