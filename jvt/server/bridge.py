"""The engine thread: the only caller of the (single-threaded) Engine, fed by asyncio handlers.

Handlers ``submit`` the requests of one HTTP request (one per choice) and ``abort`` them; both
are commands on a thread-safe queue, executed by the engine thread between steps. The thread
blocks on that queue while the engine has no work, and otherwise loops: commands, one
``engine.step()``, then the new deltas of every request, handed to each submission's asyncio
queue through ``loop.call_soon_threadsafe`` (one callback per event loop per step).

A request can only fail itself: an error while admitting one (other than the engine's
ValueError for bad input) fails its submission with ``RequestFailedError``, and the engine
fails a request it cannot pack or post-process with finish_reason "error"; the thread goes on.
If ``engine.step()`` itself raises, the thread records the error, fails every open submission
with ``EngineDeadError`` and exits; ``alive`` turns False (the server answers /health with 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from jvt.types import RequestOutput, SamplingParams, StreamDelta

log = logging.getLogger("jvt.server")
STATS_INTERVAL_S = 0.1  # how often a busy engine thread refreshes its engine.stats() snapshot

Prompt = str | list[int]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (an engine error, or the server shutting down)."""


class QueueFullError(RuntimeError):
    """Admitting the request would exceed the bound on unfinished requests."""


class RequestFailedError(RuntimeError):
    """The engine failed on this request alone (a bug, not bad input); the engine goes on."""


class InvalidRequestError(ValueError):
    """``engine.add_request`` rejected the ``index``-th item of a submission."""

    def __init__(self, index: int, error: ValueError):
        super().__init__(str(error))
        self.index = index


@dataclasses.dataclass(frozen=True)
class Update:
    """New output of choice ``index``; ``output`` is set on its last update."""

    index: int
    delta: StreamDelta
    output: RequestOutput | None


class Submission:
    """The engine requests of one HTTP request and the queue their updates arrive on.

    ``accepted`` resolves (on the engine thread) once every item is queued in the engine, or
    with InvalidRequestError / EngineDeadError; ``updates`` receives Update items and, if the
    engine dies, one EngineDeadError.
    """

    def __init__(self, items: list[tuple[Prompt, SamplingParams]]):
        self.items = items
        self.loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[Update | EngineDeadError] = asyncio.Queue()
        self.accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.requests: list = []  # engine Requests (touched by the engine thread only)


