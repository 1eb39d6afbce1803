"""``ArmoniKHealthChecks``: the health checks service, with the official client's method names and signatures."""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Dict

from ..protocol import Op
from .connection import Connection

__all__ = ["ArmoniKHealthChecks", "ServiceHealthCheckStatus"]


class ServiceHealthCheckStatus(IntEnum):
    """ArmoniK's HealthStatusEnum."""

    UNSPECIFIED = 0
    HEALTHY = 1
    DEGRADED = 2
    UNHEALTHY = 3


class ArmoniKHealthChecks:
    """Ask the broker whether it and what it depends on (LMDB, agents) are healthy."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn

    def check_health(self) -> Dict[str, Dict[str, Any]]:
        """Return ``{check name: {"message": str, "status": ServiceHealthCheckStatus}}``."""
        header, _ = self._conn.call(Op.HEALTH)
        return {check["name"]: {"message": check["message"],
                                "status": ServiceHealthCheckStatus.HEALTHY if check["healthy"]
                                else ServiceHealthCheckStatus.UNHEALTHY}
                for check in header["checks"]}
