"""Large data on one host: sealed memfds over the broker's data socket (shm.py), and T14 (memfd hygiene).

Real broker, agent and worker processes; results produced by the function processor (futures API)
or by tests/processors.py (ArmoniK-style API).
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import cloudpickle
import msgpack
import numpy as np
import pytest

import armonik_zmq
from armonik_zmq import shm
from armonik_zmq.client import ArmoniKResults, ArmoniKSessions, connect
from armonik_zmq.cluster import LocalProcesses
from armonik_zmq.errors import DataCorruptError
from reliability import figure

# Workers cannot import this module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FUNCTIONS = "armonik_zmq.functions:processor"
MiB = 1 << 20


def pattern(i: int, n_bytes: int) -> np.ndarray:
    """A result that differs for every task and every position: a wrong or torn byte shows."""
    return np.arange(n_bytes // 8, dtype=np.int64) * 7919 + i


def make_array(i: int, n_bytes: int) -> np.ndarray:
    return pattern(i, n_bytes)


def segment_files(cluster: LocalProcesses) -> list[str]:
    d = os.path.join(cluster.data_dir, "segments")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:g}s")
        time.sleep(0.1)


def backing_mmap(array) -> object:
    """Follow an array's bases down to the object that owns the memory."""
    obj = array
    while True:
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None:
            return obj
        obj = nxt


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalProcesses(data_dir=str(tmp_path_factory.mktemp("shm") / "lmdb"), workers=2, processor=FUNCTIONS,
                        broker_args=("--shm-grace", "1")) as c:
        yield c


@pytest.fixture
def client(cluster):
    with armonik_zmq.Client(cluster.endpoint) as c:
        yield c


def test_numpy_result_comes_back_as_a_read_only_view_of_the_mapping(client, cluster):
    assert client._data is not None, "the client is on the broker's host: it must use the data socket"
    before = len(segment_files(cluster))
    value = client.submit(make_array, 3, 4 * MiB).result(60)
    assert np.array_equal(value, pattern(3, 4 * MiB))
    assert not value.flags.writeable
    assert not value.flags.owndata
    assert isinstance(backing_mmap(value), mmap.mmap), "the array must be a view of the mapping, not a copy"
    assert len(segment_files(cluster)) == before + 1
    # small values stay inline (no segment for them)
    assert client.submit(make_array, 1, 1024).result(60).nbytes == 1024
    assert len(segment_files(cluster)) == before + 1
    # a large value feeds another task as a data dependency
    assert client.submit(np.sum, client.submit(make_array, 5, 2 * MiB)).result(60) == pattern(5, 2 * MiB).sum()


class SlowToFree(bytearray):
    """Memory whose release takes seconds (as a big array's munmap takes milliseconds)."""

    def __del__(self):
        time.sleep(5)


def slow_to_free_array(n_bytes: int) -> np.ndarray:
    return np.frombuffer(SlowToFree(n_bytes), dtype=np.uint8)


def test_a_big_result_is_reported_before_its_memory_is_freed(client):
    """The worker sends a big result's output, then frees the memory the task built it in: the client never
    waits for the free (a 256 MiB array in 4 KiB pages takes ~17 ms to unmap)."""
    started = time.monotonic()
    value = client.submit(slow_to_free_array, 8 * MiB).result(60)
    assert value.nbytes == 8 * MiB and is_mapped(value)
    assert time.monotonic() - started < 4, "the output waited for the result's memory to be freed (5 s)"


def is_mapped(array) -> bool:
    return not array.flags.writeable and isinstance(backing_mmap(array), mmap.mmap)


def test_a_large_input_reaches_the_worker_by_descriptor(client):
    """Above the DISPATCH inline limit (1 MiB), a segment input is mapped by the worker, not fetched as bytes."""
    assert client.submit(is_mapped, client.submit(make_array, 6, 3 * MiB)).result(60) is True
    # a small one travels inline (a private copy in the worker)
    assert client.submit(is_mapped, client.submit(make_array, 6, 512 << 10)).result(60) is False


