"""What a processor sees of its task, and the calls it may make to its agent while it runs."""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Mapping, Optional, Union

from .. import shm
from ..common import Result, Task, TaskDefinition, TaskOptions
from ..protocol import Op, chunks

log = logging.getLogger(__name__)

#: send_results data below this size waits for the task's output message (one message per short task)
SEND_NOW_THRESHOLD = 64 * 1024


class TaskHandler:
    """One task run: its inputs, and the agent calls that create results, send data and submit subtasks.

    Nothing sent through it is committed unless the processor returns ``Output()`` (success).
    """

    def __init__(self, header: dict, frames: list, call):
        self._agent_call = call
        self.token: str = header["token"]
        self.session_id: str = header["session_id"]
        self.task_id: str = header["task_id"]
        self._options: dict = header["options"]
        self._task_options: Optional[TaskOptions] = None
        self.expected_results: List[str] = list(header["expected_output_ids"])
        self.payload_id: str = header["payload_id"]
        self.configuration: dict = header.get("configuration") or {}
        self._payload = frames[0]
        deps = header["data_dependencies"]
        #: result id -> bytes of each data dependency (ArmoniK's ``data_dependencies``)
        self.data_dependencies: Mapping[str, bytes] = dict(zip(deps, frames[1:])) if deps else {}
        #: small results kept for the output message
        self._kept: Dict[str, bytes] = {}
        #: results handed to the broker's data socket: [{result_id, segment}] for the output message
        self._segments: List[dict] = []
        #: the buffers of those results, kept until this run is dropped: see ``report_before_freeing``
        self._written: List[list] = []

    @property
    def task_options(self) -> TaskOptions:
        """The task's options (built when first read: most processors never look, and a tiny task notices)."""
        if self._task_options is None:
            self._task_options = TaskOptions.from_wire(self._options)
        return self._task_options

    def _call(self, op: Op, data=(), **fields) -> dict:
        """Ask the agent, on behalf of this task run (its token)."""
        return self._agent_call(op, data, token=self.token, **fields)

    @property
    def payload(self) -> bytes:
        return self._payload

    @property
    def _chunk(self) -> int:
        return self.configuration.get("data_chunk_max_size", 2 * 1024 * 1024)

    def send_results(self, results_data: Dict[str, Union[bytes, bytearray]]) -> None:
        """Send the data of results (this task's expected outputs, or results it created).

        Small data travels with the task's output; nothing is committed before the output anyway.
        """
        big = {}
        for rid, data in results_data.items():
            if self._to_segment(rid, data):
                continue
            if isinstance(data, (list, tuple)):  # several buffers (e.g. pickle-5 out-of-band): joined once
                data = b"".join(data)
            if len(data) < SEND_NOW_THRESHOLD:
                self._kept[rid] = data
            else:
                big[rid] = data
        if big:
            ids, counts, frames = self._framed(big)
            self._call(Op.W_SEND_RESULTS, frames, result_ids=ids, frames=counts)

    def _to_segment(self, result_id: str, data) -> bool:
        """Hand a large result (a buffer, or a list of them) to the broker's data socket as a sealed memfd, if the
        broker is on this host."""
        threshold = self.configuration.get("shm_threshold", 0)
        if not threshold or (type(data) is bytes and len(data) < threshold):
            return False  # (most results: small bytes, told without a list)
        buffers = data if isinstance(data, (list, tuple)) else [data]
        if shm.nbytes(buffers) < threshold:
            return False
        segment = None
        for attempt in range(2):  # a second time on a fresh connection: the broker may have restarted
            channel = _data_channel(self.configuration, wait=_RECONNECT_WAIT)
            if channel is None:
                break
            try:
                segment = channel.put(buffers)
                break
            except (OSError, shm.DataError) as exc:
                _channels.pop(self.configuration.get("data_socket"), None)
                channel.close()
                if attempt:
                    log.warning("result %s goes over the socket: the broker's data socket failed (%s)", result_id, exc)
        if segment is None:
            return False
        self._segments.append({"result_id": result_id, "segment": segment})
        self._written.append(buffers)
        return True

    @property
    def report_before_freeing(self) -> bool:
        """Whether this run's output should go before its results' memory is freed (when the run is dropped).

        Freeing a big array built in 4 KiB pages (see hostmem.py) takes ~65 us per MiB (a 256 MiB one:
        17 ms), more than sending the output at once instead of batching it with the next ones.
        """
        return bool(self._segments) and sum(seg["segment"]["size"] for seg in self._segments) >= REPORT_BEFORE_FREEING

    def _framed(self, results_data: Dict[str, bytes]) -> tuple[list, list, list]:
        ids, counts, frames = [], [], []
        for rid, data in results_data.items():
            parts = chunks(data, self._chunk)
            ids.append(rid)
            counts.append(len(parts))
            frames.extend(parts)
        return ids, counts, frames

    def output_message(self) -> tuple[dict, list]:
        """Header fields and data frames of the kept results, for the output message."""
        fields: dict = {"segments": self._segments} if self._segments else {}
        if not self._kept:
            return fields, []
        ids, counts, frames = self._framed(self._kept)
        return {**fields, "result_ids": ids, "frames": counts}, frames

    def create_results_metadata(self, result_names: List[str], batch_size: int = 100) -> Dict[str, Result]:
        """Create results without data; return name -> Result."""
        header = self._call(Op.W_CREATE_RESULTS_METADATA, (), names=list(result_names))
        return {r["name"]: Result.from_wire(r) for r in header["results"]}

    def create_results(self, results_data: Dict[str, bytes], batch_size: int = 1) -> Dict[str, Result]:
        """Create results with their data; return name -> Result."""
        names, counts, frames = self._framed(results_data)
        header = self._call(Op.W_CREATE_RESULTS, frames, names=names, frames=counts)
        return {r["name"]: Result.from_wire(r) for r in header["results"]}

    def submit_tasks(self, tasks: List[TaskDefinition], default_task_options: Optional[TaskOptions] = None,
                     batch_size: Optional[int] = 100) -> List[Task]:
        """Submit subtasks; a subtask listing one of this task's expected outputs takes it over."""
        fields = {"tasks": [t.to_wire() for t in tasks]}
        if default_task_options is not None:
            fields["task_options"] = default_task_options.to_wire()
        header = self._call(Op.W_SUBMIT_TASKS, (), **fields)
        return [Task(id=t["task_id"], session_id=self.session_id, expected_output_ids=t["expected_output_ids"],
                     data_dependencies=t["data_dependencies"], payload_id=t["payload_id"])
                for t in header["tasks"]]


