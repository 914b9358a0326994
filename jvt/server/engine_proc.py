"""The engine process of ``jvt serve``: it owns the device and runs ``engine_loop.EngineLoop``
with commands read from, and step outputs written to, two ZMQ IPC sockets (``wire`` says what
travels). Started by ``engine_client.EngineClient`` (multiprocessing, spawn).

It ends with the API process: SIGTERM, a "stop" command, or the API process gone (the kernel's
parent-death signal, and a check of the parent pid every POLL_MS as a fallback) abort what is
running, close the engine and exit 0. SIGINT is ignored: a Ctrl-C in the terminal reaches the
whole process group, and the API process decides. If the engine itself fails, the process
exits 1 and the API process answers for it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

import zmq

from jvt.server import wire
from jvt.server.engine_loop import EngineLoop, InvalidRequestError, Update

log = logging.getLogger("jvt.engine_proc")
POLL_MS = 200  # how often a blocked engine process looks for a stop or a dead parent
PR_SET_PDEATHSIG = 1


class _Sub:
    """A submission as the engine process sees it."""

    def __init__(self, sid: int, items: list):
        self.sid = sid
        self.items = items
        self.open = len(items)  # choices whose final record has not been sent


class _Port:
    """engine_loop.Port over the sockets: one "step" message per publish."""

    def __init__(self, rx: zmq.Socket, tx: zmq.Socket, parent_pid: int):
        self.rx, self.tx = rx, tx
        self.parent_pid = parent_pid
        self.stopping = False  # SIGTERM or the parent gone: stop at the next take()
        self.subs: dict[int, _Sub] = {}
        self.accepts: list = []
        self.answers: list = []

    def take(self, block: bool) -> list[tuple[str, Any]]:
        cmds = []
        while True:
            while self.rx.poll(0):
                cmds.append(self._command(wire.decode(self.rx.recv())))
            if os.getppid() != self.parent_pid:
                self.stopping = True
            if self.stopping:
                return [*cmds, ("abort_all", None), ("stop", None)]
            if cmds or not block:
                return cmds
            self.rx.poll(POLL_MS)

    def _command(self, msg: list) -> tuple[str, Any]:
        kind = msg[0]
        if kind == "add":
            sid, items = msg[1], msg[2]
            sub = self.subs[sid] = _Sub(sid, [(ids, wire.params_from_wire(p))
                                              for ids, p in items])
            return "add", sub
        if kind == "abort":
            return "abort", (self.subs.get(msg[1]), msg[2])
        if kind == "call":
            return "call", (msg[1], msg[2])
        return kind, None  # "abort_all", "stop"

    def accepted(self, sub: _Sub, error: Exception | None) -> None:
        if error is None:
            self.accepts.append([sub.sid, None])
            return
        del self.subs[sub.sid]
        if isinstance(error, InvalidRequestError):
            self.accepts.append([sub.sid, "invalid", error.index, str(error)])
        else:
            self.accepts.append([sub.sid, "failed", str(error)])

    def publish(self, updates: list[tuple[_Sub, Update, Any]], stats: dict | None) -> None:
        records = []
        for sub, u, req in updates:
            d = u.delta
            if u.output is not None:
                sub.open -= 1
                if not sub.open:
                    del self.subs[sub.sid]
            seq = req.seq
            records.append([sub.sid, u.index, d.token_ids,
                            None if d.logprobs is None else wire.logprobs_to_wire(d.logprobs),
                            d.finish_reason, req.error,
                            [req.metrics.scheduled_time, seq.prefix_reused, seq.num_preemptions],
                            None if d.prompt_logprobs is None
                            else wire.prompt_logprobs_to_wire(d.prompt_logprobs)])
        if records or stats is not None or self.accepts or self.answers:
            self.tx.send(wire.encode(["step", self.accepts, records, stats, self.answers]))
            self.accepts, self.answers = [], []

    def answer(self, key: Any, result: Any, error: Exception | None) -> None:
        self.answers.append([key, result, None if error is None else f"{error!r}"])


def main(model: str, opts: dict, commands: str, outputs: str, parent_pid: int,
         log_level: str) -> None:
    """The engine process (the target of multiprocessing.Process): build the engine, send
    "ready" (or "failed"), then serve commands until stopped."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(levelname)s %(name)s[engine]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    rx.connect(commands)
    tx.connect(outputs)
    port = _Port(rx, tx, parent_pid)

    def on_term(signum, frame) -> None:
        port.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        engine = _build(model, opts, tx)
        if engine is None:
            code = 2
            return
        try:
            EngineLoop(port).run(engine)
        except BaseException:
            log.exception("the engine failed; the engine process exits")
            code = 1
        finally:
            engine.close()
    finally:
        ctx.destroy(linger=1000)  # the last step's message still goes out
        sys.stdout.flush()
        os._exit(code)  # no interpreter teardown of JAX's threads


def _build(model: str, opts: dict, tx: zmq.Socket):
    import dataclasses

    import jvt

    try:
        engine = jvt.Engine(model, **opts)
    except ValueError as e:
        tx.send(wire.encode(["failed", "value", str(e)]))
        return None
    except Exception as e:
        log.exception("building the engine failed")
        tx.send(wire.encode(["failed", "error", f"{e!r}"]))
        return None
    tx.send(wire.encode(["ready", dataclasses.asdict(engine.config)]))
    return engine


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the API process dies (take() also checks the parent pid)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
