"""The engine on a thread of the API process, fed by asyncio handlers (``jvt serve
--engine-in-process``, and tests that put faults into an engine), and the asyncio-side
bookkeeping it shares with ``engine_client.EngineClient`` (the engine in a process of its own).

Handlers ``submit`` the requests of one HTTP request (one per choice) and ``abort`` them; both
are commands on a thread-safe queue, executed by ``engine_loop.EngineLoop`` on the engine
thread between steps. The new deltas of every step reach each submission's asyncio queue
through ``loop.call_soon_threadsafe`` (one callback per event loop per step). If
``engine.step()`` raises, the thread records the error, fails every open submission with
``EngineDeadError`` and exits; ``alive`` turns False (the server answers /health with 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from jvt.server.engine_loop import EngineLoop, InvalidRequestError, RequestFailedError, Update
from jvt.types import RequestOutput, SamplingParams

log = logging.getLogger("jvt.server")

Prompt = str | list[int]
__all__ = ["EngineBridge", "EngineDeadError", "InvalidRequestError", "QueueFullError",
           "RequestFailedError", "Submission", "Update"]


class EngineDeadError(RuntimeError):
    """The engine has stopped (an engine error, its process gone, or the server shutting
    down). status: the HTTP status a request submitted now gets (503 once the engine process
    is gone: the server is exiting for its supervisor to restart it)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class QueueFullError(RuntimeError):
    """Admitting the request would exceed the bound on unfinished requests."""


class Submission:
    """The engine requests of one HTTP request and the queue their updates arrive on.

    ``accepted`` resolves once every item is queued in the engine, or with
    InvalidRequestError / RequestFailedError / EngineDeadError; ``updates`` receives Update
    items and, if the engine dies, one EngineDeadError.
    """

    def __init__(self, items: list[tuple[Prompt, SamplingParams]]):
        self.items = items
        self.loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue[Update | EngineDeadError] = asyncio.Queue()
        self.accepted: concurrent.futures.Future[None] = concurrent.futures.Future()


