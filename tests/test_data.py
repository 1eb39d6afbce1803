"""Result data (ARMONIK.md 1.3, seed 002 21.3/21.4): delayed upload, import from object storage,
purge and deletion, owners, and chunked storage that keeps large results out of the broker's memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading

import pytest

from armonik_zmq.broker.store import Store
from armonik_zmq.client import ResultStatus, SessionStatus, TaskDefinition, TaskStatus, connect
from armonik_zmq.errors import ArmoniKZmqError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from armonik_zmq.protocol import ErrorCode, Op
from conftest import PROCESSOR, WORKER_ENV, Api, broker_only, make_cluster

MiB = 1 << 20


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """The object storage directory the module's broker imports from, with a file outside it."""
    root = tmp_path_factory.mktemp("objects")
    (root / "inputs").mkdir()
    (root / "inputs" / "square6.json").write_bytes(json.dumps({"op": "square", "x": 6}).encode())
    (root / "inputs" / "seven.json").write_bytes(b"7")
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_bytes(b"not yours")
    (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, storage):
    with make_cluster(tmp_path_factory.mktemp("cluster"), broker_args=("--object-storage", str(storage))) as c:
        yield c


def payload(obj) -> bytes:
    return json.dumps(obj).encode()


def test_delayed_upload_of_payload_and_dependency(api):
    """21.3: a task whose payload and dependency are uploaded after submission waits PENDING for both."""
    sid = api.session()
    meta = api.results.create_results_metadata(["payload", "dep", "out"], sid)
    pid, dep, out = (meta[n].result_id for n in ("payload", "dep", "out"))
    task = api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=pid, expected_output_ids=[out],
                                                       data_dependencies=[dep])])[0]
    assert api.tasks.get_task(task.id).status == TaskStatus.PENDING
    api.results.upload_result_data(pid, sid, payload({"op": "sum"}))
    assert api.tasks.get_task(task.id).status == TaskStatus.PENDING
    assert api.results.get_result(out).status == ResultStatus.CREATED
    api.results.upload_result_data(dep, sid, b"40")
    assert api.value(sid, out) == 40
    done = api.tasks.get_task(task.id)
    assert done.status == TaskStatus.COMPLETED and done.submitted_at >= done.created_at


def test_import_binds_files_of_the_object_storage(api, storage):
    """21.4: imported data completes the result without a copy and releases the tasks waiting on it."""
    sid = api.session()
    meta = api.results.create_results_metadata(["payload", "dep", "out", "out2"], sid)
    pid, dep, out, out2 = (meta[n].result_id for n in ("payload", "dep", "out", "out2"))
    imported = api.results.import_data(sid, [(pid, b"inputs/square6.json")])
    row = imported[pid]
    assert row.status == ResultStatus.COMPLETED and row.opaque_id == b"inputs/square6.json"
    assert row.size == (storage / "inputs" / "square6.json").stat().st_size and row.completed_at is not None
    assert api.results.download_result_data(pid, sid) == (storage / "inputs" / "square6.json").read_bytes()
    api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=pid, expected_output_ids=[out])])
    assert api.value(sid, out) == 36
    # an import also releases a task submitted before it (its dependency, here by a str opaque id)
    sum_payload = api.results.create_results({"sum": payload({"op": "sum"})}, sid)["sum"].result_id
    waiting = api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=sum_payload, expected_output_ids=[out2],
                                                          data_dependencies=[dep])])[0]
    assert api.tasks.get_task(waiting.id).status == TaskStatus.PENDING
    assert api.results.import_data(sid, [(dep, "inputs/seven.json")])[dep].status == ResultStatus.COMPLETED
    assert api.value(sid, out2) == 7


