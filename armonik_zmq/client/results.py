"""``ArmoniKResults``: the results service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..common import Result
from ..protocol import MAX_BATCH, Op, chunks
from .connection import Connection
from .filters import Direction, Filter, to_wire_filter, to_wire_sort

__all__ = ["ArmoniKResults"]

#: Results per request at least: the wire is batched, so fewer round trips is faster.
_MIN_WIRE_BATCH = 10_000
#: Data per CREATE_RESULTS message, beyond which the next results go in another message.
_MESSAGE_BYTES = 64 << 20
#: Data per message of a chunked upload or download: a large result moves a bounded piece at a time.
_STREAM_MESSAGE_BYTES = 8 << 20
#: Messages of one chunked upload or download awaiting their reply at once (keeps the pipe busy).
_STREAM_WINDOW = 2


def _as_bytes(data: Any, what: str) -> Union[bytes, bytearray, memoryview]:
    """Check ``data`` is bytes-like and return it with one-byte items (so lengths count bytes)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{what} must be bytes-like, not {type(data).__name__}") from None
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class ArmoniKResults:
    """Create results, upload and download their data, inspect them."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn
        self._chunk_size: Optional[int] = None

    def get_service_config(self) -> int:
        """Return the largest data chunk the broker wants in one frame (asked once, then cached)."""
        if self._chunk_size is None:
            header, _ = self._conn.call(Op.GET_SERVICE_CONFIG)
            self._chunk_size = int(header["data_chunk_max_size"])
        return self._chunk_size

    def create_results_metadata(self, result_names: List[str], session_id: str,
                                batch_size: int = 100, *, manual_deletion: bool = False) -> Dict[str, Result]:
        """Create results without data; return each name's ``Result``.

        ``batch_size`` is a minimum: bigger batches are sent since the wire is batched. With
        ``manual_deletion`` (ArmoniK's ResultCreate field) the results' data survives a purge of the session.
        """
        names = list(result_names)
        size = min(max(batch_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        spec = {"manual_deletion": True} if manual_deletion else {}
        requests = [({"session_id": session_id, "results": [{"name": n, **spec} for n in names[i:i + size]]}, ())
                    for i in range(0, len(names), size)]
        return {row["name"]: Result.from_wire(row)
                for header, _ in self._conn._call_many(Op.CREATE_RESULTS_METADATA, requests)
                for row in header["results"]}

    def create_results(self, results_data: Dict[str, bytes], session_id: str,
                       batch_size: int = 1) -> Dict[str, Result]:
        """Create results with their data; return each name's ``Result`` (COMPLETED).

        ``batch_size`` is a minimum: results are grouped into bigger messages (bounded in count
        and bytes) since the wire is batched.
        """
        if not results_data:
            return {}
        chunk_size = self.get_service_config()
        max_count = min(max(batch_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        requests: list = []
        specs: list = []
        counts: list = []
        frames: list = []
        nbytes = 0
        for name, data in results_data.items():
            data = _as_bytes(data, f"the data of result {name!r}")
            if specs and (len(specs) >= max_count or nbytes + len(data) > _MESSAGE_BYTES):
                requests.append(({"session_id": session_id, "results": specs, "frames": counts}, frames))
                specs, counts, frames, nbytes = [], [], [], 0
            parts = chunks(data, chunk_size)
            specs.append({"name": name})
            counts.append(len(parts))
            frames.extend(parts)
            nbytes += len(data)
        requests.append(({"session_id": session_id, "results": specs, "frames": counts}, frames))
        return {row["name"]: Result.from_wire(row)
                for header, _ in self._conn._call_many(Op.CREATE_RESULTS, requests)
                for row in header["results"]}

    def upload_result_data(self, result_id: str, session_id: str, result_data: Union[bytes, bytearray]) -> None:
        """Upload the data of a result created without data.

        Large data goes in parts of a few chunks, a bounded number in flight; the broker stages them and
        completes the result only with the last part.
        """
        chunk_size = self.get_service_config()
        parts = chunks(_as_bytes(result_data, "result_data"), chunk_size)
        per_message = max(1, _STREAM_MESSAGE_BYTES // chunk_size)
        if len(parts) <= per_message:
            self._conn.call(Op.UPLOAD_RESULT_DATA, frames=parts, session_id=session_id, result_ids=[result_id])
            return
        requests = (({"session_id": session_id, "result_ids": [result_id], "frames": [len(group)],
                      "offset": first * chunk_size, "final": first + per_message >= len(parts)}, group)
                    for first in range(0, len(parts), per_message)
                    for group in (parts[first:first + per_message],))
        self._conn._call_many(Op.UPLOAD_RESULT_DATA, requests, window=_STREAM_WINDOW)

    def download_result_view(self, result_id: str, session_id: str) -> memoryview:
        """Return the data of a result as a read-only memoryview; on the broker's host, a mapping of it (no copy).

        A large result produced on this host is a shared-memory segment: it is mapped, its checksum
        verified (``DataCorruptError`` if it does not match), never copied. Anything else is downloaded
        (unless it came with its completion event to a wait: ``download_result_data``).
        """
        data = self._conn.arrived.take(session_id, result_id)
        if data is not None:
            return memoryview(data).toreadonly()
        view = self._mapped(result_id, session_id)
        if view is not None:
            return view
        return memoryview(self._download_frames(result_id, session_id)).toreadonly()

    def download_result_views(self, result_ids: List[str], session_id: str) -> Dict[str, memoryview]:
        """``download_result_view`` for many results: the mapped ones in one data-socket request per 200.

        Returns result id -> read-only memoryview; any damaged one raises ``DataCorruptError``.
        """
        taken = {rid: data for rid in result_ids if (data := self._conn.arrived.take(session_id, rid)) is not None}
        rest = [rid for rid in result_ids if rid not in taken]
        views = self._mapped_many(rest, session_id) if rest else {}
        views.update((rid, memoryview(data).toreadonly()) for rid, data in taken.items())
        for rid in result_ids:
            if rid not in views:
                views[rid] = memoryview(self._download_frames(rid, session_id)).toreadonly()
        return views

    def download_result_data(self, result_id: str, session_id: str) -> bytes:
        """Return the data of a result, asked a few chunks at a time (a large result never travels in one message).

        On the broker's host a shared-memory result is copied once from its mapping instead (checksum
        verified, ``DataCorruptError`` if it does not match); ``download_result_view`` avoids that copy.
        A small result that completed during a ``wait_for_result_availability`` on this connection came
        with its completion event: its first download here takes those bytes, with no round trip.
        """
        data = self._conn.arrived.take(session_id, result_id)
        if data is not None:
            return data
        view = self._mapped(result_id, session_id)
        if view is not None:
            return bytes(view)
        return self._download_frames(result_id, session_id)

    def _mapped(self, result_id: str, session_id: str) -> Optional[memoryview]:
        """A read-only mapping of the result if it is a shared-memory segment of a broker on this host, else None."""
        return self._mapped_many([result_id], session_id).get(result_id)

    def _mapped_many(self, result_ids: List[str], session_id: str) -> Dict[str, memoryview]:
        """Read-only mappings of those results that are shared-memory segments of a broker on this host."""
        from .. import shm
        from ..errors import DataCorruptError

        views: dict = {}
        for attempt in range(2):  # a broken data socket (the broker restarted): once more on its new socket
            channel = shm.channel_of(self._conn)
            if channel is None:
                return {}
            try:
                views = channel.get(session_id, result_ids)
                break
            except (OSError, shm.DataError):
                shm.drop_channel(self._conn)
                if attempt:
                    return {}  # over the sockets, then
        for rid, view in views.items():
            if isinstance(view, shm.DataError):
                raise DataCorruptError(str(view))
        return views

    def _download_frames(self, result_id: str, session_id: str) -> bytes:
        per_message = max(1, _STREAM_MESSAGE_BYTES // self.get_service_config())
        header, frames = self._conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=session_id, result_ids=[result_id],
                                         first_chunk=0, max_chunks=per_message)
        total = header["chunks"][0]
        if total > per_message:
            rest = (({"session_id": session_id, "result_ids": [result_id], "first_chunk": first,
                      "max_chunks": per_message}, ()) for first in range(per_message, total, per_message))
            for _, more in self._conn._call_many(Op.DOWNLOAD_RESULT_DATA, rest, window=_STREAM_WINDOW):
                frames.extend(more)
        if len(frames) == 1:
            return bytes(frames[0])
        return b"".join(frames)

    def delete_result_data(self, result_ids: List[str], session_id: str, batch_size: int = 100) -> None:
        """Delete the data of results, keeping their metadata (they become DELETED).

        ``batch_size`` is a minimum: bigger batches are sent since the wire is batched.
        """
        ids = list(result_ids)
        self._conn.arrived.forget(ids)
        size = min(max(batch_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        self._conn._call_many(Op.DELETE_RESULTS_DATA, [({"session_id": session_id, "result_ids": ids[i:i + size]}, ())
                                                       for i in range(0, len(ids), size)])

    def get_owner_task_id(self, result_ids: List[str], session_id: str, batch_size: int = 500) -> Dict[str, str]:
        """Return the id of the task responsible for producing each result ("" if none).

        ``batch_size`` is a minimum: bigger batches are sent since the wire is batched.
        """
        ids = list(result_ids)
        size = min(max(batch_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        replies = self._conn._call_many(Op.GET_OWNER_TASK_ID, [({"session_id": session_id,
                                                                 "result_ids": ids[i:i + size]}, ())
                                                               for i in range(0, len(ids), size)])
        return {rid: tid for header, _ in replies for rid, tid in header["owners"]}

    def import_data(self, session_id: str, results: Iterable[Tuple[str, Union[bytes, str]]]) -> Dict[str, Result]:
        """Bind objects of the broker's object storage to results created without data; return them by id.

        Each pair is (result id, opaque id): the opaque id names a file relative to the directory the broker
        serves as object storage (``--object-storage``). The data is not copied; the results become COMPLETED.
        """
        pairs = [{"result_id": rid, "opaque_id": oid} for rid, oid in results]
        header, _ = self._conn.call(Op.IMPORT_RESULTS_DATA, session_id=session_id, results=pairs)
        return {row["result_id"]: Result.from_wire(row) for row in header["results"]}

    def get_result(self, result_id: str) -> Result:
        """Return the result ``result_id``."""
        header, _ = self._conn.call(Op.GET_RESULTS, result_ids=[result_id])
        return Result.from_wire(header["results"][0])

    def list_results(self, result_filter: Optional[Filter] = None, page: int = 0, page_size: int = 1000,
                     sort_field: Filter = Result.status,
                     sort_direction: Direction = Direction.ASC) -> Tuple[int, List[Result]]:
        """List results: return (how many match the filter, the results of the page).

        Args:
            result_filter: which results (``Result.session_id == ...``, ``Result.name.contains(...)``); None: all.
            page: the page (0-based).
            page_size: results per page (at most 10,000).
            sort_field: the field to sort on (``Result.created_at``, ``Result.size``, ...).
            sort_direction: ``Direction.ASC`` or ``Direction.DESC``; results without the field come last.
        """
        header, _ = self._conn.call(Op.LIST_RESULTS, filter=to_wire_filter(result_filter, "result", "result_filter"),
                                    sort=to_wire_sort(sort_field, sort_direction, "result"), page=page,
                                    page_size=page_size)
        return header["total"], [Result.from_wire(r) for r in header["results"]]

    def get_results_ids(self, session_id: str, names: List[str]) -> Dict[str, str]:
        """Create results without data; return each name's result id.

        Deprecated in the official client in favour of ``create_results_metadata``; kept for ported code.
        """
        return {name: result.result_id for name, result in self.create_results_metadata(names, session_id).items()}
