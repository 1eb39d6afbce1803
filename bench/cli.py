"""Run the workloads of issue 4 on armonik_zmq and, when installed, Dask, Ray, IPyParallel, Scaler
and the stdlib's process pool: one system after another, each with the same number of worker
processes, each in a fresh child process (its own CPU accounting, no leftovers from the previous one).

    python -m bench --systems all --workers 2 --runs 3 --json out.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import DURABILITY_ARGS, DURABILITY_ENV, ROOT, machine
from .systems import SYSTEMS
from .workloads import WORKLOADS

#: rows of the table: figure name -> label
LABELS = {
    "tiny_tasks_per_s": "tiny tasks (tasks/s)",
    "latency_p50_us": "latency p50 (us)",
    "latency_p99_us": "latency p99 (us)",
    "dag_fan_in_tasks_per_s": "DAG 1000+1 reduce (tasks/s)",
    "dag_chains_tasks_per_s": "DAG 200 chains of 10 (tasks/s)",
    "data_1mib_mib_per_s": "data 100 x 1 MiB (MiB/s)",
    "data_big_seconds": "data one big array (s)",
}


def _split(value: str, known: dict, what: str) -> list[str]:
    names = list(known) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)} or 'all'")
    return names


def _with_repo_on_path() -> dict:
    """Workers of every system import ``bench.tasks``: put the repository on their path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def run_system(name: str, workloads: list[str], workers: int, runs: int, scale: float) -> dict:
    """Start one system, run the workloads ``runs`` times each, stop it; return its JSON record."""
    from .cpu import tree_seconds
    from .systems import load
    from .workloads import load as load_workload

    cls = load(name)
    record: dict = {"description": cls.description, "native_deps": cls.native_deps, "dag_note": cls.dag_note,
                    "workloads": {}}
    reason = cls.missing()
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    system = cls()
    started = time.perf_counter()
    try:
        system.start(workers)
    except Exception as exc:
        return {**record, "status": "failed", "reason": f"start failed: {exc!r}", "traceback": traceback.format_exc()}
    record.update(status="ok", version=system.version(), start_seconds=time.perf_counter() - started)
    try:
        for workload in workloads:
            module = load_workload(workload)
            samples = []
            try:
                for _ in range(runs):
                    cpu = tree_seconds()
                    wall = time.perf_counter()
                    out = module.run(system, scale)
                    out["seconds"] = time.perf_counter() - wall
                    out["cpu_seconds"] = tree_seconds() - cpu
                    samples.append(out)
            except Exception as exc:
                record["workloads"][workload] = {"error": repr(exc), "traceback": traceback.format_exc(), "runs": samples}
                continue
            figures = {}
            for fname, fig in samples[0]["figures"].items():
                values = [s["figures"][fname]["value"] for s in samples]
                figures[fname] = {**fig, "value": statistics.median(values), "runs": values}
            cpu_per_task = [s["cpu_seconds"] / s["tasks"] * 1e6 for s in samples]
            record["workloads"][workload] = {
                "figures": figures, "cpu_us_per_task": statistics.median(cpu_per_task),
                "runs": [{k: v for k, v in s.items() if k != "figures"} for s in samples]}
    finally:
        system.stop()
    return record


def _child(name: str, workloads: list[str], workers: int, runs: int, scale: float, timeout: float,
           console: Console) -> dict:
    """Run one system in a child process (fresh interpreter, its own process tree)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [sys.executable, "-m", "bench", "--systems", name, "--workloads", ",".join(workloads),
           "--workers", str(workers), "--runs", str(runs), "--scale", str(scale), "--one", out]
    # The systems' own logs go to a file: shown only when the system fails.
    with tempfile.TemporaryFile("w+") as log:
        try:
            proc = subprocess.run(cmd, env=_with_repo_on_path(), timeout=timeout, cwd=ROOT, stdout=log, stderr=log)
            if proc.returncode == 0:
                with open(out) as f:
                    return json.load(f)
            reason = f"benchmark process exited with code {proc.returncode}"
        except subprocess.TimeoutExpired:
            reason = f"no result within --system-timeout {timeout:g}s"
        finally:
            os.unlink(out)
        log.seek(0)
        tail = log.read()[-3000:]
    console.print(f"[red]{name}: {reason}; its last output:[/red]\n{escape(tail)}")
    return {"status": "failed", "reason": reason, "log_tail": tail, "workloads": {}}


def _fmt(fig: Optional[dict]) -> str:
    if fig is None:
        return "-"
    v = fig["value"]
    if fig["unit"] == "s":
        return f"{v:.3f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The table's systems and rows (label, one cell per system), from a report."""
    systems = [n for n, r in report["systems"].items() if r["status"] == "ok"]
    rows = []
    for fname, label in LABELS.items():
        cells = []
        for name in systems:
            fig = None
            for w in report["systems"][name]["workloads"].values():
                fig = w.get("figures", {}).get(fname, fig)
            if fname == "data_big_seconds" and fig is not None:
                mib = next((w["figures"]["data_big_mib"]["value"] for w in report["systems"][name]["workloads"].values()
                            if "data_big_mib" in w.get("figures", {})), None)
                label = f"data one {mib:g} MiB array (s)" if mib else label
            cells.append(_fmt(fig))
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    for workload in report["params"]["workloads"]:
        cells = []
        for name in systems:
            w = report["systems"][name]["workloads"].get(workload, {})
            cells.append("error" if "error" in w else f"{w['cpu_us_per_task']:,.0f}" if w else "-")
        rows.append([f"CPU us/task, {workload}", *cells])
    return systems, rows


