"""The write-ahead log (broker/wal.py, --durability wal): a commit durable by one flush of its record.

A simulated power loss (data.mdb back as it was at the last checkpoint, or any mix of its pages written since)
loses nothing acknowledged; a torn or damaged log tail ends the replay cleanly; the codec and replay give back
exactly the committed transactions.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armonik_zmq._core import WAL_DELETE, LoggedTxn, WalOps
from armonik_zmq.broker import wal
from armonik_zmq.broker.store import Store
from armonik_zmq.client import TaskDefinition, TaskStatus, connect
from conftest import Api, broker_only, make_cluster

#: the broker logs on, and never checkpoints on its own after its start: the test decides what data.mdb loses
WAL_ARGS = ("--durability", "wal", "--checkpoint-interval", "3600")


def _active_segment(data_dir: str) -> str:
    return sorted(glob.glob(os.path.join(data_dir, "wal", "[0-9]*.wal")))[-1]


def test_power_loss_loses_nothing_acknowledged(tmp_path):
    """Acknowledged submissions and completed results survive data.mdb losing every write since the checkpoint."""
    cluster = make_cluster(tmp_path, workers=2, broker_args=WAL_ARGS)
    try:
        cluster.start()
        # data.mdb as a power loss may leave it: every page written after the broker's start checkpoint lost
        at_checkpoint = str(tmp_path / "data-at-checkpoint.mdb")
        shutil.copyfile(os.path.join(cluster.data_dir, "data.mdb"), at_checkpoint)
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session_id = api.session()
            n = 12
            payloads = api.results.create_results(
                {f"p{i}": json.dumps({"op": "square", "x": i}).encode() for i in range(n)}, session_id, batch_size=n)
            outs = api.results.create_results_metadata([f"o{i}" for i in range(n)], session_id)
            late = api.results.create_results_metadata(["late-p", "late-o"], session_id)
            tasks = api.tasks.submit_tasks(session_id, [
                TaskDefinition(payload_id=payloads[f"p{i}"].result_id, expected_output_ids=[outs[f"o{i}"].result_id])
                for i in range(n)] + [TaskDefinition(payload_id=late["late-p"].result_id,
                                                     expected_output_ids=[late["late-o"].result_id])])
            ids = [outs[f"o{i}"].result_id for i in range(n)]
            api.events.wait_for_result_availability(ids, session_id)
        cluster.kill_broker()
        shutil.copyfile(at_checkpoint, os.path.join(cluster.data_dir, "data.mdb"))
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            for t in tasks[:n]:
                row = api.tasks.get_task(t.id)
                assert row.status == TaskStatus.COMPLETED, (t.id, row.status, row.status_message)
            assert [api.value(session_id, r) for r in ids] == [i * i for i in range(n)]
            assert api.tasks.get_task(tasks[-1].id).status == TaskStatus.PENDING
    finally:
        cluster.cleanup()


def _tear(segment: str, how: str) -> None:
    """After the last complete record of ``segment``: the start of one more record cut short (a crash mid-append),
    or bytes of no record."""
    with open(segment, "rb") as f:
        data = f.read()
    records, stop, _ = wal.read_records(data, wal.read_checkpoint(os.path.dirname(segment))[0])
    assert records, "the broker logged nothing"
    seq, ops = records[-1]
    extra = (wal.frame(seq + 1, ops) + ops)[:wal._HEAD.size + len(ops) // 2] if how == "torn" else os.urandom(300)
    with open(segment, "r+b") as f:
        f.seek(stop)
        f.write(extra)


def test_torn_or_damaged_log_tail_keeps_every_complete_record(tmp_path_factory, tmp_path):
    broker_log = str(tmp_path / "broker.log")
    with broker_only(tmp_path_factory, *WAL_ARGS, broker_log=broker_log) as cluster:
        made = {}
        for round_, how in enumerate(("torn", "garbage")):
            with connect(cluster.endpoint, timeout=30) as conn:
                api = Api(conn)
                session_id = api.session()
                for i in range(3):  # one request, one commit, one record each
                    name = f"r{round_}-{i}"
                    made[name] = (session_id, api.results.create_results({name: name.encode()}, session_id)[name])
            cluster.kill_broker()
            _tear(_active_segment(cluster.data_dir), how)
            cluster.start_broker()
            cluster.wait_ready()
            with connect(cluster.endpoint, timeout=30) as conn:
                api = Api(conn)
                for name, (session_id, result) in made.items():
                    assert api.results.download_result_data(result.result_id, session_id) == name.encode()
    with open(broker_log) as f:
        logged = f.read()
    assert "incomplete or damaged (a torn write): dropped" in logged
    assert "bytes of no record that follows (stale or damaged): ignored" in logged


def test_a_broker_in_lmdb_mode_replays_the_log_a_killed_one_left_and_a_wal_broker_logs_again_after_it(
        tmp_path_factory):
    """--durability lmdb stays a mode of its own: started where a broker logging was killed, it replays the log
    (data.mdb rolled back to the checkpoint: nothing acknowledged since is lost), flushes LMDB and drops the
    checkpoint; a broker with the log started after it logs again, on top of what lmdb mode wrote."""
    with broker_only(tmp_path_factory, *WAL_ARGS) as cluster:
        checkpoint = os.path.join(cluster.data_dir, "wal", wal.CHECKPOINT_FILE)
        made = {}
        for round_, args in enumerate((("--durability", "lmdb"), WAL_ARGS, ("--durability", "lmdb"))):
            with connect(cluster.endpoint, timeout=30) as conn:
                api = Api(conn)
                session_id = api.session()
                name = f"r{round_}"
                made[name] = (session_id, api.results.create_results({name: name.encode()}, session_id)[name])
            cluster.kill_broker()
            assert os.path.exists(checkpoint) == (round_ != 1), "a checkpoint only where the broker logged"
            cluster.broker_args = list(args)
            cluster.start_broker()
            cluster.wait_ready()
            assert os.path.exists(checkpoint) == (args == WAL_ARGS)
            with connect(cluster.endpoint, timeout=30) as conn:
                api = Api(conn)
                for name, (session_id, result) in made.items():
                    assert api.results.download_result_data(result.result_id, session_id) == name.encode()


# -- the codec and the replay, against a model ------------------------------------------------------------------

_KEYS = st.sampled_from([b"a", b"b", b"c", b"dd", b"e" * 40])
_VALUES = st.one_of(st.binary(max_size=8), st.integers(0, 3000).map(lambda n: b"v" * n))  # large ones dirty pages
#: (kind, table, key, value): table 1 is a dupsort one, whose values LMDB keeps short
_OP = st.tuples(st.sampled_from(["put", "delete"]), st.integers(0, 1), _KEYS, _VALUES).map(
    lambda op: op if op[1] == 0 else (*op[:3], op[3][:64] or (b"0" if op[0] == "put" else b"")))
#: a transaction: its ops, and nested parts (ops, aborted?)
_TXN = st.tuples(st.lists(_OP, max_size=6), st.lists(st.tuples(st.lists(_OP, max_size=4), st.booleans()), max_size=2))


def _apply(model: list, op) -> None:
    kind, table, key, value = op
    if table == 0:
        if kind == "put":
            model[0][key] = value
        else:
            model[0].pop(key, None)
    elif kind == "put":
        model[1].add((key, value))
    else:
        model[1].difference_update({p for p in model[1] if p[0] == key and (not value or p[1] == value)})


def _write(txn, tables, op) -> None:
    kind, table, key, value = op
    if kind == "put":
        if table == 0:
            txn.put(key, value, db=tables[table])
        else:
            txn.putter(tables[table])(key, value)
    elif table == 1 and not value:
        txn.delete(key, db=tables[table])
    else:
        txn.delete(key, value, db=tables[table])


def _open(path):
    env = lmdb.open(path, map_size=1 << 26, max_dbs=4, sync=False, metasync=False)
    return env, [env.open_db(b"plain"), env.open_db(b"dups", dupsort=True)]


def _state(env, tables) -> list:
    with env.begin() as txn:
        plain = dict(txn.cursor(tables[0]).iternext())
        dups = set(txn.cursor(tables[1]).iternext())
    return [plain, dups]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(txns=st.lists(_TXN, min_size=1, max_size=14), checkpoints=st.sets(st.integers(0, 13), max_size=3),
       crash=st.integers(0, 14), torn=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_replay_after_a_power_loss_gives_the_committed_prefix(tmp_path_factory, txns, checkpoints, crash, torn, seed):
    """Random transactions (nested parts that abort included), checkpoints, a crash after any of them with data.mdb
    holding any mix of the pages written since the last checkpoint, the log maybe torn: the state is exactly the
    committed transactions'."""
    rng = random.Random(seed)
    path = str(tmp_path_factory.mktemp("walprop"))
    data = os.path.join(path, "data.mdb")
    env, tables = _open(path)
    ahead = wal.WriteAhead(os.path.join(path, "wal"), data, 4096)
    ahead.log.segment_bytes = 1 << 14  # small segments: records cross several, and segments are recycled
    ahead.open(env)
    index = {t: i for i, t in enumerate(tables)}
    with open(data, "rb") as f:
        durable = f.read()
    model: list = [{}, set()]
    crash = min(crash, len(txns))
    turn_ops = WalOps()  # one for every transaction, as the broker's turns share theirs
    for n, (ops, parts) in enumerate(txns[:crash]):
        raw = env.begin(write=True)
        turn_ops.clear()
        logged = LoggedTxn(raw, turn_ops, index)
        for op in ops:
            _write(logged, tables, op)
            _apply(model, op)
        for part_ops, aborted in parts:
            child = env.begin(write=True, parent=raw)
            mark = logged.ops.mark()
            inner = LoggedTxn(child, logged.ops, index)
            before = [dict(model[0]), set(model[1])]
            for op in part_ops:
                _write(inner, tables, op)
                _apply(model, op)
            if aborted:
                child.abort()
                logged.ops.cut(mark)
                model = before
            else:
                child.commit()
        raw.commit()
        if logged.ops.count:
            ahead.append(logged.ops)
        if n in checkpoints:
            ahead.checkpoint(env, wait=True)
            with open(data, "rb") as f:
                durable = f.read()
    if torn and crash < len(txns):  # the next record was being written when the power went
        ops = WalOps()
        unlogged = env.begin(write=True)
        LoggedTxn(unlogged, ops, index).put(b"torn", b"x" * 100, db=tables[0])
        unlogged.abort()
        segment = ahead.log.segments[-1][1] if ahead.log.segments else None
        if segment is not None:
            head = wal.frame(ahead.log.next_seq, ops.encoded())
            with open(segment, "r+b") as f:
                f.seek(ahead.log.offset)
                f.write((head + ops.encoded())[:len(head) + 20])
    ahead.unpin()
    ahead.log.close()
    env.close()
    # the power loss: each page written since the last checkpoint is either on disk or as it was then
    with open(data, "rb") as f:
        now = f.read()
    mixed = bytearray()
    for at in range(0, max(len(now), len(durable)), 4096):
        old, new = durable[at:at + 4096], now[at:at + 4096]
        mixed += (old.ljust(len(new), b"\0") if rng.random() < 0.5 else new) if new else old
    with open(data, "wb") as f:
        f.write(mixed)
    after = wal.WriteAhead.restore(os.path.join(path, "wal"), data)
    env, tables = _open(path)
    try:
        ahead = wal.WriteAhead(os.path.join(path, "wal"), data, 4096)
        ahead.replay(env, tables, after)
        assert _state(env, tables) == model
    finally:
        env.close()
        shutil.rmtree(path)