def test_segment_files_and_socket_are_private(cluster, client):
    client.submit(make_array, 4, MiB).result(60)
    seg_dir = os.path.join(cluster.data_dir, "segments")
    assert stat.S_IMODE(os.stat(seg_dir).st_mode) == 0o700
    sock = os.path.join(cluster.data_dir, "data.sock")
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
    for name in segment_files(cluster):
        assert shm.segment_mode_ok(os.path.join(seg_dir, name)), name
    # the broker holds no memfd once its data is in the file, and nothing of ours is named in /dev/shm
    assert not [n for n in os.listdir("/dev/shm") if "armonik" in n]


def test_arraylike_download_api_maps_without_copy(cluster, client):
    fut = client.submit(make_array, 9, 2 * MiB)
    fut.result(60)
    with connect(cluster.endpoint) as conn:
        results = ArmoniKResults(conn)
        view = results.download_result_view(fut.result_id, client.session_id)
        assert isinstance(backing_mmap(view), mmap.mmap) and view.readonly
        data = results.download_result_data(fut.result_id, client.session_id)  # one copy of the mapping
        assert isinstance(data, bytes) and bytes(view) == data
        assert results._download_frames(fut.result_id, client.session_id) == data  # what other hosts get
        assert np.array_equal(armonik_zmq.functions.load_result(view), pattern(9, 2 * MiB))
        # many at once: the segments mapped in one data-socket request, a small (inline) one downloaded
        small = client.submit(make_array, 10, 1024)
        small.result(60)
        views = results.download_result_views([fut.result_id, small.result_id], client.session_id)
        assert isinstance(backing_mmap(views[fut.result_id]), mmap.mmap) and bytes(views[fut.result_id]) == data
        assert views[small.result_id].readonly
        assert np.array_equal(armonik_zmq.functions.load_result(views[small.result_id]), pattern(10, 1024))


def test_results_stay_mapped_through_a_broker_restart(tmp_path):
    """A result written before a broker SIGKILL is still there after it, and clients map it again
    (their data socket reconnects to the new broker), through both APIs."""
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, processor=FUNCTIONS) as cl:
        with armonik_zmq.Client(cl.endpoint) as c, connect(cl.endpoint, timeout=60) as conn:
            fut = c.submit(make_array, 12, 2 * MiB)
            assert np.array_equal(fut.result(60), pattern(12, 2 * MiB))
            results = ArmoniKResults(conn)
            assert isinstance(backing_mmap(results.download_result_view(fut.result_id, c.session_id)), mmap.mmap)
            cl.kill_broker()
            cl.start_broker()
            cl.wait_ready()
            view = results.download_result_view(fut.result_id, c.session_id)
            assert isinstance(backing_mmap(view), mmap.mmap), "mapped again, not downloaded"
            # the new broker did not see it adopted: its readers hash it (an OS crash could have torn it)
            assert "unchanged" not in data_socket_item(cl.data_dir, c.session_id, fut.result_id)
            assert np.array_equal(armonik_zmq.functions.load_result(view), pattern(12, 2 * MiB))
            # and a task run after the restart writes and maps as before
            assert is_mapped(c.submit(make_array, 13, 2 * MiB).result(60))


def test_client_without_shared_memory_gets_the_data_in_chunks(cluster):
    """A client on another host (here: shared memory refused) reads the same results over the socket."""
    with armonik_zmq.Client(cluster.endpoint, shared_memory=False) as c:
        assert c._data is None
        value = c.submit(make_array, 11, 6 * MiB).result(60)
        assert np.array_equal(value, pattern(11, 6 * MiB))
        assert value.flags.owndata or not isinstance(backing_mmap(value), mmap.mmap)


def test_shared_memory_off_still_moves_large_results(tmp_path):
    with LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=1, processor=FUNCTIONS,
                        broker_args=("--shm-threshold", "0")) as c:
        with armonik_zmq.Client(c.endpoint) as client:
            assert client._data is None
            assert np.array_equal(client.submit(make_array, 2, 3 * MiB).result(60), pattern(2, 3 * MiB))
        assert not os.path.exists(os.path.join(c.data_dir, "data.sock"))
        assert segment_files(c) == []


