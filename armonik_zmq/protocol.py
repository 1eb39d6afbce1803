"""The wire protocol: every operation, every message shape, every error code.

A message is a ZeroMQ multipart message::

    [routing frames (ROUTER side only)] | header | data frame 0 | data frame 1 | ...

``header`` is one msgpack map ``{"v": PROTOCOL_VERSION, "op": Op, "rid": int, ...fields}``.
Bulk bytes (payloads, results) travel as raw frames after the header, never inside msgpack;
a header says how many frames belong to each item (``frames`` lists).

Every request carries a caller-chosen ``rid`` and gets exactly one reply with the same ``op`` and
``rid``: either ``{"ok": True, ...reply fields}`` or ``{"error": {"code": ErrorCode, "message": str}}``.
Pushes (``DISPATCH`` and ``STOP_TASKS`` to an agent, ``RUN`` to a worker, ``EVENT`` to a subscribed client) are not
requests and get no reply; an ``EVENT`` carries the ``rid`` of the subscription it belongs to.

Every operation is batched: it takes lists, and a request is applied all-or-nothing (one bad item
fails the whole request with an error naming the item, and nothing is written).

``docs/protocol.md`` is the prose copy of this module.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Iterable, Sequence

import msgpack

from ._core import (SCHEMA_ANY, SCHEMA_BOOL, SCHEMA_INT, SCHEMA_LIST, SCHEMA_MAP, SCHEMA_NUM, SCHEMA_OPT, SCHEMA_SCALAR,
                    SCHEMA_STR, SCHEMA_STR_OR_BYTES, SCHEMA_STRMAP, schema_valid)

PROTOCOL_VERSION = 1

#: Default for GetServiceConfiguration's ``data_chunk_max_size`` (ArmoniK: PreferredMessageSize).
DATA_CHUNK_MAX_SIZE = 2 * 1024 * 1024
#: Largest header we decode; bulk data lives in frames, so a header has no reason to be big.
MAX_HEADER_SIZE = 16 * 1024 * 1024
#: Largest number of items in one list of a request (tasks per submit, ids per get, ...).
MAX_BATCH = 100_000
#: Largest result data an event may carry inline (SUBSCRIBE_EVENTS' ``inline_max``).
INLINE_EVENT_MAX = 64 * 1024
#: Largest string we accept in a header (ids, names, messages).
MAX_STR = 64 * 1024
#: ArmoniK's SortDirection numbers.
SORT_ASC, SORT_DESC = 1, 2


class Op(IntEnum):
    # -- client -> broker "frontend" -------------------------------------------------------
    GET_SERVICE_CONFIG = 1
    CREATE_SESSION = 10
    GET_SESSIONS = 11
    CANCEL_SESSIONS = 12
    CLOSE_SESSIONS = 13
    PURGE_SESSIONS = 14
    DELETE_SESSIONS = 15
    PAUSE_SESSIONS = 16
    RESUME_SESSIONS = 17
    STOP_SUBMISSION = 18
    CREATE_RESULTS_METADATA = 20
    CREATE_RESULTS = 21
    UPLOAD_RESULT_DATA = 22
    DOWNLOAD_RESULT_DATA = 23
    GET_RESULTS = 24
    IMPORT_RESULTS_DATA = 25
    GET_OWNER_TASK_ID = 26
    DELETE_RESULTS_DATA = 27
    SUBMIT_TASKS = 30
    GET_TASKS = 31
    CANCEL_TASKS = 32
    #: performance (95-99): payload results, output results and tasks in one request (one commit)
    SUBMIT_INLINE = 95
    SUBSCRIBE_EVENTS = 40
    UNSUBSCRIBE_EVENTS = 41
    EVENT = 42  # push, broker -> client
    HEALTH = 50
    LIST_SESSIONS = 60
    LIST_TASKS = 61
    COUNT_TASKS_BY_STATUS = 62
    GET_RESULT_IDS = 63
    LIST_RESULTS = 64
    LIST_PARTITIONS = 65
    GET_PARTITIONS = 66
    LIST_VERSIONS = 67
    AUTH_INFO = 70  # who the broker thinks the caller is, and its authentication counters
    # -- agent <-> broker "backend" --------------------------------------------------------
    AGENT_REGISTER = 100
    AGENT_HEARTBEAT = 101
    DISPATCH = 102  # push, broker -> agent
    FETCH_DATA = 103
    TASKS_STARTED = 104
    TASKS_DONE = 105
    TASKS_RELEASE = 106
    STOP_TASKS = 107  # push, broker -> agent: drop or kill these attempts (cancel, pause)
    TASKS_STOPPED = 108
    # -- worker <-> agent (ipc) --------------------------------------------------------------
    WORKER_READY = 200
    RUN = 201  # push, agent -> worker
    W_CREATE_RESULTS_METADATA = 202
    W_CREATE_RESULTS = 203
    W_SEND_RESULTS = 204
    W_SUBMIT_TASKS = 205
    W_OUTPUT = 206
    # several tasks per message: a worker's queue filled in one push, the outputs of the tasks it ran in one
    RUNS = 220  # push, agent -> worker
    W_OUTPUTS = 221  # push, worker -> agent (a reply only when an output is refused)


class ErrorCode(IntEnum):
    """Error codes of error replies (numbers follow gRPC's status codes where one fits)."""

    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3  # a field is missing, has the wrong type or an invalid value
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5  # unknown session / task / result id
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9  # the object is not in a status that allows the operation
    ABORTED = 10  # e.g. a dependency was aborted
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12  # unknown op
    INTERNAL = 13
    UNAVAILABLE = 14
    MALFORMED = 100  # not a msgpack map, or frames do not match the header
    UNSUPPORTED_VERSION = 101
    STALE_ATTEMPT = 102  # completion from an attempt that no longer owns the task
    UNKNOWN_AGENT = 103  # agent must (re-)register
    UNAUTHENTICATED = 110  # client side only: the broker refused the connection's CURVE handshake
    STORAGE_FULL = 125  # the LMDB map is full at --max-map-size: nothing can be written
    IDEMPOTENCY_MISMATCH = 115  # an idempotency_key reused with a different request body
    SEGMENT_LOST = 130  # a shared-memory segment named by a report is gone (broker restarted before storing it)
    DATA_CORRUPT = 131  # shared-memory data does not match its recorded checksum


class ProtocolError(Exception):
    """A request the receiver refuses; becomes an error reply ``{code, message}``."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}"


# ------------------------------------------------------------------------------------------
# Encoding and bounded decoding
# ------------------------------------------------------------------------------------------

_packer = msgpack.Packer(use_bin_type=True)


def pack(obj: Any) -> bytes:
    return _packer.pack(obj)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


_unpackb = msgpack.unpackb


def unpack(buf: bytes) -> Any:
    """Decode one msgpack object with every limit on (no ext types, string map keys only)."""
    n = len(buf)
    if n > MAX_HEADER_SIZE:
        raise ProtocolError(ErrorCode.MALFORMED, f"header of {n} bytes exceeds {MAX_HEADER_SIZE}")
    # Every item takes at least one byte: a short frame cannot make the decoder allocate a big container.
    try:
        if n <= MAX_STR:
            # msgpack's defaults are then our limits (each from the frame's size; raw=False, strict_map_key,
            # timestamp=0): one keyword to parse instead of ten, on every message of every process
            return _unpackb(buf, ext_hook=_no_ext)
        return _unpackb(buf, raw=False, strict_map_key=True, ext_hook=_no_ext, max_str_len=MAX_STR, max_bin_len=n,
                        max_array_len=min(MAX_BATCH * 4, n), max_map_len=min(MAX_BATCH, n // 2), max_ext_len=64,
                        timestamp=0)
    except (ValueError, TypeError, RecursionError) as exc:  # every msgpack decode error is a ValueError
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not valid msgpack: {exc}") from None


def request(op: Op, rid: int, **fields: Any) -> bytes:
    """Encode a request (or push) header."""
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = int(op)
    fields["rid"] = rid
    return pack(fields)


def reply_ok(op: int, rid: int, **fields: Any) -> bytes:
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = op
    fields["rid"] = rid
    fields["ok"] = True
    return pack(fields)


#: Longest error message sent (longer ones are cut): a message quoting a huge bad value must still
#: decode on the other side (MAX_STR) and not cost more than the request did.
MAX_ERROR_MESSAGE = 2048


def reply_error(op: int, rid: int, code: ErrorCode, message: str) -> bytes:
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE - 20] + "... (message cut)"
    return pack({"v": PROTOCOL_VERSION, "op": op, "rid": rid, "error": {"code": int(code), "message": message}})


def with_field(header: bytes, key: str, packed_items: list[bytes]) -> bytes | None:
    """``header`` (a packed map) with one more entry, ``key``: the array of the already packed ``packed_items``.

    No decoding: the map's entry count goes up by one and the entry is appended (msgpack maps are their
    count, then their entries). None when ``header`` is not a map with room for one more entry.
    """
    if type(header) is not bytes or not header:
        return None
    first = header[0]
    if 0x80 <= first < 0x8F:  # fixmap of up to 14 entries
        head, body = bytes((first + 1,)), header[1:]
    elif first == 0xDE and len(header) >= 3 and header[1:3] != b"\xff\xff":  # map 16
        head, body = b"\xde" + (int.from_bytes(header[1:3], "big") + 1).to_bytes(2, "big"), header[3:]
    else:
        return None
    return b"".join((head, body, _packer.pack(key), _packer.pack_array_header(len(packed_items)), *packed_items))


def decode_header(frame: bytes) -> dict:
    """Decode and check the envelope ``{v, op, rid}``; the op's own fields are checked by ``validate``."""
    header = unpack(frame)
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header must be a msgpack map")
    v = header.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {v!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    rid = header.get("rid")
    if type(rid) is not int or not (0 <= rid < 2**64):
        raise ProtocolError(ErrorCode.MALFORMED, "header field 'rid' must be an unsigned integer")
    op = header.get("op")
    if type(op) is not int:
        raise ProtocolError(ErrorCode.MALFORMED, "header field 'op' must be an integer")
    return header


def envelope_of(frame: bytes) -> tuple[int, int]:
    """Best effort (op, rid) of a frame that failed to decode, so the error reply can still carry them."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False, ext_hook=_no_ext, max_str_len=1024,
                                 max_bin_len=1024, max_array_len=64, max_map_len=64)
    except Exception:
        return 0, 0
    if not isinstance(header, dict):
        return 0, 0
    op, rid = header.get("op"), header.get("rid")
    return (op if type(op) is int else 0, rid if type(rid) is int and 0 <= rid < 2**64 else 0)


def check_reply(header: dict) -> dict:
    """Return the reply fields, or raise the ProtocolError it carries."""
    err = header.get("error")
    if err is not None:
        raise ProtocolError(ErrorCode(err.get("code", ErrorCode.UNKNOWN)), err.get("message", "unknown error"))
    return header


def split_frames(frames: Sequence[Any], counts: Iterable[int]) -> list[list[Any]]:
    """Cut ``frames`` into consecutive groups of ``counts`` frames (one group per item)."""
    out, pos = [], 0
    for n in counts:
        out.append(list(frames[pos:pos + n]))
        pos += n
    if pos != len(frames):
        raise ProtocolError(ErrorCode.MALFORMED, f"header announces {pos} data frames but {len(frames)} came")
    return out


def chunks(data: bytes | memoryview, size: int = DATA_CHUNK_MAX_SIZE) -> list:
    """Cut data into frames of at most ``size`` bytes (at least one frame, possibly empty)."""
    if type(data) is bytes and len(data) <= size:  # (most results: no memoryview to make)
        return [data]
    mv = memoryview(data)
    n = len(mv)
    if n <= size:
        return [data]
    return [mv[i:i + size] for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------
# Schemas: each op's request fields, checked explicitly (never with assert)
# ------------------------------------------------------------------------------------------


class _Type:
    def check(self, value: Any, path: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compiled(self) -> tuple:  # pragma: no cover - interface
        """This type as ``_core.schema_valid`` reads it (the node layouts are listed there)."""
        raise NotImplementedError


def _fail(path: str, what: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{path}' must be {what}, got {type(value).__name__}")


class Str(_Type):
    def __init__(self, nonempty: bool = False):
        self.nonempty = nonempty

    def compiled(self):
        return (SCHEMA_STR, self.nonempty)

    def check(self, value, path):
        if type(value) is not str:
            raise _fail(path, "a string", value)
        if self.nonempty and not value:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{path}' must not be empty")


class StrOrBytes(_Type):
    """A string or raw bytes (an object-storage key: ArmoniK's opaque ids are bytes)."""

    def __init__(self, nonempty: bool = False):
        self.nonempty = nonempty

    def compiled(self):
        return (SCHEMA_STR_OR_BYTES, self.nonempty)

    def check(self, value, path):
        if type(value) not in (str, bytes):
            raise _fail(path, "a string or bytes", value)
        if self.nonempty and not value:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{path}' must not be empty")


class Int(_Type):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def compiled(self):
        return (SCHEMA_INT, self.lo, self.hi)

    def check(self, value, path):
        if type(value) is not int:
            raise _fail(path, "an integer", value)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{path}' must be within [{self.lo}, {self.hi}], got {value}")


class Num(_Type):
    def compiled(self):
        return (SCHEMA_NUM,)

    def check(self, value, path):
        if type(value) not in (int, float):
            raise _fail(path, "a number", value)


class Bool(_Type):
    def compiled(self):
        return (SCHEMA_BOOL,)

    def check(self, value, path):
        if type(value) is not bool:
            raise _fail(path, "a boolean", value)


class Any_(_Type):
    def compiled(self):
        return (SCHEMA_ANY,)

    def check(self, value, path):
        pass


_SCALARS = (str, int, float, bool, bytes, type(None))


class Scalar(_Type):
    """Any one plain value (string, number, boolean, bytes, nil), never a container or an ext object.

    Where a field takes values of several types, this keeps the schema's depth bounded: nothing
    nested (a list 1,000 deep, a msgpack Timestamp) gets past validation to a handler or a repr.
    """

    def compiled(self):
        return (SCHEMA_SCALAR,)

    def check(self, value, path):
        if type(value) not in _SCALARS:
            raise _fail(path, "a string, number, boolean, bytes or nil", value)


class List(_Type):
    def __init__(self, item: _Type, max_len: int = MAX_BATCH, nonempty: bool = False):
        self.item, self.max_len, self.nonempty = item, max_len, nonempty

    def compiled(self):
        return (SCHEMA_LIST, self.item.compiled(), self.max_len, self.nonempty)

    def check(self, value, path):
        if type(value) is not list:
            raise _fail(path, "a list", value)
        if len(value) > self.max_len:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{path}' has {len(value)} items, at most {self.max_len} allowed")
        if self.nonempty and not value:
            raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"field '{path}' must not be empty")
        item = self.item
        try:
            for v in value:
                item.check(v, path)  # no path per item (batches hold 10,000s): built only to name a fault
        except ProtocolError:
            for i, v in enumerate(value):
                item.check(v, f"{path}[{i}]")
            raise


class StrMap(_Type):
    """A map of string to string (TaskOptions.options)."""

    def compiled(self):
        return (SCHEMA_STRMAP,)

    def check(self, value, path):
        if type(value) is not dict:
            raise _fail(path, "a map", value)
        for k, v in value.items():
            if type(v) is not str:
                raise _fail(f"{path}.{k}", "a string", v)


class Opt(_Type):
    """The field may be nil."""

    def __init__(self, inner: _Type):
        self.inner = inner

    def compiled(self):
        return (SCHEMA_OPT, self.inner.compiled())

    def check(self, value, path):
        if value is not None:
            self.inner.check(value, path)


class Map(_Type):
    """A map with known fields; ``required`` ones must be there, unknown ones are refused."""

    def __init__(self, required: dict[str, _Type] | None = None, optional: dict[str, _Type] | None = None):
        self.required = required or {}
        self.optional = optional or {}

    def compiled(self, top: bool = False):
        """``top``: a request's own map, where the envelope's fields (v, op, rid) may be too."""
        required = {name: typ.compiled() for name, typ in self.required.items()}
        return (SCHEMA_MAP, tuple(required.items()), {name: typ.compiled() for name, typ in self.optional.items()},
                top, required)

    def check(self, value, path):
        if type(value) is not dict:
            raise _fail(path or "header", "a map", value)
        prefix = f"{path}." if path else ""
        for name, typ in self.required.items():
            if name not in value:
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"missing field '{prefix}{name}'")
            typ.check(value[name], prefix + name)
        for name, v in value.items():
            if name in self.required:
                continue
            typ = self.optional.get(name)
            if typ is None:
                if not path and name in ("v", "op", "rid"):
                    continue
                raise ProtocolError(ErrorCode.INVALID_ARGUMENT, f"unknown field '{prefix}{name}'")
            typ.check(v, prefix + name)