@pytest.mark.parametrize("opaque_id, error, words", [
    (b"../outside/secret", InvalidArgumentError, "outside the object storage"),
    ("inputs/../../x", InvalidArgumentError, "outside the object storage"),
    (b"/etc/passwd", InvalidArgumentError, "relative"),
    ("escape", InvalidArgumentError, "outside the object storage"),
    (b"\xff\xfe", InvalidArgumentError, "UTF-8"),
    ("inputs/nothing-here", NotFoundError, "no object"),
    ("inputs", NotFoundError, "no object"),
])
def test_import_refuses_what_is_not_a_file_of_the_storage(api, opaque_id, error, words):
    sid = api.session()
    rid = api.results.create_results_metadata(["r"], sid)["r"].result_id
    with pytest.raises(error, match=words) as exc:
        api.results.import_data(sid, [(rid, opaque_id)])
    assert "results[0].opaque_id" in exc.value.message
    assert api.results.get_result(rid).status == ResultStatus.CREATED


def test_an_imported_object_that_vanished_fails_its_readers(api, storage):
    sid = api.session()
    (storage / "inputs" / "vanishing").write_bytes(b"5")
    rid = api.results.create_results_metadata(["v"], sid)["v"].result_id
    api.results.import_data(sid, [(rid, "inputs/vanishing")])
    (storage / "inputs" / "vanishing").unlink()
    with pytest.raises(FailedPreconditionError, match="cannot be read any more"):
        api.results.download_result_data(rid, sid)
    task, (out,) = api.submit(sid, {"op": "sum"}, deps=[rid])
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability(out, sid)
    failed = api.tasks.get_task(task.id)
    assert failed.status == TaskStatus.ERROR and "cannot be read any more" in failed.status_message


def test_import_only_into_a_result_without_data(api):
    sid = api.session()
    done = api.results.create_results({"d": b"data"}, sid)["d"].result_id
    with pytest.raises(FailedPreconditionError, match="COMPLETED"):
        api.results.import_data(sid, [(done, b"inputs/seven.json")])
    fresh = api.results.create_results_metadata(["f"], sid)["f"].result_id
    with pytest.raises(FailedPreconditionError, match="only be imported once"):
        api.results.import_data(sid, [(fresh, b"inputs/seven.json"), (fresh, b"inputs/seven.json")])
    assert api.results.get_result(fresh).status == ResultStatus.CREATED


def test_purge_keeps_manual_deletion_and_imported_data(api, storage):
    sid = api.session()
    plain = api.results.create_results({"plain": b"gone after purge"}, sid)["plain"].result_id
    kept = api.results.create_results_metadata(["kept"], sid, manual_deletion=True)["kept"]
    assert kept.manual_deletion
    api.results.upload_result_data(kept.result_id, sid, b"survives purge")
    imported = api.results.create_results_metadata(["imported"], sid)["imported"].result_id
    api.results.import_data(sid, [(imported, b"inputs/seven.json")])
    api.sessions.close_session(sid)
    assert api.sessions.purge_session(sid).status == SessionStatus.PURGED
    assert api.results.get_result(plain).status == ResultStatus.DELETED
    with pytest.raises(FailedPreconditionError, match="DELETED"):
        api.results.download_result_data(plain, sid)
    assert api.results.get_result(kept.result_id).status == ResultStatus.COMPLETED
    assert api.results.download_result_data(kept.result_id, sid) == b"survives purge"
    assert api.results.download_result_data(imported, sid) == b"7"
    api.sessions.delete_session(sid)
    assert (storage / "inputs" / "seven.json").read_bytes() == b"7"


def test_delete_result_data_keeps_the_metadata(api, storage):
    sid = api.session()
    created = api.results.create_results({"a": b"aaa", "b": b"bbb"}, sid, batch_size=2)
    a, b = created["a"].result_id, created["b"].result_id
    imported = api.results.create_results_metadata(["i"], sid)["i"].result_id
    api.results.import_data(sid, [(imported, b"inputs/seven.json")])
    empty = api.results.create_results_metadata(["e"], sid)["e"].result_id
    with pytest.raises(FailedPreconditionError, match=f"{empty} is CREATED"):
        api.results.delete_result_data([a, empty], sid)
    assert api.results.get_result(a).status == ResultStatus.COMPLETED  # all or nothing
    api.results.delete_result_data([a, imported], sid)
    api.results.delete_result_data([a], sid)  # already deleted: nothing to do
    for rid in (a, imported):
        row = api.results.get_result(rid)
        assert row.status == ResultStatus.DELETED and row.session_id == sid and row.size > 0
        with pytest.raises(FailedPreconditionError, match="DELETED"):
            api.results.download_result_data(rid, sid)
    assert (storage / "inputs" / "seven.json").read_bytes() == b"7"
    assert api.results.download_result_data(b, sid) == b"bbb"
    out = api.results.create_results_metadata(["o"], sid)["o"].result_id
    with pytest.raises(Exception, match="DELETED"):
        api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=a, expected_output_ids=[out])])


