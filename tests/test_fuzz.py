"""T11: malformed-input fuzz of the broker's and the agent's decode-and-validate paths (RELIABILITY.md 6).

Hypothesis builds messages from the protocol's own schemas (``protocol.SCHEMAS``), then breaks them:
random bytes, 1-10 parts, wrong types, missing and unknown fields, unknown ops, nesting 1,000 deep,
huge declared lengths, int and ext map keys, unknown ext codes, the timestamp ext, invalid UTF-8,
truncation and trailing bytes. A third kind is schema-valid with made-up ids, which the handlers
must refuse. Each case goes from a DEALER over loopback to a real broker process (and, in the second
test, to a real agent's worker socket) and must get exactly one reply, an error one.

Pass (broker): same pid; every case answered, error replies == the broker's error counter's growth;
RSS growth <= 50 MiB; a HEALTH probe running alongside has p99 <= 100 ms; LMDB ``last_txnid``
unchanged (no write from any of these frames). Pass (agent): same pid, every case answered with an
error, and the agent still runs a task afterwards.
"""

from __future__ import annotations

import copy
import json
import os
import random
import select
import socket
import threading
import time
from collections import deque

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from armonik_zmq import protocol as P
from armonik_zmq._core import schema_valid as compiled_schema_valid
from armonik_zmq.broker.metrics import rss_bytes
from armonik_zmq.protocol import BACKEND_OPS, FRONTEND_OPS, SCHEMAS, WORKER_OPS, Op
from armonik_zmq.worker.link import Link

from conftest import Api, broker_only, make_cluster
from reliability import figure, judge_latency

BATCH = 16  # cases per hypothesis example (a drawn case and 15 cheap mutants of it), one round trip
#: ops left out of the schema-valid kind: they would succeed and write (a session, an agent)
WRITERS = {Op.CREATE_SESSION, Op.AGENT_REGISTER}


# -- strategies -----------------------------------------------------------------------------------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.floats(),
                  st.text(max_size=12), st.binary(max_size=12))


def valid(t: P._Type) -> st.SearchStrategy:
    """Values that pass ``t.check`` (with made-up content: ids that exist nowhere)."""
    if isinstance(t, P.Str):
        return st.text(min_size=1 if t.nonempty else 0, max_size=16)
    if isinstance(t, P.StrOrBytes):
        return st.one_of(st.text(min_size=1 if t.nonempty else 0, max_size=16),
                         st.binary(min_size=1 if t.nonempty else 0, max_size=16))
    if isinstance(t, P.Int):
        return st.integers(-(2 ** 63) if t.lo is None else t.lo, 2 ** 64 - 1 if t.hi is None else t.hi)
    if isinstance(t, P.Num):
        return st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.floats())
    if isinstance(t, P.Bool):
        return st.booleans()
    if isinstance(t, (P.Any_, P.Scalar)):
        return _leaf
    if isinstance(t, P.List):
        return st.lists(valid(t.item), min_size=1 if t.nonempty else 0, max_size=min(t.max_len, 3))
    if isinstance(t, P.StrMap):
        return st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    if isinstance(t, P.Opt):
        return st.one_of(st.none(), valid(t.inner))
    if isinstance(t, P.Map):
        return st.fixed_dictionaries({k: valid(v) for k, v in t.required.items()},
                                     optional={k: valid(v) for k, v in t.optional.items()})
    raise TypeError(f"no strategy for {t!r}")  # a new schema type: teach this test about it


def header_of(op: Op, fields: dict, rid: int) -> dict:
    return {"v": P.PROTOCOL_VERSION, "op": int(op), "rid": rid, **fields}


_VALID: dict = {}


def schema_valid(ops) -> st.SearchStrategy:
    """Schema-valid headers of ``ops`` (built once per set of ops: building strategies is slow)."""
    key = frozenset(ops)
    if key not in _VALID:
        _VALID[key] = st.one_of([
            st.builds(header_of, st.just(op), valid(SCHEMAS[op]), st.integers(0, 2 ** 64 - 1))
            for op in sorted(ops - WRITERS)])
    return _VALID[key]


_SPLICE = "\x00splice-me\x00"
_SPLICED = msgpack.packb(_SPLICE)

