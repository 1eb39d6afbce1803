"""Which waiting messages a loop turn handles: peers take turns, and a turn stops at its time budget.

A turn is one LMDB transaction, and nothing of it is answered before it commits: a long turn delays
every peer, and a client flooding requests would make every turn long. So the broker:

- keeps the messages it has received but not handled yet in one queue per peer (at most
  ``max_messages`` in all: the rest wait in ZeroMQ's pipes, and a peer that keeps sending is held
  back by its pipe's high-water mark: back-pressure, nothing dropped);
- builds each turn's batch by taking one message per peer in rotation, so a polite client's request
  is among the first of the next turn however many a flooder has queued;
- cuts the batch when its estimated cost reaches ``budget`` seconds. The cost of a message is
  estimated from its size (``units``: a fixed part plus its header's bytes), at the rate of seconds per
  unit measured over recent turns, so the cut adapts to the machine and to the mix of requests;
- shortens a turn that serves a *light* peer (one message waiting: a client sending one request at a
  time, an agent's heartbeat) while another peer has a backlog: its budget is then ``LIGHT_SHARE`` of
  the usual one, and the light clients' requests come first in it. The light peer's reply leaves after
  that turn's commit, so the flooder's share of the turn is what it waits for; the flooder loses one
  short turn, an extra commit. (In rotation order, T15's client, back at the end of the rotation with
  each request, waited behind the four agents' report backlogs: one short turn per agent, up to four
  commits before its own: the 24-30 ms submit-ack tail.) Light agents stay in the rotation's order;
  the rotation itself is not changed;
- puts clients' requests ahead of agents' reports in a batch, and when a batch has both, the broker
  commits and answers the clients' part before it handles the reports (broker/server.py): a client's
  request waits for no report of its turn (one report of many completions takes a millisecond or
  more), nor for the turn's dispatch. The second commit happens only in turns that have both;
- lets a client that sent a request while a turn is being handled (a peer with nothing waiting
  before) into that very turn: after every ``LOOK_EVERY`` seconds of handling the loop looks at the
  client socket, and if such a newcomer is there, the rest of the batch goes back to the front of its
  queues and the newcomer's request is handled instead (``preempt``). It then waits for the message
  being handled, the turn's upkeep and commit, not for the rest of the turn. The loop also looks
  after the batch's last message (when that took ``LOOK_EVERY``): a client that came during it joins
  the commit in progress instead of waiting for that commit, its replies and a turn of its own.

Measured with T15's pattern (sequential submits of 100 tasks while 4 agents complete them, 30,000
tasks, runs interleaved at load 5-9): the split commit and the look took the broker CPU spent between
a submit's send and its reply from 8-10 ms to 5-5.6 ms (median), and the submit-ack median from
21.7-29 ms to 13.8-17.5 ms, with one more commit per submit and no more broker CPU per task. (The
last session measured the split, as a deferred turn, and a 0.5 ms look at load 6-9 and did not keep
them; the broker's CPU per task did not rise in these runs.)

A turn always takes at least one message, so a single huge request still gets served (in a turn of
its own).

A peer is a connection (its routing id), except for clients when CURVE is on (``by_user``): then it
is the client's authenticated key (the ZAP User-Id), so a client that opens several connections, or a
flooder with many DEALERs under one key, gets one client's share of the turns, not one per
connection. Agents stay per connection: several agents may share a key, and each one's reports count.
"""

from __future__ import annotations

from collections import deque

import zmq

#: cost of a message beyond its header's bytes (decoding, a nested transaction, a reply), in header bytes
MESSAGE_UNITS = 256
#: data frames are copied, not decoded: one unit per this many bytes
DATA_BYTES_PER_UNIT = 64
#: fraction of the budget a turn takes when it serves a light peer beside a backlog
LIGHT_SHARE = 0.25
#: seconds of handling between two looks for newcomers (a look is a getsockopt when nothing came, ~2.5 us)
LOOK_EVERY = 0.0002
#: most clients' messages a look takes from the socket
PREEMPT_TAKES = 8
#: the socket key of clients: only their newcomers preempt a turn (agents' reports are a steady stream)
CLIENTS = 0


def units(frames: list) -> int:
    """Estimated work of a received message (routing frame, header, data frames), in units."""
    n = MESSAGE_UNITS
    if len(frames) > 1:
        n += len(frames[1])
        for f in frames[2:]:
            n += len(f) // DATA_BYTES_PER_UNIT
    return n