class EngineBridge:
    """Owns an Engine on a thread of its own; the asyncio side talks to it through this.

    make_engine: builds the Engine (called on the engine thread, so that thread alone ever
      touches it). max_queue: unfinished requests allowed beyond the engine's max_num_seqs;
      ``max_pending`` (their sum) bounds the unfinished requests, and a submission beyond it
      raises QueueFullError. on_finish: called on the engine thread with each finished
      request's RequestOutput (metrics).
    """

    def __init__(self, make_engine: Callable[[], Any], *, max_queue: int,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        self.max_queue = max_queue
        self.max_pending = 0  # set by start()
        self._make_engine = make_engine
        self._on_finish = on_finish
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # put() is signal-safe
        self._lock = threading.Lock()
        self._pending = 0  # unfinished requests (guarded by _lock)
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="jvt-engine", daemon=True)
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self.stats: dict = {}  # engine.stats() after the latest iteration
        self.tokenizer = self.config = self.model_config = None
        self.max_token_bytes = 1  # the tokenizer's, set by start()

    # -- asyncio side ------------------------------------------------------------------

    def start(self) -> None:
        """Build the engine on its thread and wait for it (re-raises its construction error)."""
        self._thread.start()
        engine = self._ready.result()
        self.tokenizer, self.config = engine.tokenizer, engine.config
        self.model_config = engine.model.config
        self.max_token_bytes = engine.tokenizer.max_token_bytes
        self.max_pending = engine.config.max_num_seqs + self.max_queue

    @property
    def alive(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def submit(self, items: list[tuple[Prompt, SamplingParams]]) -> Submission:
        """Queue ``items`` in the engine (from a coroutine); await ``accepted`` next.

        Raises QueueFullError (too many unfinished requests, or shutting down) or
        EngineDeadError before anything is queued.
        """
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self._error!r})")
        with self._lock:
            if self._closing:
                raise QueueFullError("the server is shutting down")
            if self._pending + len(items) > self.max_pending:
                raise QueueFullError(f"{self._pending} requests are unfinished; the limit is "
                                     f"{self.max_pending}")
            self._pending += len(items)
        sub = Submission(items)
        self._commands.put(("add", sub))
        if not self.alive:  # died between the check and the put: nobody may answer
            _resolve(sub.accepted, EngineDeadError("the engine is not running"))
        return sub

    def abort(self, sub: Submission) -> None:
        """Abort the unfinished requests of ``sub`` (their final update still arrives)."""
        self._commands.put(("abort", sub))

    def abort_all(self) -> None:
        """Refuse new submissions and abort every request (safe in a signal handler)."""
        self._closing = True
        self._commands.put(("abort_all", None))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps; a Future of its result."""
        fut = concurrent.futures.Future()
        self._commands.put(("call", (fn, fut)))
        if not self.alive:
            _resolve(fut, EngineDeadError("the engine is not running"))
        return fut

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything, close the engine (slots and chunks returned) and join the thread."""
        self.abort_all()
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            engine = self._make_engine()
        except BaseException as e:  # noqa: BLE001 - re-raised by start()
            self._error = e
            self._ready.set_exception(e)
            return
        self._ready.set_result(engine)
        active: dict[str, tuple[Any, Submission, int]] = {}  # request id -> (req, sub, index)
        try:
            self._loop(engine, active)
        except BaseException as e:
            self._error = e
            log.exception("engine thread failed; the server now answers 503 on /health")
            self._fail(active, EngineDeadError(f"the engine failed: {e!r}"))
        finally:
            try:
                engine.close()  # aborts what is left and returns every slot and chunk
            except Exception:
                log.exception("engine.close() failed")

    def _loop(self, engine, active: dict) -> None:
        stats_time = 0.0
        while True:
            for kind, arg in self._take_commands(block=not engine.has_unfinished()):
                if kind == "add":
                    self._add(engine, active, arg)
                elif kind == "abort":
                    for req in arg.requests:
                        engine.abort(req.request_id)
                elif kind == "abort_all":
                    for req, _, _ in active.values():
                        engine.abort(req.request_id)
                elif kind == "call":
                    fn, fut = arg
                    try:
                        _resolve(fut, result=fn(engine))
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        _resolve(fut, e)
                else:  # "stop", after "abort_all": let the aborted requests retire
                    while engine.has_unfinished():
                        engine.step()
                    self._publish(engine, active)
                    self.stats = engine.stats()
                    self._fail(active, EngineDeadError("the server is shutting down"))
                    return
            if engine.has_unfinished():
                engine.step()
            self._publish(engine, active)
            now = time.monotonic()
            # A fresh snapshot before the thread blocks (idle), else a few per second are
            # plenty for the gauges (engine.stats() walks every slot).
            if now - stats_time >= STATS_INTERVAL_S or not engine.has_unfinished():
                self.stats, stats_time = engine.stats(), now

    def _take_commands(self, block: bool) -> list[tuple[str, Any]]:
        cmds = [self._commands.get()] if block else []
        while not self._commands.empty():
            cmds.append(self._commands.get_nowait())
        return cmds

    def _add(self, engine, active: dict, sub: Submission) -> None:
        for i, (prompt, params) in enumerate(sub.items):
            try:
                req = engine.add_request(prompt, params)
            except ValueError as e:
                self._reject(engine, active, sub, InvalidRequestError(i, e))
                return
            except Exception as e:
                log.exception("admitting a request failed")
                self._reject(engine, active, sub, RequestFailedError(
                    f"the engine failed to admit the request: {e!r}"))
                return
            sub.requests.append(req)
            active[req.request_id] = (req, sub, i)
        _resolve(sub.accepted, result=None)

    def _reject(self, engine, active: dict, sub: Submission, error: Exception) -> None:
        """All or nothing: abort the items of ``sub`` already queued, resolve it with error."""
        for done in sub.requests:
            engine.abort(done.request_id)
            del active[done.request_id]
        sub.requests.clear()
        self._release(len(sub.items))
        _resolve(sub.accepted, error)

    def _publish(self, engine, active: dict) -> None:
        """Hand every request's new delta to its submission; forget finished requests."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for rid, (req, sub, index) in list(active.items()):
            delta = engine.take_delta(req)
            if delta is None:
                continue
            output = None
            if delta.finish_reason is not None:
                del active[rid]
                output = req.output()
                self._release(1)
                if self._on_finish is not None:
                    try:
                        self._on_finish(output)
                    except Exception:  # metrics must never take the engine down
                        log.exception("on_finish failed for request %s", rid)
            by_loop[sub.loop].append((sub.updates, Update(index, delta, output)))
        for loop, items in by_loop.items():
            _deliver_threadsafe(loop, items)

    def _fail(self, active: dict, dead: EngineDeadError) -> None:
        """End every open submission with ``dead``, including those still in the queue."""
        for sub in {id(sub): sub for _, sub, _ in active.values()}.values():
            _deliver_threadsafe(sub.loop, [(sub.updates, dead)])
        active.clear()
        for kind, arg in self._take_commands(block=False):
            if kind == "add":
                _resolve(arg.accepted, dead)
            elif kind == "call":
                _resolve(arg[1], dead)
        with self._lock:
            self._pending = 0

    def _release(self, n: int) -> None:
        with self._lock:
            self._pending -= n


def _resolve(fut: concurrent.futures.Future, error: BaseException | None = None,
             result: Any = None) -> None:
    """Set a Future once; a second resolution (a race with a failure path) is ignored."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _deliver_threadsafe(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the loop is closed: nobody is waiting
        pass


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)
