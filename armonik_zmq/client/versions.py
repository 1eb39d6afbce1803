"""``ArmoniKVersions``: the versions service, with the official client's method names and signatures."""

from __future__ import annotations

from typing import Dict

from ..protocol import Op
from .connection import Connection

__all__ = ["ArmoniKVersions"]


class ArmoniKVersions:
    """Ask the broker which versions it runs."""

    def __init__(self, conn: Connection):
        """Use ``conn`` (where the official client takes a gRPC channel)."""
        self._conn = conn

    def list_versions(self) -> Dict[str, str]:
        """Return ``{"core": armonik_zmq's version, "api": the wire protocol's version}``."""
        header, _ = self._conn.call(Op.LIST_VERSIONS)
        return {"core": header["core"], "api": header["api"]}
