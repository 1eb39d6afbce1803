"""Store.needs_room: the map's figures are read again only when the turns counted since may have used up the room.

A real LMDB file; the only stand-in wraps LMDB's Environment to count its ``info()`` calls (the read that
``needs_room`` saves on most turns).
"""

from __future__ import annotations

from armonik_zmq.broker.store import TURN_GROWTH_BOUND, TURN_GROWTH_FACTOR, Store

MIB = 1 << 20


class _CountingEnv:
    """LMDB's Environment, counting ``info()`` calls."""

    def __init__(self, env):
        self._env = env
        self.infos = 0

    def info(self):
        self.infos += 1
        return self._env.info()

    def __getattr__(self, name):
        return getattr(self._env, name)


def _fill(store: Store, nbytes: int) -> None:
    with store.env.begin(write=True) as txn:
        for i in range(nbytes // MIB):
            txn.put(b"k%06d" % i, b"x" * MIB, db=store.data)


def test_the_map_is_read_again_once_the_counted_turns_may_have_used_its_room(tmp_path):
    store = Store(str(tmp_path / "lmdb"), map_size=64 * MIB, sync=False)
    env = store.env = _CountingEnv(store.env)
    assert TURN_GROWTH_BOUND == 16 * MIB  # the premise of the counts below: a 64 MiB map has room for 2 such turns
    assert not store.needs_room(0)  # 64 MiB free, 16 needed: 48 MiB of room (minus the first pages), 16 for this turn
    assert env.infos == 1
    assert not store.needs_room(0)  # the next turn of 16 MiB fits in what is left: not read
    assert env.infos == 1
    _fill(store, 50 * MIB)  # beyond what those turns were counted for: less than a quarter is free now
    assert store.needs_room(0)  # the third turn's 16 MiB exceed what is left of the room: read, and it must grow
    assert env.infos == 2
    assert store.room_for(0) and store.map_size == 128 * MIB
    infos = env.infos
    assert not store.needs_room(0)  # after a growth the figures are read again
    assert env.infos == infos + 1


def test_a_turn_that_receives_much_reads_the_map_at_once(tmp_path):
    store = Store(str(tmp_path / "lmdb"), map_size=1 << 30, sync=False)
    env = store.env = _CountingEnv(store.env)
    assert not store.needs_room(0)
    assert not store.needs_room(0)
    assert env.infos == 1
    # counted as 16 MiB + 8 x 100 MiB: beyond the ~750 MiB of room left, so the figures are read
    assert 16 * MIB + TURN_GROWTH_FACTOR * 100 * MIB > 750 * MIB
    assert not store.needs_room(100 * MIB)
    assert env.infos == 2
    assert store.needs_room(600 * MIB)  # less than twice that is free
    assert env.infos == 3
