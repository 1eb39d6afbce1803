"""The broker's side of shared-memory results (see armonik_zmq/shm.py and docs/data-path.md).

A completion may name, instead of data frames, a segment the worker handed to the data socket.
``check`` runs while the completion is validated: it waits until the segment is copied into its
file (so the acknowledged result survives a broker SIGKILL) and refuses one that is lost;
``store`` then makes the file the result's data in the completion's transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..protocol import ErrorCode, ProtocolError
from ..shm import DataError, SegmentStore

if TYPE_CHECKING:
    from .store import Txn


class SegmentRef:
    """A result's data that is a shared-memory segment, in place of its frames."""

    __slots__ = ("token", "size", "checksum")

    def __init__(self, spec: dict):
        self.token = spec["token"]
        self.size = spec["size"]
        self.checksum = spec["checksum"]


def check(segments: Optional[SegmentStore], spec: dict, result_id: str) -> SegmentRef:
    """Return the segment of a result's report once its data is safely stored; raise SEGMENT_LOST if it is not."""
    if segments is None:
        raise ProtocolError(ErrorCode.SEGMENT_LOST, f"result {result_id}: this broker serves no shared memory "
                                                    f"(it restarted with it off?): the task runs again")
    ref = SegmentRef(spec)
    try:
        segments.adopt(ref.token, ref.size, ref.checksum, f"result {result_id}")
    except DataError as exc:
        raise ProtocolError(ErrorCode.SEGMENT_LOST, f"{exc}: the task runs again") from None
    return ref


def store(txn: "Txn", result_id: str, ref: SegmentRef) -> int:
    """Record the segment's file as the result's data; return its size."""
    return txn.put_segment(result_id, ref.token, ref.size, ref.checksum)


def advertise(segments: Optional[SegmentStore], threshold: int) -> dict:
    """Reply fields that tell a peer on this host where to hand over and get large data."""
    if segments is None:
        return {}
    return {**segments.advertise(), "shm_threshold": threshold}
