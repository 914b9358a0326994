"""The API process's side of the engine process (``jvt serve``'s default layout).

``EngineClient`` starts ``engine_proc.main`` in a child process (multiprocessing, spawn: the
child initialises the device; this process never initialises a JAX backend) and talks to it
over two ZMQ IPC sockets with msgpack messages (``wire``). It keeps what is not the engine's:
the tokenizer (loaded here while the child loads the model), detokenization and stop strings
(``detokenize.OutputText``: the engine runs every request with ``detokenize=False`` and no stop
strings, and a request whose output reaches a stop string is finished here and aborted there),
the bound on unfinished requests and the finished requests' metrics.

Step outputs are read on the event loop (``attach``): one message per engine step, each
request's update put on its submission's queue. If the child dies, every open request ends
with EngineDeadError, new ones get 503, ``alive`` turns False (/health 503), and after
DEATH_EXIT_S the ``on_dead`` callback (the server: shut down, exit 1) runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import zmq

from jvt.config import EngineConfig
from jvt.detokenize import OutputText
from jvt.server import engine_proc, wire
from jvt.server.bridge import (
    EngineDeadError,
    EngineFront,
    InvalidRequestError,
    Prompt,
    RequestFailedError,
    Submission,
    Update,
    resolve,
)
from jvt.types import RequestMetrics, RequestOutput, SamplingParams, StreamDelta

log = logging.getLogger("jvt.server")
DEATH_EXIT_S = 2.0  # after the engine process dies: time for clients to read their errors
READY_POLL_MS = 200


class EngineClient(EngineFront):
    """The engine in a child process. model, opts: what ``jvt.Engine(model, **opts)`` takes;
    log_level: the child's logging level; the rest as EngineFront."""

    def __init__(self, model: str, opts: dict, *, max_queue: int,
                 on_finish: Callable[[RequestOutput], None] | None = None,
                 log_level: str = "info"):
        super().__init__(max_queue=max_queue, on_finish=on_finish)
        self.model, self.opts, self.log_level = model, opts, log_level
        self.on_dead: Callable[[], None] | None = None  # set by the server
        self.died = False  # the engine process ended without being stopped
        self.pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._subs: dict[int, _Open] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._dead: EngineDeadError | None = None
        self._dir = tempfile.mkdtemp(prefix="jvt-engine-")
        self._ctx = zmq.Context()
        self._tx, self._rx = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._tx.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a send
        self._rx.setsockopt(zmq.RCVHWM, 0)
        self._tx.bind(f"ipc://{self._dir}/commands")
        self._rx.bind(f"ipc://{self._dir}/outputs")
        self._proc = multiprocessing.get_context("spawn").Process(
            target=engine_proc.main, name="jvt-engine", daemon=False,
            args=(model, opts, f"ipc://{self._dir}/commands", f"ipc://{self._dir}/outputs",
                  os.getpid(), log_level))

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process and wait until it runs; ValueError for options the
        engine refuses, RuntimeError if it fails or exits while starting."""
        from jvt.models import load_tokenizer

        self._proc.start()
        self.pid = self._proc.pid
        try:
            tokenizer = load_tokenizer(self.model)
            config = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._started(tokenizer, config)

    def _wait_ready(self) -> EngineConfig:
        while not self._rx.poll(READY_POLL_MS):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited while starting (exit code "
                                   f"{self._proc.exitcode})")
        msg = wire.decode(self._rx.recv())
        if msg[0] == "failed":
            raise (ValueError if msg[1] == "value" else RuntimeError)(msg[2])
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in msg[1].items()}
        return EngineConfig(**fields)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's outputs on ``loop`` (the server's event loop) from now on."""
        self._loop = loop
        loop.add_reader(self._rx.getsockopt(zmq.FD), self._on_readable)
        loop.add_reader(self._proc.sentinel, self._on_exit)
        self._on_readable()  # what arrived before: the FD signals new messages only

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything, let the engine process close the engine and exit, and clean up
        (the process is killed if it does not exit in ``timeout`` seconds)."""
        self._closing = True
        if self._proc.is_alive():
            self._send(["abort_all"])
            self._send(["stop"])
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.error("the engine process did not stop in %.0f s: killed", timeout)
                self._proc.kill()
                self._proc.join(5)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._rx.getsockopt(zmq.FD))
            self._loop.remove_reader(self._proc.sentinel)
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- requests (event loop) ----------------------------------------------------------

    def submit(self, items: list[tuple[Prompt, SamplingParams]],
               affinity: str | None = None) -> Submission:
        """Queue ``items`` (token-id prompts) in the engine; await ``accepted`` next. Raises
        QueueFullError or EngineDeadError (status 503) before anything is sent. affinity: as
        EngineBridge.submit (one engine: unused)."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self._dead})", status=503)
        self._reserve(len(items))
        sid = next(self._ids)
        sub = Submission(items)
        sub.sid = sid
        now = time.perf_counter()
        self._subs[sid] = _Open(sub, [_Output(f"{sid}-{i}", list(ids), params, self.tokenizer,
                                              now) for i, (ids, params) in enumerate(items)])
        self._send(["add", sid, [
            [ids, wire.params_to_wire(dataclasses.replace(params, stop=(), detokenize=False))]
            for ids, params in items]])
        return sub

    def abort(self, sub: Submission, index: int | None = None) -> None:
        """Abort the unfinished requests of ``sub`` (or its choice ``index``); their final
        update still arrives."""
        if self._dead is None:
            self._send(["abort", sub.sid, index])

    def abort_all(self) -> None:
        """Refuse new submissions and abort every request (safe in a signal handler)."""
        self._closing = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._send, ["abort_all"])

    def call(self, name: str) -> concurrent.futures.Future:
        """A Future of ``engine.<name>()`` in the engine process (engine_loop.CALLS)."""
        fut = concurrent.futures.Future()
        if self._dead is not None:
            fut.set_exception(self._dead)
            return fut
        key = next(self._ids)
        self._calls[key] = fut
        self._send(["call", name, key])
        return fut

    def _send(self, msg: list) -> None:
        if not self._ctx.closed:
            self._tx.send(wire.encode(msg))

    # -- engine outputs (event loop) ----------------------------------------------------

    def _on_readable(self) -> None:
        while True:
            try:
                raw = self._rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = wire.decode(raw)
            if msg[0] == "step":
                self._step(*msg[1:])

    def _step(self, accepts: list, records: list, stats: dict | None, answers: list) -> None:
        for sid, error, *detail in accepts:
            open_ = self._subs.get(sid)
            if open_ is None:
                continue
            if error is None:
                resolve(open_.sub.accepted)
                continue
            del self._subs[sid]
            self._release(len(open_.sub.items))
            resolve(open_.sub.accepted, InvalidRequestError(*detail) if error == "invalid"
                    else RequestFailedError(detail[0]))
        now = time.perf_counter()
        for sid, index, *record in records:
            open_ = self._subs.get(sid)
            if open_ is None:
                continue
            out = open_.outputs[index]
            update, stopped = out.take(index, now, *record)
            if stopped:  # a stop string: the engine's request goes on until it is aborted
                self._send(["abort", sid, index])
            if update is None:
                continue
            if update.output is not None:
                open_.open -= 1
                if not open_.open:
                    del self._subs[sid]
                self._finished(update.output)
            open_.sub.updates.put_nowait(update)
        if stats is not None:
            self.stats = stats
        for key, result, error in answers:
            fut = self._calls.pop(key, None)
            if fut is not None:
                resolve(fut, None if error is None else RuntimeError(error), result)

    def _on_exit(self) -> None:
        """The engine process has ended: fail what is open; unless it was stopped, the server
        is told to exit after DEATH_EXIT_S."""
        loop = self._loop
        loop.remove_reader(self._proc.sentinel)
        self._on_readable()  # its last messages
        loop.remove_reader(self._rx.getsockopt(zmq.FD))
        self._proc.join()
        code = self._proc.exitcode
        self._dead = EngineDeadError(f"the engine process exited (exit code {code})")
        for open_ in self._subs.values():
            if open_.sub.accepted.done():
                open_.sub.updates.put_nowait(self._dead)
            else:
                resolve(open_.sub.accepted, self._dead)
        self._subs.clear()
        for fut in self._calls.values():
            resolve(fut, self._dead)
        self._calls.clear()
        self._release_all()
        if self._closing:
            return
        self.died = True
        log.error("the engine process died (exit code %s): every open request failed; the "
                  "server exits in %.0f s", code, DEATH_EXIT_S)
        if self.on_dead is not None:
            loop.call_later(DEATH_EXIT_S, self.on_dead)


