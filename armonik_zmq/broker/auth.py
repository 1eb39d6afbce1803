"""Who may talk to the broker, and what each peer may touch.

Authentication (``Guard``): with keys, both ROUTER sockets are CurveZMQ servers. A ZAP handler
(RFC 27) on its own thread accepts a handshake only from a public key of the client or agent
allow-list, and names the peer with a User-Id, ``client:<name>`` or ``agent:<name>``, taken from
the list that holds the key. A peer that fails the handshake never gets a frame to the broker's loop.
The same thread counts handshakes from socket monitors, for ``HEALTH`` metrics and the logs.

Authorization (``Authorizer``): called for every request before its handler, in the request's
transaction. The role comes from the User-Id (never from the routing id): the clients endpoint serves
``client:`` users, the agents endpoint ``agent:`` users. A client may only use the sessions it
created (a session row keeps its creator's User-Id as ``owner``), and the tasks and results of those
sessions; lists only show them. The broker's metrics (everyone's activity) and its data path are
not shown to clients: agents and the operator read them. An agent id belongs to the key that
registered it while that agent is alive. Without keys (NULL security) there is one anonymous local
user and none of this runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Optional

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from ..protocol import ErrorCode, Op, ProtocolError
from ..security import SecurityError, key_pair, load_allow_list
from .filters import Filter
from .store import Txn

if TYPE_CHECKING:
    from ..config import BrokerConfig
    from .server import Broker, Request

log = logging.getLogger(__name__)

#: where libzmq sends ZAP requests (RFC 27), in the sockets' own context
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "armonik-zmq"
_HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "failed_auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed_other",
}
#: pinning a list to the caller's sessions turns each clause into one clause per session, up to this many
_MAX_PINNED_CLAUSES = 10_000


class AllowList:
    """Client and agent public keys -> User-Id, read again whenever a key directory changes.

    Adding a key file lets that peer in at its next handshake, deleting one keeps it out from its next
    handshake (a connection already up stays up until it drops): no broker restart needed.
    """

    def __init__(self, client_dir: str, agent_dir: str):
        self.dirs = (client_dir, agent_dir)
        self.users: dict[bytes, str] = {}
        self._stamp: Optional[tuple] = None
        self.reload()

    def _stamps(self) -> tuple:
        stamps = []
        for d in self.dirs:
            try:
                stamps.append(os.stat(d).st_mtime_ns if d else 0)
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def reload(self) -> None:
        stamp = self._stamps()
        clients = load_allow_list(self.dirs[0], "client")
        agents = load_allow_list(self.dirs[1], "agent")
        both = sorted(clients[k] + " / " + agents[k] for k in set(clients) & set(agents))
        if both:
            raise SecurityError(f"the same public key is both a client and an agent key ({', '.join(both)}): "
                                f"a key has one role; make separate keys with `armonik-zmq keys`")
        self.users = {**clients, **agents}
        self._stamp = stamp

    def lookup(self, key: bytes) -> Optional[str]:
        """Return the User-Id of a Z85 public key, None if no allow-list holds it."""
        if self._stamps() != self._stamp:
            try:
                self.reload()
                log.info("key directories changed: %d key(s) allowed now", len(self.users))
            except SecurityError as exc:
                log.error("key directories changed but cannot be read (%s): keeping the previous allow-list", exc)
        return self.users.get(key)


class Guard:
    """The CURVE server side of the broker: its keys, the ZAP handler, handshake counters (one thread)."""

    def __init__(self, ctx: zmq.Context, config: "BrokerConfig"):
        self.public, self.secret = key_pair(config.server_secret, "the broker's secret key (server.key_secret)")
        self.allow = AllowList(config.client_keys, config.agent_keys)
        if not self.allow.users:
            log.warning("CURVE is on but no client or agent key is allowed: nobody can connect "
                        "(add keys with `armonik-zmq keys DIR --client NAME`)")
        self.ctx = ctx
        #: per endpoint: handshakes succeeded / failed_auth / failed_protocol / failed_other
        self.handshakes: dict[str, dict[str, int]] = {}
        self.zap_denied = 0
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        # Bound before any CURVE socket listens: a CURVE server without a ZAP handler would accept any key.
        self._zap.bind(ZAP_ENDPOINT)
        self._monitors: list[tuple[zmq.Socket, str]] = []
        self._wake_endpoint = f"inproc://armonik-zmq-guard-{id(self)}"
        self._wake_in = ctx.socket(zmq.PAIR)
        self._wake_in.setsockopt(zmq.LINGER, 0)
        self._wake_in.bind(self._wake_endpoint)
        self._wake_out: Optional[zmq.Socket] = None
        self._thread: Optional[threading.Thread] = None
        self._last_log = 0.0
        self._unlogged = 0

    def protect(self, sock: zmq.Socket, endpoint: str) -> None:
        """Make a ROUTER socket (not bound yet) a CURVE server authenticated through our ZAP handler."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        # A peer must not take over a live peer's routing id (RELIABILITY.md section 7): a second
        # connection that claims one is ignored by the socket instead of replacing the first.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        self.handshakes[endpoint] = dict.fromkeys(_HANDSHAKE_EVENTS.values(), 0)
        events = 0
        for event in _HANDSHAKE_EVENTS:
            events |= event
        self._monitors.append((sock.get_monitor_socket(events), endpoint))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="armonik-zmq-zap", daemon=True)
        self._thread.start()
        self._wake_out = self.ctx.socket(zmq.PAIR)
        self._wake_out.setsockopt(zmq.LINGER, 0)
        self._wake_out.connect(self._wake_endpoint)

    def stop(self) -> None:
        """Stop the thread and close its sockets (before the context is terminated)."""
        if self._thread is not None:
            self._wake_out.send(b"")
            self._thread.join()
            self._wake_out.close(linger=0)
            self._thread = None
        for sock, _ in self._monitors:
            sock.close(linger=0)
        self._monitors = []
        self._zap.close(linger=0)
        self._wake_in.close(linger=0)

    def snapshot(self) -> dict:
        return {"handshakes": {k: dict(v) for k, v in self.handshakes.items()}, "zap_denied": self.zap_denied,
                "allowed_keys": len(self.allow.users)}

    # -- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        for sock, _ in self._monitors:
            poller.register(sock, zmq.POLLIN)
        names = {sock: name for sock, name in self._monitors}
        while True:
            ready = dict(poller.poll())
            if self._wake_in in ready:
                return
            if self._zap in ready:
                try:
                    self._answer(self._zap.recv_multipart())
                except Exception:  # a bug must not leave libzmq waiting for a ZAP reply forever
                    log.exception("ZAP request failed")
            for sock, name in names.items():
                if sock in ready:
                    self._count(sock, name)

    def _count(self, monitor: zmq.Socket, endpoint: str) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = _HANDSHAKE_EVENTS.get(event["event"])
            if kind is not None:
                self.handshakes[endpoint][kind] += 1
                if kind != "succeeded":
                    self._log_refusal("handshake on %s failed (%s, %s)", endpoint, kind, event["value"])

    def _log_refusal(self, fmt: str, *args) -> None:
        # At most one line a second: a stranger retrying in a loop must not flood the log.
        now = time.monotonic()
        if now - self._last_log < 1.0:
            self._unlogged += 1
            return
        suffix = f" ({self._unlogged} more refusal(s) not logged)" if self._unlogged else ""
        self._unlogged = 0
        self._last_log = now
        log.warning(fmt + "%s", *args, suffix)

    def _answer(self, msg: list[bytes]) -> None:
        """Answer one ZAP request: 200 with the User-Id for an allowed CURVE key, 400 otherwise."""
        if len(msg) < 6:
            if len(msg) >= 2:
                self._reply(msg[1], b"400", b"malformed ZAP request")
            return
        version, request_id, _domain, address, _routing_id, mechanism = msg[:6]
        credentials = msg[6:]
        if version != b"1.0":
            self._reply(request_id, b"400", b"unsupported ZAP version")
            return
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self.zap_denied += 1
            self._reply(request_id, b"400", b"this broker accepts CURVE only")
            return
        key = z85.encode(credentials[0])
        user = self.allow.lookup(key)
        if user is None:
            self.zap_denied += 1
            self._log_refusal("refused CURVE key %s from %s: not in the client or agent allow-list",
                              key.decode(), address.decode(errors="replace"))
            self._reply(request_id, b"400", b"unknown key")
            return
        self._reply(request_id, b"200", b"OK", user.encode())

    def _reply(self, request_id: bytes, code: bytes, text: bytes, user: bytes = b"") -> None:
        self._zap.send_multipart([b"1.0", request_id, code, text, user, b""])


