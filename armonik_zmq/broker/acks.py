"""Completion acknowledgements held back for their agent's next message.

The reply to an agent's TASKS_DONE tells it that its completions are durable: it forgets them, and may send
its next TASKS_DONE (one is in flight at a time). An agent left with no task by that completion has no
other use for it until the broker gives it work again. Sent alone, the reply wakes the agent (and the ZeroMQ
I/O threads on both sides) for nothing: one of the three wake-ups of the agent per sequential task. Held,
it goes right after the next message to that agent (most often the DISPATCH of the next task, which wakes
it anyway: the agent is still busy with it when the reply comes), or inside it when that message is a push
and the agent registered with ``acks_inline`` (one message less: server.py ``_send_all``), or when held
``ACK_HOLD``. Held or not, it leaves after the commit that made the completions durable.
"""

from __future__ import annotations

import math

#: longest hold (seconds) of a completion's acknowledgement to an agent left with no task
ACK_HOLD = 0.02


class HeldAcks:
    """TASKS_DONE replies (whole messages, routing id first) waiting for their agent's next message."""

    def __init__(self) -> None:
        #: peer -> its held replies: empty when none is held (the loop tests it every turn and send: no __bool__ call)
        self.by_peer: dict[bytes, list[list]] = {}
        #: when the oldest held reply must go (time.monotonic()); inf when none is held
        self.due = math.inf

    def hold(self, message: list, mono: float) -> None:
        if not self.by_peer:
            self.due = mono + ACK_HOLD
        self.by_peer.setdefault(message[0], []).append(message)

    def take(self, peer: bytes) -> list[list]:
        """The replies held for ``peer`` (to send with a message to it), oldest first."""
        messages = self.by_peer.pop(peer, ())
        if not self.by_peer:
            self.due = math.inf
        return messages

    def take_all(self) -> list[list]:
        messages = [m for held in self.by_peer.values() for m in held]
        self.by_peer.clear()
        self.due = math.inf
        return messages
