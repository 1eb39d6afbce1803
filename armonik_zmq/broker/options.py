"""TaskOptions merge (task > request > session default, ``options`` key by key) and validation."""

from __future__ import annotations

from typing import Optional

from ..protocol import ErrorCode, ProtocolError

_SCALARS = ("max_duration", "priority", "max_retries", "partition_id", "application_name", "application_version",
            "application_namespace", "application_service", "engine_type")
MIN_PRIORITY, MAX_PRIORITY = 1, 99


def merge(*layers: Optional[dict]) -> dict:
    """Merge option layers, most specific first: a missing, null, zero or empty field falls back to the next."""
    merged: dict = {"options": {}}
    for layer in reversed([layer for layer in layers if layer]):
        for name in _SCALARS:
            value = layer.get(name)
            if value not in (None, "", 0, 0.0):
                merged[name] = value
        merged["options"].update(layer.get("options") or {})
    for name in _SCALARS:
        merged.setdefault(name, None)
    return merged


def validate(opts: dict, partitions: list[str], where: str) -> dict:
    """Check merged options the way ArmoniK does, naming the field at fault; return them."""
    def bad(field: str, why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_ARGUMENT, f"{where}: task_options.{field} {why}")

    if opts.get("max_duration") is None or opts["max_duration"] <= 0:
        raise bad("max_duration", "must be set to a positive duration")
    priority = opts.get("priority")
    if priority is None or not (MIN_PRIORITY <= priority <= MAX_PRIORITY):
        raise bad("priority", f"must be within {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
    retries = opts.get("max_retries")
    if retries is None or retries < 1:
        raise bad("max_retries", f"must be at least 1, got {retries}")
    if opts.get("partition_id") is None:
        opts["partition_id"] = partitions[0]
    elif opts["partition_id"] not in partitions:
        raise bad("partition_id", f"'{opts['partition_id']}' is not one of the session's partitions {partitions}")
    return opts
