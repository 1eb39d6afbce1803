"""The control plane: a ZeroMQ ROUTER broker keeping its tables in LMDB."""

from .server import Broker

__all__ = ["Broker"]