#: raw msgpack values the packer cannot make (or should not): spliced into a header in place of a field
RAW_VALUES = {
    "nesting 1000 (arrays)": b"\x91" * 1000 + b"\xc0",
    "nesting 1000 (maps)": b"\x81\xa1k" * 1000 + b"\xc0",
    "nesting 2000": b"\x91" * 2000 + b"\xc0",
    "array32 claims 2^32-1 items": b"\xdd\xff\xff\xff\xff\xc0\xc0",
    "map32 claims 2^32-1 pairs": b"\xdf\xff\xff\xff\xff\xa1k\xc0",
    "str32 claims 4 GiB": b"\xdb\xff\xff\xff\xffabc",
    "bin32 claims 4 GiB": b"\xc6\xff\xff\xff\xffabc",
    "ext32 claims 4 GiB": b"\xc9\xff\xff\xff\xff\x05abc",
    "array16 of 65535 nils, 3 given": b"\xdc\xff\xff\xc0\xc0\xc0",
    "invalid utf-8 str": b"\xa4\xff\xfe\xc3\x28",
    "invalid utf-8 (surrogate)": b"\xa3\xed\xa0\x80",
    "never-used byte 0xc1": b"\xc1",
    "timestamp ext -1": b"\xd6\xff\x00\x00\x00\x01",
    "timestamp96 ext -1": b"\xc7\x0c\xff" + b"\x00" * 12,
    "bad timestamp length": b"\xd5\xff\x00\x01",
    "unknown ext 42": b"\xd4\x2a\x00",
    "int map key": b"\x81\x01\xa1x",
    "ext map key": b"\x81\xd4\x05\x00\xa1x",
    "nil map key": b"\x81\xc0\xa1x",
    "array map key": b"\x81\x91\x01\xa1x",
}