def test_a_task_whose_input_data_was_deleted_ends_in_error(api):
    sid = api.session()
    kept = api.results.create_results({"k": b"1"}, sid)["k"].result_id
    late = api.results.create_results_metadata(["late"], sid)["late"].result_id
    task, (out,) = api.submit(sid, {"op": "sum"}, deps=[kept, late])
    api.results.delete_result_data([kept], sid)
    api.results.upload_result_data(late, sid, b"2")  # the task is queued now, with an input gone
    with pytest.raises(RuntimeError, match="aborted"):
        api.events.wait_for_result_availability(out, sid)
    failed = api.tasks.get_task(task.id)
    assert failed.status == TaskStatus.ERROR and f"input result {kept} has no data" in failed.status_message


def test_get_owner_task_id_follows_ownership_transfer(api, tmp_path):
    sid = api.session()
    gate = tmp_path / "gate"
    parent, (out,) = api.submit(sid, {"op": "gate", "gate": str(gate), "then": {"op": "fanout", "xs": [1, 2]}})
    payload_id = parent.payload_id
    assert api.results.get_owner_task_id([out, payload_id], sid) == {out: parent.id, payload_id: ""}
    gate.touch()
    assert api.value(sid, out) == 5
    owner = api.results.get_owner_task_id([out], sid)[out]
    assert owner != parent.id and api.tasks.get_task(owner).created_by == parent.id
    with pytest.raises(NotFoundError, match="nope"):
        api.results.get_owner_task_id(["nope"], sid)


def test_large_result_moves_in_chunks_end_to_end(api):
    """~50 MiB: uploaded in parts, read by a task, a same-size result produced, downloaded in ranges."""
    sid = api.session()
    data = os.urandom(50 * MiB + 12345)
    dep = api.results.create_results_metadata(["big"], sid)["big"].result_id
    api.results.upload_result_data(dep, sid, data)
    stored = api.results.get_result(dep)
    assert stored.status == ResultStatus.COMPLETED and stored.size == len(data)
    _, (out,) = api.submit(sid, {"op": "reverse-dep"}, deps=[dep])
    api.events.wait_for_result_availability(out, sid)
    back = api.results.download_result_data(out, sid)
    assert len(back) == len(data)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data[::-1]).digest()
    assert hashlib.sha256(api.results.download_result_data(dep, sid)).digest() == hashlib.sha256(data).digest()


def test_download_ranges_of_chunks(api):
    sid = api.session()
    chunk = api.results.get_service_config()
    data = os.urandom(2 * chunk + 10)
    rid = api.results.create_results({"r": data}, sid)["r"].result_id
    header, frames = api.conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=sid, result_ids=[rid], first_chunk=1,
                                   max_chunks=1)
    assert header["sizes"] == [len(data)] and header["chunks"] == [3] and header["frames"] == [1]
    assert bytes(frames[0]) == data[chunk:2 * chunk]
    _, frames = api.conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=sid, result_ids=[rid], first_chunk=2)
    assert b"".join(frames) == data[2 * chunk:]
    with pytest.raises(ArmoniKZmqError, match="past the end") as exc:
        api.conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=sid, result_ids=[rid], first_chunk=3)
    assert exc.value.code == ErrorCode.OUT_OF_RANGE
    with pytest.raises(InvalidArgumentError, match="one result"):
        api.conn.call(Op.DOWNLOAD_RESULT_DATA, session_id=sid, result_ids=[rid, rid], max_chunks=1)