def test_purge_and_delete_free_their_segments(cluster):
    before = set(segment_files(cluster))
    with armonik_zmq.Client(cluster.endpoint) as client:
        futs = [client.submit(make_array, i, MiB) for i in range(4)]
        client.gather(futs, timeout=60)
        files = set(segment_files(cluster)) - before
        assert len(files) == 4
        sid = client.session_id
        with connect(cluster.endpoint) as conn:
            ArmoniKResults(conn).delete_result_data([futs[0].result_id], sid)
            wait_until(lambda: len(set(segment_files(cluster)) & files) == len(files) - 1, 15,
                       "the deleted result's segment is still there")
    with connect(cluster.endpoint) as conn:
        ArmoniKSessions(conn).purge_session(sid)
    wait_until(lambda: not set(segment_files(cluster)) & files, 15, "purged segments are still there")


def test_released_futures_free_their_segments_and_keep_their_values(cluster, client):
    before = set(segment_files(cluster))
    futures = [client.submit(make_array, i, MiB) for i in (31, 32)]
    values = client.gather(futures, 60)
    made = set(segment_files(cluster)) - before
    assert len(made) == 2
    client.release(futures)
    wait_until(lambda: not set(segment_files(cluster)) & made, 15, "released segments are still there")
    assert np.array_equal(values[0], pattern(31, MiB))  # the mapping outlives its file
    assert np.array_equal(futures[1].result(), pattern(32, MiB))
    running = client.submit(time.sleep, 3)
    with pytest.raises(ValueError, match="finished futures only"):
        client.release([running])
    running.result(60)