@st.composite
def broken(draw, ops, other_ops) -> bytes:
    """A header that must be refused: a valid one with one defect, or something that is not a header."""
    kind = draw(st.sampled_from(["random", "wrong type", "missing field", "unknown field", "envelope",
                                 "other endpoint's op", "raw value", "raw header", "truncated", "trailing",
                                 "timestamp value", "ext value", "key types"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "raw header":
        return draw(st.sampled_from(sorted(RAW_VALUES.values())))
    h = draw(schema_valid(ops))
    op = Op(h["op"])
    schema = SCHEMAS[op]
    fields = [k for k in h if k not in ("v", "op", "rid")]
    if kind == "wrong type":
        name = draw(st.sampled_from([*fields, "v", "op", "rid"]))
        h[name] = draw(st.one_of(_leaf, st.lists(_leaf, max_size=3), st.dictionaries(st.text(max_size=4), _leaf,
                                                                                      max_size=2)))
    elif kind == "missing field":
        name = draw(st.sampled_from([*schema.required, "v", "op", "rid"]))
        del h[name]
    elif kind == "unknown field":
        h[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in h and k not in schema.optional))] = \
            draw(_leaf)
    elif kind == "envelope":
        h[draw(st.sampled_from(["v", "op", "rid"]))] = draw(st.sampled_from(
            [None, -1, 2, "1", 1.0, True, 9999, 2 ** 63, -(2 ** 63), [], {}]))
        if type(h.get("op")) is int and h["op"] in {int(o) for o in ops} and h.get("v") == P.PROTOCOL_VERSION \
                and type(h.get("rid")) is int and h["rid"] >= 0:
            h["op"] = 9999
    elif kind == "other endpoint's op":
        h["op"] = int(draw(st.sampled_from(sorted(other_ops))))
    elif kind == "raw value":
        name = draw(st.sampled_from([*fields, "op", "rid"]))
        h[name] = _SPLICE
        return msgpack.packb(h).replace(_SPLICED, draw(st.sampled_from(sorted(RAW_VALUES.values()))), 1)
    elif kind == "timestamp value":
        h[draw(st.sampled_from([*fields, "rid"]) if fields else st.just("rid"))] = msgpack.Timestamp(1, 2)
    elif kind == "ext value":
        h[draw(st.sampled_from([*fields, "rid"]) if fields else st.just("rid"))] = msgpack.ExtType(
            draw(st.integers(0, 127)), draw(st.binary(max_size=8)))
    elif kind == "key types":
        h[draw(st.sampled_from([1, -1, 2.5, True, msgpack.ExtType(1, b"k"), b"bytes-key"]))] = draw(_leaf)
    packed = msgpack.packb(h)
    if kind == "truncated":
        return packed[:draw(st.integers(0, len(packed) - 1))]
    if kind == "trailing":
        return packed + draw(st.binary(min_size=1, max_size=8))
    if _accepted(packed, ops):
        # The defect happened to be harmless (e.g. a wrong type equal to a right one): add one that is not.
        h["zz-unknown-field"] = 1
        packed = msgpack.packb(h)
    return packed


def _accepted(frame: bytes, ops) -> bool:
    try:
        P.validate(P.decode_header(frame), ops)
        return True
    except P.ProtocolError:
        return False


@st.composite
def case(draw, ops, other_ops) -> list[bytes]:
    """One message's parts: a header (schema-valid 1 time in 10, broken otherwise), then 0-9 data frames."""
    header = msgpack.packb(draw(schema_valid(ops))) if draw(st.integers(0, 9)) == 0 else draw(broken(ops, other_ops))
    return [header, *draw(st.lists(st.binary(max_size=32), max_size=9))]


_INTERESTING = b"\x00\x01\x7f\x80\x90\x9f\xa0\xbf\xc0\xc1\xc2\xc3\xc4\xc6\xc7\xc9\xca\xcb\xcf\xd0\xd3\xd4\xd5" \
               b"\xd6\xd7\xd8\xd9\xdb\xdc\xdd\xde\xdf\xe0\xff"


#: the mutants' random generator is seeded by hypothesis (a HypothesisRandom would make every call a draw: slow)
SEEDS = st.integers(0, 2 ** 32 - 1)


def _wrong_values(rnd) -> list:
    return [None, True, -1, 0, 2 ** 63, -(2 ** 63), 2 ** 64 - 1, 1.5, float("nan"), "", "x" * rnd.randint(1, 300),
            b"\xff", [], [[]], [None] * 3, {}, {"k": 1}, {"": []}, msgpack.ExtType(rnd.randrange(128), b"e"),
            msgpack.Timestamp(rnd.randint(0, 2 ** 32), 0), _nested(rnd.randint(2, 120))]


def _nested(depth: int):
    value: object = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _value_havoc(header: dict, rnd, ops) -> bytes:
    """1-3 edits of a decoded header's fields: delete one, give one a wrong value, add one, or send it
    under another op's number (a request of one op read as another)."""
    for _ in range(rnd.randint(1, 3)):
        keys = list(header)
        what = rnd.randrange(4)
        if what == 0 and keys:
            del header[rnd.choice(keys)]
        elif what == 1 and keys:
            header[rnd.choice(keys)] = rnd.choice(_wrong_values(rnd))
        elif what == 2:
            header[rnd.choice(["zz", "x" * 70_000, 7, -1, b"raw", 0.5, msgpack.ExtType(3, b"")])] = \
                rnd.choice(_wrong_values(rnd))
        else:
            header["op"] = int(rnd.choice(sorted(ops)))
            if rnd.random() < 0.5 and keys:
                header.pop(rnd.choice(keys), None)
    return msgpack.packb(header)


def _deep_edit(value, rnd):
    """Return ``value`` with one edit somewhere inside it: a field deleted, added or given a wrong value, or an item
    of a list replaced; at any depth (the schema check must judge nested maps and lists as well as the top)."""
    if isinstance(value, dict) and value and rnd.random() < 0.8:
        key = rnd.choice(list(value))
        what = rnd.randrange(4)
        if what == 0:
            value[key] = _deep_edit(value[key], rnd)
        elif what == 1:
            del value[key]
        elif what == 2:
            value[key] = rnd.choice(_wrong_values(rnd))
        else:
            value[rnd.choice(["zz", 7, "v", "rid", b"k"])] = rnd.choice(_wrong_values(rnd))
        return value
    if isinstance(value, list) and value and rnd.random() < 0.8:
        i = rnd.randrange(len(value))
        value[i] = _deep_edit(value[i], rnd) if rnd.random() < 0.6 else rnd.choice(_wrong_values(rnd))
        return value
    return rnd.choice(_wrong_values(rnd))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_valid(FRONTEND_OPS | BACKEND_OPS | WORKER_OPS), SEEDS)
def test_the_compiled_schema_check_agrees_with_the_schema_classes(header, seed):
    """``protocol.validate`` trusts ``_core.schema_valid``'s yes: it must say yes exactly when the schema classes do."""
    rnd = random.Random(seed)
    op = Op(header["op"])
    for edited in (header, *(_deep_edit(copy.deepcopy(header), rnd) for _ in range(BATCH))):
        try:
            SCHEMAS[op].check(edited, "")
            expected = True
        except P.ProtocolError:
            expected = False
        assert compiled_schema_valid(P._COMPILED[op], edited) == expected, edited


