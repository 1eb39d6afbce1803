"""``ArmoniKResults``: the results service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from ..common import Result
from ..protocol import MAX_BATCH, Op, chunks
from .connection import Connection

__all__ = ["ArmoniKResults"]

#: Results per request at least: the wire is batched, so fewer round trips is faster.
_MIN_WIRE_BATCH = 10_000
#: Data per CREATE_RESULTS message, beyond which the next results go in another message.
_MESSAGE_BYTES = 64 << 20


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
                                batch_size: int = 100) -> Dict[str, Result]:
        """Create results without data; return each name's ``Result``.

        ``batch_size`` is a minimum: bigger batches are sent since the wire is batched.
        """
        names = list(result_names)
        size = min(max(batch_size or 0, _MIN_WIRE_BATCH), MAX_BATCH)
        requests = [({"session_id": session_id, "results": [{"name": n} for n in names[i:i + size]]}, ())
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
        """Upload the data of a result created without data."""
        parts = chunks(_as_bytes(result_data, "result_data"), self.get_service_config())
        self._conn.call(Op.UPLOAD_RESULT_DATA, frames=parts, session_id=session_id, result_ids=[result_id])

    def download_result_data(self, result_id: str, session_id: str) -> bytes:
        """Return the data of a result."""
        _, frames = self._conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=session_id, result_ids=[result_id])
        if len(frames) == 1:
            return bytes(frames[0])
        return b"".join(frames)

    def get_result(self, result_id: str) -> Result:
        """Return the result ``result_id``."""
        header, _ = self._conn.call(Op.GET_RESULTS, result_ids=[result_id])
        return Result.from_wire(header["results"][0])
