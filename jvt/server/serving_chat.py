"""POST /v1/chat/completions: messages -> the chat template -> n engine requests -> a chat
completion or its SSE chunks."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from jvt.server.bridge import EngineDeadError, RequestFailedError
from jvt.server.errors import bad_sampling_params
from jvt.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    TokenLogprob,
    TopLogprob,
)
from jvt.server.serving import (
    LOGPROB_FLOOR,
    SSE_DONE,
    EventStream,
    Generation,
    ServingContext,
    json_response,
    prompt_logprobs,
    sse,
    sse_error,
    usage,
)
from jvt.types import Logprob, RequestOutput


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        model = ctx.model_name(req.model)
        ctx.check_count(req.n)
        messages = [m.as_template() for m in req.messages]
        ctx.check_text_bytes(sum(len(m["content"].encode()) for m in messages), "messages",
                             "messages")
        try:
            params = req.sampling_params(ctx.max_model_len)
        except ValueError as e:
            raise bad_sampling_params(e, {"logprobs": "top_logprobs", **req.renames()}) from None
        ctx.check_constraint(req, params)
        ids = await ctx.chat_ids(messages)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        ctx.check_room(ids, req.max_completion_tokens if req.max_completion_tokens is not None
                       else req.max_tokens, "messages", "messages", field)
        gen = await ctx.submit([(ids, sp) for sp in params], "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if req.stream:
            return EventStream(self._stream(gen, head, req.n, req.include_usage))
        outs = await gen.outputs(raw)
        if outs is None:
            return Response(status_code=499)  # the client has gone
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=out.text),
                              logprobs=self._logprobs(out.logprobs),
                              finish_reason=out.finish_reason)
                   for i, out in enumerate(outs)]
        body = ChatCompletionResponse(
            **head, choices=choices, usage=usage(outs, req.n),
            prompt_logprobs=prompt_logprobs(outs[0].prompt_logprobs, ctx.tokenizer.decode))
        return json_response(body)

    async def _stream(self, gen: Generation, head: dict, n: int, include_usage: bool):
        """The first role chunk carries prompt_logprobs when the request asked."""
        started = [False] * n
        outs: list[RequestOutput | None] = [None] * n
        try:
            async for u in gen.updates():
                i, d = u.index, u.delta
                if not started[i]:  # with the first token: a role chunk before prefill
                    started[i] = True  # would make the client's TTFT lie
                    plps = None if any(started[:i] + started[i + 1:]) else prompt_logprobs(
                        d.prompt_logprobs, self.ctx.tokenizer.decode)
                    yield sse(ChatCompletionChunk(**head, prompt_logprobs=plps, choices=[
                        ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""),
                                         logprobs=None, finish_reason=None)]))
                lp = self._logprobs(d.logprobs)
                if u.output is not None:
                    outs[i] = u.output
                if not d.text and not (lp and lp.content) and d.finish_reason is None:
                    continue  # nothing settled yet (text held back)
                delta = ChatDelta(content=d.text) if d.text else ChatDelta()
                yield self._chunk(head, ChatStreamChoice(index=i, delta=delta, logprobs=lp,
                                                         finish_reason=d.finish_reason))
            if include_usage:
                yield sse(ChatCompletionChunk(**head, choices=[], usage=usage(outs, n)))
        except (EngineDeadError, RequestFailedError) as e:
            yield sse_error(e)
        yield SSE_DONE

    @staticmethod
    def _chunk(head: dict, choice: ChatStreamChoice) -> str:
        return sse(ChatCompletionChunk(**head, choices=[choice]))

    def _logprobs(self, lps: list[Logprob] | None) -> ChatLogprobs | None:
        if lps is None:
            return None
        decode = self.ctx.tokenizer.decode

        def top(token_id: int, logprob: float) -> TopLogprob:
            token = decode([token_id])
            return TopLogprob(token=token, logprob=max(logprob, LOGPROB_FLOOR),
                              bytes=list(token.encode()))

        content = []
        for lp in lps:
            chosen = top(lp.token_id, lp.logprob)
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=[
                top(t, v) for t, v in lp.top.items()]))
        return ChatLogprobs(content=content)