#: this worker process's connections to broker data sockets, by path (None: not reachable from here)
_channels: Dict[str, Optional[shm.DataChannel]] = {}

#: bytes of shared-memory results from which a run's output is sent before their memory is freed
REPORT_BEFORE_FREEING = 4 << 20


#: seconds a worker waits for a restarting broker's data socket before sending a result over the sockets
#: (its agent is cut off from that broker meanwhile too, so the output would wait anyway)
_RECONNECT_WAIT = 5.0


def _data_channel(configuration: dict, wait: float = 0.0) -> Optional[shm.DataChannel]:
    path = configuration.get("data_socket")
    if not path:
        return None
    channel = _channels.get(path)
    deadline = time.monotonic() + wait
    while channel is None:  # not cached when unreachable: the broker may be restarting
        channel = shm.DataChannel.open(configuration)
        if channel is not None:
            _channels[path] = channel
        elif time.monotonic() >= deadline or configuration.get("host_id") != shm.host_id():
            return None
        else:
            time.sleep(0.1)
    return channel


def mapped_inputs(header: dict, frames: list) -> list:
    """The payload and dependencies of a RUN, in order, with the ``mapped`` ones mapped from the data socket.

    Those are read-only memoryviews of the broker's segment files (checksums verified): no copy.
    """
    mapped = header["mapped"]
    channel = _data_channel(header.get("configuration") or {})
    if channel is None:
        raise shm.DataError("the broker's data socket is not reachable from this worker")
    views = channel.get(header["session_id"], mapped)
    for rid in mapped:
        view = views.get(rid)
        if view is None or isinstance(view, Exception):
            raise shm.DataError(f"input {rid}: {view or 'not a segment any more'}")
    rest = iter(frames)
    return [views[rid] if rid in views else next(rest)
            for rid in [header["payload_id"], *header["data_dependencies"]]]