def test_chunked_upload_completes_only_with_its_last_part(api):
    sid = api.session()
    rid = api.results.create_results_metadata(["r"], sid)["r"].result_id

    def part(data: bytes, offset: int, final: bool):
        return api.conn.call(Op.UPLOAD_RESULT_DATA, frames=[data], session_id=sid, result_ids=[rid], offset=offset,
                             final=final)[0]

    assert part(b"abc", 0, False)["received"] == 3
    assert part(b"defg", 3, False)["received"] == 7
    # an upload left there is no data: the result is still without it
    assert api.results.get_result(rid).status == ResultStatus.CREATED
    with pytest.raises(FailedPreconditionError, match="CREATED"):
        api.results.download_result_data(rid, sid)
    with pytest.raises(FailedPreconditionError, match="7 byte"):
        part(b"x", 5, False)
    # offset 0 starts over
    part(b"hello ", 0, False)
    reply = part(b"world", 6, True)
    assert reply["results"][0]["status"] == ResultStatus.COMPLETED and reply["results"][0]["size"] == 11
    assert api.results.download_result_data(rid, sid) == b"hello world"
    with pytest.raises(FailedPreconditionError, match="COMPLETED"):
        part(b"more", 11, True)
    other = api.results.create_results_metadata(["o"], sid)["o"].result_id
    with pytest.raises(InvalidArgumentError, match="one result"):
        api.conn.call(Op.UPLOAD_RESULT_DATA, frames=[b"a", b"b"], counts=[1, 1], session_id=sid,
                      result_ids=[rid, other], offset=0, final=True)


def test_empty_and_chunk_sized_data(api):
    sid = api.session()
    chunk = api.results.get_service_config()
    cases = {"empty": b"", "one": os.urandom(chunk), "two": os.urandom(2 * chunk)}
    ids = {}
    for name, data in cases.items():
        ids[name] = api.results.create_results_metadata([name], sid)[name].result_id
        api.results.upload_result_data(ids[name], sid, data)
    for name, data in cases.items():
        assert api.results.get_result(ids[name]).size == len(data)
        assert api.results.download_result_data(ids[name], sid) == data


def test_store_keeps_objects_as_chunks(tmp_path):
    """The LMDB layer alone: any split of the bytes into frames or upload parts reads back the same."""
    rng = random.Random(7)
    store = Store(str(tmp_path / "lmdb"), map_size=1 << 26, sync=False, chunk_size=7)
    try:
        for case in range(300):
            data = rng.randbytes(rng.randint(0, 60))
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 5))))
            parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            with store.write() as txn:
                rid = f"r{case}"
                if case % 2:
                    assert txn.put_object(rid, parts) == len(data)
                else:
                    for i, part in enumerate(parts):
                        txn.stage_object(rid, [part], sum(map(len, parts[:i])))
                        assert txn.object_size(rid) is None  # staged: nobody reads it yet
                    assert txn.commit_object(rid) == len(data)
                chunks = list(txn.iter_object_chunks(rid))
                assert b"".join(chunks) == data and txn.object_size(rid) == len(data)
                assert len(chunks) == txn.object_chunks(rid) and {len(c) for c in chunks[:-1]} <= {7}
                first = rng.randint(0, len(chunks) - 1)
                assert b"".join(txn.iter_object_chunks(rid, first, 2)) == data[first * 7:(first + 2) * 7]
                assert txn.delete_object(rid) and txn.object_size(rid) is None
        with store.read() as txn:
            assert txn.txn.stat(store.data)["entries"] == 0
    finally:
        store.close()


