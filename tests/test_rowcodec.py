"""The stored rows' codec in the Cython core (``_core.pack_fields``, ``_core.unpack_fields``) against msgpack.

The broker writes its task and result rows with ``pack_fields`` and reads them with ``unpack_fields``; rows on
disk were written by msgpack before, and other readers (inspector, listing) may still decode with msgpack. So
``pack_fields`` must write exactly msgpack's bytes, and ``unpack_fields`` must read what msgpack wrote, or say
it cannot (None) so that msgpack decides. Then the broker's rows (``store.encode_task``/``decode_row``) go
through a real LMDB file, old map rows included.
"""

from __future__ import annotations

import math
import time

import lmdb
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from armonik_zmq._core import new_id, pack_fields, unpack_fields
from armonik_zmq.broker import store

_pack = msgpack.Packer(use_bin_type=True).pack

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=300) | st.binary(max_size=300))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=20)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=40)


def _fields(n: int) -> tuple:
    return tuple(f"f{i}" for i in range(n))


@settings(max_examples=250, deadline=None)
@given(st.lists(values, min_size=1, max_size=30))
def test_pack_fields_writes_msgpack_bytes_and_unpack_fields_reads_them(row_values):
    fields = _fields(len(row_values))
    row = dict(zip(fields, row_values))
    packed = pack_fields(row, fields, -1, None, _pack)
    assert packed == _pack(row_values)
    assert unpack_fields(packed, {len(fields): fields}) == row


@settings(max_examples=150, deadline=None)
@given(st.lists(values, min_size=1, max_size=10), st.data())
def test_unpack_fields_agrees_with_msgpack_on_damaged_rows(row_values, data):
    fields = _fields(len(row_values))
    buf = bytearray(_pack(row_values))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    buf = bytes(buf[:cut])
    try:
        got = unpack_fields(buf, {len(fields): fields})
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            msgpack.unpackb(buf, raw=False)
        return
    if got is None:
        return  # msgpack decides (reads it, or refuses it)
    expected = msgpack.unpackb(buf, raw=False)
    assert list(got) == list(fields)
    assert _pack(list(got.values())) == _pack(expected)  # NaN-proof equality


def test_what_the_row_codec_leaves_to_msgpack():
    one = {1: ("a",)}
    assert unpack_fields(_pack({"a": 1}), one) is None  # a map row (older format)
    assert unpack_fields(_pack([1, 2]), one) is None  # an array of no known length
    assert unpack_fields(_pack([msgpack.ExtType(1, b"x")]), one) is None
    assert unpack_fields(_pack([{1: 2}]), one) is None  # a map with an int key
    assert unpack_fields(_pack([1]) + b"\x00", one) is None  # trailing bytes
    assert unpack_fields(memoryview(_pack([1])), one) is None  # not bytes
    assert unpack_fields(msgpack.packb([1.5], use_single_float=True), one) == {"a": 1.5}
    assert math.isnan(unpack_fields(_pack([math.nan]), one)["a"])
    assert unpack_fields(_pack([[[], ["x"]]]), one, True) == {"a": ((), ("x",))}  # arrays as tuples
    assert pack_fields({"a": 1, "b": 2}, ("a",), -1, None, _pack) is None  # other keys: the caller packs a map
    assert pack_fields({"a": 1}, ("b",), -1, None, _pack) is None
    with pytest.raises(OverflowError):
        pack_fields({"a": 2**64}, ("a",), -1, None, _pack)  # as msgpack
    assert msgpack.unpackb(pack_fields({"a": 1, "b": {"x": 1}}, ("a", "b"), 1, _pack({"x": 1}), _pack)) == [1, _pack({"x": 1})]
    deep = inner = []
    for _ in range(100):  # deeper than the codec goes: msgpack packs and reads it
        inner.append([])
        inner = inner[0]
    assert pack_fields({"a": deep}, ("a",), -1, None, _pack) == _pack([deep])
    assert unpack_fields(_pack([deep]), one) is None
    cycle = []
    cycle.append(cycle)
    with pytest.raises(ValueError):  # msgpack's recursion limit, not a crash
        pack_fields({"a": cycle}, ("a",), -1, None, _pack)