def havoc(parts: list[bytes], rnd, ops) -> list[bytes]:
    """A cheap mutant of a message: half of the time 1-3 edits of its fields (when it decodes to a map),
    else 1-4 byte-level edits of the header (AFL's "havoc" stage); sometimes data frames added or
    removed (1 to 10 parts in all)."""
    data = list(parts[1:])
    if rnd.random() < 0.3:
        data = [rnd.randbytes(rnd.randint(0, 16)) for _ in range(rnd.randint(0, 9))]
    if rnd.random() < 0.5:
        try:
            decoded = msgpack.unpackb(parts[0], strict_map_key=False)
        except Exception:
            decoded = None
        if isinstance(decoded, dict):
            try:
                return [_value_havoc(decoded, rnd, ops), *data]
            except (TypeError, ValueError):  # an unhashable key or a value the packer refuses: use bytes
                pass
    header = bytearray(parts[0])
    for _ in range(rnd.randint(1, 4)):
        what = rnd.randrange(8)
        at = rnd.randint(0, len(header))
        if what == 0 and header:
            header[min(at, len(header) - 1)] ^= 1 << rnd.randrange(8)
        elif what == 1 and header:
            header[min(at, len(header) - 1)] = rnd.choice(_INTERESTING)
        elif what == 2:
            header[at:at] = rnd.randbytes(rnd.randint(1, 8))
        elif what == 3:
            del header[at:at + rnd.randint(1, 8)]
        elif what == 4:
            del header[at:]
        elif what == 5:
            header += rnd.randbytes(rnd.randint(1, 4))
        elif what == 6:
            header[at:at] = rnd.choice(list(RAW_VALUES.values()))
        else:
            header[at:at] = header[rnd.randint(0, len(header)):][:rnd.randint(1, 16)]
    return [bytes(header), *data]


def classify(parts: list[bytes], ops) -> str | None:
    """"valid" if the header passes the broker's own decode and validation, "broken" if not; None for a
    valid header of an op that would write (not sent: this test is about input that must not)."""
    try:
        op = P.validate(P.decode_header(parts[0]), ops)
    except P.ProtocolError:
        return "broken"
    return None if op in WRITERS else "valid"


def expand(base: list[bytes], rnd, ops, n: int) -> list[tuple[str, list[bytes]]]:
    """The base case and ``n - 1`` havoc mutants of it, each with its kind."""
    out = []
    for parts in [base, *(havoc(base, rnd, ops) for _ in range(n - 1))]:
        kind = classify(parts, ops)
        if kind is not None:
            out.append((kind, parts))
    return out


# -- harness --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.connect(endpoint)
    return sock


def _decode_reply(frame: bytes) -> dict:
    """Decode a reply as strictly as the client does (protocol.unpack): replies must pass it too."""
    header = P.unpack(frame)
    assert isinstance(header, dict) and header.get("v") == P.PROTOCOL_VERSION, header
    return header