def _markdown(report: dict) -> str:
    """The report as a Markdown table (for notes and issues), with its command and the systems' versions."""
    systems, rows = _rows(report)
    p = report["params"]
    lines = [f"`{p.get('command', 'python -m bench')}`: {p['workers']} workers, median of {p['runs']} run(s), "
             f"scale {p['scale']:g}, {report['machine']['date']}", "",
             "| workload | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    for name, r in report["systems"].items():
        extra = f" {r.get('version', '')}: {r['description']}; {r['dag_note']}" if r["status"] == "ok" else \
            f": {r['status']} ({r['reason']})"
        lines.append(f"- {name}{extra}")
        for workload, w in r.get("workloads", {}).items():
            if "error" in w:
                lines.append(f"  - {workload}: {w['error']}")
    return "\n".join(lines) + "\n"


def render(report: dict, console: Console) -> None:
    systems, rows = _rows(report)
    p = report["params"]
    if not systems:
        console.print("no system ran", style="yellow")
    table = Table(title=f"{p['workers']} workers, median of {p['runs']} run(s), scale {p['scale']:g} "
                        f"({report['machine']['cpus']} CPUs, others may be running: compare CPU us/task too)")
    table.add_column("workload")
    for name in systems:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    if systems:
        console.print(table)
    for name, r in report["systems"].items():
        if r["status"] != "ok":
            console.print(f"[yellow]{name}: {r['status']}: {escape(r['reason'])}[/yellow]")
            continue
        for workload, w in r["workloads"].items():
            if "error" in w:
                console.print(f"[red]{name} / {workload}: {escape(w['error'])}[/red]")
        console.print(f"[dim]{name} {r.get('version', '')}: {escape(r['description'])}; {escape(r['dag_note'])}[/dim]")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--systems", default="all", show_default=True,
              help=f"Comma-separated systems, or 'all': {', '.join(SYSTEMS)}. Missing ones are skipped.")
@click.option("--workloads", default="all", show_default=True,
              help=f"Comma-separated workloads, or 'all': {', '.join(WORKLOADS)}.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Worker processes per system.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1), help="Runs per workload; medians reported.")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(min=0.0001),
              help="Multiply every count and size (0.01 for a smoke run).")
@click.option("--durability", type=click.Choice(list(DURABILITY_ARGS)), default="lmdb", show_default=True,
              help="How armonik_zmq's broker makes a commit durable: its default (lmdb: LMDB's own two flushes), "
                   "wal (--durability wal: one flush of a write-ahead log) or none (--no-sync: no flush).")
@click.option("--json", "json_path", default="", help="Also write the full report (every run) to this file.")
@click.option("--system-timeout", default=1800.0, show_default=True, help="Seconds one system may take in all.")
@click.option("--show", "show_path", default="", help="Print the table of a report written before (--json) and stop.")
@click.option("--markdown", is_flag=True, help="With --show: print the table as Markdown.")
@click.option("--one", "one_path", default="", hidden=True, help="Internal: run the one system given, write JSON here.")
def main(systems: str, workloads: str, workers: int, runs: int, scale: float, durability: str, json_path: str,
         system_timeout: float, show_path: str, markdown: bool, one_path: str) -> None:
    """Benchmark armonik_zmq against Dask, Ray, IPyParallel, Scaler and ProcessPoolExecutor.

    Workloads: tiny (20,000 no-op tasks in bulk), latency (1,000 sequential round trips), dag
    (1,000 + 1 reduce; 200 chains of 10), data (100 x 1 MiB numpy results; one 256 MiB array).
    `armonik_api` is armonik_zmq's ArmoniK-style path (payload bytes + worker module).
    Peers install with `pip install -e .[bench]`.
    """
    if show_path:
        with open(show_path) as f:
            report = json.load(f)
        if markdown:
            click.echo(_markdown(report), nl=False)
        else:
            render(report, Console(width=None if sys.stdout.isatty() else 160))
        return
    os.environ[DURABILITY_ENV] = durability  # the systems' child processes inherit it
    names = _split(systems, SYSTEMS, "system")
    chosen = _split(workloads, WORKLOADS, "workload")
    if one_path:
        record = run_system(names[0], chosen, workers, runs, scale)
        with open(one_path, "w") as f:
            json.dump(record, f)
        return
    # A wide table even when the output is a file or a pipe (CI logs, notes).
    console = Console(width=None if sys.stdout.isatty() else 160)
    report = {"benchmark": "peers", "machine": machine(),
              "params": {"systems": names, "workloads": chosen, "workers": workers, "runs": runs, "scale": scale,
                         "durability": durability, "command": " ".join(["python -m bench", *sys.argv[1:]])},
              "systems": {}}
    for name in names:
        with console.status(f"{name}: {', '.join(chosen)} x {runs} on {workers} workers..."):
            started = time.perf_counter()
            report["systems"][name] = record = _child(name, chosen, workers, runs, scale, system_timeout, console)
        what = record["status"] if record["status"] != "ok" else f"done in {time.perf_counter() - started:.1f}s"
        console.print(f"{name}: {what}" + (f" ({record['reason']})" if record["status"] != "ok" else ""), markup=False)
        if json_path:  # after every system: an interrupted run keeps what it measured
            _write(json_path, report)
    render(report, console)
    if json_path:
        console.print(f"wrote {json_path}")


def _write(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