@dataclasses.dataclass
class _Open:
    """A submission with unfinished choices."""

    sub: Submission
    outputs: list[_Output]
    open: int = 0

    def __post_init__(self):
        self.open = len(self.outputs)


class _Output:
    """One engine request as the API process builds its output: tokens, text, logprobs and
    metrics from the engine's records, stop strings applied here."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 tokenizer, arrival: float):
        self.request_id = request_id
        self.tokens = prompt_ids  # prompt then output ids
        self.num_prompt = len(prompt_ids)
        self.text = OutputText(tokenizer, self.num_prompt, params.stop)
        self.min_tokens = params.min_tokens
        self.logprobs = [] if params.logprobs is not None else None
        self.prompt_logprobs: list | None = None
        self.metrics = RequestMetrics(arrival, prompt_tokens=self.num_prompt)
        self.done = False

    def take(self, index: int, now: float, token_ids: list[int], logprobs: list | None,
             finish: str | None, error: str | None, metrics: list,
             prompt_logprobs: list | None) -> tuple[Update | None, bool]:
        """(the update of one engine record or None, whether a stop string ended the output
        here while the engine goes on). Tokens after a stop string are dropped."""
        if self.done:
            return None, False
        m = self.metrics
        m.scheduled_time, m.prefix_tokens_reused, m.num_preemptions = metrics
        plps = None
        if prompt_logprobs is not None:
            plps = self.prompt_logprobs = wire.prompt_logprobs_from_wire(prompt_logprobs)
        new, stopped = [], False
        for token in token_ids:
            self.tokens.append(token)
            m.token_times.append(now)
            new.append(token)
            if self.text.add(self.tokens, len(self.tokens) - self.num_prompt >= self.min_tokens):
                stopped = True
                break
        lps = None
        if self.logprobs is not None:
            lps = wire.logprobs_from_wire(logprobs or [])[:len(new)]
            self.logprobs += lps
        reason = "stop" if stopped else finish
        if reason is not None and not stopped and reason != "error":
            self.text.finish(self.tokens)
        text = self.text.take(reason is not None)
        if reason is None and not new and not text and plps is None:
            return None, False
        output = None
        if reason is not None:
            self.done = True
            m.finished_time = now
            output = RequestOutput(self.request_id, None, self.tokens[:self.num_prompt],
                                   self.text.text, self.tokens[self.num_prompt:], reason,
                                   self.metrics, self.logprobs, error, self.prompt_logprobs)
        delta = StreamDelta(self.request_id, text, new, reason, lps, plps)
        return Update(index, delta, output), stopped and finish is None