class EngineFront:
    """What the API process knows of an engine wherever it runs: the bound on unfinished
    requests, the latest engine.stats() snapshot, the tokenizer and EngineConfig (set by
    ``start``). Subclasses send the commands.

    max_queue: unfinished requests allowed beyond the engine's max_num_seqs; ``max_pending``
      (their sum) bounds the unfinished requests, and a submission beyond it raises
      QueueFullError. on_finish: called with each finished request's RequestOutput (metrics).
    """

    def __init__(self, *, max_queue: int,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        self.max_queue = max_queue
        self.max_pending = 0  # set by start()
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._pending = 0  # unfinished requests (guarded by _lock)
        self._closing = False
        self.stats: dict = {}  # engine.stats() after the latest step
        self.tokenizer = self.config = None
        self.max_token_bytes = 1  # the tokenizer's, set by start()

    routes = False  # several engines behind it: submit's affinity picks one (ray_serve)
    died = False  # the engine process ended without being stopped (the server exits 1)
    on_dead: Callable[[], None] | None = None  # called when it did

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The server's event loop is running (an engine process's outputs are read on it)."""

    def _started(self, tokenizer, config) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.max_token_bytes = tokenizer.max_token_bytes
        self.max_pending = config.max_num_seqs + self.max_queue

    @property
    def unfinished(self) -> int:
        """Engine requests submitted and not yet finished (as this side counts them)."""
        return self._pending

    def _reserve(self, n: int) -> None:
        with self._lock:
            if self._closing:
                raise QueueFullError("the server is shutting down")
            if self._pending + n > self.max_pending:
                raise QueueFullError(f"{self._pending} requests are unfinished; the limit is "
                                     f"{self.max_pending}")
            self._pending += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    def _release_all(self) -> None:
        with self._lock:
            self._pending = 0

    def _finished(self, output: RequestOutput) -> None:
        self._release(1)
        if self._on_finish is not None:
            try:
                self._on_finish(output)
            except Exception:  # metrics must never take the engine down
                log.exception("on_finish failed for request %s", output.request_id)


class EngineBridge(EngineFront):
    """Owns an Engine on a thread of its own; the asyncio side talks to it through this.

    make_engine: builds the Engine (called on the engine thread, so that thread alone ever
      touches it); see EngineFront for the rest. on_finish runs on the engine thread.
    """

    def __init__(self, make_engine: Callable[[], Any], *, max_queue: int,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        super().__init__(max_queue=max_queue, on_finish=on_finish)
        self._make_engine = make_engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # put() is signal-safe
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="jvt-engine", daemon=True)
        self._ready: concurrent.futures.Future = concurrent.futures.Future()

    # -- asyncio side ------------------------------------------------------------------

    def start(self) -> None:
        """Build the engine on its thread and wait for it (re-raises its construction error)."""
        self._thread.start()
        engine = self._ready.result()
        self._started(engine.tokenizer, engine.config)

    @property
    def alive(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def submit(self, items: list[tuple[Prompt, SamplingParams]],
               affinity: str | None = None) -> Submission:
        """Queue ``items`` in the engine (from a coroutine); await ``accepted`` next.
        affinity: which conversation the request continues (routes between replicas,
        ``ray_serve.ServeFront``; one engine has nothing to route).

        Raises QueueFullError (too many unfinished requests, or shutting down) or
        EngineDeadError before anything is queued.
        """
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self._error!r})")
        self._reserve(len(items))
        sub = Submission(items)
        self._commands.put(("add", sub))
        if not self.alive:  # died between the check and the put: nobody may answer
            resolve(sub.accepted, EngineDeadError("the engine is not running"))
        return sub

    def abort(self, sub: Submission, index: int | None = None) -> None:
        """Abort the unfinished requests of ``sub`` (or its choice ``index``); their final
        update still arrives."""
        self._commands.put(("abort", (sub, index)))

    def abort_all(self) -> None:
        """Refuse new submissions and abort every request (safe in a signal handler)."""
        self._closing = True
        self._commands.put(("abort_all", None))

    def call(self, name: str) -> concurrent.futures.Future:
        """A Future of ``engine.<name>()`` (a name in engine_loop.CALLS), run between steps."""
        fut = concurrent.futures.Future()
        self._commands.put(("call", (name, fut)))
        if not self.alive:
            resolve(fut, EngineDeadError("the engine is not running"))
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
        core = EngineLoop(self)
        try:
            core.run(engine)
            self._fail(core, EngineDeadError("the server is shutting down"))
        except BaseException as e:
            self._error = e
            log.exception("engine thread failed; the server now answers 503 on /health")
            self._fail(core, EngineDeadError(f"the engine failed: {e!r}"))
        finally:
            try:
                engine.close()  # aborts what is left and returns every slot and chunk
            except Exception:
                log.exception("engine.close() failed")

    # The engine_loop.Port methods, called on the engine thread.

    def take(self, block: bool) -> list[tuple[str, Any]]:
        cmds = [self._commands.get()] if block else []
        while not self._commands.empty():
            cmds.append(self._commands.get_nowait())
        return cmds

    def accepted(self, sub: Submission, error: Exception | None) -> None:
        if error is not None:
            self._release(len(sub.items))
        resolve(sub.accepted, error)

    def publish(self, updates: list[tuple[Submission, Update, Any]], stats: dict | None
                ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for sub, update, _ in updates:
            if update.output is not None:
                self._finished(update.output)
            by_loop[sub.loop].append((sub.updates, update))
        for loop, items in by_loop.items():
            _deliver_threadsafe(loop, items)
        if stats is not None:
            self.stats = stats

    def answer(self, key: concurrent.futures.Future, result: Any,
               error: Exception | None) -> None:
        resolve(key, error, result)

    def _fail(self, core: EngineLoop, dead: EngineDeadError) -> None:
        """End every open submission with ``dead``, including those still in the queue."""
        for sub in {id(sub): sub for _, sub, _ in core.active.values()}.values():
            _deliver_threadsafe(sub.loop, [(sub.updates, dead)])
        core.active.clear()
        for kind, arg in self.take(block=False):
            if kind == "add":
                resolve(arg.accepted, dead)
            elif kind == "call":
                resolve(arg[1], dead)
        self._release_all()


def resolve(fut: concurrent.futures.Future, error: BaseException | None = None,
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
