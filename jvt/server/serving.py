"""What both endpoints share: model check, submission to the engine thread, waiting for the
outputs (aborting when the client goes away) and server-sent events.

``serving_completion`` and ``serving_chat`` turn a request into prompts and SamplingParams,
``submit`` them here, and shape the Updates into a response or SSE chunks.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
from collections.abc import AsyncIterator

from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from jvt import tools
from jvt.server.bridge import (
    EngineDeadError,
    EngineFront,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    Submission,
    Update,
)
from jvt.server.errors import APIError, error_body, sampling_field
from jvt.server.protocol import PromptLogprob, PromptLogprobs, PromptTokensDetails, UsageInfo
from jvt.types import Logprob, RequestOutput, SamplingParams, StreamDelta

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
LOGPROB_FLOOR = -9999.0  # stands for -inf, which JSON cannot carry (vLLM's choice)


class Generation:
    """The engine requests of one HTTP request: iterate its Updates or collect its outputs.

    Leaving either early (exception, cancellation) aborts the requests still running.
    """

    def __init__(self, bridge: EngineFront, sub: Submission):
        self.bridge = bridge
        self.sub = sub
        self.open = len(sub.items)  # choices whose last update has not arrived

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until every choice has finished (EngineDeadError if the engine dies
        meanwhile, RequestFailedError if it failed on one choice). Updates of one choice that queued up while the consumer was busy (a slow
        client, a loaded event loop) come merged into one: fewer, larger chunks under load."""
        queue = self.sub.updates
        try:
            while self.open:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in _merge(items):
                    if isinstance(item, EngineDeadError):
                        self.open = 0
                        raise item
                    if item.output is not None:
                        self.open -= 1
                        if item.output.error is not None:
                            raise RequestFailedError(
                                f"the engine failed on this request: {item.output.error}")
                    yield item
        finally:
            self.abort()

    async def outputs(self, raw: Request) -> list[RequestOutput] | None:
        """Every choice's RequestOutput in choice order; None if the client disconnected first
        (then the requests are aborted)."""
        async def collect():
            outs: list[RequestOutput | None] = [None] * self.open
            async for u in self.updates():
                if u.output is not None:
                    outs[u.index] = u.output
            return outs

        task = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(raw))
        try:
            await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                return None
            error = task.exception()
            if isinstance(error, (EngineDeadError, RequestFailedError)):
                raise APIError(500, str(error)) from None
            return task.result()
        finally:
            gone.cancel()
            task.cancel()
            self.abort()

    def abort(self) -> None:
        if self.open:
            self.open = 0
            self.bridge.abort(self.sub)


def _merge(items: list) -> list:
    """Consecutive updates of each choice as one (in first-arrival order); an error ends it."""
    merged: dict[int, Update] = {}
    for item in items:
        if isinstance(item, EngineDeadError):
            return [*merged.values(), item]
        prev = merged.get(item.index)
        if prev is None:
            merged[item.index] = item
            continue
        a, b = prev.delta, item.delta
        logprobs = None if a.logprobs is None else a.logprobs + (b.logprobs or [])
        merged[item.index] = Update(item.index, StreamDelta(
            b.request_id, a.text + b.text, a.token_ids + b.token_ids, b.finish_reason, logprobs,
            a.prompt_logprobs or b.prompt_logprobs), item.output)
    return list(merged.values())