def _task_row() -> dict:
    tid, now = new_id(), time.time()
    opts = {"max_duration": 600.0, "priority": 1, "max_retries": 2, "partition_id": "default", "application_name": "app",
            "application_version": None, "application_namespace": None, "application_service": None,
            "engine_type": None, "options": {"k": "v"}}
    return {"task_id": tid, "session_id": new_id(), "owner_pod_id": "", "pod_hostname": "", "initial_task_id": tid,
            "created_by": "", "parent_task_ids": [], "payload_id": new_id(), "data_dependencies": [new_id()],
            "expected_output_ids": [new_id()], "retry_of_ids": [], "status": 1, "status_message": "é", "error": None,
            "options": opts, "attempt": 3, "created_at": now, "submitted_at": now, "received_at": None,
            "acquired_at": None, "fetched_at": None, "started_at": None, "processed_at": None, "ended_at": None}


def test_rows_of_every_format_read_back_from_lmdb(tmp_path):
    """Rows as the broker writes them now, as msgpack wrote them before (arrays), and older map rows."""
    task = _task_row()
    result = {"result_id": new_id(), "session_id": new_id(), "name": "out", "owner_task_id": "", "created_by": "",
              "completed_by": "", "status": 1, "created_at": time.time(), "completed_at": None, "size": 2**40,
              "opaque_id": b"\x00\xff", "manual_deletion": True}
    before = [task[f] for f in store.TASK_FIELDS]
    before[store.TASK_FIELDS.index("options")] = _pack(task["options"])
    stored = {b"task": store.encode_task(task), b"result": store.encode_result(result),
              b"task msgpack": _pack(before), b"result msgpack": _pack([result[f] for f in store.RESULT_FIELDS]),
              b"task map": _pack(task), b"result map": _pack(result)}
    assert stored[b"task"] == stored[b"task msgpack"] and stored[b"result"] == stored[b"result msgpack"]
    env = lmdb.open(str(tmp_path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, buf in stored.items():
            txn.put(key, buf)
    with env.begin() as txn:
        for key in stored:
            row = store.decode_row(txn.get(key))
            if key.startswith(b"task"):
                # an array row's id lists come back as tuples (a map row's as lists): same ids either way
                assert type(row["expected_output_ids"]) is (list if key == b"task map" else tuple)
                row = {k: list(v) if type(v) is tuple else v for k, v in row.items()}
            assert row == (task if key.startswith(b"task") else result), key
    env.close()


def test_new_tasks_are_stored_as_array_rows_of_every_field(tmp_path):
    """create_tasks' rows (a parent's subtask included) carry every stored field: stored as arrays, read back equal."""
    from armonik_zmq.broker.events import EventBus
    from armonik_zmq.broker.state import BrokerState
    from armonik_zmq.status import TaskStatus

    st = store.Store(str(tmp_path / "lmdb"), map_size=1 << 24, sync=False)
    state = BrokerState(["default"], EventBus())
    now = time.time()
    session = {"session_id": new_id(), "status": 1, "partition_ids": ["default"],
               "options": {"max_duration": 60.0, "priority": 1, "max_retries": 2, "options": {"k": "v"}}}
    try:
        with st.write() as txn:
            payload = state.new_result_row(session["session_id"], "payload", now=now)
            state.insert_result(txn, payload)
            state.complete_result(txn, payload, b"data", "", now)
            outs = [state.new_result_row(session["session_id"], f"o{i}", now=now) for i in range(3)]
            for row in outs:
                state.insert_result(txn, row)
            [parent] = state.create_tasks(txn, session, [{"payload_id": payload["result_id"],
                                                           "expected_output_ids": [outs[0]["result_id"]]}], None, now)
            parent_row = txn.get_task(parent["task_id"])
            [child] = state.create_tasks(txn, session, [{"payload_id": payload["result_id"],
                                                          "data_dependencies": [outs[0]["result_id"]],
                                                          "expected_output_ids": [outs[1]["result_id"]]}],
                                         None, now, parent=parent_row, task_ids=["child"])
            rows = {t: dict(txn.get_task(t)) for t in (parent["task_id"], child["task_id"])}
        with st.read() as txn:
            for task_id, row in rows.items():
                buf = txn.txn.get(task_id.encode(), db=st.tasks)
                assert type(msgpack.unpackb(buf, raw=False)) is list  # not a map: every field, and no other
                assert store.decode_row(buf) == row and tuple(row) == store.TASK_FIELDS
        child_row = rows["child"]
        assert child_row["created_by"] == parent["task_id"] and child_row["parent_task_ids"] == (parent["task_id"],)
        assert child_row["status"] == TaskStatus.PENDING and child_row["submitted_at"] is None  # its input has no data
        assert rows[parent["task_id"]]["submitted_at"] == now and rows[parent["task_id"]]["parent_task_ids"] == ()
    finally:
        st.close()


def test_object_rows_of_an_objects_table_move_into_the_data_table_when_opened(tmp_path):
    """A directory written with an ``objects`` table (object rows apart from their chunks) opens with every result's
    data readable; its rows are then in the data table, keyed by the bare result id, and the old table is gone.
    New data is stored the same way: its row next to its chunks."""
    from armonik_zmq.broker.objects import chunk_key

    path = str(tmp_path / "lmdb")
    env = lmdb.open(path, map_size=1 << 24, max_dbs=16)
    data, objects = env.open_db(b"data"), env.open_db(b"objects")
    with env.begin(write=True) as txn:
        txn.put(chunk_key("small", 0), b"abc", db=data)
        txn.put(b"small", _pack({"size": 3, "chunks": 1, "chunk_size": 4}), db=objects)
        for i, part in enumerate((b"0123", b"45")):
            txn.put(chunk_key("big", i), part, db=data)
        txn.put(b"big", _pack({"size": 6, "chunks": 2, "chunk_size": 4}), db=objects)
        txn.put(chunk_key("upload", 0), b"xy", db=data)
        txn.put(b"upload", _pack({"size": 2, "chunks": 1, "chunk_size": 4, "staged": True}), db=objects)
    env.close()
    st = store.Store(path, map_size=1 << 24, sync=False, chunk_size=4)
    try:
        with st.read() as txn:
            assert txn.txn.get(b"objects") is None  # no such table any more
            assert txn.read_object("small") == b"abc" and txn.read_object("big") == b"012345"
            assert txn.object_size("upload") is None and txn.object_chunks("big") == 2
            assert msgpack.unpackb(txn.txn.get(b"big", db=st.data)) == {"size": 6, "chunks": 2, "chunk_size": 4}
        with st.write() as txn:
            assert txn.commit_object("upload") == 2 and txn.put_object("new", b"n") == 1
    finally:
        st.close()
    st = store.Store(path, map_size=1 << 24, sync=False, chunk_size=4)  # nothing to move any more
    try:
        with st.read() as txn:
            assert txn.read_object("upload") == b"xy" and txn.read_object("new") == b"n"
            assert [k for k, _ in txn.txn.cursor(db=st.data)] == [
                b"big", chunk_key("big", 0), chunk_key("big", 1), b"new", chunk_key("new", 0),
                b"small", chunk_key("small", 0), b"upload", chunk_key("upload", 0)]
    finally:
        st.close()


def test_an_idempotency_age_table_moves_into_the_key_table_when_opened_and_its_keys_still_expire(tmp_path):
    """A directory written with the expiry index in a table of its own (``idempotency_age``: applied_at + key)
    opens with that index moved into the key table, after every key (0xFF + applied_at + key), and the old table
    gone; the collection then expires its keys, old and new, and only those older than the ttl."""
    from armonik_zmq.broker.idempotency import AGE, Idempotency
    from armonik_zmq.broker.metrics import Metrics

    path = str(tmp_path / "lmdb")
    env = lmdb.open(path, map_size=1 << 24, max_dbs=16)
    keys, by_age = env.open_db(b"idempotency"), env.open_db(b"idempotency_age")
    now = time.time()
    stored = {"old:1": now - 100, "old:2": now - 50, "\U0010ffff:1": now - 100, "kept:1": now}  # the last: 4-byte UTF-8
    with env.begin(write=True) as txn:
        for key, at in stored.items():
            txn.put(key.encode(), _pack([b"d" * 16, at, b"reply"]), db=keys)
            txn.put(int(at * 1e6).to_bytes(8, "big") + key.encode(), b"", db=by_age)
    env.close()
    st = store.Store(path, map_size=1 << 24, sync=False)
    try:
        idem = Idempotency(st, 60.0, Metrics())
        with st.read() as txn:
            assert txn.txn.get(b"idempotency_age") is None  # no such table any more
            entries = [k for k, _ in txn.txn.cursor(db=idem.keys)]
        assert entries[:4] == sorted(k.encode() for k in stored) and all(k[:1] == AGE for k in entries[4:])
        assert len(entries) == 8
        with st.write() as txn:
            assert idem.collect(txn, now, 0.0) == 2  # old:1 and the 4-byte one; old:2 is 50 s old (ttl 60 s)
        with st.write() as txn:
            assert idem.collect(txn, now + 55, 1.0) == 1  # old:2
        with st.read() as txn:
            assert [k for k, _ in txn.txn.cursor(db=idem.keys)] == [b"kept:1", AGE + int(now * 1e6).to_bytes(8, "big")
                                                                    + b"kept:1"]
        assert Idempotency(st, 60.0, Metrics()).keys  # a second open finds nothing to move
    finally:
        st.close()


def test_session_task_and_result_tables_move_into_the_session_index_when_opened(tmp_path):
    """A directory written with a session's task ids and result ids in two tables (``session_tasks``,
    ``session_results``, keyed by the session id) opens with both in the session index, side by side, and the
    old tables gone; a session's ids read back, new ones join them, and deleting the session removes them all."""
    path = str(tmp_path / "lmdb")
    env = lmdb.open(path, map_size=1 << 24, max_dbs=16)
    tasks_db = env.open_db(b"session_tasks", dupsort=True)
    results_db = env.open_db(b"session_results", dupsort=True)
    ids = {sid: ([new_id() for _ in range(3)], [new_id() for _ in range(5)]) for sid in (new_id(), new_id())}
    with env.begin(write=True) as txn:
        for sid, (task_ids, result_ids) in ids.items():
            for tid in task_ids:
                txn.put(sid.encode(), tid.encode(), db=tasks_db)
            for rid in result_ids:
                txn.put(sid.encode(), rid.encode(), db=results_db)
    env.close()
    st = store.Store(path, map_size=1 << 24, sync=False)
    try:
        with st.read() as txn:
            assert txn.txn.get(b"session_tasks") is None and txn.txn.get(b"session_results") is None
            for sid, (task_ids, result_ids) in ids.items():
                assert txn.session_task_ids(sid) == task_ids and txn.session_result_ids(sid) == result_ids
            keys = list(txn.txn.cursor(db=st.session_index).iternext_nodup())
        assert keys == sorted(k for sid in ids for k in (store.session_tasks_key(sid), store.session_results_key(sid)))
        first, second = ids
        result = {"result_id": new_id(), "session_id": first, "name": "r", "owner_task_id": "", "created_by": "",
                  "completed_by": "", "status": 1, "created_at": 0.0, "completed_at": None, "size": 0,
                  "opaque_id": None, "manual_deletion": False}
        with st.write() as txn:
            txn.put_result(result, new=True)
            assert txn.session_result_ids(first) == ids[first][1] + [result["result_id"]]
            second_tasks, second_results = ids[second]
            assert txn.first_session_ids(store.session_tasks_key(second), 2) == second_tasks[:2]
            for tid in second_tasks:
                txn.delete_task_row(tid, second)
            for rid in second_results:
                txn.delete_result_row(rid, second)
        with st.read() as txn:
            assert txn.session_task_ids(second) == [] and txn.session_result_ids(second) == []
            assert txn.session_task_ids(first) == ids[first][0]
    finally:
        st.close()


class _PythonRows:
    """store.Txn's row methods as they were in Python, before ``_core.RowTables``: the behaviour it must keep."""

    def __init__(self, st, txn, touched, task_max, result_max):
        self.st, self.txn, self.touched, self.task_max, self.result_max = st, txn, touched, task_max, result_max

    def _get(self, db, key):
        buf = self.txn.get(key.encode(), db=db)
        return None if buf is None else store.decode_row(buf)

    def get_task(self, task_id):
        row = self.st.task_rows.get(task_id)
        if row is None:
            row = self._get(self.st.tasks, task_id)
            if row is None or row["status"] in store._TASK_ENDED or len(self.st.task_rows) >= self.task_max:
                return row
            self.st.task_rows[task_id] = row
        if self.touched is not None:
            self.touched.add(task_id)
        return row

    def put_task(self, row, new=False, was=None):
        task_id = row["task_id"]
        key = task_id.encode()
        self.txn.put(key, store.encode_task(row), db=self.st.tasks)
        status = row["status"]
        ended = status in store._TASK_ENDED
        if ended:
            self.txn.delete(key, db=self.st.live_tasks)
        elif new or was is None or (was == store._SUBMITTED) != (status == store._SUBMITTED):
            self.txn.put(key, store._live_value(row) if status == store._SUBMITTED else b"", db=self.st.live_tasks)
        if new:
            self.txn.put(store.session_tasks_key(row["session_id"]), key, db=self.st.session_index)
        cache = self.st.task_rows
        if ended:
            cache.pop(task_id, None)
        elif len(cache) < self.task_max or task_id in cache:
            cache[task_id] = row
            if self.touched is not None:
                self.touched.add(task_id)

    def get_result(self, result_id):
        row = self.st.result_rows.get(result_id)
        if row is None:
            row = self._get(self.st.results, result_id)
            if row is None or row["status"] != store._RESULT_CREATED or len(self.st.result_rows) >= self.result_max:
                return row
            self.st.result_rows[result_id] = row
        if self.touched is not None:
            self.touched.add(result_id)
        return row

    def put_result(self, row, new=False):
        result_id = row["result_id"]
        key = result_id.encode()
        self.txn.put(key, store.encode_result(row), db=self.st.results)
        if new:
            self.txn.put(store.session_results_key(row["session_id"]), key, db=self.st.session_index)
        cache = self.st.result_rows
        if row["status"] != store._RESULT_CREATED:
            cache.pop(result_id, None)
        elif len(cache) < self.result_max or result_id in cache:
            cache[result_id] = row
            if self.touched is not None:
                self.touched.add(result_id)


#: task statuses where the live-task and cache rules differ: SUBMITTED, two unfinished, two final
_task_statuses = st.sampled_from([2, 2, 3, 9, 12, 4, 5])
_row_ops = st.lists(st.tuples(st.sampled_from(["put_task", "get_task", "put_result", "get_result"]),
                              st.integers(0, 4), _task_statuses, st.booleans(), st.none() | _task_statuses,
                              st.integers(0, 4)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_row_ops, st.booleans(), st.integers(0, 3))
def test_compiled_row_tables_store_and_cache_rows_as_the_python_methods_they_replaced(tmp_path_factory, ops,
                                                                                       with_touched, cache_max):
    """``_core.RowTables`` (store.Txn's get/put of task and result rows, read rows decoded in C) against the Python it
    replaced: the same rows returned, the same LMDB tables (tasks, results, live tasks, session index), caches and touched ids."""
    from armonik_zmq._core import RowRules, RowTables
    from armonik_zmq.broker.state import _NEW_TASK

    base = tmp_path_factory.mktemp("rows")
    stores = [store.Store(str(base / name), map_size=1 << 24, sync=False) for name in ("compiled", "python")]
    rules = RowRules(store.TASK_FIELDS, store.RESULT_FIELDS, store._OPTIONS_AT, store.packed_options, store._pack,
                     store.decode_row, store._live_value, store.session_tasks_key, store.session_results_key,
                     store._TASK_ENDED, store._SUBMITTED, store._RESULT_CREATED, cache_max, cache_max)
    rules.use_decoding(store._OPTIONS_BY_BYTES, store._FIELDS_BY_LENGTH)  # as the store's: rows decoded in C
    options = [{"partition_id": "p", "priority": 1, "max_retries": 1}, {"partition_id": "q", "priority": 3}]
    try:
        touched = [set() if with_touched else None, set() if with_touched else None]
        with stores[0].write() as compiled_txn, stores[1].write() as python_txn:
            sides = [RowTables(rules, compiled_txn.txn, compiled_txn.puts, stores[0].tasks, stores[0].results,
                               stores[0].live_tasks, stores[0].task_rows, stores[0].result_rows, touched[0]),
                     _PythonRows(stores[1], python_txn.txn, touched[1], cache_max, cache_max)]
            for op, ident, status, new, was, variant in ops:
                answers = []
                for side in sides:
                    if op == "put_task":
                        # variant 4: a row with a field of its own (stored as a map)
                        row = {**_NEW_TASK, "task_id": f"t{ident}", "session_id": f"s{ident % 2}", "status": status,
                               "options": options[variant % 2], **({"extra": 1} if variant == 4 else {})}
                        answers.append(side.put_task(row, new=new, was=was))
                    elif op == "put_result":
                        row = {"result_id": f"r{ident}", "session_id": f"s{ident % 2}", "name": "n",
                               "owner_task_id": "", "created_by": "", "completed_by": "", "status": variant % 3,
                               "created_at": 1.5, "completed_at": None, "size": 0, "opaque_id": b"",
                               "manual_deletion": new, **({"extra": 1} if variant == 4 else {})}
                        answers.append(side.put_result(row, new=new))
                    else:
                        answers.append(getattr(side, op)(f"{op[4]}{ident}"))
                assert answers[0] == answers[1]
            assert touched[0] == touched[1]
            for a, b in ((stores[0].task_rows, stores[1].task_rows), (stores[0].result_rows, stores[1].result_rows)):
                assert a == b and list(a) == list(b)
            tables = [[list(txn.txn.cursor(db=db).iternext()) for db in (s.tasks, s.results, s.live_tasks,
                                                                          s.session_index)]
                      for s, txn in zip(stores, (compiled_txn, python_txn))]
            assert tables[0] == tables[1]
    finally:
        for s in stores:
            s.close()


_frame_sizes = st.sampled_from([0, 1, 100, 255, 256, 65535, 65536, 65537, 99_999, 100_000, 100_001])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["bytes", "memoryview", "list", "frames", "bytearray"]),
                          st.lists(_frame_sizes, min_size=1, max_size=3)), min_size=1, max_size=8))
