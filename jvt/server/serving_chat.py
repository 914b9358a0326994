"""POST /v1/chat/completions: messages (and tools) -> the chat template -> n engine requests
-> a chat completion or its SSE chunks, tool calls parsed out of the text (jvt.tools)."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from jvt import tools
from jvt.server.bridge import EngineDeadError, RequestFailedError
from jvt.server.errors import APIError, bad_sampling_params
from jvt.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
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
        parser, tool_list = ctx.tool_parser, req.tool_list()
        self._check_tools(req, tool_list, parser)
        try:
            params = req.sampling_params(ctx.max_model_len, parser)
        except ValueError as e:
            raise bad_sampling_params(e, {"logprobs": "top_logprobs", **req.renames()}) from None
        ctx.check_constraint(req, params)
        ids = await ctx.chat_ids(messages, tool_list)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        ctx.check_room(ids, req.max_completion_tokens if req.max_completion_tokens is not None
                       else req.max_tokens, "messages", "messages", field)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"),
                          len(messages) - 1)
        gen = await ctx.submit([(ids, sp) for sp in params], "messages",
                               affinity=ctx.affinity(raw, req.user, messages[:first_user + 1]))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        names = {t.name for t in tool_list}
        if req.stream:
            parsers = [tools.ToolParser(names, parser) if names else None for _ in range(req.n)]
            return EventStream(self._stream(gen, head, req.n, req.include_usage, parsers))
        outs = await gen.outputs(raw)
        if outs is None:
            return Response(status_code=499)  # the client has gone
        choices = []
        for i, out in enumerate(outs):
            content, calls = tools.parse(out.text, names, parser) if names else (out.text, [])
            message = ChatResponseMessage(content=content, tool_calls=[
                ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in calls] or None)
            choices.append(ChatChoice(index=i, message=message,
                                      logprobs=self._logprobs(out.logprobs),
                                      finish_reason=_finish(out.finish_reason, bool(calls))))
        body = ChatCompletionResponse(
            **head, choices=choices, usage=usage(outs, req.n),
            prompt_logprobs=prompt_logprobs(outs[0].prompt_logprobs, ctx.tokenizer.decode))
        return json_response(body)

    @staticmethod
    def _check_tools(req: ChatCompletionRequest, tool_list: list[tools.Tool], parser: str
                     ) -> None:
        """400 (param tools) for a parameters schema the grammar library refuses; (param
        tool_choice) for "auto" with a constraint that is not JSON (the output must be
        allowed to be either)."""
        if not tool_list:
            return
        from jvt.structured import grammar

        try:
            grammar("grammar", tools.call_grammar(tool_list, True, parser))
        except ValueError as e:
            raise APIError(400, f"tools: a function's parameters: {e}", "tools") from None
        kinds = req.constraint().keys()
        if req.tool_mode == "auto" and kinds and not kinds & {"json_schema", "json_object"}:
            raise APIError(400, f'tool_choice "auto" combines only with a JSON response format '
                                f"(json_object, json_schema), not with {req.constraint_fields()[0]}"
                                ' of another kind; use tool_choice "none" to constrain the text',
                           "tool_choice")

    async def _stream(self, gen: Generation, head: dict, n: int, include_usage: bool,
                      parsers: list[tools.ToolParser | None]):
        """The first role chunk carries prompt_logprobs when the request asked. With tools,
        each choice's text goes through its ToolParser: a call's first delta (id, name) goes
        out once its name is written, then its arguments text as it is written."""
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
                text, calls = d.text, []
                if parsers[i] is not None:
                    text, calls = parsers[i].feed(d.text)
                    if d.finish_reason is not None:
                        rest, more = parsers[i].finish()
                        text, calls = text + rest, calls + more
                if (not text and not calls and not (lp and lp.content)
                        and d.finish_reason is None):
                    continue  # nothing settled yet (text held back)
                deltas = [ToolCallDelta(index=c.index, id=c.id,
                                        type=None if c.id is None else "function",
                                        function=FunctionCallDelta(name=c.name,
                                                                   arguments=c.arguments))
                          for c in calls]
                delta = ChatDelta(content=text or None, tool_calls=deltas or None)
                called = parsers[i] is not None and parsers[i].calls > 0
                yield self._chunk(head, ChatStreamChoice(
                    index=i, delta=delta, logprobs=lp,
                    finish_reason=_finish(d.finish_reason, called)))
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


def _finish(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for a turn that stopped after writing calls."""
    return "tool_calls" if called and reason == "stop" else reason