def _denied(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PERMISSION_DENIED, message)


class Authorizer:
    """The checks every request passes before its handler, when CURVE is on."""

    def __init__(self, broker: "Broker"):
        self.broker = broker
        #: requests refused by these checks
        self.denied = 0
        #: agent id -> User-Id of the key that registered it last
        self.agent_users: dict[str, str] = {}

    @staticmethod
    def user_of(frame: zmq.Frame) -> str:
        """Return the ZAP User-Id of the connection a frame came from ("" if it has none)."""
        try:
            return frame.get("User-Id") or ""
        except (zmq.ZMQError, UnicodeDecodeError):
            return ""

    def authorize(self, req: "Request", txn: Txn, frame: zmq.Frame) -> None:
        """Set ``req.user`` from the connection's User-Id; refuse what this user may not do."""
        broker = self.broker
        user = req.user = self.user_of(frame)
        role = user.partition(":")[0]
        try:
            if req.sock is broker.backend:
                if role != "agent":
                    raise _denied(f"{user or 'this connection'} is not an agent key: the agents endpoint serves "
                                  f"agents only (clients connect to {broker.config.endpoint})")
                self._check_agent(req)
                return
            if role != "client":
                raise _denied(f"{user or 'this connection'} is not a client key: the clients endpoint serves "
                              f"clients only (agents connect to {broker.config.agents_endpoint})")
            if req.op == Op.HEALTH and req.header.get("metrics"):
                raise _denied("the broker's metrics count every client's work: they are served to agent keys "
                              f"(HEALTH on {broker.config.agents_endpoint}) and on the operator's --metrics-port, "
                              "not to clients")
            self._check_sessions(req, txn, user)
        except ProtocolError:
            self.denied += 1
            raise

    def _check_agent(self, req: "Request") -> None:
        agent_id = req.header.get("agent_id")
        if type(agent_id) is not str:
            return
        holder = self.agent_users.get(agent_id)
        if holder is not None and holder != req.user and agent_id in self.broker.agents:
            raise _denied(f"agent id {agent_id} belongs to a live agent of another key ({holder}): "
                          f"{req.user} may not use it; give this agent its own --agent-id")
        if req.op == Op.AGENT_REGISTER:
            self.agent_users[agent_id] = req.user
            req.on_rollback(lambda: self._restore(agent_id, holder))

    def _restore(self, agent_id: str, holder: Optional[str]) -> None:
        if holder is None:
            self.agent_users.pop(agent_id, None)
        else:
            self.agent_users[agent_id] = holder

    def _check_sessions(self, req: "Request", txn: Txn, user: str) -> None:
        """Refuse a request naming a session, task or result of a session another user created.

        Unknown ids pass: the handler answers NOT_FOUND for them, as without security.
        """
        h = req.header
        owners = self.broker.state.session_owner

        def check(session_id, what: str) -> None:
            owner = owners.get(session_id)
            if owner is not None and owner != user:
                raise _denied(f"{what} belongs to another client: {user} may not use it")

        sid = h.get("session_id")
        if type(sid) is str:
            check(sid, f"session {sid}")
        for sid in h.get("session_ids") or ():
            check(sid, f"session {sid}")
        for tid in h.get("task_ids") or ():
            row = txn.get_task(tid)
            if row is not None:
                check(row["session_id"], f"task {tid}")
        for rid in h.get("result_ids") or ():
            row = txn.get_result(rid)
            if row is not None:
                check(row["session_id"], f"result {rid}")

    def restrict(self, req: "Request", flt: Filter, entity: str) -> Filter:
        """Narrow a list's filter to the caller's own sessions (and their tasks and results)."""
        user = req.user
        if entity == "session":
            inner = flt.match
            flt.match = ((lambda row: row.get("owner", "") == user) if inner is None
                         else (lambda row: row.get("owner", "") == user and inner(row)))
            return flt
        owners = self.broker.state.session_owner
        pins = flt.pinned("session_id")
        if pins is not None:
            foreign = sorted(s for s in pins if owners.get(s) not in (None, user))
            if foreign:
                self.denied += 1
                raise _denied(f"session {foreign[0]} belongs to another client: {user} may not list it")
            return flt  # the pins already keep the scan inside the caller's sessions
        owned = sorted(s for s, o in owners.items() if o == user)
        dnf = req.header.get("filter") or [[]]
        if len(dnf) * max(1, len(owned)) <= _MAX_PINNED_CLAUSES:
            # One clause per (clause, session): the scan then reads only those sessions' rows, from the index.
            pinned = [[*clause, ["session_id", "eq", s]] for clause in dnf for s in owned]
            return Filter(pinned or [[["session_id", "eq", ""]]], "filter", entity)  # "" is no session's id
        inner, mine = flt.match, frozenset(owned)
        flt.match = ((lambda row: row["session_id"] in mine) if inner is None
                     else (lambda row: row["session_id"] in mine and inner(row)))
        return flt


class Security:
    """Mixed into ``Broker``: ``AUTH_INFO``, and what a caller may see of the broker as a whole.

    With CURVE, a client sees its own identity and its own sessions only: the broker's counters (requests,
    handshakes, refusals of every peer) and where its data lives are for agents and the operator.
    """

    def handle_auth_info(self: "Broker", req: "Request", txn: Txn) -> None:
        """Tell the caller who the broker thinks it is."""
        req.reply(user=req.user, secure=self.guard is not None)

    def sees_broker_internals(self: "Broker", req: "Request") -> bool:
        """Whether ``req``'s caller may see the broker's own figures: without CURVE (one local user), or an agent."""
        return self.auth is None or req.sock is self.backend

    def auth_figures(self: "Broker") -> dict:
        """The authentication counters, for HEALTH metrics: requests that reached the loop, refusals, handshakes."""
        guard, auth = self.guard, self.auth
        if guard is None:
            return {}
        return {"auth": {"requests": self.stats["requests"], "denied": auth.denied, **guard.snapshot()}}
