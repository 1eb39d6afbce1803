"""armonik_zmq through its ArmoniK-style API: payload bytes, a worker module, no pickling.

The same tasks as the other systems (``bench.tasks``), but encoded as small payloads that the worker
module ``bench.tasks:processor`` decodes: the bare task path, so the futures API's own cost shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

from . import System

#: results per batched download (small results)
_DOWNLOAD_BATCH = 256


@dataclass(frozen=True)
class Handle:
    result_id: str
    fn: str


class ArmoniKApi(System):
    name = "armonik_api"
    description = "armonik_zmq ArmoniK-style API (payload bytes + worker module bench.tasks:processor)"
    requires = ("armonik_zmq",)
    dag_note = "results as data dependencies (ArmoniK TaskDefinition)"

    def start(self, workers: int) -> None:
        from armonik_zmq.client import ArmoniKEvents, ArmoniKResults, ArmoniKSessions, ArmoniKTasks, TaskOptions, connect
        from armonik_zmq.cluster import LocalProcesses

        from ..common import bench_env, broker_args

        self.cluster = LocalProcesses(workers=workers, processor="bench.tasks:processor", env=bench_env(),
                                      broker_args=broker_args()).start()
        self.conn = connect(self.cluster.endpoint, timeout=600)
        self.sessions, self.results, self.tasks, self.events = (
            ArmoniKSessions(self.conn), ArmoniKResults(self.conn), ArmoniKTasks(self.conn), ArmoniKEvents(self.conn))
        self.session_id = self.sessions.create_session(
            TaskOptions(max_duration=timedelta(minutes=10), priority=1, max_retries=1))

    def stop(self) -> None:
        try:
            self.sessions.close_session(self.session_id)
            self.conn.close()
        finally:
            self.cluster.cleanup()

    def version(self) -> str:
        import armonik_zmq

        return armonik_zmq.__version__

    def submit(self, fn: Callable, *args) -> Any:
        return self.map(fn, [args])[0]

    def map(self, fn: Callable, calls: Sequence[tuple]) -> list:
        from armonik_zmq.client import TaskDefinition

        from ..tasks import encode_call

        if not calls:
            return []
        payloads, deps = {}, []
        for i, call in enumerate(calls):
            unique: dict[str, int] = {}
            literal = [{"$": unique.setdefault(a.result_id, len(unique))} if isinstance(a, Handle) else a for a in call]
            payloads[f"p{i}"] = encode_call(fn.__name__, literal)
            deps.append(list(unique))
        n = len(calls)
        created = self.results.create_results(payloads, self.session_id, batch_size=n)
        outputs = self.results.create_results_metadata([f"o{i}" for i in range(n)], self.session_id, batch_size=n)
        out_ids = [outputs[f"o{i}"].result_id for i in range(n)]
        self.tasks.submit_tasks(self.session_id, [
            TaskDefinition(payload_id=created[f"p{i}"].result_id, expected_output_ids=[out_ids[i]],
                           data_dependencies=deps[i]) for i in range(n)], chunk_size=n)
        return [Handle(rid, fn.__name__) for rid in out_ids]

    def result(self, handle: Handle) -> Any:
        """One result, the way ArmoniK code gets it: wait for it, then ``download_result_data``."""
        from ..tasks import decode_output

        if handle.fn == "array":
            return self.gather([handle])[0]
        self.events.wait_for_result_availability(handle.result_id, self.session_id)
        return decode_output(handle.fn, self.results.download_result_data(handle.result_id, self.session_id))

    def gather(self, handles: Sequence[Handle]) -> list:
        from armonik_zmq.protocol import Op, split_frames

        from ..tasks import decode_output

        ids = [h.result_id for h in handles]
        self.events.wait_for_result_availability(ids, self.session_id, bucket_size=max(1, len(ids)))
        values: dict[str, Any] = {}
        small = []
        for h in handles:
            if h.fn != "array":  # what came with its completion event during the wait needs no download
                data = self.conn.arrived.take(self.session_id, h.result_id)
                if data is None:
                    small.append(h)
                else:
                    values[h.result_id] = data
        for start in range(0, len(small), _DOWNLOAD_BATCH):
            batch = [h.result_id for h in small[start:start + _DOWNLOAD_BATCH]]
            # One request for a batch of small results (the wire op behind download_result_data).
            header, frames = self.conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=self.session_id, result_ids=batch)
            for rid, parts in zip(batch, split_frames(frames, header["frames"])):
                values[rid] = parts[0] if len(parts) == 1 else b"".join(parts)
        arrays = [h.result_id for h in handles if h.fn == "array"]
        if arrays:  # large: mapped on the broker's host (no copy, one request per 200), else streamed in chunks
            values.update(self.results.download_result_views(arrays, self.session_id))
        return [decode_output(h.fn, values[h.result_id]) for h in handles]

    def release(self, handles: Sequence[Handle]) -> None:
        ids = [h.result_id for h in handles]
        if ids:
            self.results.delete_result_data(ids, self.session_id, batch_size=len(ids))


ADAPTER = ArmoniKApi
