"""CurveZMQ keys and endpoint rules shared by the broker, the agents and the clients.

A key directory made by ``armonik-zmq keys DIR`` holds::

    DIR/server.key               the broker's public key: every client and agent needs it
    DIR/server.key_secret        the broker's secret key: the broker only
    DIR/clients/<name>.key       a client's public key: the broker's client allow-list
    DIR/clients/<name>.key_secret  that client's secret key: give it to that client only
    DIR/agents/<name>.key        an agent's public key: the broker's agent allow-list
    DIR/agents/<name>.key_secret   that agent's secret key: give it to that agent only

Files are ZeroMQ certificates (``zmq.auth``), mode 0600, in directories of mode 0700. A peer's
identity inside the broker is its ZAP User-Id, ``client:<name>`` or ``agent:<name>``: the role
comes from which allow-list holds its key, never from anything the peer sends.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from typing import Iterator, Optional, Union

import zmq
import zmq.auth

SERVER = "server"
CLIENTS = "clients"
AGENTS = "agents"
#: the role prefix of a User-Id, by allow-list directory
ROLES = {CLIENTS: "client", AGENTS: "agent"}
#: length of a Z85-encoded CURVE key
Z85_KEY_LEN = 40

KeyInput = Union[str, bytes, os.PathLike]


class SecurityError(RuntimeError):
    """Keys that cannot be used, or an endpoint that may not be served as asked; the message says what to do."""


def has_curve() -> bool:
    return bool(zmq.has("curve"))


def _require_curve() -> None:
    if not has_curve():
        raise SecurityError("this libzmq was built without CURVE support: install pyzmq from its wheels "
                        "(pip install --force-reinstall pyzmq), which bundle a libzmq with CURVE")


# -- generating keys ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    # Files are created 0600 from the start: no window in which a secret key is readable by others.
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise SecurityError(f"key name {name!r}: use letters, digits, '-', '_' and '.' only (it becomes the User-Id)")
    return name


def create_keys(directory: str, clients: list[str], agents: list[str]) -> list[str]:
    """Create the server key pair (unless it exists) and the named client and agent key pairs.

    Return the paths of the secret-key files created. An existing key is never overwritten:
    asking for a name that already exists is an error.
    """
    _require_curve()
    for name in [*clients, *agents]:
        _check_name(name)
    if len(set(clients)) != len(clients) or len(set(agents)) != len(agents):
        raise SecurityError("a key name appears twice")
    created = []
    with _private_umask():
        _private_dir(directory)
        plan = [(directory, SERVER)] if not os.path.exists(os.path.join(directory, SERVER + ".key_secret")) else []
        for sub, names in ((CLIENTS, clients), (AGENTS, agents)):
            _private_dir(os.path.join(directory, sub))
            for name in names:
                if os.path.exists(os.path.join(directory, sub, name + ".key")):
                    raise SecurityError(f"{os.path.join(directory, sub, name + '.key')} exists already: choose another "
                                    f"name, or delete that key first (deleting it revokes it)")
                plan.append((os.path.join(directory, sub), name))
        for where, name in plan:
            public, secret = zmq.auth.create_certificates(where, name)
            for path in (public, secret):
                os.chmod(path, 0o600)
            created.append(secret)
    return created


def next_names(directory: str, sub: str, prefix: str, count: int) -> list[str]:
    """Return ``count`` names ``<prefix>-<n>`` not used yet in ``directory/sub``."""
    names, n = [], 1
    while len(names) < count:
        name = f"{prefix}-{n}"
        if not os.path.exists(os.path.join(directory, sub, name + ".key")):
            names.append(name)
        n += 1
    return names


# -- loading keys ----------------------------------------------------------------------------------


def _load(path: str, what: str, need_secret: bool) -> tuple[bytes, Optional[bytes]]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read {what} from {path}: {exc}. Make keys with `armonik-zmq keys DIR`") from None
    if need_secret and not secret:
        raise SecurityError(f"{path} holds no secret key ({what}): give the '.key_secret' file, not the '.key' one")
    if len(public) != Z85_KEY_LEN or (secret is not None and len(secret) != Z85_KEY_LEN):
        raise SecurityError(f"{path} is not a CURVE certificate ({what}): its keys are not 40 Z85 characters")
    return public, secret


def public_key(key: KeyInput, what: str = "the server's public key") -> bytes:
    """Return a Z85 public key given as 40 Z85 characters or as a certificate file (``.key`` or ``.key_secret``)."""
    if isinstance(key, bytes) and len(key) == Z85_KEY_LEN:
        return key
    if isinstance(key, str) and len(key) == Z85_KEY_LEN and not os.path.exists(key):
        return key.encode()
    return _load(os.fspath(key), what, need_secret=False)[0]


def key_pair(secret: Union[KeyInput, tuple[bytes, bytes]], what: str = "this peer's secret key") -> tuple[bytes, bytes]:
    """Return (public, secret) Z85 keys from a ``.key_secret`` file or a (public, secret) pair."""
    if isinstance(secret, tuple):
        public, sec = secret
        public = public.encode() if isinstance(public, str) else public
        sec = sec.encode() if isinstance(sec, str) else sec
        if len(public) != Z85_KEY_LEN or len(sec) != Z85_KEY_LEN:
            raise SecurityError(f"{what}: a key pair is two Z85 keys of 40 characters")
        return public, sec
    public, sec = _load(os.fspath(secret), what, need_secret=True)
    return public, sec  # type: ignore[return-value]


def load_allow_list(directory: str, role: str) -> dict[bytes, str]:
    """Return {Z85 public key: User-Id} for every ``*.key`` file of ``directory`` (User-Id ``<role>:<name>``)."""
    keys: dict[bytes, str] = {}
    if not directory:
        return keys
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise SecurityError(f"cannot read the {role} key directory {directory}: {exc.strerror}") from None
    for filename in names:
        if not filename.endswith(".key"):
            continue
        public, _ = _load(os.path.join(directory, filename), f"a {role} public key", need_secret=False)
        keys[public] = f"{role}:{filename[:-len('.key')]}"
    return keys


def apply_client_keys(sock: zmq.Socket, server_key: bytes, pair: tuple[bytes, bytes]) -> None:
    """Make a connecting socket a CURVE client of the server whose public key is ``server_key``."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair[0])
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair[1])


