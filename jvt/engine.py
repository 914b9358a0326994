"""Engine: the public entry point (generate, stream, chat, sessions, abort, stats).

The loop is nano-vllm's schedule -> run -> postprocess, with mini-sglang's overlap: step N is
enqueued on the device before the host reads back step N-1's tokens, so detokenization, stop
checks and the next schedule run while the device computes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from jvt import memory, models, parallel, structured
from jvt.config import make_config
from jvt.detokenize import OutputText
from jvt.models.loader import quantizable
from jvt.platform import enable_compilation_cache, jax_devices
from jvt.runner import EntryError, Runner, Scores, scores_prompt
from jvt.scheduler import REFUSAL_DECAY, Scheduler, Sequence, Status, StepPlan
from jvt.session import Session
from jvt.types import (
    Logprob,
    RequestError,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    StreamDelta,
)

Prompt = str | list[int]
log = logging.getLogger("jvt.engine")


class Request:
    """A queued or running request (``Engine.add_request``): poll ``finished``, then ``output()``.

    Engine-side bookkeeping: the scheduler's Sequence plus output text, logprobs and metrics.
    """

    def __init__(self, seq: Sequence, prompt: str | None, metrics: RequestMetrics, tokenizer,
                 matcher=None):
        self.seq = seq
        self.prompt = prompt
        self.metrics = metrics
        self.matcher = matcher  # the structured-output constraint's state (jvt.structured)
        # The output text (None when the params turn detokenizing off: token ids only).
        self.out_text = OutputText(tokenizer, seq.num_prompt, seq.params.stop) \
            if seq.params.detokenize else None
        self.logprobs: list[Logprob] | None = [] if seq.params.logprobs is not None else None
        # one per prompt position (the first stays None), filled by the prefill steps
        self.prompt_logprobs: list[Logprob | None] | None = \
            [None] * seq.num_prompt if seq.params.prompt_logprobs is not None else None
        self.streamed_tokens = 0
        self.stream_started = False  # a delta was given (the first carries prompt_logprobs)
        self.stream_done = False  # the final delta was given
        self.error: str | None = None  # why the engine failed this request (finish "error")

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def finished(self) -> bool:
        return self.seq.status is Status.FINISHED

    @property
    def text(self) -> str:
        return "" if self.out_text is None else self.out_text.text

    def settle_text(self) -> None:
        """The request ended (not at a stop string): the rest of its text is final."""
        if self.out_text is not None:
            self.out_text.finish(self.seq.tokens)

    def output(self) -> RequestOutput:
        seq = self.seq
        self.metrics.prefix_tokens_reused = seq.prefix_reused
        self.metrics.num_preemptions = seq.num_preemptions
        return RequestOutput(seq.request_id, self.prompt, seq.tokens[:seq.num_prompt], self.text,
                             seq.tokens[seq.num_prompt:], seq.finish_reason, self.metrics,
                             self.logprobs, self.error, self.prompt_logprobs)


class Engine:
    """An LLM engine over a KV store in virtual memory.

    Args:
      model: a real model name ("smollm2-135m", the default), a random-weights preset name
        ("tiny", "llama-3.2-1b", "llama-3-8b"), a local Hugging Face checkpoint directory or
        GGUF file, or a loaded ``jvt.models.Model``.
      **config: ``jvt.config.EngineConfig`` fields (unknown names or bad values: ValueError).
    """

    def __init__(self, model: str | models.Model = models.DEFAULT_MODEL, **config):
        cfg = make_config(**config)
        self.devices = jax_devices(cfg.device, cfg.tensor_parallel, cfg.gpu_memory_utilization)
        self.device = self.devices[0]
        if cfg.compilation_cache:  # before the first compilation (loading compiles too)
            enable_compilation_cache(cfg.compilation_cache_dir)
        self.model = self._load(model, cfg, self.devices)
        mc = self.model.config
        if cfg.device != "cpu" and mc.dtype == "float32":
            raise ValueError("the CUDA attention kernels support bfloat16 and float16, and this "
                             "model is float32: pass dtype='bfloat16' (or load it so)")
        parallel.check(mc, cfg.tensor_parallel, len(self.devices))
        self.tokenizer = self.model.tokenizer
        kv = memory.plan(mc, devices=self.devices, max_num_seqs=cfg.max_num_seqs,
                         max_model_len=cfg.max_model_len, kv_budget_bytes=cfg.kv_budget_bytes,
                         gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.config = cfg = dataclasses.replace(cfg, max_model_len=kv.max_model_len)
        self.store = memory.make_store(mc, kv, cfg.max_num_seqs, self.devices)
        self.scheduler = Scheduler(
            self.store, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, prefill_chunk=cfg.prefill_chunk,
            max_model_len=cfg.max_model_len, enable_prefix_sharing=cfg.enable_prefix_sharing,
            preemption_mode=cfg.preemption_mode, swap_space_bytes=cfg.swap_space_bytes,
            wait_device=self._wait_device, decode_steps=cfg.decode_steps)
        module = self.model.module
        if cfg.tensor_parallel > mc.num_kv_heads:
            module = parallel.expand_kv_heads(module, cfg.tensor_parallel)
        self.runner = Runner(module, self.store, shapes=cfg.step_shapes, devices=self.devices,
                             eos_ids=self.tokenizer.eos_ids, decode_steps=cfg.decode_steps)
        self.runner.warmup()
        if cfg.device != "cpu" and cfg.kv_budget_bytes is None:
            self.store.set_budget_bytes(memory.gpu_kv_budget(
                kv, self.devices, cfg.gpu_memory_utilization, self.runner.temp_bytes(),
                cfg.max_num_seqs))
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._step_id = -1
        self._inflight = None  # (step id, plan, device results) of the step not yet read back
        self._structured = None  # jvt.structured.Constrainer, made for the first constraint
        self._stalled = 0  # consecutive idle steps with work queued
        self.refused_draws = 0  # K-step draws a constraint refused (see _refused)

    @staticmethod
    def _load(model, cfg, devices) -> models.Model:
        if isinstance(model, models.Model):
            if cfg.dtype not in (None, model.config.dtype):
                raise ValueError(f"dtype={cfg.dtype!r} differs from the loaded model's "
                                 f"{model.config.dtype!r}; load the model with that dtype")
            return model
        if not isinstance(model, str):
            raise ValueError(f"model must be a model name, a preset name, a checkpoint "
                             f"directory or GGUF file, or a jvt.models.Model, got "
                             f"{type(model).__name__}")
        dtype, weights = cfg.dtype, cfg.weights
        if weights == "auto":
            keep = (cfg.device == "cpu" and cfg.tensor_parallel == 1
                    and dtype in (None, "float32") and quantizable(model))
            weights = "quantized" if keep else "dense"
        if cfg.device != "cpu":
            if dtype is None and models.read_config(model).dtype == "float32":
                dtype = "bfloat16"  # the CUDA kernels run half precision
            memory.check_weights_fit(models.read_config(model, dtype, weights), devices,
                                     cfg.gpu_memory_utilization)
        return models.load(model, dtype=dtype, weights=weights)

    # -- public API ----------------------------------------------------------------------

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (str or token ids); outputs in prompt order.

        sampling_params: one for all prompts, one per prompt, or None (SamplingParams()).
        Every prompt is validated before any is queued (ValueError naming the problem).
        RequestError, once every request has ended, if the engine failed on one of them.
        """
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a str, a list of token ids, or a non-empty list "
                             f"of those; got {type(prompts).__name__}")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if not isinstance(sampling_params, list) or len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params must be one SamplingParams or a list of one per "
                             f"prompt ({len(prompts)}), got {sampling_params!r}")
        checked = [self._check(p, sp, f"prompts[{i}]")
                   for i, (p, sp) in enumerate(zip(prompts, sampling_params))]
        reqs = [self._add(ids, text, sp) for ids, text, sp in checked]
        self._run(reqs, use_tqdm)
        for i, r in enumerate(reqs):
            if r.error is not None:
                raise RequestError(r.request_id, f"prompts[{i}]: {r.error}")
        return [r.output() for r in reqs]

    def _run(self, reqs: list[Request], use_tqdm: bool = False) -> list[Request]:
        """Step until every request in ``reqs`` is finished, then forget them."""
        try:
            with tqdm(total=len(reqs), disable=not use_tqdm, desc="generate") as bar:
                while not all(r.finished for r in reqs):
                    self.step()
                    bar.update(sum(r.finished for r in reqs) - bar.n)
        finally:
            for r in reqs:
                if not r.finished:
                    self.abort(r.seq.request_id)
                self._requests.pop(r.seq.request_id, None)
        self._flush()
        return reqs

    def _flush(self) -> None:
        """With nothing queued, read back the last step so finished slots retire now."""
        while self._inflight is not None and not self.scheduler.has_work():
            self.step()

    def free_cache(self) -> None:
        """Release every retained slot (finished requests and idle sessions keep theirs for
        reuse); sessions recompute their history on their next turn."""
        self.scheduler.evict_all_retained()
        self._flush()

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               *, _owner: object | None = None) -> Iterator[StreamDelta]:
        """Generate for one prompt, yielding text and token deltas as they are read back.

        The prompt is validated now (ValueError); the request is queued when iteration starts.
        Closing the iterator early aborts the request. RequestError if the engine fails on it.
        """
        checked = self._check(prompt, sampling_params or SamplingParams(), "prompt")
        return self._stream(checked, _owner)

    def _stream(self, checked, owner) -> Iterator[StreamDelta]:
        req = self._add(*checked, owner=owner)
        try:
            while True:
                delta = self.take_delta(req)
                if req.error is not None:
                    raise RequestError(req.request_id, req.error)
                if delta is not None:
                    yield delta
                if req.stream_done:
                    return
                self.step()
        finally:
            if not req.finished:
                self.abort(req.seq.request_id)
            self._requests.pop(req.seq.request_id, None)
            self._flush()

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None
                    ) -> Request:
        """Queue one request without blocking and return its handle.

        Nothing runs until ``step()`` is called (``generate`` and ``stream`` step too, and
        advance every queued request). ValueError for a bad prompt or params, as generate().
        """
        ids, text, sp = self._check(prompt, sampling_params or SamplingParams(), "prompt")
        return self._add(ids, text, sp)

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running (or a step is still being read back)."""
        return self.scheduler.has_work() or self._inflight is not None

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None
             ) -> RequestOutput:
        """One assistant reply to ``messages`` (dicts with 'role' and 'content')."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([ids], sampling_params, use_tqdm=False)[0]

    def session(self, system: str | None = None) -> Session:
        """A multi-turn conversation that keeps its KV cache between turns."""
        return Session(self, system)

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running request (finish_reason "abort"); False if unknown/done."""
        req = self._requests.get(request_id)
        if req is None or req.finished:
            return False
        self.scheduler.finish(req.seq, "abort")
        req.settle_text()
        req.metrics.finished_time = time.perf_counter()
        del self._requests[request_id]
        return True

    def stats(self) -> dict:
        """KV memory (mapped vs used bytes, chunks), slots, queue lengths, preemptions and the
        host bytes held by swapped-out sequences. Under tensor parallelism the KV figures are
        sums over the devices and "kv_per_device" lists each device's own."""
        kv = self.store.stats()
        sched = self.scheduler
        used = sum(s.kv_valid for s in sched.running) + sum(len(r.tokens)
                                                            for r in sched.retained.values())
        return {
            "kv_mapped_bytes": kv.mapped_bytes,
            "kv_used_bytes": used * self.store.token_bytes,
            "kv_budget_bytes": self.store.budget_chunks * self.store.chunk_bytes,
            "chunk_bytes": self.store.chunk_bytes,
            "tokens_per_chunk": self.store.tokens_per_chunk,
            "chunks_in_use": kv.chunks_in_use,
            "chunks_shared": kv.chunks_shared,
            "chunks_created": kv.chunks_created,
            "slots": self.store.slots,
            "slots_free": len(sched.free_slots),
            "slots_running": len(sched.running),
            "slots_retained": len(sched.retained),
            "slots_draining": len(sched.draining),
            "waiting": len(sched.waiting),
            "running": len(sched.running),
            "preemptions": sched.num_preemptions,
            "swaps": sched.num_swaps,
            "swapped_bytes": sched.swapped_bytes,
            "compiles": self.runner.num_compiles,
            "refused_draws": self.refused_draws,
            "tensor_parallel": self.config.tensor_parallel,
            "kv_per_device": self._device_kv_stats(used),
        }

    def _device_kv_stats(self, used_tokens: int) -> list[dict]:
        stores = getattr(self.store, "stores", [self.store])
        return [{"device": str(d), "kv_mapped_bytes": st.mapped_bytes,
                 "kv_used_bytes": used_tokens * s.token_bytes, "chunks_in_use": st.chunks_in_use,
                 "chunks_created": st.chunks_created}
                for d, s, st in zip(self.devices, stores, (s.stats() for s in stores))]

    def close(self) -> None:
        """Abort unfinished requests, wait for the device, and free the KV store."""
        for request_id in list(self._requests):
            self.abort(request_id)
        self._flush()
        self.store.close()

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration: schedule and enqueue step N, then read back and process step N-1.

        While a structured-output request runs, step N-1 is read back first (no overlap): the
        allowed tokens of step N depend on the tokens it sampled, and a K-step call's draws
        the constraint refuses shorten what step N starts from."""
        processed = False
        if self._inflight is not None and any(
                seq.params.constraint is not None for seq in self.scheduler.running):
            processed = self._process_inflight()
        plan = self.scheduler.schedule()
        launched = None
        if plan is not None:
            now = time.perf_counter()
            for entry in plan.entries:
                req = self._requests.get(entry.seq.request_id)
                if req is not None and req.metrics.scheduled_time is None:
                    req.metrics.scheduled_time = now
            plan, result = self._launch(plan, self._masks(plan))
        if plan is not None:  # None too when every entry of the plan failed
            self._step_id += 1
            self.scheduler.fence(self._step_id)
            launched = (self._step_id, plan, result)
        if not processed and not self._process_inflight() and launched is None \
                and self.scheduler.has_work():
            # A step may only preempt; one that stays idle with nothing in flight is stuck.
            self._stalled += 1
            if self._stalled > 2:
                raise RuntimeError(f"the scheduler cannot place any request: {self.stats()}")
        if launched is not None:
            self._stalled = 0
        self._inflight = launched

    def _process_inflight(self) -> bool:
        """Read back and process the step in flight, if any; whether there was one."""
        if self._inflight is None:
            return False
        step, prev_plan, prev_result = self._inflight
        self._inflight = None
        host, scores = self.runner.collect(prev_result)
        self.store.check()
        self.scheduler.retire(step)
        if scores is not None:
            self._take_scores(prev_plan, scores)
        self._postprocess(prev_plan, host)
        return True

    def _masks(self, plan: StepPlan) -> np.ndarray | None:
        """The allowed-token bits of ``plan``'s constrained entries (other rows allow every
        token), or None when it has none."""
        reqs = [(i, self._requests.get(e.seq.request_id)) for i, e in enumerate(plan.entries)
                if _constrained(e)]
        rows = [(i, req.matcher) for i, req in reqs if req is not None]
        return self._constrainer().masks(rows, len(plan.entries)) if rows else None

    def _constrainer(self):
        if self._structured is None:
            self._structured = structured.Constrainer(
                self.tokenizer, self.model.config.vocab_size, self.tokenizer.eos_ids)
        return self._structured

    def _launch(self, plan: StepPlan, masks: np.ndarray | None = None
                ) -> tuple[StepPlan | None, object]:
        """Enqueue ``plan``; an entry that cannot be packed fails its request alone and the
        step runs without it. (the plan launched or None, its device results)."""
        while True:
            try:
                return plan, self.runner.launch(plan, masks)
            except EntryError as e:
                self._fail(plan.entries[e.index].seq, e.cause)
                keep = [i for i in range(len(plan.entries)) if i != e.index]
                if not keep:
                    return None, None
                plan = StepPlan([plan.entries[i] for i in keep])
                masks = None if masks is None else masks[keep]

    def _fail(self, seq: Sequence, cause: Exception) -> None:
        """End ``seq``'s request with finish_reason "error" (its KV is dropped); the engine
        and every other request go on."""
        log.error("request %s failed", seq.request_id, exc_info=cause)
        self.scheduler.finish(seq, "error")
        req = self._requests.pop(seq.request_id, None)
        if req is not None:
            req.error = f"{type(cause).__name__}: {cause}"
            req.metrics.finished_time = time.perf_counter()

    def _wait_device(self) -> None:
        """Block until the step in flight has finished on the device, so its KV writes have
        landed; its results are still read back by step() as usual. The scheduler calls this
        before it swaps a slot out."""
        if self._inflight is not None:
            self._inflight[2][0].block_until_ready()

    def _take_scores(self, plan: StepPlan, scores: Scores) -> None:
        """Record the prompt log-probabilities a scoring step computed."""
        row = 0
        for entry in plan.entries:
            req = self._requests.get(entry.seq.request_id)
            if req is not None and req.prompt_logprobs is not None and scores_prompt(entry):
                seq, k = entry.seq, entry.seq.params.prompt_logprobs
                for pos in range(entry.start, min(entry.start + entry.n, seq.num_prompt - 1)):
                    r = row + pos - entry.start
                    top = {int(t): float(lp) for t, lp in zip(scores.top_ids[r][:k],
                                                              scores.top_logprobs[r][:k])}
                    req.prompt_logprobs[pos + 1] = Logprob(seq.tokens[pos + 1],
                                                           float(scores.logprob[r]), top,
                                                           int(scores.rank[r]))
            row += entry.n

    def _postprocess(self, plan, host: list) -> None:
        """Take every entry's sampled tokens (host: one SampleResult per decode iteration);
        a K-step entry's tokens after the one its sequence finishes with are discarded, and
        so are those from the first one its constraint refuses (drawn unmasked, see
        jvt.sampling.sample): the sequence goes on from the last kept token."""
        now = time.perf_counter()
        for i, entry in enumerate(plan.entries):
            if not entry.samples:
                continue
            seq = entry.seq
            seq.pending -= entry.steps
            req = self._requests.get(seq.request_id)
            for j in range(entry.steps):
                if req is None or seq.status is Status.FINISHED:
                    break
                token = int(host[j].tokens[i])
                if req.matcher is not None:
                    ok = self._constrainer().take(req.matcher, token)
                    if j > 0:
                        seq.refusal_rate += REFUSAL_DECAY * ((not ok) - seq.refusal_rate)
                    if not ok:
                        if j == 0:  # the mask applied: the matcher and the mask disagree
                            self._fail(seq, RuntimeError(
                                f"the grammar matcher refused token {token}: "
                                f"{req.matcher.get_error()}"))
                        else:
                            self._refused(seq)
                        break
                try:
                    self._take_token(req, host[j], i, now,
                                     entry.start + j + 1 if entry.steps > 1 else None)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    self._fail(seq, e)

    def _refused(self, seq: Sequence) -> None:
        """A K-step call drew a token ``seq``'s constraint refuses: it and the rest of the
        call's tokens are dropped; the next step feeds the last kept token again (its KV is
        rewritten the same) and draws with the mask. The device counted the dropped tokens in
        the penalty tables: their rows are written again from the kept tokens."""
        seq.num_computed = len(seq.tokens) - 1
        seq.penalty_rows_written = False
        self.refused_draws += 1

    def _take_token(self, req: Request, host, i: int, now: float, kv_written: int | None
                    ) -> None:
        """Append row ``i``'s sampled token to ``req`` (its constraint took it already) and
        finish it if it stops there. kv_written: in a K-step call, the KV length certainly
        written when this token was sampled (the KV of the rows the call ran after it is not
        counted as kept)."""
        seq = req.seq
        if seq.params.max_tokens == 0:  # the prompt only: the token is not kept
            req.settle_text()
            self.scheduler.finish(seq, "length")
            req.metrics.finished_time = now
            del self._requests[seq.request_id]
            return
        token = int(host.tokens[i])
        seq.tokens.append(token)
        req.metrics.token_times.append(now)
        if req.logprobs is not None:
            k = seq.params.logprobs
            top = {int(t): float(lp) for t, lp in zip(host.top_ids[i][:k],
                                                      host.top_logprobs[i][:k])}
            req.logprobs.append(Logprob(token, float(host.logprob[i]), top))
        reason = self._finish_reason(req, token)
        if reason is not None:
            if kv_written is not None:
                seq.num_computed = min(seq.num_computed, kv_written)
            self.scheduler.finish(seq, reason)
            req.metrics.finished_time = now
            del self._requests[seq.request_id]  # the caller holds the Request

    def _finish_reason(self, req: Request, token: int) -> str | None:
        seq, params = req.seq, req.seq.params
        stops = seq.num_output >= params.min_tokens
        if req.out_text is not None and req.out_text.add(seq.tokens, stops):
            return "stop"
        reason = None
        if stops and (token in params.stop_token_ids or (
                not params.ignore_eos and token in self.tokenizer.eos_ids)):
            reason = "stop"
        elif seq.num_output >= params.max_tokens or len(seq.tokens) >= self.config.max_model_len:
            reason = "length"
        if reason is not None:
            req.settle_text()
        return reason

    def take_delta(self, req: Request) -> StreamDelta | None:
        """What ``req`` (from ``add_request``) produced since its previous delta, or None when
        nothing new is settled yet or its final delta was already taken.

        Text that may still become a stop string or complete a UTF-8 character is held back;
        the final delta (``finish_reason`` set) carries the rest. The deltas of one request add
        up to its ``output()`` text, token ids and logprobs.
        """
        if req.stream_done:
            return None
        tokens = req.seq.tokens[req.seq.num_prompt + req.streamed_tokens:]
        text = "" if req.out_text is None else req.out_text.take(req.finished)
        if not req.finished and not tokens and not text:
            return None
        logprobs = None
        if req.logprobs is not None:
            logprobs = req.logprobs[req.streamed_tokens:req.streamed_tokens + len(tokens)]
        first = req.streamed_tokens == 0 and not req.stream_started
        req.stream_started = True
        req.streamed_tokens += len(tokens)
        req.stream_done = req.finished
        return StreamDelta(req.seq.request_id, text, tokens, req.seq.finish_reason, logprobs,
                           req.prompt_logprobs if first else None)

    # -- requests ------------------------------------------------------------------------

    def _check(self, prompt, params, name: str) -> tuple[list[int], str | None, SamplingParams]:
        """Validate one prompt and its params; (token ids, prompt text or None, params)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params for {name} must be a jvt.SamplingParams, got "
                             f"{type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{name} is an empty string")
            text = prompt
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
        elif _is_token_list(prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"{name} must be a str or a list of int token ids, got "
                             f"{type(prompt).__name__}")
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError(f"{name} has no tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} has token ids outside [0, {vocab}): {bad[:5]}")
        if params.constraint is not None:
            structured.grammar(*params.constraint)  # ValueError naming the field if it does not compile
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias for {name} has token ids outside "
                             f"[0, {vocab}): {bad[:5]}")
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"{name} has {len(ids)} tokens; max_model_len={limit} leaves room "
                             f"for prompts of at most {limit - 1}")
        need = math.ceil(min(len(ids) + params.max_tokens, limit) / self.store.tokens_per_chunk)
        if need > self.store.budget_chunks:
            raise ValueError(
                f"{name} needs {need} KV chunks for its prompt plus max_tokens, more than the "
                f"whole budget ({self.store.budget_chunks} chunks of "
                f"{self.store.chunk_bytes} bytes): raise kv_budget_bytes or lower max_tokens")
        return ids, text, params

    def _add(self, ids: list[int], text: str | None, params: SamplingParams,
             owner: object | None = None) -> Request:
        number = next(self._ids)
        seed = params.seed if params.seed is not None else \
            (self.config.seed * 1_000_003 + number) % 2**32
        seq = Sequence(str(number), ids, params, seed, owner)
        matcher = None if params.constraint is None else self._constrainer().matcher(params)
        req = Request(seq, text, RequestMetrics(time.perf_counter(), prompt_tokens=len(ids)),
                      self.tokenizer, matcher)
        self._requests[seq.request_id] = req
        self.scheduler.add(seq)
        return req


def _constrained(entry) -> bool:
    return entry.samples and entry.seq.params.constraint is not None


def _is_token_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)