def test_a_compiled_small_object_is_stored_as_put_object_stores_it(tmp_path_factory, puts):
    """``RowTables.put_small_object`` (the compiled one-chunk path of a completion's data), then ``put_object`` when
    it declines, against ``put_object`` alone: the same sizes and data tables, for data of every shape and size
    around the chunk size (100,000 bytes here), written once or again."""
    base = tmp_path_factory.mktemp("objects")
    stores = [store.Store(str(base / name), map_size=1 << 26, sync=False, chunk_size=100_000)
              for name in ("compiled", "python")]
    try:
        with stores[0].write() as compiled, stores[1].write() as python:
            written = set()
            for ident, shape, sizes in puts:
                frames = [bytes([ident + i]) * n for i, n in enumerate(sizes)]
                data = {"bytes": frames[0], "memoryview": memoryview(frames[0]), "list": frames[:1],
                        "frames": frames, "bytearray": bytearray(frames[0])}[shape]
                size = compiled.rows.put_small_object(f"r{ident}", data)
                # declined: not one frame of bytes or a buffer, larger than a chunk, or data to replace
                assert (size == -1) == (shape == "bytearray" or (shape == "frames" and len(sizes) > 1)
                                        or sizes[0] > 100_000 or ident in written)
                if size == -1:
                    size = compiled.put_object(f"r{ident}", data)
                assert size == python.put_object(f"r{ident}", data)
                written.add(ident)
            tables = [list(txn.txn.cursor(db=s.data).iternext()) for s, txn in zip(stores, (compiled, python))]
            assert tables[0] == tables[1]
    finally:
        for s in stores:
            s.close()