class Prober(threading.Thread):
    """Sends HEALTH every 20 ms on its own connection and records the round trips (seconds)."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        super().__init__(daemon=True)
        self.sock = _dealer(ctx, endpoint)
        self.latencies: list[float] = []
        self.failures = 0
        self._halt = threading.Event()

    def run(self) -> None:
        rid = 0
        while not self._halt.wait(0.02):
            rid += 1
            start = time.perf_counter()
            self.sock.send(P.request(Op.HEALTH, rid))
            try:
                reply = _decode_reply(self.sock.recv())
            except zmq.Again:
                self.failures += 1
                continue
            self.latencies.append(time.perf_counter() - start)
            if not reply.get("ok") or reply["rid"] != rid:
                self.failures += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sock.close()


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def _metrics(sock: zmq.Socket) -> dict:
    sock.send(P.request(Op.HEALTH, 1, metrics=True))
    return _decode_reply(sock.recv())["metrics"]


class LinkPeer:
    """A connection to an agent's worker socket, framed as a worker's link (worker/link.py), with the
    ``send_multipart``/``recv_multipart`` of a DEALER (a reply not in within ``timeout`` raises TimeoutError)."""

    def __init__(self, path: str, timeout: float = 20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.link = Link(self.sock)
        self.timeout = timeout
        self._inbox: deque = deque()

    def send_multipart(self, parts: list) -> None:
        self.link.send(parts)

    def recv_multipart(self) -> list:
        deadline = time.monotonic() + self.timeout
        while not self._inbox:
            if self.link.closed is not None:
                raise AssertionError(f"the agent closed the link: {self.link.closed}")
            if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            self._inbox.extend(self.link.read())
        return self._inbox.popleft()

    def close(self) -> None:
        self.link.close()


def _send_batch(sock, cases: list, seen: dict, on_reply) -> None:
    """Send the cases, then take one reply per case (replies may come in another order: a listing
    runs between turns), and hand each to ``on_reply`` with the schema-valid cases' (op, rid)."""
    valid_keys = set()
    for kind, parts in cases:
        sock.send_multipart(parts)
        if kind == "valid":
            h = msgpack.unpackb(parts[0])
            valid_keys.add((h["op"], h["rid"]))
    for _ in cases:
        try:
            reply = _decode_reply(sock.recv_multipart()[0])
        except (zmq.Again, TimeoutError):
            raise AssertionError(f"no reply within 20 s to one of {cases!r:.2000}") from None
        on_reply(reply, valid_keys, cases)
    seen["cases"] += len(cases)


def _run(body, strategy, seen: dict, target: int) -> None:
    """Run ``body`` on examples of ``strategy`` until ``seen["cases"]`` reaches ``target``.

    Deterministic (derandomize): the same cases every run, so a CI failure reproduces; hypothesis
    shrinks a failing example to a small one.
    """
    while seen["cases"] < target:
        settings(max_examples=(target - seen["cases"]) // BATCH + 1, deadline=None, derandomize=True,
                 database=None, suppress_health_check=list(HealthCheck))(given(strategy)(body))()


# -- tests ----------------------------------------------------------------------------------------

@pytest.fixture
def tcp_broker(tmp_path_factory):
    with broker_only(tmp_path_factory, endpoint=f"tcp://127.0.0.1:{_free_port()}",
                     agents_endpoint=f"tcp://127.0.0.1:{_free_port()}") as cluster:
        yield cluster


