"""POST /tokenize and /detokenize (vLLM's routes): the ids the generation endpoints would run
for a prompt or a conversation, and the text of ids. Tokenizing runs on a worker thread."""

from __future__ import annotations

import asyncio

from jvt.server.errors import APIError
from jvt.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from jvt.server.serving import ServingContext


class TokenizeServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        form = req.root
        ctx = self.ctx
        ctx.model_name(form.model)
        tok = ctx.tokenizer
        if isinstance(form, TokenizeChatRequest):
            ids = await ctx.chat_ids([m.as_template() for m in form.messages],
                                     [t.as_tool() for t in form.tools or ()])
        else:
            add_bos = form.add_special_tokens and tok.add_bos
            ids = await asyncio.to_thread(tok.encode, form.prompt, add_bos=add_bos)
        strs = None
        if form.return_token_strs:
            strs = await asyncio.to_thread(lambda: [tok.decode([i]) for i in ids])
        return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                                token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        ctx = self.ctx
        ctx.model_name(req.model)
        vocab = ctx.tokenizer.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens[{bad}] = {req.tokens[bad]} is not a token id of this "
                                f"model (vocabulary size {vocab})", "tokens")
        text = await asyncio.to_thread(ctx.tokenizer.decode, req.tokens)
        return DetokenizeResponse(prompt=text)
