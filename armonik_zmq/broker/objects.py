"""Result data ("objects"): chunked in LMDB, or referenced in an external object storage directory.

A result's bytes live in the ``data`` table as chunks of at most ``chunk_size`` bytes, keyed
``result_id NUL chunk-index`` (4 bytes, big-endian), and one object row, keyed by the bare result id in
the same table (so just before its chunks), tells how big the object is. Chunks let an upload or a
download move one message's worth at a time, so a large result never sits whole in the broker's memory.

An imported result (ArmoniK's ImportResultsData) keeps no bytes in LMDB: its object row names a
file of the object storage directory (its opaque id), read chunk by chunk when needed. The broker
never deletes such a file: it belongs to whoever put it there.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Union

from ..protocol import ErrorCode, ProtocolError

Buffer = Union[bytes, bytearray, memoryview]


def chunk_key(result_id: str, index: int) -> bytes:
    # The NUL and the fixed-width index make every key of one result the same length, so no other
    # result's key can be mistaken for one of them.
    return result_id.encode() + b"\x00" + index.to_bytes(4, "big")


def n_chunks(size: int, chunk_size: int) -> int:
    """Return how many chunks hold ``size`` bytes (an empty object is one empty chunk)."""
    return max(1, -(-size // chunk_size))


def rechunk(frames: Iterable[Buffer], chunk_size: int) -> Iterator[Buffer]:
    """Cut a sequence of frames into chunks of exactly ``chunk_size`` bytes but the last (none for no bytes).

    Frames are sliced without copying; only a chunk that straddles two frames is assembled.
    """
    pending = bytearray()
    for frame in frames:
        view = memoryview(frame).cast("B")
        pos = 0
        if pending:
            pos = min(chunk_size - len(pending), len(view))
            pending += view[:pos]
            if len(pending) == chunk_size:
                yield bytes(pending)
                pending = bytearray()
        while len(view) - pos >= chunk_size:
            yield view[pos:pos + chunk_size]
            pos += chunk_size
        pending += view[pos:]
    if pending:
        yield bytes(pending)


class ObjectStorage:
    """The directory that imported results point into; ``opaque_id`` is a path relative to it."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"object storage {root!r} is not a directory")
        self.root = os.path.realpath(root)

    def resolve(self, opaque_id: Union[bytes, str], field: str = "opaque_id") -> str:
        """Return the real path an opaque id names; refuse one that leaves the storage (``..``, absolute, symlink)."""
        if isinstance(opaque_id, (bytes, bytearray)):
            try:
                name = bytes(opaque_id).decode()
            except UnicodeDecodeError:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{field}' must be UTF-8") from None
        else:
            name = opaque_id
        if not name or "\x00" in name:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{field}' must name a file of the object storage")
        if os.path.isabs(name):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{field}' must be relative to the object "
                                                            f"storage, got the absolute path {name!r}")
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([self.root, path]) != self.root or path == self.root:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT,
                                f"field '{field}' ({name!r}) leads outside the object storage")
        return path

    def size(self, opaque_id: Union[bytes, str], field: str = "opaque_id") -> int:
        """Return the size of the file an opaque id names; NOT_FOUND if there is no such file."""
        path = self.resolve(opaque_id, field)
        if not os.path.isfile(path):
            raise ProtocolError(ErrorCode.NOT_FOUND,
                                f"field '{field}': no object {object_name(opaque_id)!r} in the object storage")
        return os.path.getsize(path)

    def check(self, opaque_id: str, size: int) -> str:
        """Return the path of an imported object; refuse one gone, moved out or resized since its import."""
        try:
            path = self.resolve(opaque_id)
            if os.path.getsize(path) != size:
                raise OSError(f"it is no longer {size} bytes long")
        except (OSError, ProtocolError) as exc:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"imported object {opaque_id!r} cannot be read any more: {exc}") from None
        return path

    def read(self, opaque_id: str, size: int, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of an imported object recorded as ``size`` bytes long."""
        path = self.check(opaque_id, size)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION,
                                f"imported object {opaque_id!r} cannot be read any more: {exc}") from None
        if len(data) != length:
            raise ProtocolError(ErrorCode.FAILED_PRECONDITION, f"imported object {opaque_id!r} changed while read")
        return data


def object_name(opaque_id: Union[bytes, str]) -> str:
    """Return an opaque id as the text the ``objects`` table keeps (bytes are UTF-8)."""
    return bytes(opaque_id).decode(errors="replace") if isinstance(opaque_id, (bytes, bytearray)) else opaque_id