ID = Str(nonempty=True)
IDS = List(ID)
#: TaskOptions on the wire; every field optional because options merge (task > request > session).
#: ``max_duration`` is in seconds.
TASK_OPTIONS = Map(optional={
    "max_duration": Opt(Num()),
    "priority": Opt(Int()),
    "max_retries": Opt(Int()),
    "partition_id": Opt(Str()),
    "application_name": Opt(Str()),
    "application_version": Opt(Str()),
    "application_namespace": Opt(Str()),
    "application_service": Opt(Str()),
    "engine_type": Opt(Str()),
    "options": Opt(StrMap()),
})
RESULT_CREATE = Map(required={"name": Str()}, optional={"manual_deletion": Bool()})
#: One task to create, as the client or a worker describes it.
TASK_CREATE = Map(
    required={"payload_id": ID, "expected_output_ids": List(ID, nonempty=True)},
    optional={"data_dependencies": IDS, "options": Opt(TASK_OPTIONS)},
)
#: A filter in disjunctive normal form: OR of ANDs of [field, operator, value]. Many OR clauses are
#: normal (waiting on many results names each one); an AND clause has few terms.
FILTER = Opt(List(List(List(Scalar(), max_len=3), max_len=64), max_len=MAX_BATCH))
FRAME_COUNTS = List(Int(0, 1 << 20))
#: Most rows in one page of a List* reply (bigger pages would not fit in one header).
MAX_PAGE_SIZE = 10_000
#: Sort of a List* request: a filter field (FILTER_FIELDS) and ArmoniK's SortDirection number.
SORT = Map(required={"field": Str(nonempty=True)}, optional={"direction": Int(SORT_ASC, SORT_DESC)})
PAGING = {"filter": FILTER, "sort": Opt(SORT), "page": Int(0, 1 << 31), "page_size": Int(1, MAX_PAGE_SIZE)}

