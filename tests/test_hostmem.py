"""Fresh memory on a VM whose balloon reports free pages: workers build big arrays in small pages (hostmem.py).

The detection reads virtio devices from sysfs (a made-up tree here, both ways); a real worker process
is asked what numpy does in it, which must follow what this host's own sysfs says.
"""

from __future__ import annotations

import sys

import cloudpickle

import armonik_zmq
from armonik_zmq import hostmem

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _device(root, name: str, device: str, features: str) -> None:
    d = root / name
    d.mkdir()
    (d / "device").write_text(device + "\n")
    (d / "features").write_text(features + "\n")


def test_a_balloon_that_reports_free_pages_is_detected(tmp_path):
    _device(tmp_path, "virtio0", "0x0002", "0" * 5 + "1" + "0" * 58)  # a block device with bit 5: not a balloon
    assert not hostmem.host_reports_free_pages(str(tmp_path))
    _device(tmp_path, "virtio1", "0x0005", "0110000100" + "0" * 54)  # a balloon without F_REPORTING (bit 5)
    assert not hostmem.host_reports_free_pages(str(tmp_path))
    _device(tmp_path, "virtio2", "0x0005", "0110010100" + "0" * 54)  # stats, deflate on OOM, reporting
    assert hostmem.host_reports_free_pages(str(tmp_path))
    assert not hostmem.host_reports_free_pages(str(tmp_path / "missing"))


def numpy_uses_huge_pages() -> bool:
    try:
        from numpy._core.multiarray import _get_madvise_hugepage
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _get_madvise_hugepage
    return bool(_get_madvise_hugepage())


def test_workers_build_big_arrays_in_small_pages_only_where_the_host_reports_free_pages(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)  # the workers inherit this environment
    with armonik_zmq.LocalCluster(n_workers=1) as client:
        assert client.submit(numpy_uses_huge_pages).result(60) is not hostmem.host_reports_free_pages()


def test_an_explicit_numpy_setting_wins(monkeypatch):
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    with armonik_zmq.LocalCluster(n_workers=1) as client:
        assert client.submit(numpy_uses_huge_pages).result(60) is True