async def _disconnected(raw: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class ServingContext:
    """The server's view of its engine: names, limits, and submission of requests.

    served_names: the model names requests may use (the first one is reported back).
    root: what --model named. forced_parser: the tool-call format to use (None: the chat
    template's, jvt.tools.parser_for).
    """

    def __init__(self, bridge: EngineFront, served_names: list[str], root: str,
                 forced_parser: str | None = None):
        self.bridge = bridge
        self.served_names = served_names
        self.root = root
        self.forced_parser = forced_parser

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.bridge.config.max_model_len

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None:
            return self.served_names[0]
        if requested not in self.served_names:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"{self.served_names}.", "model")
        return requested

    @property
    def max_token_bytes(self) -> int:
        return self.bridge.max_token_bytes

    def check_count(self, count: int) -> None:
        """400 (param n) for more engine requests (prompts x n) than the server ever holds,
        before anything is built for them."""
        limit = self.bridge.max_pending
        if count > limit:
            raise APIError(400, f"the request asks for {count} completions (prompts x n); "
                                f"this server holds at most {limit} requests", "n")

    def check_text_bytes(self, size: int, name: str, field: str) -> None:
        """400 (param ``field``) when ``size`` bytes of prompt text cannot fit the context
        whatever they tokenize to: no token spells more than max_token_bytes bytes. Checked
        before tokenizing, so an oversized prompt costs no tokenization."""
        fewest = math.ceil(size / self.max_token_bytes)
        if fewest >= self.max_model_len:
            raise APIError(400, f"{name} has {size} bytes of text, at least {fewest} tokens, "
                                f"and this model's maximum context length is "
                                f"{self.max_model_len} tokens", field)

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (with the tokenizer's BOS rule), on a worker thread."""
        tok = self.tokenizer
        return await asyncio.to_thread(lambda: [tok.encode(t, add_bos=tok.add_bos)
                                                for t in texts])

    @functools.cached_property
    def tool_parser(self) -> str:
        """The tool-call format: --tool-call-parser, else the chat template's."""
        return self.forced_parser or tools.parser_for(self.tokenizer.chat_template)

    @functools.cached_property
    def template_takes_tools(self) -> bool:
        return tools.takes_tools(self.tokenizer.chat_template)

    async def chat_ids(self, messages: list[dict], tool_list: list[tools.Tool] = ()
                       ) -> list[int]:
        """The chat template rendered with ``tool_list`` and tokenized, on a worker thread;
        a template that takes no tools gets them written into the messages
        (jvt.tools.inline_tools). A conversation the template refuses is a 400 (param
        messages)."""
        if self.template_takes_tools:
            messages = tools.template_messages(messages)
            given = [t.as_template() for t in tool_list] or None
        else:
            messages, given = tools.inline_tools(messages, list(tool_list)), None
        try:
            return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages,
                                           add_generation_prompt=True, tools=given)
        except (ValueError, TemplateError) as e:
            raise APIError(400, f"messages: {e}", "messages") from None

    @staticmethod
    def check_constraint(req, params: list[SamplingParams]) -> None:
        """400 for more than one constraining field (param: the second), or a constraint the
        grammar library refuses (param: the field that carried it), before anything is
        tokenized or queued."""
        given = req.constraint_fields()
        if len(given) > 1:
            raise APIError(400, f"at most one of {', '.join(given)} may constrain the output",
                           given[1])
        if given and params[0].constraint is not None:
            from jvt.structured import grammar

            try:
                grammar(*params[0].constraint)
            except ValueError as e:
                raise APIError(400, f"{given[0]}: {e}", given[0]) from None

    def check_room(self, ids: list[int], max_tokens: int | None, name: str, prompt_field: str,
                   field: str) -> None:
        """400 (param ``prompt_field``) for a prompt that leaves no room in the model's context,
        and (param ``field``) when an explicit max_tokens does not fit after the prompt, as vLLM
        and OpenAI answer (None: whatever room is left)."""
        n = len(ids)
        room = self.max_model_len - n
        if room <= 0:
            raise APIError(400, f"{name} has {n} tokens; this model's maximum context length "
                                f"of {self.max_model_len} tokens leaves room for prompts of at "
                                f"most {self.max_model_len - 1}", prompt_field)
        if max_tokens is not None and room < max_tokens:
            raise APIError(400, f"{name} has {n} tokens and {field}={max_tokens} asks for "
                                f"{max_tokens} more, but this model's maximum context length is "
                                f"{self.max_model_len} tokens: {field} may be at most {room}",
                           field)

    def affinity(self, raw: Request, user: str | None, start) -> str | None:
        """``affinity_key`` of a request when the engine front routes between replicas, else
        None (nothing to route: not computed)."""
        return affinity_key(raw, user, start) if self.bridge.routes else None

    async def submit(self, items: list[tuple[list[int], SamplingParams]], param: str,
                     item_name=None, affinity: str | None = None) -> Generation:
        """Queue ``items`` in the engine; the Generation once the engine has accepted all.
        affinity: ``affinity`` of the request (which replica should serve it).

        Errors: 400 when the engine rejects an item (``param`` names the field unless the
        message names a SamplingParams field; ``item_name(i)`` the item in the message), 503 (Retry-After) when the queue is full,
        500 when the engine is dead or failed to admit the request.
        """
        try:
            sub = self.bridge.submit(items, affinity)
        except QueueFullError as e:
            raise _busy(e) from None
        except EngineDeadError as e:
            raise APIError(e.status, str(e)) from None
        accepted = asyncio.wrap_future(sub.accepted)
        try:
            await asyncio.wait([accepted])
        except asyncio.CancelledError:
            self.bridge.abort(sub)
            raise
        # Read the outcome instead of raising it: a raised error's traceback would hold this
        # frame, whose ``sub`` holds the error (a cycle keeping the request's prompt alive
        # until a full garbage collection).
        error = accepted.exception()
        if isinstance(error, InvalidRequestError):
            where = f"{item_name(error.index)}: " if item_name and len(items) > 1 else ""
            raise APIError(400, where + str(error), sampling_field(str(error)) or param) from None
        if isinstance(error, QueueFullError):  # a replica's own bound (ray_serve)
            raise _busy(error) from None
        if error is not None:
            raise APIError(500, str(error)) from None
        return Generation(self.bridge, sub)