def test_a_cached_session_row_follows_writes_and_is_dropped_by_aborted_transactions(tmp_path):
    """Store.session_rows keeps decoded session rows across turns (every submit reads its session's). A put stores
    and keeps the new row; a request (nested transaction) that fails drops what it read or wrote, changed in place
    or not; an aborted turn drops them all; a deleted session is gone: each read gives what LMDB holds."""
    st = store.Store(str(tmp_path / "lmdb"), map_size=1 << 24, sync=False)
    try:
        def lmdb_row(sid):
            with st.env.begin() as raw:
                buf = raw.get(sid.encode(), db=st.sessions)
            return None if buf is None else store.decode_row(buf)

        with st.write() as txn:
            txn.put_session({"session_id": "s1", "status": 1, "options": {"priority": 1}})
        with st.write() as txn:
            row = txn.get_session("s1")
            assert txn.get_session("s1") is row  # decoded once
        with st.write() as txn:
            assert txn.get_session("s1") is row  # and kept across turns

        with st.write() as txn:  # a request changes the row in place, then fails: its nested transaction aborts
            with pytest.raises(RuntimeError):
                with txn.nested() as child:
                    child.get_session("s1")["status"] = 4
                    raise RuntimeError("refused")
            assert txn.get_session("s1")["status"] == 1
        with st.write() as txn:  # a nested put, then the request fails
            with pytest.raises(RuntimeError):
                with txn.nested() as child:
                    child.put_session({"session_id": "s1", "status": 5, "options": {"priority": 1}})
                    raise RuntimeError("refused")
            assert txn.get_session("s1")["status"] == 1
            with txn.nested() as child:  # a nested put that commits
                child.put_session({"session_id": "s1", "status": 2, "options": {"priority": 1}})
            assert txn.get_session("s1")["status"] == 2
        assert lmdb_row("s1")["status"] == 2

        with pytest.raises(RuntimeError):  # a whole turn aborted after its put
            with st.write() as txn:
                txn.put_session({"session_id": "s1", "status": 3, "options": {"priority": 1}})
                raise RuntimeError("turn aborted")
        with st.write() as txn:
            assert txn.get_session("s1") == lmdb_row("s1") and txn.get_session("s1")["status"] == 2

        with st.write() as txn:
            txn.delete_session("s1")
            assert txn.get_session("s1") is None
        assert lmdb_row("s1") is None
    finally:
        st.close()
