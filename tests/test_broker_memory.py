"""The broker's resident memory: data.mdb pages its LMDB map touched are given back (broker/filepages.py)."""

from __future__ import annotations

import os

import pytest

from armonik_zmq.broker.filepages import GROWN_BYTES, FilePages, mapped_ranges, resident_file_pages
from armonik_zmq.broker.store import Store


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def _store_of_40_mib(tmp_path) -> tuple[Store, dict]:
    """A store holding 40 MiB of rows (40,000 of 1 KiB), and those rows."""
    store = Store(str(tmp_path / "lmdb"), map_size=1 << 30)
    rows = {f"row-{i:06d}".encode(): os.urandom(1024) for i in range(40_000)}
    with store.write() as txn:
        for key, value in rows.items():
            txn.txn.put(key, value, db=store.tasks)
    return store, rows


def test_data_file_pages_leave_the_resident_set_and_every_row_reads_back(tmp_path):
    """40 MiB of rows read through the map are resident; after a release they are not, and still read the same."""
    store, rows = _store_of_40_mib(tmp_path)
    try:
        assert mapped_ranges(store.file_pages.path), "LMDB maps data.mdb"
        store.file_pages.release()
        before = _rss_file_kib()
        with store.read() as txn:
            assert all(txn.txn.get(key, db=store.tasks) == value for key, value in rows.items())
        mapped = _rss_file_kib() - before
        assert mapped > 30 * 1024, f"reading 40 MiB of rows mapped only {mapped} KiB"
        store.file_pages.release()
        after = _rss_file_kib()
        assert after - before < 4 * 1024, f"{after - before} KiB of data.mdb still resident after the release"
        with store.read() as txn:
            assert all(txn.txn.get(key, db=store.tasks) == value for key, value in rows.items())
    finally:
        store.close()


def test_data_file_pages_are_released_once_reads_mapped_many_before_the_interval(tmp_path):
    """A commit releases the mapped pages before the interval is up once the resident file pages grew by
    ``grown_bytes`` since the last release (the write-ahead log's commits map new pages at full speed), not before."""
    store, rows = _store_of_40_mib(tmp_path)
    try:
        pages = FilePages(store.file_pages.path, interval=3600, grown_bytes=GROWN_BYTES, check_interval=0)
        pages.maybe_release()  # the first is due at once
        released = pages.released
        assert released, "LMDB maps data.mdb"
        pages.maybe_release()
        assert pages.released == released, "released again with no pages faulted in and the interval not up"
        resident = resident_file_pages()
        with store.read() as txn:
            assert all(txn.txn.get(key, db=store.tasks) == value for key, value in rows.items())
        if resident_file_pages() - resident < 30 * 256:
            pytest.skip("/proc/self/statm does not show the 40 MiB of data.mdb pages that reads mapped")
        pages.maybe_release()
        assert pages.released == 2 * released
        # without the growth trigger (the store's, unless it logs), the same reads wait for the interval
        steady = FilePages(store.file_pages.path, interval=3600, grown_bytes=0, check_interval=0)
        steady.maybe_release()
        with store.read() as txn:
            assert all(txn.txn.get(key, db=store.tasks) == value for key, value in rows.items())
        steady.maybe_release()
        assert steady.released == released
        assert store.file_pages.grown_pages == 0, "a store without the write-ahead log has no growth trigger"
    finally:
        store.close()
    logging_store = Store(str(tmp_path / "logged"), map_size=1 << 30, durability="wal")
    try:
        assert logging_store.file_pages.grown_pages == GROWN_BYTES // os.sysconf("SC_PAGE_SIZE")
    finally:
        logging_store.close()


def test_a_release_finds_the_map_again_only_once_lmdb_mapped_the_file_anew(tmp_path, monkeypatch):
    """Releases after the first reuse where the file is mapped (reading /proc/self/maps pauses the broker's loop ~1 ms);
    once the map grows, LMDB maps the file anew elsewhere, and the next release finds that map and gives its pages
    back."""
    from armonik_zmq.broker import filepages

    reads = []
    real = filepages.mapped_ranges
    monkeypatch.setattr(filepages, "mapped_ranges", lambda path: reads.append(path) or real(path))
    store, rows = _store_of_40_mib(tmp_path)
    try:
        pages = store.file_pages
        first = pages.release()
        assert first and len(reads) == 1
        for _ in range(3):
            assert pages.release() == first
        assert len(reads) == 1, "the maps were read again though the file stayed mapped where it was"
        before = real(pages.path)
        assert store.grow(), "the map did not grow"
        assert real(pages.path) != before, "LMDB did not map the file anew"
        released = _rss_file_kib()
        with store.read() as txn:
            assert all(txn.txn.get(key, db=store.tasks) == value for key, value in rows.items())
        assert pages.release() > first and len(reads) == 2
        assert _rss_file_kib() - released < 4 * 1024, "the pages of the new map stayed resident"
    finally:
        store.close()