def _busy(e: QueueFullError) -> APIError:
    return APIError(503, f"server busy: {e}; retry later", None,
                    {"Retry-After": str(RETRY_AFTER_S)})


SESSION_HEADER = "x-session-id"  # Ray Serve's session header
AFFINITY_PREFIX_TOKENS = 32  # a completion prompt's conversation: its first tokens


def affinity_key(raw: Request, user: str | None, start: object) -> str:
    """The conversation a request continues, for routing it to the replica that holds its
    KV: the X-Session-Id header, else the request's ``user``, else a hash of ``start`` (the
    chat messages up to the first user message, or a prompt's first AFFINITY_PREFIX_TOKENS
    token ids: the same for every turn of one conversation)."""
    explicit = raw.headers.get(SESSION_HEADER) or user
    if explicit:
        return f"session:{explicit}"
    digest = hashlib.blake2b(json.dumps(start).encode(), digest_size=12).hexdigest()
    return f"prefix:{digest}"


def json_response(body: BaseModel) -> Response:
    """``body`` as an application/json response (pydantic's serializer, not FastAPI's)."""
    return Response(body.model_dump_json(), media_type="application/json")


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: Exception) -> str:
    """The in-stream error event (the stream has started: the status is already 200)."""
    status = e.status if isinstance(e, APIError) else 500
    return f"data: {error_body(status, str(e)).model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that always closes its generator when the response ends
    (done, client gone, or cancelled), so the generator's ``finally`` aborts its requests."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def prompt_logprobs(lps: list[Logprob | None] | None, decode) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs: per prompt token (the first: None) the token's own entry, then
    its top alternatives (``decode``: token ids -> text)."""
    if lps is None:
        return None

    def entry(token: int, logprob: float, rank: int) -> PromptLogprob:
        return PromptLogprob(logprob=max(logprob, LOGPROB_FLOOR), rank=rank,
                             decoded_token=decode([token]))

    out: PromptLogprobs = [None]
    for lp in lps[1:]:
        tokens = {lp.token_id: entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (t, v) in enumerate(lp.top.items(), 1):
            tokens.setdefault(t, entry(t, v, rank))
        out.append(tokens)
    return out


def usage(outs: list[RequestOutput], n: int) -> UsageInfo:
    """Usage of prompts x n choices: each prompt's tokens counted once, every choice's output
    tokens (a final EOS or stop token included)."""
    prompt = sum(len(outs[i].prompt_token_ids) for i in range(0, len(outs), n))
    completion = sum(len(o.token_ids) for o in outs)
    cached = sum(outs[i].metrics.prefix_tokens_reused for i in range(0, len(outs), n))
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
