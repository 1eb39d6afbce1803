"""The worker process: connect to the agent, run each task given, report its output."""

from __future__ import annotations

import ctypes
import importlib
import itertools
import logging
import os
import signal
import sys
import traceback
from collections import deque
from typing import Callable

import zmq

from ..common import Output
from ..protocol import Op, ProtocolError, check_reply, decode_header, request
from .taskhandler import TaskHandler, mapped_inputs

log = logging.getLogger(__name__)

#: prctl(2) option: the signal this process gets when its parent dies
_PR_SET_PDEATHSIG = 1


def load_processor(spec: str) -> Callable[[TaskHandler], Output]:
    """Import ``module:function``; raise a clear error when it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"processor must be given as MODULE:FUNCTION, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import processor module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no callable named {attr!r}")
    return fn


class WorkerRuntime:
    def __init__(self, agent_endpoint: str, processor: Callable[[TaskHandler], Output], identity: str = ""):
        self.processor = processor
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, f"{identity}-{os.getpid()}".encode())
        self.sock.connect(agent_endpoint)
        self._rids = itertools.count(1)
        self._agent_pid = os.getppid()
        #: RUN pushes that arrived while waiting for a reply (the agent queues the next task early)
        self._runs: deque = deque()

    def send(self, op: Op, data=(), **fields) -> int:
        rid = next(self._rids)
        self.sock.send_multipart([request(op, rid, **fields), *data], copy=False)
        return rid

    def call(self, op: Op, data=(), **fields) -> dict:
        """Send one request (header fields + ``data`` frames) to the agent and wait for its reply.

        RUN pushes that arrive meanwhile are kept for later.
        """
        rid = self.send(op, data, **fields)
        while True:
            header, frames = self._receive()
            if header is None:
                continue
            if header["op"] == Op.RUN:
                self._runs.append((header, frames))
            elif header["rid"] == rid:
                try:
                    return check_reply(header)
                except ProtocolError as exc:
                    raise RuntimeError(f"agent refused {op.name}: {exc}") from None

    def _receive(self):
        if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a failed NOBLOCK recv
            # Nothing yet: wait, but notice when the agent died (we were re-parented), so that a
            # SIGKILLed agent leaves no orphan workers behind.
            while not self.sock.poll(1000):
                if os.getppid() != self._agent_pid:
                    raise SystemExit("the agent is gone: worker exiting")
        # copy=True: bytes at once (a task handler wants bytes anyway; no zmq.Frame objects per message)
        msg = self.sock.recv_multipart()
        try:
            header = decode_header(msg[0])
        except ProtocolError as exc:
            log.error("undecodable message from the agent ignored: %s", exc)
            return None, []
        if header["op"] == Op.W_OUTPUT and "error" in header:
            # Outputs are not waited for (the next task starts at once), so their refusals surface here.
            log.error("agent refused an output: %s", header["error"].get("message"))
        return header, msg[1:]

    def _next_run(self):
        if self._runs:
            return self._runs.popleft()
        while True:
            header, frames = self._receive()
            if header is not None and header["op"] == Op.RUN:
                return header, frames

    def run_one(self, header: dict, frames: list) -> None:
        token = header["token"]
        inputs = frames
        if header.get("mapped"):
            try:
                inputs = mapped_inputs(header, inputs)
            except Exception as exc:  # the data is gone or damaged: the retry path (maybe elsewhere)
                self.send(Op.W_OUTPUT, token=token, ok=False, raised=True,
                          error=f"cannot map the task's inputs from the broker's data socket: {exc}")
                return
        handler = TaskHandler(header, inputs, self.call)
        try:
            output = self.processor(handler)
        except Exception:
            # ArmoniK: an exception is not an Output: the task takes the retry path.
            self.send(Op.W_OUTPUT, token=token, ok=False, raised=True, error=traceback.format_exc())
            return
        if not isinstance(output, Output):
            self.send(Op.W_OUTPUT, token=token, ok=False, raised=True,
                      error=f"processor returned {type(output).__name__}, expected armonik_zmq.worker.Output")
            return
        fields, frames = handler.output_message() if output.success else ({}, [])
        self.send(Op.W_OUTPUT, frames, token=token, ok=output.success, error=output.error, **fields)

    def serve(self) -> None:
        self.call(Op.WORKER_READY, pid=os.getpid())
        while True:
            header, frames = self._next_run()
            self.run_one(header, frames)


def _die_with_agent() -> None:
    """Have Linux SIGKILL this worker the moment its agent dies, even in the middle of a long task.

    Elsewhere the parent pid check in ``_receive`` still applies, between tasks.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(agent_endpoint: str, processor_spec: str, identity: str = "") -> None:
    _die_with_agent()
    logging.basicConfig(level=os.environ.get("ARMONIK_ZMQ_LOG", "WARNING"),
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    try:
        processor = load_processor(processor_spec)
    except ValueError as exc:
        print(f"armonik-zmq worker: {exc}", file=sys.stderr)
        sys.exit(2)
    runtime = WorkerRuntime(agent_endpoint, processor, identity)
    try:
        runtime.serve()
    except KeyboardInterrupt:
        pass
