"""Reliability report: run the reliability tests (T1..T15 of RELIABILITY.md) and write docs/reliability.md.

    python -m bench.faults                      # full size (nightly: long), writes docs/reliability.md
    python -m bench.faults --size ci            # the CI sizes, a quick look
    python -m bench.faults --render-only FILE   # re-render the report from a figures file

Each test records its figures with ``tests/reliability.py:figure()`` into the file named by
``ARMONIK_ZMQ_FIGURES``; this script sets it, runs pytest on the reliability test files (only the
size asked for, via ``ARMONIK_ZMQ_SIZE``) and renders one table row per figure.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import click
from rich.console import Console

from .common import ROOT, machine

#: the reliability test files of RELIABILITY.md section 6, and the tests each one holds
TEST_FILES = {
    "tests/test_faults.py": "T1, T2, T3, T4, T7",
    "tests/test_resubmit.py": "T5, T6",
    "tests/test_lmdb_faults.py": "T8, T9, T15",
    "tests/test_hostile.py": "T10, T12",
    "tests/test_fuzz.py": "T11",
    "tests/test_security.py": "T13",
    "tests/test_shm.py": "T14",
}

TITLES = {
    "T1": "Broker kill -9 storm", "T2": "Agent kill -9", "T3": "Hung agent and fencing", "T4": "Poison task",
    "T5": "Durable submit acks", "T6": "Broker outage with live peers", "T7": "No silent ROUTER drops",
    "T8": "LMDB map growth and cross-process readers", "T9": "Stale readers and file growth",
    "T10": "Duplicate, stale and foreign messages", "T11": "Malformed-input fuzz", "T12": "Oversize and flood",
    "T13": "Authentication and authorization", "T14": "Shared-memory / memfd hygiene",
    "T15": "Throughput floor, soak and restart time",
}


#: what a reader of the figures must know: where a test departs from RELIABILITY.md, and why
NOTES = {
    "T1": "The client retries a call across broker restarts with an idempotency key (the `resubmit` parcel); "
          "when a submit still fails, the test resubmits the batch only if none of its outputs got an owner task "
          "(a submission is one transaction, all or nothing), so no key is ever submitted twice. `recovered` "
          "counts tasks whose submission was committed but never acknowledged to the test. The fault-free "
          "baseline is the same workload on the same cluster just before the storm. Restart to first dispatch "
          "includes starting a new broker process (Python imports) and the agents registering again.",
    "T2": "A task counts as back in the queue at its RETRIED stamp (the broker drops the agent and requeues "
          "all its tasks in the same step). The first kill comes 1 s after the submissions, then one every 2 s.",
    "T3": "(b) ArmoniK ends a task that runs past its max_duration in TIMEOUT, without retry; RELIABILITY.md says "
          "it is retried. armonik_zmq keeps ArmoniK's behaviour (the test checks TIMEOUT and no retry). "
          "(a) The CI size stops the agent 5 s instead of 10 s (still past its 3 s lease).",
    "T4": "Detection + respawn is budgeted at 2 s per attempt (agent reaps dead workers every 0.2 s; a new "
          "worker starts in about 0.3-1 s); the measured time per attempt is listed.",
    "T7": "(b) The broker's per-agent SNDHWM is lowered to 10 (hidden `--backend-sndhwm`), the stopped agent "
          "has RCVHWM 100 and room for 100,000 tasks, 50 KB payloads fill the socket buffers; the lease is "
          "600 s so only a failed send can take the tasks back, and commits are not fsynced so the loop lag "
          "is the broker's own (turn-duration histogram, p99 as its bucket's upper bound). The guard runs "
          "the same with `--no-router-mandatory`: tasks are lost, which the same checks report.",
    "T10": "The hostile agent and the honest one are raw DEALERs played by the test (no agent process). Each "
           "report's expected kind comes from a model of the order the broker handles one connection's "
           "messages in: a stale or foreign report of a task that has already ended counts as a duplicate. "
           "CI size: 100 tasks (full: 1,000).",
    "T12": "(b) The flooder sends one-task submits with up to 5,000 unanswered (its own process); the polite "
           "client submits 1 task/s at full size (10/s at CI size, whose flood lasts 3 s), 30 samples, so its "
           "p99 is their maximum. The polite p99 is judged only when the load average is at most 2 x CPUs (the "
           "figure is always recorded). Outputs for the flood are created beforehand (500,000 at full size, 100,000 at CI size): "
           "broker RSS includes them.",
}


def _test_key(test_id: str) -> tuple:
    digits = "".join(c for c in test_id if c.isdigit())
    return (int(digits) if digits else 99, test_id)


def run_tests(files: list[str], size: str, figures_path: str, extra: tuple[str, ...]) -> dict[str, str]:
    """Run pytest on the files (one pytest per file, so one file's crash spares the others); outcome per file."""
    env = {**os.environ, "ARMONIK_ZMQ_FIGURES": figures_path, "ARMONIK_ZMQ_SIZE": size,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    outcomes = {}
    for path in files:
        # -m "": every test of the file, slow or not; ARMONIK_ZMQ_SIZE keeps one size of the scaled ones
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", "--timeout", "3600",
               "-rfE", path, *extra]
        click.echo(f"$ ARMONIK_ZMQ_SIZE={size} {shlex.join(cmd[1:])}", err=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        outcomes[path] = {0: "passed", 1: "some tests failed", 5: "no tests"}.get(rc, f"pytest exit code {rc}")
    return outcomes


def load_figures(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def _value(row: dict) -> str:
    value = row["value"]
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return f"{value} {row['unit']}".strip()


def _command(row: dict, size: str) -> str:
    node = row.get("node") or ""
    if not node:
        return ""
    return f"`ARMONIK_ZMQ_SIZE={size} python -m pytest -m '' '{node}'`"


def render(rows: list[dict], size: str, outcomes: dict[str, str], started: float, took: float,
           load: float) -> str:
    m = machine()
    lines = [
        "# Reliability report",
        "",
        "Generated by `python -m bench.faults"
        + ("" if size == "full" else f" --size {size}") + "`: it runs the reliability tests of",
        "RELIABILITY.md section 6 (T1..T15) against real broker, agent and worker",
        "processes, and lists every figure they measured with its pass criterion.",
        "",
        f"- size: **{size}** ({'the counts of RELIABILITY.md' if size == 'full' else '1/10 of the counts'})",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, run took {took / 60:.1f} min",
        f"- machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, pyzmq {m['pyzmq']} "
        f"(libzmq {m['libzmq']}), py-lmdb {m['lmdb']}, msgpack {m['msgpack']}",
        "- timings are wall-clock on a shared machine: other load makes them noisy (and pessimistic); "
        f"load average at the end of the run: {load:.1f} on {m['cpus']} CPUs.",
        "",
        "## Test files",
        "",
        "| file | tests | outcome |",
        "| --- | --- | --- |",
    ]
    for path, tests in TEST_FILES.items():
        missing = "not run" if os.path.exists(os.path.join(ROOT, path)) else "not in the repository yet"
        lines.append(f"| `{path}` | {tests} | {outcomes.get(path, missing)} |")
    by_test: dict[str, list[dict]] = {}
    for row in rows:
        by_test.setdefault(row["test"], []).append(row)
    lines += ["", "## Figures", "",
              "| test | figure | value | criterion | pass | command |",
              "| --- | --- | --- | --- | --- | --- |"]
    for test_id in sorted(set(TITLES) | set(by_test), key=_test_key):
        title = f"{test_id} {TITLES.get(test_id, '')}".strip()
        if test_id not in by_test:
            lines.append(f"| {title} | no figure recorded | | | | |")
            continue
        for row in by_test[test_id]:
            verdict = "pass" if row["passed"] else "**FAIL**"
            lines.append(f"| {title} | {row['name']} | {_value(row)} | {row['criterion']} | {verdict} "
                         f"| {_command(row, size)} |")
    failed = [r for r in rows if not r["passed"]]
    lines += ["", f"{len(rows)} figures, {len(failed)} failing their criterion."]
    notes = [(t, n) for t, n in sorted(NOTES.items(), key=lambda item: _test_key(item[0])) if t in by_test]
    if notes:
        lines += ["", "## Notes", ""] + [f"- **{t}**: {n}" for t, n in notes]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--size", type=click.Choice(["full", "ci"]), default="full", show_default=True,
              help="Which size of the scaled tests to run (full = RELIABILITY.md's counts, ci = 1/10).")
@click.option("--output", default=os.path.join(ROOT, "docs", "reliability.md"), show_default=True,
              help="Where to write the report (Markdown).")
@click.option("--figures", "figures_path", default=None,
              help="Keep the raw figures (JSON lines) in this file (default: a temporary file).")
@click.option("--only", multiple=True, help="Run only this test file (repeatable), e.g. tests/test_faults.py.")
@click.option("--render-only", "render_only", default=None,
              help="Do not run anything: render the report from this figures file.")
@click.option("-k", "keyword", default=None, help="Passed to pytest -k (select tests by name).")
def main(size: str, output: str, figures_path: str | None, only: tuple[str, ...], render_only: str | None,
         keyword: str | None) -> None:
    """Run the reliability tests T1..T15 and write the reliability report (docs/reliability.md)."""
    console = Console(stderr=True)
    started = time.time()
    if render_only:
        rows, meta = load_figures(render_only), {}
        if os.path.exists(render_only + ".meta.json"):
            with open(render_only + ".meta.json") as f:
                meta = json.load(f)
        outcomes = meta.get("outcomes", {})
        started = meta.get("started", started)
    else:
        files = list(only) or [f for f in TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
        missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
        if missing:
            raise click.BadParameter(f"no such test file: {', '.join(missing)}", param_hint="--only")
        if figures_path is None:
            fd, figures_path = tempfile.mkstemp(prefix="armonik-zmq-figures-", suffix=".jsonl")
            os.close(fd)
        else:
            open(figures_path, "w").close()
        outcomes = run_tests(files, size, figures_path, ("-k", keyword) if keyword else ())
        rows = load_figures(figures_path)
        # kept beside the figures, so that --render-only can render this run again
        with open(figures_path + ".meta.json", "w") as f:
            json.dump({"outcomes": outcomes, "started": started, "took": time.time() - started,
                       "load": os.getloadavg()[0]}, f)
    took = meta.get("took", time.time() - started) if render_only else time.time() - started
    load = meta.get("load", os.getloadavg()[0]) if render_only else os.getloadavg()[0]
    text = render(rows, size, outcomes, started, took, load)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    failed = sum(not r["passed"] for r in rows)
    console.print(f"{len(rows)} figures ({failed} failing) -> {output}")
    sys.exit(1 if failed or any(o not in ("passed", "no tests") for o in outcomes.values()) else 0)


if __name__ == "__main__":
    main()
