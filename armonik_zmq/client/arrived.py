"""Small results' data that came with their completion event during a wait, kept for the download that follows.

ArmoniK code waits for its results (``wait_for_result_availability``) and then downloads each one
(``download_result_data``). A wait for a few results (``INLINE_COUNT``) asks the broker for small results'
data in their completion events (``inline_max``), so the download that follows finds it here: no round trip. A result
is immutable once COMPLETED, so the bytes are the ones the broker would send. Each entry serves one download
(a second one asks the broker); the oldest go first past ``MAX_BYTES``; deleting a result's data through the
same connection drops its entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Optional

from ..status import ResultStatus

__all__ = ["ArrivedData", "inline_max_for"]

#: results up to this size (bytes) come with their completion event to a waiting subscription
INLINE_MAX = 16 * 1024
#: data kept at most (bytes), over all results of a connection
MAX_BYTES = 16 << 20
_COMPLETED = int(ResultStatus.COMPLETED)


#: waits for more results than this take no data: bulk code often waits without downloading (and downloads in
#: batches), and every event's data costs the broker and this client a copy (ArmoniK's default bucket size)
INLINE_COUNT = 100


def inline_max_for(count: int) -> int:
    """The ``inline_max`` of a wait for ``count`` results."""
    return INLINE_MAX if count <= INLINE_COUNT else 0


class ArrivedData:
    """The data of completed results that arrived with their events, by result id (thread-safe)."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: "OrderedDict[str, tuple[str, bytes]]" = OrderedDict()
        self._bytes = 0

    def keeper(self, session_id: str):
        """An ``on_events`` hook for a subscription of ``session_id``: keeps the data its events carry."""
        def keep(events: list) -> list:
            for _, body in events:
                data = body.get("data")
                if data is not None and body.get("status") == _COMPLETED:
                    self._put(body["result_id"], session_id, data)
            return events
        return keep

    def _put(self, result_id: str, session_id: str, data: bytes) -> None:
        with self._lock:
            old = self._data.pop(result_id, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._data[result_id] = (session_id, data)
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._data.popitem(last=False)
                self._bytes -= len(dropped)

    def take(self, session_id: str, result_id: str) -> Optional[bytes]:
        """The data of ``result_id`` if it arrived (for this session), forgotten once taken; else None."""
        with self._lock:
            entry = self._data.get(result_id)
            if entry is None or entry[0] != session_id:
                return None
            del self._data[result_id]
            self._bytes -= len(entry[1])
        return entry[1]

    def forget(self, result_ids: Iterable[str]) -> None:
        """Drop the entries of results whose data is being deleted."""
        with self._lock:
            for rid in result_ids:
                entry = self._data.pop(rid, None)
                if entry is not None:
                    self._bytes -= len(entry[1])

    def __len__(self) -> int:
        return len(self._data)
