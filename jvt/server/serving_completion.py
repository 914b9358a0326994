"""POST /v1/completions: prompts x n engine requests -> a completion or its SSE chunks."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response

from jvt.server.bridge import EngineDeadError, RequestFailedError
from jvt.server.errors import APIError, bad_sampling_params
from jvt.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
)
from jvt.server.serving import (
    AFFINITY_PREFIX_TOKENS,
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


class CompletionServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        model = ctx.model_name(req.model)
        ctx.check_count(req.count())
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt is an empty list", "prompt")
        names = [f"prompt[{i}]" if len(prompts) > 1 else "prompt" for i in range(len(prompts))]
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        for i in texts:
            if not prompts[i]:
                raise APIError(400, f"{names[i]} is an empty string", "prompt")
            ctx.check_text_bytes(len(prompts[i].encode()), names[i], "prompt")
        try:
            params = req.sampling_params(ctx.max_model_len)
        except ValueError as e:
            raise bad_sampling_params(e, req.renames()) from None
        ctx.check_constraint(req, params)
        ids = list(prompts)
        for i, encoded in zip(texts, await ctx.encode([prompts[i] for i in texts])):
            ids[i] = encoded
        for name, p in zip(names, ids):
            ctx.check_room(p, req.max_tokens, name, "prompt", "max_tokens")
        n = req.n
        gen = await ctx.submit([(p, sp) for p in ids for sp in params], "prompt",
                               lambda i: f"prompt[{i // n}]",
                               ctx.affinity(raw, req.user, ids[0][:AFFINITY_PREFIX_TOKENS]))
        echo = [(p if isinstance(p, str) else ctx.tokenizer.decode(p)) if req.echo else ""
                for p in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if req.stream:
            return EventStream(self._stream(gen, head, echo, req))
        outs = await gen.outputs(raw)
        if outs is None:
            return Response(status_code=499)  # the client has gone
        choices = []
        for i, out in enumerate(outs):
            prefix = echo[i // n]
            head_lp = self._echoed(req, out.prompt_logprobs)
            lp = None if out.logprobs is None else self._logprobs(out.logprobs, len(prefix),
                                                                  head_lp)
            choices.append(CompletionChoice(
                index=i, text=prefix + out.text, logprobs=lp, finish_reason=out.finish_reason,
                prompt_logprobs=self._vllm_prompt_logprobs(req, out.prompt_logprobs)))
        body = CompletionResponse(**head, choices=choices, usage=usage(outs, n))
        return json_response(body)

    async def _stream(self, gen: Generation, head: dict, echo: list[str],
                      req: CompletionRequest):
        """Each choice's first chunk carries its echo (and with logprobs, the prompt's) and
        prompt_logprobs when asked."""
        n = req.n
        count = len(echo) * n
        offsets = [len(echo[i // n]) for i in range(count)]  # text_offset of the next token
        started = [False] * count
        prompt_lps: list = [None] * count  # arrived with the first delta, not yet sent
        outs: list[RequestOutput | None] = [None] * count
        try:
            async for u in gen.updates():
                i, d = u.index, u.delta
                if d.prompt_logprobs is not None:
                    prompt_lps[i] = d.prompt_logprobs
                first = not started[i]
                text = echo[i // n] + d.text if first else d.text
                lp = None
                if d.logprobs is not None:
                    lp = self._logprobs(d.logprobs, offsets[i],
                                        self._echoed(req, prompt_lps[i]) if first else None)
                    offsets[i] += sum(map(len, lp.tokens[len(lp.tokens) - len(d.logprobs):]))
                if u.output is not None:
                    outs[i] = u.output
                if not text and not (lp and lp.tokens) and d.finish_reason is None:
                    continue  # nothing settled yet (text held back)
                started[i] = True
                choice = CompletionChoice(
                    index=i, text=text, logprobs=lp, finish_reason=d.finish_reason,
                    prompt_logprobs=self._vllm_prompt_logprobs(req, prompt_lps[i])
                    if first else None)
                yield sse(CompletionResponse(**head, choices=[choice]))
            if req.include_usage:
                yield sse(CompletionResponse(**head, choices=[], usage=usage(outs, n)))
        except (EngineDeadError, RequestFailedError) as e:
            yield sse_error(e)
        yield SSE_DONE

    def _vllm_prompt_logprobs(self, req: CompletionRequest, lps: list[Logprob | None] | None):
        if req.prompt_logprobs is None:
            return None
        return prompt_logprobs(lps, self.ctx.tokenizer.decode)

    def _echoed(self, req: CompletionRequest, lps: list[Logprob | None] | None
                ) -> CompletionLogProbs | None:
        """The prompt's part of the legacy logprobs (echo with logprobs): its first token's
        logprob and top_logprobs are null, the others have the request's top-k."""
        if not req.echo or req.logprobs is None or lps is None:
            return None
        decode = self.ctx.tokenizer.decode
        first = decode([lps[0].token_id]) if lps[0] is not None else None
        return self._logprobs(lps[1:], len(first or ""), CompletionLogProbs(
            text_offset=[0], token_logprobs=[None], tokens=[first or ""], top_logprobs=[None]),
            top_k=req.logprobs)

    def _logprobs(self, lps: list[Logprob], offset: int, head: CompletionLogProbs | None = None,
                  top_k: int | None = None) -> CompletionLogProbs:
        """The legacy shape, after ``head`` (the echoed prompt's); top_logprobs holds the token
        itself too (as vLLM's); top_k: how many alternatives to show (None: all there are)."""
        decode = self.ctx.tokenizer.decode
        out = head or CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[],
                                         top_logprobs=[])
        for lp in lps:
            token = decode([lp.token_id])
            out.text_offset.append(offset)
            offset += len(token)
            out.tokens.append(token)
            out.token_logprobs.append(max(lp.logprob, LOGPROB_FLOOR))
            top = {decode([t]): max(v, LOGPROB_FLOOR)
                   for t, v in list(lp.top.items())[:top_k]}
            top[token] = max(lp.logprob, LOGPROB_FLOOR)
            out.top_logprobs.append(top)
        return out

