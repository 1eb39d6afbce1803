"""Values as buffers written once: pickle protocol 5 with out-of-band buffers (numpy arrays, bytes views).

``dumps`` returns a list of buffers: a small header, the pickle stream, then each out-of-band
buffer as it is in memory (no copy), every one starting at a 64-byte boundary. Written into a
memfd (shm.py) they are copied once; ``loads`` on a mapping of that memfd rebuilds the arrays
as read-only views of the mapping: a 256 MiB array comes back without a single copy.

Layout (little-endian): ``b"\\x02"`` (the function processor's tag for this layout), ``b"AZ5"``,
u32 buffer count n, u64 pickle length, n x u64 buffer lengths, padding to 64, the pickle,
then each buffer, padded to 64.
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import Any, List

import cloudpickle

#: the first byte: the function processor's tag for an out-of-band value (OK is 0, ERROR is 1)
TAG = b"\x02"
_MAGIC = b"AZ5"
_ALIGN = 64
_PAD = bytes(_ALIGN)


def _pad(n: int) -> int:
    return -n % _ALIGN


def dumps(value: Any, min_oob: int = 1 << 16) -> List:
    """Return ``value`` as buffers: ``[header, pickle, pad, buffer, pad, ...]``; big buffers are not copied.

    Buffers smaller than ``min_oob`` stay inside the pickle (cheaper than their bookkeeping).
    """
    raws: list = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: pickled in-band
            return True
        if raw.nbytes < min_oob:
            return True
        raws.append(raw)
        return False

    dump = pickle.dumps if _plain_array(value) else cloudpickle.dumps
    stream = dump(value, protocol=5, buffer_callback=keep)
    head = TAG + _MAGIC + struct.pack(f"<IQ{len(raws)}Q", len(raws), len(stream), *(r.nbytes for r in raws))
    out = [head + bytes(_pad(len(head))), stream]
    if _pad(len(stream)):
        out.append(_PAD[:_pad(len(stream))])
    for raw in raws:
        out.append(raw)
        if _pad(raw.nbytes):
            out.append(_PAD[:_pad(raw.nbytes)])
    return out


def _plain_array(value: Any) -> bool:
    """Whether ``value`` is a numpy array that the standard pickler writes exactly as cloudpickle does (no object
    in it; its dtype and reconstructor go by reference): the standard one does it in half the time."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(value) is numpy.ndarray and not value.dtype.hasobject


def is_oob(data) -> bool:
    view = memoryview(data)
    return view.nbytes >= 4 and bytes(view[:4]) == TAG + _MAGIC


def loads(data) -> Any:
    """Rebuild a value from ``dumps``'s bytes (one buffer, e.g. a read-only mapping): arrays are views of it."""
    view = memoryview(data).cast("B") if memoryview(data).format != "B" else memoryview(data)
    if not is_oob(view):
        raise ValueError("not an out-of-band value (wrong tag)")
    (n,) = struct.unpack_from("<I", view, 4)
    lengths = struct.unpack_from(f"<Q{n}Q", view, 8)
    stream_len, sizes = lengths[0], lengths[1:]
    pos = 8 + 8 * (n + 1)
    pos += _pad(pos)
    stream = view[pos:pos + stream_len]
    pos += stream_len + _pad(stream_len)
    buffers = []
    for size in sizes:
        buffers.append(view[pos:pos + size])
        pos += size + _pad(size)
    if pos > view.nbytes:
        raise ValueError(f"out-of-band value truncated: needs {pos} bytes, has {view.nbytes}")
    return pickle.loads(stream, buffers=buffers)


#: types that hold no buffer and that cloudpickle pickles exactly as the standard pickler does, which costs a
#: tenth of building cloudpickle's pickler (what a tiny task notices)
PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes})


def pack(value: Any, ok_tag: bytes) -> Any:
    """Return ``ok_tag`` + pickle (bytes) for a value without big buffers, else ``dumps``'s list of buffers."""
    if type(value) in PLAIN_TYPES:
        return ok_tag + pickle.dumps(value, protocol=5)
    parts = dumps(value)
    if len(parts) <= 3 and struct.unpack_from("<I", parts[0], 4)[0] == 0:
        return ok_tag + parts[1]
    return parts


def unpack(data) -> Any:
    """The value of ``pack``'s output, given as one buffer (bytes, or a mapping)."""
    view = memoryview(data)
    if is_oob(view):
        return loads(view)
    return pickle.loads(view[1:])