def test_a_checkpoint_file_of_another_data_file_is_refused(tmp_path):
    """The log's checkpoint is never written over a data.mdb older than it (a copy from before, say)."""
    path = str(tmp_path / "db")
    env, tables = _open(path)
    data = os.path.join(path, "data.mdb")
    with open(data, "rb") as f:
        old = f.read()
    ahead = wal.WriteAhead(os.path.join(path, "wal"), data, 4096)
    for i in range(4):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v", db=tables[0])
    ahead.open(env)
    ahead.close(env)
    env.close()
    with open(data, "wb") as f:
        f.write(old)
    try:
        wal.WriteAhead.restore(os.path.join(path, "wal"), data)
    except wal.WalError as exc:
        assert "older" in str(exc)
    else:
        raise AssertionError("a checkpoint was restored over an older data.mdb")


def test_a_restart_is_refused_while_another_process_keeps_lmdbs_lock_file_from_before_the_crash(tmp_path):
    """A process that holds the directory open through a crash (armonik-zmq inspect, say) keeps LMDB's lock file
    naming the crashed broker's last transaction: LMDB would build on the wrong meta page after the checkpoint's were
    put back (acknowledged rows lost), so the start is refused; once that process is gone it starts and replays."""
    path = str(tmp_path / "db")
    store = Store(path, durability="wal", checkpoint_interval=3600)
    holder = subprocess.Popen([sys.executable, "-c", "import lmdb, sys; env = lmdb.open(sys.argv[1], readonly=True, "
                               "max_dbs=16); print('open', flush=True); sys.stdin.read()", path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"open\n"
        for i in range(5):
            with store.write() as txn:
                txn.txn.put(b"k%d" % i, b"v" * 300, db=store.tasks)
        store.wal.finish()
        store.wal.unpin()
        store.wal.log.close()
        store.env.close()  # a crash: no last checkpoint
        with pytest.raises(wal.WalError, match="another process has"):
            Store(path, durability="wal")
    finally:
        holder.stdin.close()
        holder.wait(30)
    store = Store(path, durability="wal")
    try:
        with store.read() as txn:
            assert [txn.txn.get(b"k%d" % i, db=store.tasks) for i in range(5)] == [b"v" * 300] * 5
    finally:
        store.close()


def test_expired_idempotency_keys_leave_the_log_a_delete_of_the_key_and_of_its_age_entry(tmp_path):
    """The collection of expired idempotency keys removes each key and its age entry; both deletes must be in the
    turn's log record (a delete through a cursor is not logged: after a power loss it would come back)."""
    from armonik_zmq.broker.idempotency import _TS, Idempotency, _age_key
    from armonik_zmq.broker.metrics import Metrics
    from armonik_zmq.broker.store import Store

    st = Store(str(tmp_path / "lmdb"), map_size=1 << 24, durability="wal")
    try:
        idem = Idempotency(st, 60.0, Metrics())
        expired = [f"client:{i}".encode() for i in range(3)]
        with st.write() as txn:
            for key in expired:
                txn.txn.put(key, b"row", db=idem.keys)
                txn.txn.put(_age_key(_TS.pack(1_000_000), key), b"", db=idem.keys)
        with st.write() as txn:
            assert idem.collect(txn, 1_000.0, 0.0) == 3
            logged = list(wal.decode_ops(txn.txn.ops.encoded()))
        table = st.table_index[idem.keys]
        assert [(kind, t) for kind, t, _, _ in logged] == [(WAL_DELETE, table)] * 6
        assert {key for _, _, key, _ in logged} == {*expired, *(_age_key(_TS.pack(1_000_000), k) for k in expired)}
        with st.read() as txn:
            assert not list(txn.txn.cursor(db=idem.keys))
    finally:
        st.close()


def test_segments_are_recycled_and_a_record_larger_than_one_gets_a_file_of_its_own(tmp_path):
    """Records fill preallocated segments; one larger than a segment is a file of its own size, deleted (not kept
    as a spare) once a checkpoint covers it; covered segments become spares that later segments reuse."""
    directory = str(tmp_path / "wal")
    segment = 1 << 14
    log = wal.Log(directory, segment_bytes=segment)
    log.start(0)
    records = [os.urandom(n) for n in (5000,) * 3 + (3 * segment,) + (5000,) * 9]  # 3 records a segment
    for record in records:
        log.append(record)
    sizes = [os.path.getsize(path) for _, path in log._paths()]
    large = 3 * segment + (wal.BLOCK if log.direct else 16)  # a direct write ends on a whole block of zeros
    assert sizes.count(segment) == len(sizes) - 1 and large in sizes, sizes
    assert [ops for _, ops in wal.Log(directory, segment_bytes=segment).replay(0)] == records
    log.recycle(log.next_seq - 1)
    spares = len(sizes) - 2  # all but the large record's and the active one
    assert [os.path.getsize(spare) for spare in log._spares()] == [segment] * spares and spares == 3
    files = len(os.listdir(directory))
    for _ in range(spares):
        log.append(os.urandom(segment - 100))  # each fills a segment: a spare is renamed, no file is made
    assert len(os.listdir(directory)) == files
    log.close()


def test_a_checkpoint_prepares_a_spare_segment_once_the_active_one_is_half_full(tmp_path):
    """A broker's first segments: once the active one is past its half and no spare is left, the checkpoint's thread
    makes one of zeros, which the commit that fills the active segment then renames (no zeros on its path)."""
    path = str(tmp_path)
    env, _tables = _open(path)
    ahead = wal.WriteAhead(os.path.join(path, "wal"), os.path.join(path, "data.mdb"), 4096)
    ahead.log.segment_bytes = segment = 1 << 14
    try:
        ahead.open(env)
        ahead.log.wait_spare()
        assert len(ahead.log._spares()) == 1, "a fresh log's first segment is made ahead, on a thread"
        ahead.append(os.urandom(segment // 4))
        ahead.checkpoint(env)
        ahead.finish()
        assert ahead.log._spares() == [], "a spare made while the active segment is under its half"
        ahead.append(os.urandom(segment // 3))
        ahead.checkpoint(env)
        ahead.finish()
        [spare] = ahead.log._spares()
        with open(spare, "rb") as f:
            assert not any(f.read()) and os.path.getsize(spare) == segment
        ahead.append(os.urandom(segment // 2))  # does not fit in the active segment: the spare is the next one
        assert ahead.log._spares() == [] and not os.path.exists(spare)
        assert len(ahead.log._paths()) == 2
    finally:
        ahead.close(env)
        env.close()


def test_a_large_record_with_no_spare_left_gets_a_file_of_its_own_and_a_spare_is_made_after_it(tmp_path):
    """A record larger than ``large_record`` that needs a new segment while no spare is left is written into a file
    of its own (no segment of zeros first: bulk turns log megabytes each); the next record opens a segment again
    (a file of its own is never grown), and a checkpoint prepares a spare meanwhile. With a spare, it takes it."""
    path = str(tmp_path)
    env, _tables = _open(path)
    ahead = wal.WriteAhead(os.path.join(path, "wal"), os.path.join(path, "data.mdb"), 4096)
    log = ahead.log
    log.segment_bytes = segment = 1 << 15
    log.large_record = segment // 4
    records = []
    try:
        ahead.open(env)
        log.wait_spare()
        records.append(os.urandom(6000))
        ahead.append(records[-1])  # the first segment: the spare the open made
        records.append(os.urandom(segment - 5000))
        ahead.append(records[-1])  # does not fit, no spare: a file of its own, its exact size (whole blocks)
        assert log.own and os.path.getsize(log.segments[-1][1]) == -(-(segment - 5000 + 16) // wal.BLOCK) * wal.BLOCK
        assert log.needs_spare()
        ahead.checkpoint(env)
        ahead.finish()  # a spare made on the checkpoint's thread; the first segment, covered, is one too
        spares = log._spares()
        assert len(spares) == 2 and any("prepared" in spare for spare in spares)
        records.append(os.urandom(100))
        ahead.append(records[-1])  # not into the large record's file: a spare becomes the next segment
        assert not log.own and len(log._spares()) == 1 and os.path.getsize(log.segments[-1][1]) == segment
        ahead.checkpoint(env)
        ahead.finish()  # the large record's file, covered, is deleted (not a spare)
        assert len(log._spares()) == 1 and len(log._paths()) == 1
        records.append(os.urandom(segment - 60))
        ahead.append(records[-1])  # does not fit, a spare is left: it is the next segment
        assert not log.own and os.path.getsize(log.segments[-1][1]) == segment and log._spares() == []
        records.append(os.urandom(segment + 10))
        ahead.append(records[-1])  # larger than a segment: a file of its own whatever the spares
        assert log.own
        ahead.unpin()
        log.close()  # a crash: every record after the open's checkpoint replays, in order
        after = wal.WriteAhead.restore(os.path.join(path, "wal"), os.path.join(path, "data.mdb"))
        replayed = [ops for _, ops in wal.Log(os.path.join(path, "wal"), segment_bytes=segment).replay(after)]
        assert replayed == records[3:]
    finally:
        env.close()


def test_a_large_turns_buffer_is_kept_while_large_turns_go_on_and_given_back_after(tmp_path):
    """The turns' WalOps keeps a buffer larger than WAL_OPS_KEPT across ``clear`` (bulk turns log 9-52 MB each: given
    back after each, the next one faulted its pages in again); ``trim`` (once a second) gives it back once a whole
    interval passed with no transaction that needed it, and drops the ops as ``clear`` does."""
    from armonik_zmq._core import WAL_OPS_KEPT
    env = lmdb.open(str(tmp_path), map_size=1 << 28, max_dbs=2, sync=False, metasync=False)
    table = env.open_db(b"plain")
    ops = WalOps()

    def turn(size: int) -> None:
        ops.clear(16)
        with env.begin(write=True) as raw:
            LoggedTxn(raw, ops, {table: 0}).put(os.urandom(8), bytes(size), db=table)

    try:
        turn(WAL_OPS_KEPT + (1 << 20))
        large = ops.capacity
        assert large > WAL_OPS_KEPT
        turn(100)
        assert ops.capacity == large, "a small turn after a large one"
        assert not ops.trim() and ops.capacity == large and len(ops) == 0, "a large turn since the last trim"
        turn(WAL_OPS_KEPT + (1 << 20))
        turn(100)
        assert not ops.trim() and ops.capacity == large
        turn(100)
        assert ops.trim() and ops.capacity <= WAL_OPS_KEPT and len(ops) == 0, "no large turn in a whole interval"
        turn(100)
        assert ops.capacity <= WAL_OPS_KEPT and ops.headroom == 16 and len(ops) == 8 + 8 + 100
    finally:
        env.close()


def test_a_segment_of_zeros_is_written_directly_and_flushed(tmp_path):
    """A new segment's zeros go to the disk directly where the file system allows it (16 MiB through the page cache
    cost the broker ~34 ms of CPU; directly ~2): the file is whole, every byte zero, its blocks allocated (no
    hole), and no page of it is left in the page cache."""
    path = str(tmp_path / "segment")
    size = 1 << 21
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(path + "-probe", "wb"):
        pass
    try:
        os.close(os.open(path + "-probe", os.O_RDWR | os.O_DIRECT))
        direct = True
    except OSError:
        direct = False
    try:
        os.pwrite(fd, b"\xff" * 8192, size - 8192)  # bytes that must become zeros
        os.fsync(fd)
        wal._fill_zeros(fd, size, path)
        assert os.fstat(fd).st_size == size and os.fstat(fd).st_blocks * 512 >= size
        assert os.pread(fd, size, 0) == bytes(size)
    finally:
        os.close(fd)
    if direct:  # written directly: none of a fresh segment's pages is in the page cache
        path2 = str(tmp_path / "segment2")
        fd = os.open(path2, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            wal._fill_zeros(fd, size, path2)
        finally:
            os.close(fd)
        assert _cached_pages(path2) == 0


def _cached_pages(path: str) -> int:
    """How many of a file's pages are in the page cache (mincore on a map of it)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_a_log_that_lost_its_checkpoint_is_not_replayed_when_logging_starts_again(tmp_path):
    """A broker in another mode replays the log and drops its checkpoint; a later broker with the log numbers its
    records from 1 again. The old segments must go: reused as spares, an old record of the same size that follows
    the last new one carries the next number and would be replayed as new after a crash."""
    path = str(tmp_path)
    data = os.path.join(path, "data.mdb")
    env, _tables = _open(path)
    try:
        first = wal.WriteAhead(os.path.join(path, "wal"), data, 4096)
        first.open(env)
        for i in range(5):
            first.append(b"old-%d" % i + b"x" * 100)
        first.unpin()
        first.log.close()  # a crash; then a start in lmdb mode replays the log and drops the checkpoint
        os.unlink(os.path.join(path, "wal", wal.CHECKPOINT_FILE))
        second = wal.WriteAhead(os.path.join(path, "wal"), data, 4096)
        second.open(env)
        new = [b"new-%d" % i + b"x" * 100 for i in range(2)]
        for ops in new:
            second.append(ops)
        second.unpin()
        second.log.close()  # a crash
        after = wal.WriteAhead.restore(os.path.join(path, "wal"), data)
        assert [ops for _, ops in wal.WriteAhead(os.path.join(path, "wal"), data, 4096).log.replay(after)] == new
    finally:
        env.close()


def _fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return int(next(line for line in f if line.startswith("flags:")).split()[1], 8)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT") or not os.path.exists("/proc/self/fdinfo"), reason="Linux only")
def test_records_are_written_directly_in_whole_blocks_from_the_turns_buffer(tmp_path):
    """Segments are O_DIRECT and O_DSYNC: each record is written from the WalOps buffer in whole 4 KiB blocks (the
    segment's last partial block again, the record, zeros to the block's end), and the segment then holds exactly
    what the page cache and fdatasync would have written; records that open a segment, or come as bytes, too."""
    segment = 1 << 15
    logs = {}
    for name, direct in (("direct", True), ("cached", False)):
        log = logs[name] = wal.Log(str(tmp_path / name), segment_bytes=segment, direct=direct)
        log.start(0)
    try:
        os.close(os.open(str(tmp_path / "probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:  # tmpfs, say: the log writes through the page cache there (the other tests cover it)
        pytest.skip(f"no O_DIRECT where pytest keeps its files: {exc}")
    rng = random.Random(7)
    env, tables = _open(str(tmp_path / "env"))
    ops = WalOps()
    records = []
    for n in range(40):
        log = logs["direct"]
        ops.clear(log.headroom)  # as the broker's turn does (store._Write)
        with env.begin(write=True) as raw:
            logged = LoggedTxn(raw, ops, {t: i for i, t in enumerate(tables)})
            for _ in range(rng.randint(1, 30)):
                logged.put(os.urandom(rng.randint(1, 40)), os.urandom(rng.randint(0, 700)), db=tables[0])
        record = ops if n % 7 else ops.encoded()  # bytes take a buffer of the log's own
        offset = log.offset
        log.append(record)
        logs["cached"].append(ops.encoded())
        records.append(ops.encoded())
        assert log.fd_direct and _fd_flags(log.fd) & (os.O_DIRECT | os.O_DSYNC) == os.O_DIRECT | os.O_DSYNC
        if log.offset > offset:  # not a new segment: the tail before the record was written again, intact
            assert len(log.tail) == log.offset % wal.BLOCK
        assert log.headroom == log.offset % wal.BLOCK + 16
    assert len(logs["direct"].segments) > 3, "records opened segments (the WalOps buffer moved to the new headroom)"
    for log in logs.values():
        log.close()
    contents = {}
    for name, log in logs.items():
        contents[name] = [open(path, "rb").read() for _, path in log._paths()]
        assert [r for _, r in wal.Log(log.directory, segment_bytes=segment).replay(0)] == records
    assert contents["direct"] == contents["cached"]
    env.close()


def test_crc32c_in_hardware_and_by_table_is_the_castagnoli_checksum():
    """The records' checksum: the standard check value, the same by the CPU's instruction and by the table at every
    length and alignment, and continued in parts as in one piece. The instruction runs three streams at once over
    3 x 256 and 3 x 8192 bytes, then the rest: lengths around those, and their sums."""
    from armonik_zmq._core import crc32c

    assert crc32c(b"123456789") == crc32c(b"123456789", hardware=False) == 0xE3069283
    data = os.urandom(120_000)
    for length in (0, 1, 7, 8, 9, 63, 64, 65, 767, 768, 769, 1000, 1543, 4097, 24_575, 24_576, 24_577,
                   24_576 + 768 + 13, 2 * 24_576 + 5000, 100_003):
        for start in range(8):
            view = memoryview(data)[start:start + length]
            assert crc32c(view) == crc32c(view, hardware=False), (length, start)
            assert crc32c(view[length // 3:], crc32c(view[:length // 3])) == crc32c(view), (length, start)


def test_records_of_an_older_log_with_zlib_checksums_replay_before_the_new_ones(tmp_path):
    """New records carry CRC32C (flagged in their length); a log written before, whose records carry zlib's crc32,
    still replays, and a damaged record of either kind ends the replay."""
    import struct
    import zlib

    def old_record(seq: int, ops: bytes) -> bytes:  # the format before CRC32C
        body = struct.pack("<QI", seq, len(ops))
        return struct.pack("<I", zlib.crc32(ops, zlib.crc32(body))) + body + ops

    directory = str(tmp_path / "wal")
    old = [os.urandom(n) for n in (10, 3000, 200)]
    os.makedirs(directory)
    with open(os.path.join(directory, f"{1:016d}.wal"), "wb") as f:
        f.write(b"".join(old_record(seq, ops) for seq, ops in enumerate(old, 1)) + bytes(8192))
    log = wal.Log(directory, segment_bytes=1 << 16)
    assert [ops for _, ops in log.replay(0)] == old and log.next_seq == 4
    new = [os.urandom(n) for n in (50, 5000)]
    for ops in new:  # into the next segment
        log.append(ops)
    log.close()
    assert struct.unpack_from("<I", wal.frame(4, new[0]), 12)[0] == len(new[0]) | 1 << 31, "no CRC32C flag"
    assert [(seq, ops) for seq, ops in wal.Log(directory).replay(0)] == list(enumerate(old + new, 1))
    newest = sorted(glob.glob(os.path.join(directory, "*.wal")))[-1]
    with open(newest, "rb") as f:
        data = bytearray(f.read())
    data[wal._HEAD.size + len(new[0]) + wal._HEAD.size + 60] ^= 1  # a bit of the second new record's ops
    records, _, why = wal.read_records(bytes(data), 3)
    assert [ops for _, ops in records] == new[:1] and "damaged" in why


# -- large records streamed to a file of their own (WalOps.spill_to, Log.spill) ------------------------------------


def _streamed_turns(env, tables, ops: WalOps, log: wal.Log, rng: random.Random, turns: int):
    """Random turns of nested parts (some aborted) through ``ops``, each committed and appended to ``log``; return
    (each record's expected ops, how many turns streamed, cuts below what had left the buffer, of which into the
    record's first block)."""
    index = {t: i for i, t in enumerate(tables)}
    expected, streamed, unwound, into_first = [], 0, 0, 0
    for _ in range(turns):
        ops.clear(log.headroom)  # as the broker's turn does (store._Write)
        model = []
        with env.begin(write=True) as raw:
            LoggedTxn(raw, ops, index)
            for _part in range(rng.randint(1, 6)):
                child = env.begin(write=True, parent=raw)
                mark = ops.mark()
                inner = LoggedTxn(child, ops, index)
                added = []
                for _ in range(rng.choice((1, 5, 40))):
                    key, value = os.urandom(rng.randint(1, 30)), os.urandom(rng.choice((0, 10, 700, 5000)))
                    inner.put(key, value, db=tables[0])
                    added.append((wal.WAL_PUT, 0, key, value))
                if rng.random() < 0.4:
                    child.abort()
                    unwound += mark[0] < ops.spilled
                    into_first += mark[0] < wal.BLOCK - 16 < ops.spilled
                    ops.cut(mark)
                else:
                    child.commit()
                    model += added
                assert len(ops) == sum(8 + len(k) + len(v) for _, _, k, v in model)
        streamed += ops.streaming
        if ops.count:
            log.append(ops)
            expected.append(model)
        else:
            log.drop_stream()  # as the store does
    return expected, streamed, unwound, into_first


@pytest.mark.parametrize("direct", [True, False])
def test_a_large_turns_ops_stream_to_a_file_of_their_own_and_a_cut_below_them_reads_them_back(tmp_path, direct,
                                                                                                 caplog):
    """Once a turn's ops reach the spill size they go to a file of their record's own as they come, in whole blocks,
    and the buffer keeps only the last partial block (bulk records of 9-52 MB made it grow, a page fault per 4 KiB);
    the head is written last. A nested part that aborts after its ops left the buffer moves the write position back
    (the piece read back from the file; into the first block: the record is in memory alone again, and its file
    goes). Every record replays as exactly the committed ops, in order, between records in segments, and no file
    holds bytes after its records (an aborted part's pieces went further)."""
    rng = random.Random(11)
    segment = 1 << 22
    log = wal.Log(str(tmp_path / "wal"), segment_bytes=segment, direct=direct)
    log.start(0)
    env, tables = _open(str(tmp_path / "env"))
    ops = WalOps()
    piece = 2 * wal.BLOCK
    ops.spill_to(log.spill, piece)
    try:
        expected, streamed, unwound, into_first = _streamed_turns(env, tables, ops, log, rng, 80)
        assert streamed > 20 and unwound > 5 and into_first > 0, (streamed, unwound, into_first)
        assert ops.capacity <= 8 * piece, "the buffer held a whole large record"
        log.close()
        replayed = [list(wal.decode_ops(r)) for _, r in wal.Log(log.directory, segment_bytes=segment).replay(0)]
        assert replayed == expected
        own = [p for _, p in log._paths() if os.path.getsize(p) != segment]
        assert len(own) == streamed, "a streamed record's file (and no other) is left"
        assert "write-ahead log" not in caplog.text
    finally:
        env.close()


def test_a_turn_that_streamed_then_failed_leaves_no_file_and_the_store_logs_on(tmp_path):
    """store._Write: a turn whose ops streamed and that then fails (or whose every part was cut) deletes its record's
    file; the next large turn streams again; after a crash (the log closed with no checkpoint) every committed turn
    replays, and none of the failed one."""
    store = Store(str(tmp_path / "data"), durability="wal", checkpoint_interval=3600)
    wal_dir = os.path.join(store.path, "wal")
    big = os.urandom(wal.STREAM_PIECE // 3)
    try:
        store.wal.log.wait_spare()
        before = set(os.listdir(wal_dir))
        with pytest.raises(RuntimeError):
            with store.write() as txn:
                for i in range(4):
                    txn.txn.put(b"failed-%d" % i, big, db=store.data)
                assert store.wal_ops.streaming
                raise RuntimeError("the turn fails")
        assert set(os.listdir(wal_dir)) == before, "the failed turn's file is left"
        with store.write() as txn:
            for i in range(4):
                txn.txn.put(b"kept-%d" % i, big, db=store.data)
            assert store.wal_ops.streaming
        assert len(set(os.listdir(wal_dir)) - before) == 1
        with store.write() as txn:
            txn.txn.put(b"small", b"x", db=store.data)
    finally:
        store.wal.unpin()
        store.wal.log.close()  # a crash: no last checkpoint
        store.env.close()
    store = Store(str(tmp_path / "data"), durability="wal")
    try:
        with store.read() as txn:
            assert [txn.txn.get(b"kept-%d" % i, db=store.data) for i in range(4)] == [big] * 4
            assert txn.txn.get(b"small", db=store.data) == b"x"
            assert txn.txn.get(b"failed-0", db=store.data) is None
    finally:
        store.close()


_KILLED_MID_RECORD = r'''
import os, signal, sys
import lmdb
from armonik_zmq._core import LoggedTxn, WalOps
from armonik_zmq.broker import wal

directory, stage = sys.argv[1], sys.argv[2]
log = wal.Log(directory)
log.start(0)
env = lmdb.open(directory + "-env", map_size=1 << 28, max_dbs=2, sync=False, metasync=False)
table = env.open_db(b"t")
ops = WalOps()
ops.spill_to(log.spill, 4 * wal.BLOCK)

def turn(name, n, size):
    ops.clear(log.headroom)
    raw = env.begin(write=True)
    logged = LoggedTxn(raw, ops, {table: 0})
    for i in range(n):
        logged.put(b"%s-%d" % (name, i), bytes([i % 251]) * size, db=table)
    raw.commit()
    return ops

for name, size in ((b"a", 100), (b"b", 3000), (b"c", 100)):  # in a segment, streamed, in a segment: complete
    log.append(turn(name, 20, size))
turn(b"d", 30, 3000)
assert ops.streaming
if stage in ("rest", "head"):
    ops_crc, _size = ops.stream_end()
    if stage == "head":
        ops.stream_head(wal.frame_streamed(log.next_seq, len(ops), ops_crc))
if stage == "complete":
    log.append(ops)
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize("stage", ["mid", "rest", "head", "complete"])
def test_a_broker_killed_while_a_record_streams_replays_every_record_before_it(tmp_path, stage):
    """A real SIGKILL while a large record streams: with some of its pieces written ("mid"), or all but its first
    block ("rest"), the replay stops before it (its first block, with the head, is zeros); with its head written
    ("head": a process crash loses no write that returned) or flushed ("complete"), it replays. The start after
    the crash deletes its file. Then a record torn on disk (a block of it lost, as a power loss may leave it) ends
    the replay there, logged."""
    directory = str(tmp_path / "wal")
    child = subprocess.run([sys.executable, "-c", _KILLED_MID_RECORD, directory, stage], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    replayed = list(wal.Log(directory).replay(0))
    names = [{key.split(b"-")[0] for _, _, key, _ in wal.decode_ops(ops)} for _, ops in replayed]
    assert names == [{b"a"}, {b"b"}, {b"c"}] + ([{b"d"}] if stage in ("head", "complete") else [])
    assert [seq for seq, _ in replayed] == list(range(1, len(names) + 1))
    last = sorted(glob.glob(os.path.join(directory, "[0-9]*.wal")))[-1]
    if stage in ("head", "complete"):  # torn on disk: a block in the middle of the record lost
        with open(last, "r+b") as f:
            f.seek(3 * wal.BLOCK)
            f.write(bytes(wal.BLOCK))
        log = wal.Log(directory)
        records = list(log.replay(0))
        assert [seq for seq, _ in records] == [1, 2, 3]
    log = wal.Log(directory)
    list(log.replay(0))
    log.start(log.next_seq - 1)  # after the start's checkpoint (the broker's)
    assert not os.path.exists(last) and not glob.glob(os.path.join(directory, "*.tmp"))
    log.append(b"after")
    log.close()
    assert [ops for _, ops in wal.Log(directory).replay(log.next_seq - 2)] == [b"after"]


def test_a_power_loss_after_a_streamed_record_loses_none_of_its_data(tmp_path_factory):
    """A real broker: results created with megabytes of data in one request (one turn, its record streamed to a file
    of its own), then kill -9 and data.mdb back as it was at the start's checkpoint: the replay of the streamed
    record gives every byte back."""
    with broker_only(tmp_path_factory, *WAL_ARGS) as cluster:
        data_path = os.path.join(cluster.data_dir, "data.mdb")
        at_checkpoint = data_path + ".at-checkpoint"
        shutil.copyfile(data_path, at_checkpoint)
        blobs = {f"big{i}": os.urandom(wal.STREAM_PIECE // 2 + i) for i in range(4)}
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            session_id = api.session()
            made = api.results.create_results(blobs, session_id, batch_size=len(blobs))
        sizes = [os.path.getsize(p) for p in glob.glob(os.path.join(cluster.data_dir, "wal", "[0-9]*.wal"))]
        assert any(size > 2 * wal.STREAM_PIECE and size != wal.SEGMENT_BYTES for size in sizes), sizes
        cluster.kill_broker()
        shutil.copyfile(at_checkpoint, data_path)
        cluster.start_broker()
        cluster.wait_ready()
        with connect(cluster.endpoint, timeout=60) as conn:
            api = Api(conn)
            for name, data in blobs.items():
                assert api.results.download_result_data(made[name].result_id, session_id) == data, name