def test_checksum_mismatch_is_detected_never_returned(cluster, client):
    before = set(segment_files(cluster))
    fut = client.submit(make_array, 21, MiB)
    fut.result(60)
    (name,) = set(segment_files(cluster)) - before
    # damage one byte in the middle of the file, as a torn write or a bad disk would
    path = os.path.join(cluster.data_dir, "segments", name)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.seek(MiB // 2)
        byte = f.read(1)
        f.seek(MiB // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with connect(cluster.endpoint) as conn:
        with pytest.raises(DataCorruptError, match="checksum mismatch"):
            ArmoniKResults(conn).download_result_view(fut.result_id, client.session_id)
        with pytest.raises(DataCorruptError, match="checksum mismatch"):  # the copying call as well
            ArmoniKResults(conn).download_result_data(fut.result_id, client.session_id)
    with armonik_zmq.Client(cluster.endpoint) as other:  # the futures path raises too, never returns the bytes
        views = other._data.get(client.session_id, [fut.result_id])
        assert isinstance(views[fut.result_id], shm.DataError)


def data_socket_item(data_dir: str, session_id: str, result_id: str) -> dict:
    """What the broker's data socket says of one result (its descriptor is closed at once)."""
    channel = shm.DataChannel(os.path.join(data_dir, "data.sock"))
    try:
        reply, fds = channel._request({"op": "get", "session_id": session_id, "result_ids": [result_id]})
    finally:
        channel.close()
    for fd in fds:
        os.close(fd)
    return reply["items"][0]


def test_readers_hash_only_what_the_broker_cannot_vouch_for(cluster, client):
    """A segment nobody changed since the broker adopted it is vouched for: readers skip hashing it (its writer
    hashed those very bytes). Once changed in any way (here made writable: its ctime moves), it is hashed again."""
    before = set(segment_files(cluster))
    fut = client.submit(make_array, 22, MiB)
    fut.result(60)
    (name,) = set(segment_files(cluster)) - before
    assert data_socket_item(cluster.data_dir, client.session_id, fut.result_id).get("unchanged") is True
    os.chmod(os.path.join(cluster.data_dir, "segments", name), 0o600)
    assert "unchanged" not in data_socket_item(cluster.data_dir, client.session_id, fut.result_id)
    with connect(cluster.endpoint) as conn:  # hashed now, and still right
        view = ArmoniKResults(conn).download_result_view(fut.result_id, client.session_id)
        assert np.array_equal(armonik_zmq.functions.load_result(view), pattern(22, MiB))


def test_data_socket_refuses_what_is_not_a_sealed_memfd(cluster):
    path = os.path.join(cluster.data_dir, "data.sock")

    def ask(msg, fds=()):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(path)
        try:
            raw = msg if isinstance(msg, bytes) else msgpack.packb(msg)
            socket.send_fds(s, [raw], list(fds)) if fds else s.sendall(raw)
            data, got, _, _ = socket.recv_fds(s, 1 << 16, 8)
            for fd in got:
                os.close(fd)
            return msgpack.unpackb(data)
        finally:
            s.close()

    unsealed = os.memfd_create("x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(unsealed, b"x" * 100)
    token = os.urandom(16).hex()
    try:
        assert "not sealed" in ask({"op": "put", "token": token, "size": 100, "checksum": "b2:00"}, [unsealed])["error"]
    finally:
        os.close(unsealed)
    fd, size, digest = shm.write_segment([b"y" * 100])
    try:
        assert "token" in ask({"op": "put", "token": "../../etc/passwd", "size": size, "checksum": digest}, [fd])["error"]
        assert "says 99" in ask({"op": "put", "token": token, "size": 99, "checksum": digest}, [fd])["error"]
        assert "exactly one descriptor" in ask({"op": "put", "token": token, "size": size, "checksum": digest})["error"]
    finally:
        os.close(fd)
    assert "error" in ask(b"\xc1garbage")
    assert "unknown op" in ask({"op": "rm -rf"})["error"]
    assert ask({"op": "get", "session_id": "nope", "result_ids": ["x"]})["items"][0]["error"]
    # and it still serves
    with armonik_zmq.Client(cluster.endpoint) as client:
        assert np.array_equal(client.submit(make_array, 1, MiB).result(60), pattern(1, MiB))


def test_results_are_written_straight_into_the_segment_directory(cluster, client):
    """The writer names a file of the broker's segment directory itself: no message, no copy."""
    seg_dir = os.path.join(cluster.data_dir, "segments")
    ch = shm.DataChannel(os.path.join(cluster.data_dir, "data.sock"))
    try:
        ref = ch.put([b"z" * 1000])
        assert os.path.samefile(ch.segment_dir, seg_dir), "the broker must offer its segment directory"
        path = os.path.join(seg_dir, ref["token"])
        st = os.stat(path)
        assert st.st_size == 1000 and stat.S_IMODE(st.st_mode) == 0o400 and st.st_nlink == 1
        assert ref["checksum"] == shm.checksum([b"z" * 1000])
    finally:
        ch.close()
    os.unlink(path)  # named by no row: the sweeper would take it after the grace anyway
    # the futures path uses it too: a value made by a worker is there under its token, mode 0400
    before = set(segment_files(cluster))
    assert np.array_equal(client.submit(make_array, 2, MiB).result(60), pattern(2, MiB))
    (new,) = set(segment_files(cluster)) - before
    assert stat.S_IMODE(os.stat(os.path.join(seg_dir, new)).st_mode) == 0o400


def test_a_segment_holds_its_buffers_exactly_however_they_are_cut(tmp_path):
    """Writes end on 256 KiB boundaries of the file, small buffers sharing one writev: the bytes and the checksum
    must not depend on the cut (more buffers than IOV_MAX, empty ones, ones across a boundary), file or memfd."""
    rng = random.Random(7)
    cases = [[b"x"] * 2000, [], [b""], [bytes(192), os.urandom(MiB + 3), bytes(5)],
             [os.urandom(256 << 10), b"", os.urandom(1)]]
    cases += [[os.urandom(rng.choice([0, 1, 63, 4096, 65536, 262143, 262145, 700000])) for _ in range(rng.randint(1, 9))]
              for _ in range(30)]
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, buffers in enumerate(cases):
            expected = b"".join(buffers)
            size, digest = shm.write_file(dir_fd, f"t{i}", buffers)
            with open(tmp_path / f"t{i}", "rb") as f:
                assert f.read() == expected, f"case {i}"
            assert (size, digest) == (len(expected), shm.checksum([expected])), f"case {i}"
            fd, size, digest = shm.write_segment(buffers)
            try:
                assert os.pread(fd, len(expected) + 1, 0) == expected, f"memfd, case {i}"
                assert (size, digest) == (len(expected), shm.checksum([expected])), f"memfd, case {i}"
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)


def test_numpy_values_pickle_as_cloudpickle_pickles_them():
    """Arrays without objects go through the standard pickler (half the time): the same stream and out-of-band
    buffers as cloudpickle's; other values (an object array, a subclass) still go through cloudpickle."""
    from armonik_zmq import serialization

    class Sub(np.ndarray):
        pass

    arrays = [np.zeros(MiB // 8), np.arange(20000, dtype=np.int32).reshape(100, 200).T,
              np.zeros(10000, dtype=[("a", "i4"), ("b", "f8")]), np.zeros(40000, dtype="M8[s]"), np.zeros(3)]
    for a in arrays:
        ours, theirs = serialization.dumps(a), []
        stream = cloudpickle.dumps(a, protocol=5, buffer_callback=lambda b: theirs.append(b.raw()) if b.raw().nbytes
                                   >= 1 << 16 else True)
        assert bytes(ours[1]) == stream and [bytes(r) for r in ours[2:] if len(r) >= 64] == [bytes(r) for r in theirs]
        blob = b"".join(bytes(memoryview(p).cast("B")) for p in ours)
        back = serialization.loads(blob)
        assert back.dtype == a.dtype and np.array_equal(back, a)
    assert not serialization._plain_array(np.array([object(), 1], dtype=object))
    assert not serialization._plain_array(np.zeros(3).view(Sub))
    assert serialization._plain_array(np.zeros(3))


@pytest.fixture
def segment_store(tmp_path):
    """A real broker Store and SegmentStore on a fresh data directory, in this process."""
    from armonik_zmq.broker.store import Store

    store = Store(str(tmp_path / "lmdb"))
    segments = shm.SegmentStore(store, str(tmp_path / "lmdb"), grace=600)
    try:
        yield segments
    finally:
        segments.close()
        store.env.close()


def test_a_completion_adopts_only_a_complete_private_file_nobody_writes(segment_store):
    assert segment_store.files, "this directory supports O_TMPFILE and leases: writers must use it"
    seg_dir = segment_store.dir
    dir_fd = os.open(seg_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        good = os.urandom(16).hex()
        size, digest = shm.write_file(dir_fd, good, [b"g" * 4096])
        segment_store.adopt(good, size, digest, "result r1")
        assert segment_store.sweep() == 0 and os.path.exists(os.path.join(seg_dir, good))  # pinned meanwhile

        with pytest.raises(shm.DataError, match="is lost"):
            segment_store.adopt(os.urandom(16).hex(), 10, "xxh3:00", "result r2")
        short = os.urandom(16).hex()
        shm.write_file(dir_fd, short, [b"s" * 4096])
        with pytest.raises(shm.DataError, match="holds 4096 bytes, the report says 4095"):
            segment_store.adopt(short, 4095, "xxh3:00", "result r3")
        # still open for writing (its writer could change it under the readers): refused
        token = os.urandom(16).hex()
        writer = os.open(os.path.join(seg_dir, token), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(writer, b"w" * 100)
            with pytest.raises(shm.DataError, match="open for writing"):
                segment_store.adopt(token, 100, "xxh3:00", "result r4")
        finally:
            os.close(writer)
        os.chmod(os.path.join(seg_dir, token), 0o644)  # readable by others: refused too
        with pytest.raises(shm.DataError, match="private file"):
            segment_store.adopt(token, 100, "xxh3:00", "result r5")
        os.chmod(os.path.join(seg_dir, token), 0o400)
        segment_store.adopt(token, 100, "xxh3:00", "result r6")  # now it is fine
        with pytest.raises(shm.DataError, match="invalid segment token"):
            segment_store.adopt("../../etc/passwd", 10, "xxh3:00", "result r7")
    finally:
        os.close(dir_fd)


def test_the_broker_vouches_for_a_bounded_number_of_files(segment_store):
    """Readers skip hashing the files the broker stamped at adoption; past ``max_stamps`` they hash."""
    segment_store.max_stamps = 1
    dir_fd = os.open(segment_store.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tokens = [os.urandom(16).hex() for _ in range(2)]
        for token in tokens:
            size, digest = shm.write_file(dir_fd, token, [b"v" * 4096])
            segment_store.adopt(token, size, digest, f"result {token}")
        vouched = []
        for token in tokens:
            fd = segment_store.open_file(token)
            try:
                vouched.append(segment_store._unchanged(token, fd))
            finally:
                os.close(fd)
        assert vouched == [True, False]
        segment_store.forget(tokens[0])  # its row is gone: the room is free again, and it is not vouched for
        assert len(segment_store._stamps) == 0
    finally:
        os.close(dir_fd)


def test_a_deleted_segment_file_goes_once_its_delete_is_committed_not_at_the_next_sweep(segment_store):
    """Released files are unlinked within a fraction of a second of the commit (their pages are reused at once),
    never before it; the sweep, every 5 s here, would take them later."""
    store = segment_store.store
    store.segments = segment_store  # as the broker wires it: deleting a row releases its file
    assert segment_store.sweep_interval >= 5
    dir_fd = os.open(segment_store.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        token = os.urandom(16).hex()
        size, digest = shm.write_file(dir_fd, token, [b"d" * 4096])
    finally:
        os.close(dir_fd)
    segment_store.adopt(token, size, digest, "result r1")
    with store.write() as txn:
        txn.put_segment("r1", token, size, digest)
    path = segment_store.file_path(token)
    with store.write() as txn:
        txn.delete_object("r1")
        time.sleep(0.5)  # the data thread looks meanwhile: the delete is not committed, the file stays
        assert os.path.exists(path)
    committed = time.monotonic()
    wait_until(lambda: not os.path.exists(path), 2, "the released file is still there")
    assert time.monotonic() - committed < 2


def test_memfd_fallback_is_copied_into_the_segment_file_and_adopted(segment_store):
    """Where writers cannot use the segment directory, a sealed memfd is handed over and copied there."""
    ch = shm.DataChannel(segment_store.path)
    try:
        ch.segment_dir = ""  # as when the broker offers no directory (no O_TMPFILE or leases there)
        data = [b"m" * 100_000, b"n" * 5]
        ref = ch.put(data)
    finally:
        ch.close()
    assert segment_store.stats["put"] == 1 and segment_store.stats["spilled_bytes"] == 100_005
    path = os.path.join(segment_store.dir, ref["token"])
    with open(path, "rb") as f:
        assert f.read() == b"".join(data)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400 and ref["checksum"] == shm.checksum(data)
    segment_store.adopt(ref["token"], ref["size"], ref["checksum"], "result r1")
    with pytest.raises(shm.DataError, match="the report says"):
        segment_store.adopt(ref["token"], ref["size"] + 1, ref["checksum"], "result r2")


def test_a_broker_that_fsyncs_segments_has_its_writers_fsync_them(tmp_path):
    from armonik_zmq.broker.store import Store

    store = Store(str(tmp_path / "lmdb"))
    segments = shm.SegmentStore(store, str(tmp_path / "lmdb"), fsync=True)
    try:
        ch = shm.DataChannel(segments.path)
        try:
            ref = ch.put([b"f" * 3000])
            assert ch._fsync is True and ch.segment_dir == segments.dir  # told by hello
        finally:
            ch.close()
        assert os.path.getsize(os.path.join(segments.dir, ref["token"])) == 3000
    finally:
        segments.close()
        store.env.close()


def test_a_broker_start_removes_what_a_crash_cut_short(tmp_path):
    """A memfd copy (``.part``) or a start-up probe a crash left behind is removed at the next start."""
    from armonik_zmq.broker.store import Store

    seg_dir = tmp_path / "lmdb" / "segments"
    seg_dir.mkdir(parents=True)
    (seg_dir / ("ab" * 16 + ".part")).write_bytes(b"half")
    (seg_dir / "probe-4242-0badf00d").write_bytes(b"\0")
    store = Store(str(tmp_path / "lmdb"))
    segments = shm.SegmentStore(store, str(tmp_path / "lmdb"))
    try:
        assert os.listdir(seg_dir) == []
    finally:
        segments.close()
        store.env.close()


def test_a_writer_killed_while_writing_leaves_no_file(segment_store):
    """The file has no name until it is complete: a SIGKILLed writer leaves nothing, and frees its space."""
    code = ("import os, sys; d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
            "fd = os.open('.', os.O_TMPFILE | os.O_WRONLY, 0o400, dir_fd=d)\n"
            "os.write(fd, b'x' * (64 << 20)); print('written', flush=True); import time; time.sleep(60)")
    before = shutil.disk_usage(segment_store.dir).used
    proc = subprocess.Popen([sys.executable, "-c", code, segment_store.dir], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        assert os.listdir(segment_store.dir) == []
    finally:
        proc.kill()
        proc.wait()
    assert os.listdir(segment_store.dir) == []
    # ext4 may account the freed blocks a little later; 64 MiB must not stay allocated
    wait_until(lambda: shutil.disk_usage(segment_store.dir).used - before < 32 * MiB, 10, "the space stayed used")


_READER = """
import sys
from armonik_zmq import shm
ch = shm.DataChannel(sys.argv[1])
view = ch.get(sys.argv[2], [sys.argv[3]])[sys.argv[3]]
assert not isinstance(view, Exception), view
print(len(view), int(view[len(view) // 2]))
del view
ch.close()
"""


def test_a_reader_that_attaches_and_exits_never_removes_the_segment(cluster, client):
    fut = client.submit(make_array, 8, MiB)
    expected = pattern(8, MiB)
    fut.result(60)
    files = segment_files(cluster)
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _READER, os.path.join(cluster.data_dir, "data.sock"),
                              client.session_id, fut.result_id], capture_output=True, text=True, timeout=60,
                             env={**os.environ})
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.split()[0]) > MiB  # the array and its pickle header
    time.sleep(1.5)  # a sweep or two (grace 1 s here)
    assert segment_files(cluster) == files
    with connect(cluster.endpoint) as conn:
        again = ArmoniKResults(conn).download_result_view(fut.result_id, client.session_id)
        assert np.array_equal(armonik_zmq.functions.load_result(again), expected)


# -- T14 -------------------------------------------------------------------------------------------------

def slow_array(i: int, n_bytes: int, seconds: float) -> np.ndarray:
    time.sleep(seconds)
    return pattern(i, n_bytes)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _memfds(pid: int) -> tuple[int, int]:
    """What segments a process holds open: (memfds, files of the segment directory).

    The broker's memfds are bounded by its writing workers (one put each, answered once copied). Segment
    files are open only while handed over to a reader (a client's batch of up to shm.GET_BATCH descriptors,
    closed once sent), so they are counted apart: at rest the broker holds none.
    """
    memfds = files = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            memfds += target.startswith("/memfd:")
            files += "/segments/" in target
    except OSError:
        pass
    return memfds, files


def _dev_shm_used() -> int:
    return shutil.disk_usage("/dev/shm").used


def test_t14_memfd_hygiene_under_worker_agent_and_broker_kills(tmp_path, scale):
    """T14: 1,000 (CI 100) tasks with 8 MiB results over the memfd path; SIGKILL 10 workers (CI 3), 3 agents
    (CI 1; whole process groups) and the broker once: every result checksum-correct, nothing left in /dev/shm."""
    n_tasks = int(1000 * scale)
    worker_kills, agent_kills = (10, 3) if scale >= 1 else (3, 1)
    size = 8 * MiB
    baseline_shm = _dev_shm_used()
    project_entries = lambda: [n for n in os.listdir("/dev/shm") if "armonik" in n.lower()]  # noqa: E731
    assert project_entries() == []
    cluster = LocalProcesses(data_dir=str(tmp_path / "lmdb"), workers=2, processor=FUNCTIONS, lease=3.0,
                             broker_args=("--shm-grace", "10"))
    agents: list[subprocess.Popen] = []

    def start_agent() -> None:
        args = [sys.executable, "-m", "armonik_zmq.cli", "--log-level", "WARNING", "agent", "--broker",
                cluster.agents_endpoint, "--workers", "2", "--processor", FUNCTIONS]
        # its own process group: a kill takes the agent and its workers at once
        agents.append(subprocess.Popen(args, env=cluster.env, start_new_session=True))

    rng = random.Random(14)
    started = time.monotonic()
    try:
        cluster.start_broker()
        for _ in range(3):
            start_agent()
        cluster.wait_ready()
        with armonik_zmq.Client(cluster.endpoint, retries=20) as client:
            futures = client.map(slow_array, range(n_tasks), [size] * n_tasks, [0.05] * n_tasks, chunksize=50)
            done = lambda: sum(f.done() for f in futures)  # noqa: E731
            # the faults, spread over the run: workers (mostly caught writing), agents, the broker once
            plan = ["worker"] * worker_kills + ["agent"] * agent_kills + ["broker"]
            rng.shuffle(plan)
            killed = {"worker": 0, "agent": 0, "broker": 0}
            held, handed = [], []  # the broker's memfds and open segment files, sampled while it works

            def progressed(target: int) -> bool:
                memfds, files = _memfds(cluster.broker.pid)
                held.append(memfds)
                handed.append(files)
                return done() >= target

            for k, fault in enumerate(plan):
                wait_until(lambda: progressed(n_tasks * (k + 1) // (len(plan) + 2)), 300, "the run stalled")
                live = [a for a in agents if a.poll() is None]
                if fault == "worker":
                    workers = [w for a in live for w in _children(a.pid)]
                    if workers:
                        os.kill(rng.choice(workers), signal.SIGKILL)
                        killed["worker"] += 1
                elif fault == "agent":
                    victim = rng.choice(live)
                    os.killpg(victim.pid, signal.SIGKILL)
                    victim.wait()
                    killed["agent"] += 1
                    start_agent()  # the supervisor's respawn
                else:
                    cluster.kill_broker()
                    cluster.start_broker()
                    killed["broker"] += 1
            values = client.gather(futures, timeout=600)  # hashed on read unless the broker vouches for the file
            wrong = [i for i, v in enumerate(values) if not np.array_equal(v, pattern(i, size))]
            assert wrong == [], f"{len(wrong)} result(s) with wrong data, e.g. tasks {wrong[:5]}"
            # most went through memfds (a result written while the broker is down goes over the socket),
            # and were mapped, not downloaded (a batch read while the broker restarts is downloaded)
            mapped = sum(isinstance(backing_mmap(v), mmap.mmap) for v in values)
            segments = len(segment_files(cluster))
            assert segments >= len(values) * 3 // 4 and mapped >= segments // 2, \
                f"{segments} segment files, {mapped} results mapped, of {len(values)}"
            del values
            assert killed == {"worker": worker_kills, "agent": agent_kills, "broker": 1}, killed
            # 6 workers write at most one segment each at a time: the broker never piles memfds up
            assert max(held) <= 12, f"the broker held up to {max(held)} memfds"
            seg_dir = os.path.join(cluster.data_dir, "segments")
            modes = {n: oct(stat.S_IMODE(os.stat(os.path.join(seg_dir, n)).st_mode)) for n in segment_files(cluster)}
            assert all(shm.segment_mode_ok(os.path.join(seg_dir, n)) for n in modes), modes
            sid = client.session_id
        with connect(cluster.endpoint) as conn:
            ArmoniKSessions(conn).purge_session(sid)
        # after the run and a sweep: no segment left, nothing named in /dev/shm, its usage at baseline
        wait_until(lambda: segment_files(cluster) == [], 60, "segment files are left after purge and sweep")
        at_rest = _memfds(cluster.broker.pid)
        leftover = _dev_shm_used() - baseline_shm
        figure("T14", "wrong or lost results", len(wrong), "results", "= 0", not wrong)
        figure("T14", "/dev/shm project entries after the run", len(project_entries()), "entries", "= 0",
               not project_entries())
        figure("T14", "/dev/shm usage vs baseline", round(leftover / MiB, 2), "MiB", "within +-1 MiB",
               abs(leftover) <= MiB)
        figure("T14", "most memfds the broker held at once", max(held), "memfds", "<= 12 (6 workers)",
               max(held) <= 12)
        figure("T14", "most segment files the broker held open at once (handed to readers)", max(handed), "files",
               "(informative)", True)
        figure("T14", "memfds / segment files the broker holds at rest after the run", f"{at_rest[0]} / {at_rest[1]}",
               "", "0 / 0", at_rest == (0, 0))
        figure("T14", "wall time", round(time.monotonic() - started, 1), "s", "(informative)", True)
        assert at_rest == (0, 0), f"the broker still holds {at_rest[0]} memfd(s) and {at_rest[1]} segment file(s)"
        assert project_entries() == []
        assert abs(leftover) <= MiB, f"/dev/shm usage moved by {leftover / MiB:.1f} MiB"
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGTERM)
        for a in agents:
            try:
                a.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(a.pid, signal.SIGKILL)
        cluster.cleanup()