class FairQueue:
    """Received messages waiting for a turn, one queue per (socket, peer), served in rotation."""

    def __init__(self, budget: float, max_messages: int, by_user: bool = False):
        #: seconds of handling a turn aims at
        self.budget = budget
        #: clients' messages are queued by User-Id (CURVE), not by connection
        self.by_user = by_user
        self.max_messages = max_messages
        self.queues: dict[tuple[int, bytes], deque] = {}
        self.waiting = 0
        #: client peers that had nothing waiting when a message of theirs came, since the last take
        self.newcomers: list[tuple[int, bytes]] = []
        #: units of the batch being handled (take, then preempt)
        self.turn_units = 0
        self._keys: dict[int, int] = {}
        # Decayed sums of (seconds, units) of recent turns: their ratio is the cost of a unit. The start
        # value (1 us per unit) is pessimistic: the first turns are small, and the estimate adapts.
        self._seconds = 0.01
        self._units = 10_000.0

    def room(self) -> int:
        return self.max_messages - self.waiting

    def _peer(self, key: int, frames: list) -> tuple:
        """Whose turn a message takes: its connection, or with ``by_user`` a client's User-Id."""
        if self.by_user and key == CLIENTS and len(frames) > 1:
            try:
                return key, frames[1].get("User-Id")
            except (zmq.ZMQError, UnicodeDecodeError):
                pass  # no User-Id (cannot happen behind ZAP): by connection
        return key, frames[0].bytes

    def add(self, key: int, sock, frames: list) -> None:
        """Queue a message received on ``sock`` (``key`` tells the sockets apart)."""
        peer = self._peer(key, frames)
        q = self.queues.get(peer)
        if q is None:
            q = self.queues[peer] = deque()
            if key == CLIENTS:
                self.newcomers.append(peer)
        self._keys[id(sock)] = key
        q.append((sock, frames))
        self.waiting += 1

    @property
    def seconds_per_unit(self) -> float:
        return self._seconds / self._units

    def take(self) -> tuple[list, int]:
        """The next turn's batch and its units: one message per peer in rotation, up to the budget.

        A peer served goes to the back of the rotation, so the next turn starts with the others. Clients'
        requests come first in the batch.
        """
        batch: list = []
        limit = self.budget / self.seconds_per_unit
        total = 0
        queues = self.queues
        if len(queues) > 1 and len(queues) < self.waiting:  # several peers, and one has a backlog
            light = [peer for peer, q in queues.items() if len(q) == 1]
            if light:
                limit *= LIGHT_SHARE
                # The turn is short for the light clients: their requests come first in it (a client that had
                # nothing waiting joins the rotation at its back, and the short turns went to the agents' backlogs,
                # one commit each). They leave the rotation (one message each): the others keep its order.
                for peer in light:
                    if peer[0] == CLIENTS:
                        item = queues.pop(peer).popleft()
                        batch.append(item)
                        total += units(item[1])
        while queues and (not batch or total < limit):
            for peer in list(queues):
                q = queues[peer]
                item = q.popleft()
                batch.append(item)
                total += units(item[1])
                # to the back of the rotation (or out, when it has nothing more)
                del queues[peer]
                if q:
                    queues[peer] = q
                if total >= limit:
                    break
        self.waiting -= len(batch)
        self.newcomers = []
        self.turn_units = total
        keys = self._keys
        clients = [item for item in batch if keys[id(item[0])] == CLIENTS]
        if clients and len(clients) < len(batch):
            batch = clients + [item for item in batch if keys[id(item[0])] != CLIENTS]
        return batch, total

    def clients_ahead(self, batch: list) -> int:
        """How many messages at the head of ``batch`` are clients' requests (``take`` puts them first)."""
        keys = self._keys
        n = 0
        for sock, _ in batch:
            if keys[id(sock)] != CLIENTS:
                break
            n += 1
        return n

    def preempt(self, batch: list, handled: int) -> None:
        """Mid-turn, after new messages were added: newcomers' first requests replace ``batch[handled:]``.

        The replaced messages go back to the front of their peers' queues (in order), and their peers to
        the front of the rotation: they come first in the next turn.
        """
        newcomers = [peer for peer in self.newcomers if peer in self.queues]
        self.newcomers = []
        if not newcomers:
            return
        self._put_back(batch[handled:])
        del batch[handled:]
        for peer in newcomers:
            q = self.queues[peer]
            item = q.popleft()
            if not q:
                del self.queues[peer]
            batch.append(item)
            self.turn_units += units(item[1])
        self.waiting -= len(newcomers)

    def _put_back(self, rest: list) -> None:
        """Return taken messages to the front of their peers' queues (in order), their peers to the front of the rotation."""
        peers = [self._peer(self._keys[id(sock)], frames) for sock, frames in rest]
        restored = {peer: None for peer in peers}  # in the order the batch had them
        for peer in restored:
            restored[peer] = self.queues.pop(peer, None) or deque()
        for peer, item in zip(reversed(peers), reversed(rest)):
            restored[peer].appendleft(item)
            self.turn_units -= units(item[1])
        self.queues = {**restored, **self.queues}
        self.waiting += len(rest)

    def record(self, seconds: float, n_units: int) -> None:
        """Learn from a turn that handled ``n_units`` in ``seconds`` (recent turns weigh most)."""
        if n_units <= 0:
            return
        self._seconds = 0.9 * self._seconds + seconds
        self._units = 0.9 * self._units + n_units
