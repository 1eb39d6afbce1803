"""What fresh memory costs on this host, and how a worker allocates big arrays because of it.

On a VM whose memory balloon reports free pages to the host (virtio-balloon ``F_REPORTING``, as
Firecracker and QEMU offer), the guest hands every free block of 2 MiB and more back to the host,
which drops its backing. A transparent huge page is exactly such a block: each one a process
touches costs a host fault for all of it, about 1 ms. numpy asks for huge pages (``madvise``) for
every array of 4 MiB or more, so a task that builds a 256 MiB array paid 0.3 to 0.6 s for it here,
when the same array in 4 KiB pages, taken from the guest's fragmented free memory first, costs
0.10 to 0.13 s (and 0.03 s when the blocks were freed a moment ago, before their report). On
bare metal, huge pages are the faster choice, so the switch applies only where the host reports
free pages (docs/data-path.md, "Fresh memory").
"""

from __future__ import annotations

import glob
import os
import sys

#: virtio device id of a memory balloon, and the feature bit of free page reporting (virtio spec 5.5.3)
_BALLOON_DEVICE = "0x0005"
_F_REPORTING = 5


def host_reports_free_pages(root: str = "/sys/bus/virtio/devices") -> bool:
    """Whether this VM's balloon reports free pages to the host (fresh huge pages then cost a host fault each)."""
    for device in glob.glob(os.path.join(root, "*")):
        try:
            with open(os.path.join(device, "device")) as f:
                if f.read().strip() != _BALLOON_DEVICE:
                    continue
            with open(os.path.join(device, "features")) as f:
                features = f.read().strip()
        except OSError:
            continue
        if len(features) > _F_REPORTING and features[_F_REPORTING] == "1":  # bit i is the i-th character
            return True
    return False


def prefer_small_pages_for_arrays() -> bool:
    """In a worker, before user code runs: have numpy build big arrays in 4 KiB pages where the host reports
    free pages; return whether it did. An explicit ``NUMPY_MADVISE_HUGEPAGE`` in the environment wins."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ or not host_reports_free_pages():
        return False
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"  # read by numpy when it is imported
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # already imported (by a sitecustomize, say): tell it directly
        try:
            from numpy._core.multiarray import _set_madvise_hugepage
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _set_madvise_hugepage
        _set_madvise_hugepage(False)
    return True
