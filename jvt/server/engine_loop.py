"""The engine's command loop, shared by the server's two ways of running an Engine: on a thread
of the API process (``bridge.EngineBridge``) and in a process of its own (``engine_proc``).

The loop is the only caller of the (single-threaded) Engine. Commands come from a ``Port``,
which also carries the results away; between commands it runs one ``engine.step()`` and hands
every request's new delta to the port, all of one step in one ``publish`` call. It blocks on
the port while the engine has no work.

Commands (kind, arg):
  ("add", sub)            queue sub.items (prompt, SamplingParams) all or nothing; the port's
                          ``accepted(sub, error)`` follows, error None or an exception
  ("abort", (sub, i))     abort choice i of sub (i None: every choice)
  ("abort_all", None)     abort every request
  ("call", (name, key))   run engine.<name>() for name in CALLS; ``answer(key, result, error)``
  ("stop", None)          let aborted requests retire, publish, and return

A request can only fail itself: an error while admitting one (other than the engine's
ValueError for bad input) rejects its submission with ``RequestFailedError``, and the engine
fails a request it cannot pack or post-process with finish_reason "error"; the loop goes on.
If ``engine.step()`` raises, ``run`` raises; ``active`` then still holds the open requests.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol

from jvt.types import RequestOutput, StreamDelta

log = logging.getLogger("jvt.server")
STATS_INTERVAL_S = 0.1  # how often a busy loop refreshes its engine.stats() snapshot
CALLS = ("stats", "free_cache")  # engine methods a "call" command may run


class RequestFailedError(RuntimeError):
    """The engine failed on this request alone (a bug, not bad input); the engine goes on."""


class InvalidRequestError(ValueError):
    """``engine.add_request`` rejected the ``index``-th item of a submission."""

    def __init__(self, index: int, error: ValueError | str):
        super().__init__(str(error))
        self.index = index


@dataclasses.dataclass(frozen=True)
class Update:
    """New output of choice ``index``; ``output`` is set on its last update."""

    index: int
    delta: StreamDelta
    output: RequestOutput | None


class Port(Protocol):
    def take(self, block: bool) -> list[tuple[str, Any]]:
        """The commands that arrived (at least one when ``block``)."""

    def accepted(self, sub: Any, error: Exception | None) -> None:
        """Every item of ``sub`` is queued in the engine (error None), or none is."""

    def publish(self, updates: list[tuple[Any, Update, Any]], stats: dict | None) -> None:
        """The updates of one step, (submission, update, engine Request) each; a fresh stats
        snapshot or None. Called after every iteration (``updates`` may be empty)."""

    def answer(self, key: Any, result: Any, error: Exception | None) -> None:
        """The result of a "call" command."""


class EngineLoop:
    def __init__(self, port: Port):
        self.port = port
        self.active: dict[str, tuple[Any, Any, int]] = {}  # request id -> (req, sub, index)
        self._requests: dict[Any, list] = {}  # submission -> its engine Requests, item order
        self._stats_time = 0.0
        self.received = 0  # engine requests submitted to this loop, accepted or not

    def run(self, engine) -> None:
        """Execute commands and step until "stop"."""
        while True:
            for kind, arg in self.port.take(block=not engine.has_unfinished()):
                if kind == "add":
                    self._add(engine, arg)
                elif kind == "abort":
                    sub, index = arg
                    reqs = self._requests.get(sub, [])
                    for req in reqs if index is None else reqs[index:index + 1]:
                        engine.abort(req.request_id)
                elif kind == "abort_all":
                    for req, _, _ in self.active.values():
                        engine.abort(req.request_id)
                elif kind == "call":
                    self._call(engine, *arg)
                else:  # "stop", after "abort_all": let the aborted requests retire
                    while engine.has_unfinished():
                        engine.step()
                    self._publish(engine, force_stats=True)
                    return
            if engine.has_unfinished():
                engine.step()
            self._publish(engine, force_stats=not engine.has_unfinished())

    def _add(self, engine, sub) -> None:
        self.received += len(sub.items)
        reqs = []
        for i, (prompt, params) in enumerate(sub.items):
            try:
                reqs.append(engine.add_request(prompt, params))
            except ValueError as e:
                self._reject(engine, reqs, sub, InvalidRequestError(i, e))
                return
            except Exception as e:
                log.exception("admitting a request failed")
                self._reject(engine, reqs, sub, RequestFailedError(
                    f"the engine failed to admit the request: {e!r}"))
                return
        self._requests[sub] = reqs
        for i, req in enumerate(reqs):
            self.active[req.request_id] = (req, sub, i)
        self.port.accepted(sub, None)

    def _reject(self, engine, queued: list, sub, error: Exception) -> None:
        """All or nothing: abort the items of ``sub`` already queued, then reject it."""
        for req in queued:
            engine.abort(req.request_id)
        self.port.accepted(sub, error)

    def _call(self, engine, name: str, key) -> None:
        if name not in CALLS:
            self.port.answer(key, None, ValueError(f"unknown engine call {name!r}"))
            return
        try:
            result = self._stats(engine) if name == "stats" else getattr(engine, name)()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            self.port.answer(key, None, e)
            return
        self.port.answer(key, result, None)

    def _stats(self, engine) -> dict:
        """engine.stats() and the loop's count of requests received."""
        return {**engine.stats(), "requests_received": self.received}

    def _publish(self, engine, force_stats: bool) -> None:
        """Hand every request's new delta to the port; forget finished requests. A fresh
        stats snapshot goes along every STATS_INTERVAL_S, and before the loop blocks (idle)."""
        updates = []
        for rid, (req, sub, index) in list(self.active.items()):
            delta = engine.take_delta(req)
            if delta is None:
                continue
            output = None
            if delta.finish_reason is not None:
                del self.active[rid]
                if all(r.finished for r in self._requests.get(sub, ())):
                    self._requests.pop(sub, None)
                output = req.output()
            updates.append((sub, Update(index, delta, output), req))
        stats = None
        now = time.monotonic()
        if force_stats or now - self._stats_time >= STATS_INTERVAL_S:
            stats, self._stats_time = self._stats(engine), now
        self.port.publish(updates, stats)
