"""``ArmoniKPartitions``: the partitions service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..common import Partition
from ..protocol import Op
from .connection import Connection
from .filters import Direction, Filter, to_wire_filter, to_wire_sort

__all__ = ["ArmoniKPartitions"]


class ArmoniKPartitions:
    """Inspect the partitions the broker serves (from its configuration)."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn

    def list_partitions(self, partition_filter: Optional[Filter] = None, page: int = 0, page_size: int = 1000,
                        sort_field: Filter = Partition.priority,
                        sort_direction: Direction = Direction.ASC) -> Tuple[int, List[Partition]]:
        """List partitions: return (how many match the filter, the partitions of the page).

        Args:
            partition_filter: which partitions (``Partition.priority > 1``, ...); None: all.
            page: the page (0-based).
            page_size: partitions per page (at most 10,000).
            sort_field: the field to sort on (``Partition.id``, ...).
            sort_direction: ``Direction.ASC`` or ``Direction.DESC``.
        """
        header, _ = self._conn.call(Op.LIST_PARTITIONS,
                                    filter=to_wire_filter(partition_filter, "partition", "partition_filter"),
                                    sort=to_wire_sort(sort_field, sort_direction, "partition"), page=page,
                                    page_size=page_size)
        return header["total"], [Partition.from_wire(p) for p in header["partitions"]]

    def get_partition(self, partition_id: str) -> Partition:
        """Return the partition ``partition_id``."""
        header, _ = self._conn.call(Op.GET_PARTITIONS, partition_ids=[partition_id])
        return Partition.from_wire(header["partitions"][0])
