"""The built-in function processor: tasks whose payload is a pickled Python call (the futures API).

A payload is ``PAYLOAD_MAGIC + pickle((function bytes, argument bytes))``: the function pickled alone with
cloudpickle (so workers cache it by its bytes), the arguments pickled with cloudpickle where every
future became a persistent id, its result id, which is also a data dependency of the task.

A result is one tag byte then a pickle: ``OK`` then the return value, or ``ERROR`` then an
``ErrorRecord`` (the exception and its formatted traceback). A user exception is a result like any
other, so the task succeeds and is not retried; a task depending on a failed one passes the error on.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import traceback
import types
from collections import ChainMap, OrderedDict
from typing import Any, Callable, Mapping, Optional

import cloudpickle

from . import serialization, subtasks
from .common import Output

OK = b"\x00"
ERROR = b"\x01"
#: the first bytes of a payload made by ``dump_call``: no JSON, text or pickle starts with a NUL byte,
#: so a processor can tell a call of the futures API from its own payloads (``armonik_zmq.processors``)
PAYLOAD_MAGIC = b"\x00azc1"
_MAGIC_LEN = len(PAYLOAD_MAGIC)
#: unpickled functions kept per worker
_FUNCTION_CACHE_SIZE = 256

#: unpickled functions by the blake2b digest of their bytes (a closure over a big array is not kept twice)
_functions: "OrderedDict[bytes, Callable]" = OrderedDict()


class ErrorRecord:
    """What a failed call leaves as its result: the exception (pickled, if it can be) and the remote traceback."""

    def __init__(self, exc: BaseException):
        self.type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        self.text = str(exc)
        self.traceback = "".join(traceback.format_exception(exc))
        try:
            self.exception = cloudpickle.dumps(exc)
            pickle.loads(self.exception)  # an exception whose constructor takes other arguments fails here
        except Exception:
            self.exception = None

    def to_exception(self) -> BaseException:
        """Rebuild the exception (a ``RuntimeError`` with the text if it cannot be), the remote traceback attached."""
        exc = None
        if self.exception is not None:
            try:
                exc = pickle.loads(self.exception)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RuntimeError(f"{self.type_name}: {self.text}")
        exc.remote_traceback = self.traceback
        exc.add_note(f"Remote traceback:\n{self.traceback}")
        return exc


def _reduce_code_keeping_its_file(code: types.CodeType):
    """cloudpickle's reduction of a code object, with its file name kept.

    cloudpickle >= 3.1.3 writes "<dynamic-code>" instead (for payloads that do not depend on where a
    function was defined): a remote traceback then has no source lines. With the real name, the worker
    shows them wherever it can read the file (always on one host), as it did before.
    """
    constructor, args = cloudpickle.cloudpickle._code_reduce(code)
    return constructor, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, code objects keeping their file names (for the source lines of remote tracebacks)."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code_keeping_its_file}, cloudpickle.Pickler.dispatch_table)


def dump_function(fn: Callable) -> bytes:
    """Return ``fn`` pickled for the function processor (by value when the workers cannot import it)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(fn)
    return buffer.getvalue()


class _CallPickler(_Pickler):
    """Pickle call arguments, writing each future as its result id and noting it in ``dependencies``."""

    def __init__(self, buffer: io.BytesIO, future_type: type):
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.future_type = future_type
        self.dependencies: dict[str, None] = {}

    def persistent_id(self, obj):
        if isinstance(obj, self.future_type):
            self.dependencies[obj.result_id] = None
            return obj.result_id
        return None


def dump_call(function_bytes: bytes, args: tuple, kwargs: dict, future_type: type) -> tuple[bytes, list[str]]:
    """Return the payload of ``function(*args, **kwargs)`` and the result ids of the futures among the arguments."""
    plain = serialization.PLAIN_TYPES
    if plain.issuperset(map(type, args)) and (not kwargs or plain.issuperset(map(type, kwargs.values()))):
        # no future, nothing pickled by value: the standard pickler writes the same stream, 10x cheaper
        return dump_payload(function_bytes, pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)), []
    buffer = io.BytesIO()
    pickler = _CallPickler(buffer, future_type)
    pickler.dump((args, kwargs))
    return dump_payload(function_bytes, buffer.getvalue()), list(pickler.dependencies)


def dump_payload(function_bytes: bytes, argument_bytes: bytes, aliases: Optional[dict] = None) -> bytes:
    """Return a call's payload; ``aliases`` maps persistent ids in the arguments to the result ids they stand for."""
    parts = (function_bytes, argument_bytes, aliases) if aliases else (function_bytes, argument_bytes)
    return PAYLOAD_MAGIC + pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)


def is_call(payload) -> bool:
    """Whether a payload is a call made by ``dump_call``."""
    if type(payload) is bytes:  # (a worker's inputs: no view to make)
        return payload.startswith(PAYLOAD_MAGIC)
    return bytes(memoryview(payload)[:len(PAYLOAD_MAGIC)]) == PAYLOAD_MAGIC