def test_t11_broker_survives_malformed_input(tcp_broker, scale):
    target = int(200_000 * scale)  # CI: 20,000 cases
    ctx = zmq.Context()
    front, back = _dealer(ctx, tcp_broker.endpoint), _dealer(ctx, tcp_broker.agents_endpoint)
    probe_sock = _dealer(ctx, tcp_broker.endpoint)
    pid = tcp_broker.broker.pid
    before = _metrics(probe_sock)
    rss_before = rss_bytes(pid)
    prober = Prober(ctx, tcp_broker.endpoint)
    prober.start()
    seen = {"cases": 0, "errors": 0, "ok": 0, "valid": 0}
    oks_by_op: dict[str, int] = {}

    def on_reply(reply, valid_keys, cases):
        if "error" in reply:
            seen["errors"] += 1
            return
        # Only a schema-valid request may succeed (one whose made-up ids are not needed: a listing, a
        # transition of an empty list of sessions...); none of them may write (checked at the end).
        assert (reply["op"], reply["rid"]) in valid_keys and reply.get("ok") is True, (reply, cases)
        seen["ok"] += 1
        name = Op(reply["op"]).name
        oks_by_op[name] = oks_by_op.get(name, 0) + 1

    # 3 in 4 examples go to the client endpoint, 1 in 4 to the agents' (same decode path, other ops)
    def fuzz(example):
        to_agents, base, seed = example
        rnd = random.Random(seed)
        ops = BACKEND_OPS if to_agents else FRONTEND_OPS
        cases = expand(base, rnd, ops, BATCH)
        seen["valid"] += sum(kind == "valid" for kind, _ in cases)
        _send_batch(back if to_agents else front, cases, seen, on_reply)

    to_front = st.tuples(st.just(False), case(FRONTEND_OPS, BACKEND_OPS - FRONTEND_OPS),
                         SEEDS)
    to_back = st.tuples(st.just(True), case(BACKEND_OPS, FRONTEND_OPS - BACKEND_OPS), SEEDS)
    examples = st.one_of(to_front, to_front, to_front, to_back)
    started = time.monotonic()
    _run(fuzz, examples, seen, target)
    elapsed = time.monotonic() - started
    prober.stop()
    after = _metrics(probe_sock)
    rss_growth = rss_bytes(pid) - rss_before
    errors_counted = sum(after["errors"].values()) - sum(before["errors"].values())
    latency = p99(prober.latencies)
    for sock in (front, back, probe_sock):
        sock.close()
    ctx.term()

    alive = tcp_broker.broker.poll() is None
    figure("T11", "broker fuzz cases", seen["cases"], "cases", ">= 20,000 in CI", seen["cases"] >= 20_000)
    figure("T11", "broker pid unchanged", alive, "", "same process", alive)
    figure("T11", "error replies == error counter", f"{seen['errors']} == {errors_counted}", "",
           "every bad frame answered or counted", seen["errors"] == errors_counted)
    figure("T11", "broker RSS growth", round(rss_growth / 2 ** 20, 1), "MiB", "<= 50 MiB", rss_growth <= 50 << 20)
    figure("T11", f"health probe p99 (load average {os.getloadavg()[0]:.1f})", round(latency * 1000, 1), "ms",
           "<= 100 ms", latency <= 0.1)
    figure("T11", "LMDB commits from fuzz", after["lmdb_last_txnid"] - before["lmdb_last_txnid"], "commits", "= 0",
           after["lmdb_last_txnid"] == before["lmdb_last_txnid"])
    print(f"\nT11 broker: {seen['cases']} cases in {elapsed:.1f}s ({seen['valid']} schema-valid, {seen['ok']} "
          f"answered ok: {json.dumps(oks_by_op)}), {seen['errors']} error replies; rejected "
          f"{ {k: after['rejected'][k] - before['rejected'][k] for k in after['rejected']} }; RSS "
          f"{rss_growth / 2 ** 20:+.1f} MiB; health p99 {latency * 1000:.1f} ms over {len(prober.latencies)} probes")

    assert alive and tcp_broker.broker.pid == pid
    assert seen["cases"] >= target
    assert seen["errors"] + seen["ok"] == seen["cases"]
    assert seen["errors"] == errors_counted
    assert rss_growth <= 50 << 20, f"broker RSS grew {rss_growth / 2 ** 20:.1f} MiB"
    assert after["lmdb_last_txnid"] == before["lmdb_last_txnid"], "a fuzz case made the broker commit"
    assert prober.failures == 0, f"{prober.failures} health probes unanswered or refused"
    judge_latency("T11 health probe p99", latency, 0.1)


def worker_socket(agent_pid: int, timeout: float = 30.0) -> str:
    """The agent's worker socket, read from the command line of one of its worker processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != agent_pid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().decode().split("\0")
            except (OSError, ValueError, IndexError):
                continue
            if "--agent" in args:
                return args[args.index("--agent") + 1]
        time.sleep(0.1)
    raise AssertionError(f"no worker process of agent {agent_pid} found")


def test_t11_agent_worker_socket_survives_malformed_input(tmp_path, scale):
    target = int(50_000 * scale)  # CI: 5,000 cases
    with make_cluster(tmp_path, workers=1) as cluster:
        pid = cluster.agent.pid
        sock = LinkPeer(worker_socket(pid))
        seen = {"cases": 0, "errors": 0}

        def on_reply(reply, valid_keys, cases):
            assert "error" in reply, (reply, cases)  # no made-up token or pid is a worker's
            seen["errors"] += 1

        def fuzz(example):
            base, seed = example
            rnd = random.Random(seed)
            _send_batch(sock, expand(base, rnd, WORKER_OPS, BATCH), seen, on_reply)

        _run(fuzz, st.tuples(case(WORKER_OPS, (FRONTEND_OPS | BACKEND_OPS) - WORKER_OPS),
                             SEEDS), seen, target)
        sock.close()
        alive = cluster.agent.poll() is None
        figure("T11", "agent fuzz cases", seen["cases"], "cases", "every one answered with an error",
               seen["errors"] == seen["cases"])
        figure("T11", "agent pid unchanged", alive, "", "same process", alive)
        assert alive and seen["errors"] == seen["cases"] >= target
        # and it still runs tasks for its real workers
        from armonik_zmq.client import connect
        with connect(cluster.endpoint, timeout=30) as conn:
            api = Api(conn)
            session = api.session()
            _, outs = api.submit(session, {"op": "square", "x": 7})
            assert api.value(session, outs[0]) == 49