class ClientKeys:
    """What a client or an agent needs to connect with CURVE: the server's public key and its own pair."""

    __slots__ = ("server_key", "pair")

    def __init__(self, server_key: KeyInput, secret: Union[KeyInput, tuple[bytes, bytes]]):
        _require_curve()
        self.server_key = public_key(server_key)
        self.pair = key_pair(secret)

    @classmethod
    def from_options(cls, server_key: Optional[KeyInput], secret: Optional[Union[KeyInput, tuple]],
                     server_option: str = "server_key", secret_option: str = "secret") -> Optional["ClientKeys"]:
        """Return the keys, None when neither is given; refuse one without the other."""
        if server_key is None and secret is None:
            return None
        if server_key is None or secret is None:
            missing = server_option if server_key is None else secret_option
            raise SecurityError(f"CURVE needs both the server's public key and this peer's secret key: '{missing}' "
                            f"is missing ({server_option}: DIR/server.key, {secret_option}: its '.key_secret' file)")
        return cls(server_key, secret)

    def apply(self, sock: zmq.Socket) -> None:
        apply_client_keys(sock, self.server_key, self.pair)


# -- endpoints -------------------------------------------------------------------------------------


def _host_is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in ("lo", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False  # an interface name, or a name that does not resolve: assume it is reachable from outside
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def is_private_endpoint(endpoint: str) -> bool:
    """Tell whether only this host can reach ``endpoint``: ``ipc://``, ``inproc://`` or tcp on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    # tcp://[source;]host:port
    host = rest.rsplit(";", 1)[-1].rsplit(":", 1)[0]
    return _host_is_loopback(host)


def check_bind(endpoint: str, secure: bool, option: str) -> None:
    """Refuse to bind an address other hosts can reach unless CURVE is on (RELIABILITY.md section 7)."""
    if secure or is_private_endpoint(endpoint):
        return
    raise SecurityError(
        f"refusing to serve {option} {endpoint} without authentication: any host that can reach it would be "
        f"trusted. Either bind a loopback address (tcp://127.0.0.1:PORT) or an ipc:// socket, or turn CURVE on: "
        f"`armonik-zmq keys DIR` makes the keys, then start the broker with `--keys DIR` and give each client "
        f"and agent the server's public key and its own secret key")
