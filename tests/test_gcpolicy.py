"""The broker's garbage-collection steps (broker/gcpolicy.py): one every STEP_PERIOD, later while a client waits."""

from __future__ import annotations

import gc
import time
import weakref

from armonik_zmq.broker.gcpolicy import IDLE_AFTER, STEP_PERIOD, GcPolicy


def test_a_step_waits_while_a_client_waits_by_one_period_at_most():
    policy = GcPolicy()
    policy.start()
    try:
        policy.busy()
        assert policy.full_collections == 0  # not due yet
        time.sleep(STEP_PERIOD * 1.1)
        policy.busy(wanted=True)
        assert policy.full_collections == 0  # due, but a client's request waits: a later turn
        policy.busy()
        assert policy.full_collections == 1
        time.sleep(STEP_PERIOD * 2.2)
        policy.busy(wanted=True)
        assert policy.full_collections == 2  # a period late: it runs even though a client waits
    finally:
        policy.stop()


def _collections(generation: int, during) -> int:
    """How many collections of ``generation`` CPython ran by itself while ``during()`` ran."""
    seen = []

    def record(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == generation:
            seen.append(generation)

    gc.callbacks.append(record)
    try:
        during()
    finally:
        gc.callbacks.remove(record)
    return len(seen)


def test_the_survivors_of_young_collections_wait_for_the_step_unscanned():
    kept = []

    def a_turn() -> None:  # what a turn of a few thousand tasks keeps: rows of tracked objects
        kept.extend({"task_id": str(i), "ids": [i]} for i in range(20_000))

    policy = GcPolicy()
    policy.start()
    try:
        assert _collections(0, a_turn) > 0  # the youngest generation collects as usual
        assert _collections(1, a_turn) == 0  # with CPython's thresholds: one middle collection per 10 young ones
        time.sleep(STEP_PERIOD * 1.1)
        policy.busy()
        assert policy.full_collections == 1
        assert gc.get_count()[1] == 0  # the step scanned the survivors (and froze them)
    finally:
        policy.stop()
    assert _collections(1, a_turn) > 0  # stopped: CPython's own thresholds again


def test_an_idle_broker_frees_a_dead_reference_cycle_once_young_collections_piled_up():
    class Node:
        pass

    young = gc.get_threshold()[0]
    policy = GcPolicy()
    policy.start()
    try:
        node = Node()
        node.cycle = [node]
        probe = weakref.ref(node)
        kept = [[i] for i in range(young * 2)]  # the cycle, alive, survives a young collection
        del node  # and dies in the middle generation, which no young collection scans
        kept += [[i] for i in range(young * 2)]
        policy.idle()
        assert probe() is not None and policy.full_collections == 0  # few young collections since: none now
        kept += [[i] for i in range(young * IDLE_AFTER * 2)]
        assert probe() is not None  # with CPython's thresholds a middle collection would have freed it
        policy.idle()
        assert probe() is None and policy.full_collections == 1
        assert kept
    finally:
        policy.stop()