#: The operators of each kind of field: ArmoniK's typed filter conditions (date BEFORE is ``lt``,
#: duration SHORTER is ``lt``, ...). Dates are float seconds since the epoch, durations float
#: seconds, statuses their numbers.
_ORDERED = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
FILTER_OPERATORS: dict[str, frozenset[str]] = {
    "string": frozenset({"eq", "ne", "contains", "notcontains", "startswith", "endswith"}),
    "number": _ORDERED,
    "date": _ORDERED,
    "duration": _ORDERED,
    "array": frozenset({"contains", "notcontains"}),
    "status": frozenset({"eq", "ne"}),
    "boolean": frozenset({"is"}),
}
#: TaskOptions fields of tasks and sessions; ``options[<key>]`` (a string) is a key of TaskOptions.options.
_OPTION_FIELDS = {
    "options.max_duration": "duration", "options.max_retries": "number", "options.priority": "number",
    "options.partition_id": "string", "options.application_name": "string", "options.application_namespace": "string",
    "options.application_version": "string", "options.application_service": "string",
    "options.engine_type": "string",
}
_DATES = ("created_at", "submitted_at", "received_at", "acquired_at", "fetched_at", "started_at", "processed_at",
          "ended_at", "pod_ttl")
#: The fields a filter or a sort may name, per entity, with their kind (the row field names of the wire).
FILTER_FIELDS: dict[str, dict[str, str]] = {
    "task": {
        **dict.fromkeys(("task_id", "session_id", "owner_pod_id", "initial_task_id", "created_by", "pod_hostname",
                         "payload_id", "error"), "string"),
        "status": "status",
        **dict.fromkeys(_DATES, "date"),
        **dict.fromkeys(("creation_to_end_duration", "processing_to_end_duration", "received_to_end_duration"),
                        "duration"),
        **_OPTION_FIELDS,
    },
    "session": {
        "session_id": "string", "status": "status", "client_submission": "boolean", "worker_submission": "boolean",
        "partition_ids": "array", "duration": "duration",
        **dict.fromkeys(("created_at", "cancelled_at", "closed_at", "purged_at", "deleted_at"), "date"),
        **_OPTION_FIELDS,
    },
    "result": {
        **dict.fromkeys(("result_id", "session_id", "name", "created_by", "owner_task_id"), "string"),
        "status": "status", "created_at": "date", "completed_at": "date", "size": "number",
    },
    "partition": {
        "id": "string", "parent_partition_ids": "array",
        **dict.fromkeys(("pod_reserved", "pod_max", "preemption_percentage", "priority"), "number"),
    },
}