#: the result of a call that returned None (most tasks run for their effect)
_OK_NONE = OK + pickle.dumps(None, protocol=5)


def dump_result(value: Any):
    """``OK`` + pickle; a value holding big buffers (numpy arrays) is a list of buffers written once (serialization.py)."""
    if value is None:
        return _OK_NONE
    return serialization.pack(value, OK)


def dump_error(exc: BaseException) -> bytes:
    return ERROR + pickle.dumps(ErrorRecord(exc), protocol=pickle.HIGHEST_PROTOCOL)


def load_result(data) -> Any:
    """Return the value of a result, or raise the exception of a failed call."""
    if type(data) is bytes and data[:1] == OK:  # a small value (inline in its event): a plain pickle
        if data == _OK_NONE:
            return None
        return pickle.loads(memoryview(data)[1:])
    view = memoryview(data)
    value = serialization.unpack(view)
    if bytes(view[:1]) == ERROR:
        raise value.to_exception()
    return value


#: functions pickled in fewer bytes are cached under their bytes (hashing them is cheaper than a digest)
_SMALL_FUNCTION = 4096


#: the last function called and its bytes: a worker mostly runs the same function again (no hash, no cache order)
_last: tuple = (b"", None)


def _function(function_bytes: bytes) -> Callable:
    """Return the unpickled function, from the cache when bytes with the same digest were seen before."""
    global _last
    last_bytes, fn = _last
    if function_bytes == last_bytes:
        return fn
    fn = _cached_function(function_bytes)
    _last = (function_bytes, fn)
    return fn


def _cached_function(function_bytes: bytes) -> Callable:
    if len(function_bytes) < _SMALL_FUNCTION:
        key = function_bytes
    else:
        key = hashlib.blake2b(function_bytes, digest_size=16).digest()
    fn = _functions.get(key)
    if fn is None:
        fn = pickle.loads(function_bytes)
        _functions[key] = fn
        if len(_functions) > _FUNCTION_CACHE_SIZE:
            _functions.popitem(last=False)
    else:
        _functions.move_to_end(key)
    return fn


class _CallUnpickler(pickle.Unpickler):
    """Unpickle call arguments, each persistent id (a future's result id, maybe aliased) becoming its value.

    One class for every call: creating a class per task cost more than the rest of a tiny task's unpickling.
    """

    def __init__(self, argument_bytes: bytes, values: Mapping[str, Any], aliases: Mapping[str, str]):
        super().__init__(io.BytesIO(argument_bytes))
        self.values = values
        self.aliases = aliases

    def persistent_load(self, pid):
        return self.values[self.aliases.get(pid, pid)]


#: the arguments of a call without any, as ``dump_call`` writes them
_NO_ARGUMENTS = pickle.dumps(((), {}), protocol=pickle.HIGHEST_PROTOCOL)


def _load_arguments(argument_bytes: bytes, values: Mapping[str, Any], aliases: Mapping[str, str]) -> tuple[tuple, dict]:
    return _CallUnpickler(argument_bytes, values, aliases).load()


def processor(task_handler) -> Output:
    """Run one pickled call and write its return value (or its error record) to the task's output."""
    out = task_handler.expected_results[0]
    deps = task_handler.data_dependencies
    if deps:
        for data in deps.values():
            if bytes(memoryview(data)[:1]) == ERROR:  # an argument failed: so does this call, with the same error
                task_handler.send_results({out: bytes(data)})
                return Output()
    try:
        payload = task_handler.payload
        if not is_call(payload):
            raise ValueError("this payload is not a call of armonik_zmq's futures API (no PAYLOAD_MAGIC prefix); "
                             "serve other tasks with armonik_zmq.processors.with_functions(your_processor)")
        parts = pickle.loads(payload[_MAGIC_LEN:] if type(payload) is bytes else memoryview(payload)[_MAGIC_LEN:])
        fn = _function(parts[0])
        argument_bytes = parts[1]
        if deps or len(parts) > 2:
            args, kwargs = _load_arguments(argument_bytes, {rid: serialization.unpack(data) for rid, data in deps.items()},
                                           parts[2] if len(parts) > 2 else {})
        elif argument_bytes == _NO_ARGUMENTS:  # fn(): nothing to unpickle, nothing to unpack
            args = kwargs = None
        else:  # no future among the arguments, so no persistent id: the plain unpickler (no object per call)
            args, kwargs = pickle.loads(argument_bytes)
        subtasks.begin(task_handler)
        try:
            value = fn() if args is None else fn(*args, **kwargs)
            client = subtasks._current  # made only if the call asked for it
            # A subtask's future returned: the subtask takes over this output (it writes it, not us).
            if client is not None and client._finish(value):
                return Output()
        finally:
            subtasks.end()
        data = dump_result(value)
    except Exception as exc:
        data = dump_error(exc)
    task_handler.send_results({out: data})
    return Output()
