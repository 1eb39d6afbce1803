"""The broker's garbage-collection steps (broker/gcpolicy.py): one every STEP_PERIOD, later while a client waits."""

from __future__ import annotations

import time

from armonik_zmq.broker.gcpolicy import STEP_PERIOD, GcPolicy


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