def field_kind(entity: str, field: str) -> str | None:
    """Return the kind of ``field`` for ``entity`` ("task", "session", ...), or None if it cannot be filtered on."""
    fields = FILTER_FIELDS[entity]
    kind = fields.get(field)
    if kind is None and "options.priority" in fields and field.startswith("options[") and field.endswith("]") \
            and len(field) > len("options[]"):
        return "string"
    return kind

#: A client's name for one request that changes something (``<client id>:<sequence>``): a retry with the
#: same key gets the first reply and changes nothing more (see broker/idempotency.py).
IDEMPOTENCY_KEY = Str(nonempty=True)
MAX_IDEMPOTENCY_KEY = 256
#: A shared-memory segment handed to the broker's data socket (shm.py): token, size, "<algorithm>:<hex>" checksum.
SEGMENT = Map(required={"token": Str(nonempty=True), "size": Int(0, 1 << 62), "checksum": Str(nonempty=True)})

#: Request fields of every op a peer may send. Reply fields are documented in docs/protocol.md.
SCHEMAS: dict[Op, Map] = {
    Op.GET_SERVICE_CONFIG: Map(),
    Op.CREATE_SESSION: Map(optional={"default_task_options": Opt(TASK_OPTIONS), "partition_ids": Opt(List(Str()))}),
    Op.GET_SESSIONS: Map(required={"session_ids": IDS}),
    Op.CANCEL_SESSIONS: Map(required={"session_ids": IDS}),
    Op.CLOSE_SESSIONS: Map(required={"session_ids": IDS}),
    Op.PURGE_SESSIONS: Map(required={"session_ids": IDS}),
    Op.DELETE_SESSIONS: Map(required={"session_ids": IDS}),
    Op.PAUSE_SESSIONS: Map(required={"session_ids": IDS}),
    Op.RESUME_SESSIONS: Map(required={"session_ids": IDS}),
    # client/worker: true switches that kind of submission off (ArmoniK's StopSubmission)
    Op.STOP_SUBMISSION: Map(required={"session_ids": IDS, "client": Bool(), "worker": Bool()}),
    Op.CREATE_RESULTS_METADATA: Map(required={"session_id": ID, "results": List(RESULT_CREATE)}),
    Op.CREATE_RESULTS: Map(required={"session_id": ID, "results": List(RESULT_CREATE), "frames": FRAME_COUNTS}),
    # offset/final: one part of a chunked upload of one result (bytes already sent; false while more follow).
    Op.UPLOAD_RESULT_DATA: Map(required={"session_id": ID, "result_ids": IDS, "frames": FRAME_COUNTS},
                               optional={"offset": Int(0, 1 << 62), "final": Bool()}),
    # first_chunk/max_chunks: a range of one result's chunks, so no reply has to hold a whole large result.
    Op.DOWNLOAD_RESULT_DATA: Map(required={"session_id": ID, "result_ids": IDS},
                                 optional={"first_chunk": Int(0, 1 << 32), "max_chunks": Int(1, 1 << 20)}),
    Op.GET_RESULTS: Map(required={"result_ids": IDS}),
    # opaque_id: a file of the broker's object storage, relative to it (bytes or string, like ArmoniK's).
    Op.IMPORT_RESULTS_DATA: Map(required={"session_id": ID, "results": List(Map(
        required={"result_id": ID, "opaque_id": StrOrBytes(nonempty=True)}))}),
    Op.GET_OWNER_TASK_ID: Map(required={"session_id": ID, "result_ids": IDS}),
    Op.DELETE_RESULTS_DATA: Map(required={"session_id": ID, "result_ids": IDS}),
    Op.SUBMIT_INLINE: Map(required={"session_id": ID, "tasks": List(Map(optional={
        "name": Str(), "data_dependencies": IDS, "options": Opt(TASK_OPTIONS)})), "frames": FRAME_COUNTS},
        optional={"task_options": Opt(TASK_OPTIONS)}),
    Op.SUBMIT_TASKS: Map(required={"session_id": ID, "tasks": List(TASK_CREATE)},
                         optional={"task_options": Opt(TASK_OPTIONS)}),
    Op.GET_TASKS: Map(required={"task_ids": IDS}),
    Op.CANCEL_TASKS: Map(required={"task_ids": IDS}, optional={"force": Bool()}),
    Op.SUBSCRIBE_EVENTS: Map(required={"session_id": ID}, optional={
        "event_types": Opt(List(Int(0, 5), max_len=8)),
        "task_filter": FILTER,
        "result_filter": FILTER,
        # only these results' events (and those the result filter lets through): a wait on many results
        "result_ids": IDS,
        # the same ids in the one data frame, each ended by a NUL byte (a big wait: decoded a slice at a time)
        "result_ids_frame": Bool(),
        "snapshot": Bool(),
        # results completed with at most this many bytes carry them in their RESULT_STATUS_UPDATE ("data")
        "inline_max": Int(0, INLINE_EVENT_MAX),
        # its EVENT pushes may travel inside a reply to this client sent after the same commit ("pushes")
        "with_replies": Bool(),
    }),
    Op.UNSUBSCRIBE_EVENTS: Map(required={"subscription": Int(0)}),
    # metrics: also return the broker's counters (broker/metrics.py), e.g. for tests and tools
    Op.HEALTH: Map(optional={"metrics": Bool()}),
    Op.LIST_SESSIONS: Map(optional=PAGING),
    Op.LIST_TASKS: Map(optional={**PAGING, "with_errors": Bool(), "detailed": Bool()}),
    Op.COUNT_TASKS_BY_STATUS: Map(optional={"filter": FILTER}),
    Op.GET_RESULT_IDS: Map(required={"task_ids": IDS}),
    Op.LIST_RESULTS: Map(optional=PAGING),
    Op.LIST_PARTITIONS: Map(optional=PAGING),
    Op.GET_PARTITIONS: Map(required={"partition_ids": IDS}),
    Op.LIST_VERSIONS: Map(),
    Op.AUTH_INFO: Map(),
    # holds: the attempts the agent still has (re-registration): [task_id, attempt, started]; the broker
    # keeps those it still gives to this agent and pushes STOP_TASKS for the others.
    Op.AGENT_REGISTER: Map(required={"agent_id": ID, "capacity": Int(1, 1 << 20)}, optional={
        "partitions": List(Str()), "hostname": Str(), "pid": Int(), "holds": List(List(Any_(), max_len=3)),
        # acks_inline: a TASKS_DONE reply held for the agent's next push may travel inside it (``with_field``)
        "acks_inline": Bool(),
    }),
    # capacity: the agent's new capacity (it asks for more while its tasks are tiny, back to its own after)
    Op.AGENT_HEARTBEAT: Map(required={"agent_id": ID}, optional={"capacity": Int(1, 1 << 20)}),
    Op.FETCH_DATA: Map(required={"agent_id": ID, "session_id": ID, "result_ids": IDS}),
    Op.TASKS_STARTED: Map(required={"agent_id": ID, "tasks": List(List(Scalar(), max_len=3))}),
    Op.TASKS_DONE: Map(required={"agent_id": ID, "tasks": List(Map(
        required={"task_id": ID, "attempt": Int(0), "ok": Bool()},
        optional={
            "error": Opt(Str()),
            # raised: the processor raised, or its worker or agent died (retried); timeout: killed past
            # max_duration (TIMEOUT, not retried); neither: the worker returned Output(error) (ERROR)
            "raised": Bool(),
            "timeout": Bool(),
            "created_results": List(Map(required={"result_id": ID, "name": Str()})),
            "results": List(Map(required={"result_id": ID, "frames": Int(0, 1 << 20)}, optional={"segment": SEGMENT})),
            "subtasks": List(Map(required={"task_id": ID, "payload_id": ID, "expected_output_ids": List(ID, nonempty=True)},
                                 optional={"data_dependencies": IDS, "options": Opt(TASK_OPTIONS)})),
            "subtask_options": Opt(TASK_OPTIONS),
            "timestamps": Map(optional={"fetched_at": Num(), "started_at": Num(), "processed_at": Num()}),
        },
    ))}),
    Op.TASKS_RELEASE: Map(required={"agent_id": ID, "tasks": List(List(Scalar(), max_len=3))}),
    Op.TASKS_STOPPED: Map(required={"agent_id": ID, "tasks": List(List(Scalar(), max_len=2))}),
    Op.WORKER_READY: Map(required={"pid": Int()}),
    Op.W_CREATE_RESULTS_METADATA: Map(required={"token": Str(), "names": List(Str())}),
    Op.W_CREATE_RESULTS: Map(required={"token": Str(), "names": List(Str()), "frames": FRAME_COUNTS}),
    Op.W_SEND_RESULTS: Map(required={"token": Str(), "result_ids": IDS, "frames": FRAME_COUNTS}),
    Op.W_SUBMIT_TASKS: Map(required={"token": Str(), "tasks": List(TASK_CREATE)},
                           optional={"task_options": Opt(TASK_OPTIONS)}),
    # raised: the processor raised (or the worker died) instead of returning Output(error).
    # result_ids/frames: result data kept back by send_results until the output (small data, one message).
    Op.W_OUTPUT: Map(required={"token": Str(), "ok": Bool()}, optional={
        "error": Opt(Str()), "raised": Bool(), "result_ids": IDS, "frames": FRAME_COUNTS,
        # results handed to the broker's data socket as sealed memfds (shm.py): no data frames
        "segments": List(Map(required={"result_id": ID, "segment": SEGMENT}))}),
    # The outputs of consecutive tasks of one worker, in the order it ran them; each as W_OUTPUT's fields,
    # plus the worker's clock at the task's start and end (its timestamps count from there). returned:
    # tokens of runs queued at the worker behind a long task, which it gives back without running them.
    Op.W_OUTPUTS: Map(required={"outputs": List(Map(required={"token": Str(), "ok": Bool()}, optional={
        "error": Opt(Str()), "raised": Bool(), "result_ids": IDS, "frames": FRAME_COUNTS,
        "segments": List(Map(required={"result_id": ID, "segment": SEGMENT})),
        "started_at": Num(), "ended_at": Num()}))}, optional={"returned": List(Str())}),
}


