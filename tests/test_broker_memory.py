"""The broker's resident memory: data.mdb pages its LMDB map touched are given back (broker/filepages.py)."""

from __future__ import annotations

import os

from armonik_zmq.broker.filepages import mapped_ranges
from armonik_zmq.broker.store import Store


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_data_file_pages_leave_the_resident_set_and_every_row_reads_back(tmp_path):
    """40 MiB of rows read through the map are resident; after a release they are not, and still read the same."""
    store = Store(str(tmp_path / "lmdb"), map_size=1 << 30)
    try:
        rows = {f"row-{i:06d}".encode(): os.urandom(1024) for i in range(40_000)}
        with store.write() as txn:
            for key, value in rows.items():
                txn.txn.put(key, value, db=store.tasks)
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