def test_data_stored_over_older_or_staged_data_replaces_every_chunk_of_it(tmp_path):
    """put_object over an unfinished chunked upload, or over data already there, leaves only its own chunks."""
    store = Store(str(tmp_path / "lmdb"), map_size=1 << 26, sync=False, chunk_size=7)
    try:
        with store.write() as txn:
            txn.stage_object("staged", [b"s" * 30], 0)  # 5 chunks, unfinished
            txn.put_object("older", [b"o" * 30])  # 5 chunks, complete
            for rid in ("staged", "older"):
                assert txn.put_object(rid, b"new") == 3
                assert list(txn.iter_object_chunks(rid)) == [b"new"] and txn.object_chunks(rid) == 1
            assert txn.txn.stat(store.data)["entries"] == 4  # each one's chunk and object row
    finally:
        store.close()


@pytest.fixture(scope="module")
def lone_broker(tmp_path_factory):
    """A broker alone (no agent, no object storage, no fsync): data operations only."""
    with broker_only(tmp_path_factory, "--no-sync") as cluster:
        yield cluster


def test_up_serves_an_object_storage(tmp_path, storage):
    """`armonik-zmq up --object-storage DIR`: the local cluster's broker imports from DIR."""
    endpoint = f"ipc://{tmp_path}/frontend"
    up = subprocess.Popen([sys.executable, "-m", "armonik_zmq", "--log-level", "WARNING", "up", "--data-dir",
                           str(tmp_path / "data"), "--endpoint", endpoint, "--agents-endpoint",
                           f"ipc://{tmp_path}/backend", "--workers", "1", "--processor", PROCESSOR,
                           "--object-storage", str(storage)], env={**os.environ, **WORKER_ENV})
    try:
        with connect(endpoint, timeout=60) as conn:
            api = Api(conn)
            sid = api.session()
            meta = api.results.create_results_metadata(["payload", "out"], sid)
            api.results.import_data(sid, [(meta["payload"].result_id, "inputs/square6.json")])
            api.tasks.submit_tasks(sid, [TaskDefinition(payload_id=meta["payload"].result_id,
                                                        expected_output_ids=[meta["out"].result_id])])
            assert api.value(sid, meta["out"].result_id) == 36
    finally:
        up.terminate()
        up.wait(60)
    assert up.returncode == 0


def test_import_needs_an_object_storage(lone_broker):
    with connect(lone_broker.endpoint, timeout=30) as conn:
        api = Api(conn)
        sid = api.session()
        rid = api.results.create_results_metadata(["r"], sid)["r"].result_id
        with pytest.raises(FailedPreconditionError, match="--object-storage"):
            api.results.import_data(sid, [(rid, b"x")])


def _rss(pid: int) -> tuple[int, int]:
    """Return (VmRSS, RssAnon) of a process, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


class PeakMemory:
    """Sample a process's (VmRSS, RssAnon) while the ``with`` block runs; keep the peaks and the start."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = _rss(pid)
        self.rss = self.anon = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            rss, anon = _rss(self.pid)
            self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
            self._done.wait(0.005)

    @property
    def anon_growth(self) -> int:
        return self.anon - self.start[1]

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def test_broker_memory_stays_bounded_during_large_transfers(lone_broker):
    """256 MiB up and down: the broker holds a few chunks at a time, never the whole result (let alone twice)."""
    size = 256 * MiB
    data = os.urandom(size)
    with connect(lone_broker.endpoint, timeout=60) as conn:
        api = Api(conn)
        sid = api.session()
        rid = api.results.create_results_metadata(["big"], sid)["big"].result_id
        with PeakMemory(lone_broker.broker.pid) as up:
            api.results.upload_result_data(rid, sid, data)
        assert api.results.get_result(rid).size == size
        with PeakMemory(lone_broker.broker.pid) as down:
            back = api.results.download_result_data(rid, sid)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # What the broker copies itself (anonymous memory) stays a few messages' worth. VmRSS also counts the
    # LMDB pages a download maps: the data once, as file pages.
    for name, peak in (("upload", up), ("download", down)):
        assert peak.anon_growth < 64 * MiB, f"{name}: broker anonymous memory grew by {peak.anon_growth >> 20} MiB"
    assert down.rss < 1.5 * size, f"broker VmRSS peaked at {down.rss >> 20} MiB for a {size >> 20} MiB download"