#: op number -> Op (decode_header has checked it is an int)
_OP_BY_NUMBER = {int(op): op for op in Op}


def validate(header: dict, allowed: frozenset[Op] | set[Op]) -> Op:
    """Check the op is one this endpoint serves and its fields match the schema; return the Op."""
    raw = header["op"]
    op = _OP_BY_NUMBER.get(raw)  # not Op(raw): an enum call, 1-3 us per message
    if op is None:
        raise ProtocolError(ErrorCode.UNIMPLEMENTED, f"unknown op {raw}")
    if op not in allowed:
        raise ProtocolError(ErrorCode.UNIMPLEMENTED, f"op {op.name} is not served on this endpoint")
    if not schema_valid(_COMPILED[op], header):
        SCHEMAS[op].check(header, "")  # names the field at fault (and is the judge, should the two differ)
    return op


#: The client requests that change something. Each may carry an ``idempotency_key``: sent again (a reply lost
#: with a connection or a broker restart), it is applied once and answered with its first reply. Without
#: keys, a retried upload would be refused (the result already has its data) and a retried cancel or
#: session change answered with an error for a change that did happen.
KEYED_OPS = frozenset({
    Op.CREATE_SESSION, Op.CREATE_RESULTS_METADATA, Op.CREATE_RESULTS, Op.SUBMIT_TASKS, Op.SUBMIT_INLINE,
    Op.CANCEL_SESSIONS, Op.CLOSE_SESSIONS, Op.PURGE_SESSIONS, Op.DELETE_SESSIONS, Op.PAUSE_SESSIONS,
    Op.RESUME_SESSIONS, Op.STOP_SUBMISSION, Op.UPLOAD_RESULT_DATA, Op.IMPORT_RESULTS_DATA, Op.DELETE_RESULTS_DATA,
    Op.CANCEL_TASKS,
})
for _op in KEYED_OPS:
    SCHEMAS[_op].optional["idempotency_key"] = IDEMPOTENCY_KEY
