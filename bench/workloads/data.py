"""Data: 100 tasks each returning a 1 MiB numpy array fetched by the client -> MiB/s; one 256 MiB array -> s."""

from __future__ import annotations

import time

from ..tasks import array
from . import figure, scaled

MIB = 1 << 20
SMALL = 100
BIG_MIB = 256


def run(system, scale: float) -> dict:
    n = scaled(SMALL, scale)
    started = time.perf_counter()
    handles = system.map(array, [(MIB, float(i)) for i in range(n)])
    arrays = system.gather(handles)
    small_s = time.perf_counter() - started
    for i, a in enumerate(arrays):
        if a.nbytes != MIB or a[0] != i or a[-1] != i:
            raise AssertionError(f"{system.name}: array {i} came back wrong")
    del arrays
    system.release(handles)
    big_mib = scaled(BIG_MIB, scale)
    started = time.perf_counter()
    handle = system.submit(array, big_mib * MIB, 7.0)
    big = system.result(handle)
    big_s = time.perf_counter() - started
    if big.nbytes != big_mib * MIB or big[0] != 7.0 or big[-1] != 7.0:
        raise AssertionError(f"{system.name}: the {big_mib} MiB array came back wrong")
    del big
    system.release([handle])
    return {"tasks": n + 1, "figures": {"data_1mib_mib_per_s": figure(n / small_s, "MiB/s"),
                                        "data_big_seconds": figure(big_s, "s", "lower"),
                                        "data_big_mib": figure(big_mib, "MiB", "none")}}
