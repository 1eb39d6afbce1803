"""``python -m bench`` runs end to end at a tiny scale and writes the report's JSON shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_systems_one_after_another_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench", "--systems", "armonik_zmq,processpool,nosuch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown system nosuch" in proc.stderr  # refused before anything starts
    proc = subprocess.run([sys.executable, "-m", "bench", "--systems", "armonik_zmq,processpool", "--runs", "1",
                           "--scale", "0.005", "--workers", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["params"]["workers"] == 2 and report["params"]["systems"] == ["armonik_zmq", "processpool"]
    assert report["params"]["durability"] == "lmdb"  # the broker's default unless --durability says otherwise
    assert report["machine"]["cpus"] >= 1
    for name in ("armonik_zmq", "processpool"):
        system = report["systems"][name]
        assert system["status"] == "ok", system
        assert set(system["workloads"]) == {"tiny", "latency", "dag", "data"}
        for workload in system["workloads"].values():
            assert "error" not in workload, workload
            assert workload["cpu_us_per_task"] >= 0  # clock ticks are 10 ms: a tiny run may read 0
            assert len(workload["runs"]) == 1
            for fig in workload["figures"].values():
                assert fig["value"] > 0 and fig["unit"] and len(fig["runs"]) == 1
        figures = {k: v for w in system["workloads"].values() for k, v in w["figures"].items()}
        assert {"tiny_tasks_per_s", "latency_p50_us", "latency_p99_us", "dag_fan_in_tasks_per_s",
                "dag_chains_tasks_per_s", "data_1mib_mib_per_s", "data_big_seconds"} <= set(figures)
        assert figures["latency_p99_us"]["value"] >= figures["latency_p50_us"]["value"]
    assert "tiny tasks (tasks/s)" in proc.stdout  # the table
    assert elapsed < 40, f"the smoke run took {elapsed:.1f}s"
    shown = subprocess.run([sys.executable, "-m", "bench", "--show", str(out), "--markdown"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "| workload | armonik_zmq | processpool |" in shown.stdout
    assert "| tiny tasks (tasks/s) |" in shown.stdout and "- processpool " in shown.stdout


def test_a_system_not_installed_is_skipped_with_a_clear_line(tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")])}
    # A module named like a peer that fails to import stands for a peer that is not installed.
    (tmp_path / "ipyparallel.py").write_text("raise ImportError('not installed here')\n")
    proc = subprocess.run([sys.executable, "-m", "bench", "--systems", "ipyparallel", "--runs", "1", "--scale", "0.005",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())["systems"]["ipyparallel"]
    assert record["status"] == "skipped" and "not installed" in record["reason"]
    assert "ipyparallel: skipped" in proc.stdout and "pip install -e .[bench]" in proc.stdout.replace("\n", "")


def test_agent_alone_reports_the_agents_and_workers_cpu_per_task(tmp_path):
    """``python -m bench.agent_alone`` feeds a real agent from a scripted broker and writes its figures."""
    out = tmp_path / "agent.json"
    proc = subprocess.run([sys.executable, "-m", "bench.agent_alone", "--tasks", "600", "--runs", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    (run,) = report["figures"]["runs"]
    assert run["tasks"] == 600 and run["tasks_per_s"] > 0 and run["reports_per_1000"] > 0
    assert run["agent_cpu_us_per_task"] >= 0 and run["workers_cpu_us_per_task"] >= 0  # 10 ms clock ticks


def test_floor_runs_each_durable_write_and_refuses_an_unknown_one(tmp_path):
    """``python -m bench.floor`` times the bare six-hop chain per durable-write mode and writes its figures."""
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, "-m", "bench.floor", "--tasks", "200", "--runs", "1", "--dir", str(tmp_path),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"none", "direct", "flush2"}
    for fig in figures.values():
        assert 0 < fig["p50_us"] <= fig["p99_us"] and len(fig["runs"]) == 1
    bad = subprocess.run([sys.executable, "-m", "bench.floor", "--modes", "none,fsync3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown mode(s) fsync3" in bad.stderr