#: each op's schema as ``_core.schema_valid`` reads it (validate's fast path): compiled once SCHEMAS is complete
_COMPILED = {op: schema.compiled(top=True) for op, schema in SCHEMAS.items()}

FRONTEND_OPS = frozenset({
    Op.GET_SERVICE_CONFIG, Op.CREATE_SESSION, Op.GET_SESSIONS, Op.CANCEL_SESSIONS, Op.CLOSE_SESSIONS,
    Op.PURGE_SESSIONS, Op.DELETE_SESSIONS, Op.CREATE_RESULTS_METADATA, Op.CREATE_RESULTS,
    Op.UPLOAD_RESULT_DATA, Op.DOWNLOAD_RESULT_DATA, Op.GET_RESULTS, Op.SUBMIT_TASKS, Op.GET_TASKS,
    Op.SUBSCRIBE_EVENTS, Op.UNSUBSCRIBE_EVENTS, Op.HEALTH,
    Op.LIST_SESSIONS, Op.LIST_TASKS, Op.COUNT_TASKS_BY_STATUS, Op.GET_RESULT_IDS, Op.LIST_RESULTS,
    Op.LIST_PARTITIONS, Op.GET_PARTITIONS, Op.LIST_VERSIONS,
    Op.PAUSE_SESSIONS, Op.RESUME_SESSIONS, Op.STOP_SUBMISSION, Op.IMPORT_RESULTS_DATA, Op.GET_OWNER_TASK_ID,
    Op.DELETE_RESULTS_DATA, Op.CANCEL_TASKS, Op.SUBMIT_INLINE,
    Op.AUTH_INFO,
})
BACKEND_OPS = frozenset({
    Op.AGENT_REGISTER, Op.AGENT_HEARTBEAT, Op.FETCH_DATA, Op.TASKS_STARTED, Op.TASKS_DONE,
    Op.TASKS_RELEASE, Op.TASKS_STOPPED, Op.HEALTH,
})
WORKER_OPS = frozenset({
    Op.WORKER_READY, Op.W_CREATE_RESULTS_METADATA, Op.W_CREATE_RESULTS, Op.W_SEND_RESULTS,
    Op.W_SUBMIT_TASKS, Op.W_OUTPUT, Op.W_OUTPUTS,
})
