"""Engine end to end on the CPU: equivalences that must hold whatever the scheduling.

Most tests use a small model with wide KV (16 KV heads of 128 floats, 2 layers: 32 KiB per
token), so that a 2 MiB chunk holds 64 tokens and chunk boundaries, prefix sharing and memory
pressure happen at prompt lengths a CPU test can afford.
"""

import math
import random

import jax
import numpy as np
import pytest

import jvt
from jvt import models
from jvt.types import SamplingParams

WIDE = models.ModelConfig(
    vocab_size=263, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=16,
    num_kv_heads=16, head_dim=128, max_position_embeddings=1024, dtype="float32",
    bos_token_id=256, eos_token_id=(257, 262))
TPC = 64  # tokens per 2 MiB chunk for WIDE
TOKEN_BYTES = 32 << 10  # KV bytes per token for WIDE
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
ENGINE = {"max_num_seqs": 8, "max_model_len": 384, "max_num_batched_tokens": 128,
          "token_buckets": (16, 128), "seq_buckets": (8,), "prefill_chunk": 48}


@pytest.fixture(scope="module")
def model():
    return models.Model(WIDE, models.init_module(WIDE, seed=3), models.ByteTokenizer())


@pytest.fixture(scope="module")
def engine(model):
    return jvt.Engine(model, **ENGINE)


@pytest.fixture(scope="module")
def reference(model):
    """An engine that runs one request at a time and never shares KV: the reference."""
    e = jvt.Engine(model, max_num_seqs=1, max_model_len=384, max_num_batched_tokens=128,
                   token_buckets=(128,), seq_buckets=(1,), prefill_chunk=128,
                   enable_prefix_sharing=False)

    def run(prompt, params=GREEDY):
        return e.generate([prompt], params, use_tqdm=False)[0]
    return run


def _prompts(n, seed, lo=1, hi=150, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(256) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def _in_use(engine):
    return engine.store.stats().chunks_in_use


def test_greedy_matches_transformers_generate(tmp_path):
    import torch
    from hf_fixtures import build_hf_model, save_hf_model

    hf = build_hf_model("llama3", seed=1)
    save_hf_model(hf, tmp_path)
    # No params cache: its key (config, file sizes, mtimes) could match another test's
    # checkpoint of the same shapes written in the same clock tick.
    loaded = models.load(str(tmp_path), use_cache=False)
    e = jvt.Engine(loaded, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=32,
                   token_buckets=(8, 32), seq_buckets=(4,), prefill_chunk=13)
    prompts = [[256] + p for p in _prompts(5, seed=0, hi=40)] + [[256]]
    outs = e.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              eos_token_id=257, pad_token_id=258)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] == 257 else "length")


def test_batch_invariance_alone_vs_among_16_others(engine, reference):
    prompts = _prompts(17, seed=1, hi=200)
    params = [GREEDY] * 16 + [SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20,
                                              ignore_eos=True)]
    together = engine.generate(prompts, params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, together):
        alone = reference(prompt, p)
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens


def test_no_compilation_after_warmup(engine):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        prompts = _prompts(11, seed=2, hi=300)
        engine.generate(prompts, [SamplingParams(temperature=t, max_tokens=1 + i * 3, top_k=i)
                                  for i, t in enumerate([0.0, 0.5, 1.0] * 3 + [0.0, 2.0])],
                        use_tqdm=False)
        list(engine.stream(prompts[0], GREEDY))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    # (8, 8) for decode steps, (16, 8) and (128, 8) for prefill steps, and the K-step variant
    # of (8, 8); one variant on the CPU.
    assert engine.config.step_shapes == [(8, 8), (16, 8), (128, 8)]
    assert engine.runner.decode_shapes() == [(8, 8)] and engine.config.decode_steps > 1
    assert engine.runner.num_compiles == len(engine.runner.variants) * 4 == 4


def test_session_turn_equals_recomputing_the_conversation(engine, reference):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    previous = None  # the last turn's prompt + output: what its slot holds KV for
    with engine.session(system="be brief") as session:
        for text in ["hello there", "and then?", "x" * 70, "ok"]:
            messages = [*session.messages, {"role": "user", "content": text}]
            out = session.send(text, params)
            ids = engine.tokenizer.apply_chat_template(messages)
            assert out.prompt_token_ids == ids
            assert out.token_ids == reference(ids, params).token_ids
            if previous is not None:
                # Only the tokens after the longest prefix the slot holds are prefilled (the
                # last output token's KV exists only if a step ran after it was sampled).
                assert out.metrics.prefix_tokens_reused in (
                    _common_prefix(previous, ids), _common_prefix(previous[:-1], ids))
                assert out.metrics.prefix_tokens_reused > 0
            previous = out.prompt_token_ids + out.token_ids


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b) - 1) and a[n] == b[n]:
        n += 1
    return n


def test_session_survives_eviction(model, reference):
    e = jvt.Engine(model, **{**ENGINE, "max_num_seqs": 2, "seq_buckets": (2,)})
    params = SamplingParams(temperature=0.0, max_tokens=10)
    s = e.session()
    s.send("first turn", params)
    e.generate(_prompts(4, seed=9, hi=100), GREEDY, use_tqdm=False)  # evicts the session's slot
    out = s.send("second turn", params)
    assert out.token_ids == reference(e.tokenizer.apply_chat_template(s.messages[:-1]),
                                      params).token_ids


TINY_BUDGET = {**ENGINE, "kv_budget_bytes": 5 * (2 << 20), "enable_prefix_sharing": False}
TINY_PARAMS = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)


@pytest.mark.parametrize("mode,swap_space,swaps", [
    ("swap", 4 << 30, True),
    ("recompute", 4 << 30, False),
    ("swap", TOKEN_BYTES - 1, False),  # no victim fits: every one is recomputed
])
def test_tiny_budget_preempts_and_outputs_stay_identical(model, reference, mode, swap_space,
                                                         swaps):
    e = jvt.Engine(model, **TINY_BUDGET, preemption_mode=mode, swap_space_bytes=swap_space)
    prompts = _prompts(6, seed=4, lo=40, hi=110)
    outs = e.generate(prompts, TINY_PARAMS, use_tqdm=False)
    stats = e.stats()
    assert stats["preemptions"] > 0
    assert sum(o.metrics.num_preemptions for o in outs) == stats["preemptions"]
    assert (stats["swaps"] > 0) == swaps and stats["swaps"] <= stats["preemptions"]
    assert stats["swapped_bytes"] == 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(prompt, TINY_PARAMS).token_ids
    assert _in_use(e) == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_penalised_requests_keep_their_penalties(model, reference, mode):
    """A preempted sequence's penalty rows are rewritten when it is re-admitted (possibly into
    another slot) and its prompt logprobs survive the recompute."""
    e = jvt.Engine(model, **TINY_BUDGET, preemption_mode=mode)
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.2,
                            logit_bias={7: 2.0}, prompt_logprobs=2)
    prompts = _prompts(6, seed=4, lo=40, hi=110)
    outs = e.generate(prompts, params, use_tqdm=False)
    assert e.stats()["preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        ref = reference(prompt, params)
        assert out.token_ids == ref.token_ids
        assert [lp and (lp.token_id, lp.rank) for lp in out.prompt_logprobs] == \
            [lp and (lp.token_id, lp.rank) for lp in ref.prompt_logprobs]


def test_abort_of_a_swapped_out_request_frees_its_host_bytes(model, reference):
    e = jvt.Engine(model, **TINY_BUDGET, preemption_mode="swap")
    prompts = _prompts(6, seed=4, lo=40, hi=110)
    handles = [e.add_request(p, TINY_PARAMS) for p in prompts]
    while not any(h.seq.swapped is not None for h in handles):
        assert e.has_unfinished(), "no request was swapped out"
        e.step()
    swapped = [h for h in handles if h.seq.swapped is not None]
    victim = swapped[0]
    assert victim.seq.swapped.nbytes == victim.seq.num_computed * TOKEN_BYTES > 0
    assert e.stats()["swapped_bytes"] == sum(h.seq.swapped.nbytes for h in swapped)
    assert e.abort(victim.request_id)
    assert victim.seq.swapped is None
    assert e.stats()["swapped_bytes"] == sum(h.seq.swapped.nbytes for h in swapped[1:])
    while e.has_unfinished():
        e.step()
    assert e.stats()["swapped_bytes"] == 0
    assert victim.output().finish_reason == "abort"
    for prompt, h in zip(prompts, handles):
        if h is not victim:
            assert h.output().token_ids == reference(prompt, TINY_PARAMS).token_ids
    assert _in_use(e) == 0


def test_prefix_sharing_same_outputs_fewer_chunks(model, reference):
    common = _prompts(1, seed=5, lo=150, hi=150)[0]  # 2 whole chunks + 22 tokens
    prompts = _prompts(6, seed=6, lo=1, hi=60, prefix=common)
    e = jvt.Engine(model, **ENGINE)
    first = e.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = e.generate(prompts[1:], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, first + rest):
        assert out.token_ids == reference(prompt).token_ids
    assert first[0].metrics.prefix_tokens_reused == 0
    assert all(o.metrics.prefix_tokens_reused == 2 * TPC for o in rest)
    stats = e.stats()
    unshared = sum(math.ceil((len(p) + GREEDY.max_tokens - 1) / TPC) for p in prompts)
    assert stats["chunks_shared"] == 2
    assert stats["chunks_in_use"] == unshared - 2 * (len(prompts) - 1)
    e.free_cache()
    assert _in_use(e) == 0


def test_a_continued_request_reuses_its_retained_slot_to_the_token(model, reference):
    """A request that repeats a finished request's prompt and output (the next turn of a
    conversation sent whole) continues in that request's retained slot: every token whose KV
    is there is reused, not only whole chunks, and the outputs equal the reference's."""
    e = jvt.Engine(model, **ENGINE)
    first_prompt = _prompts(1, seed=11, lo=97, hi=97)[0]
    first = e.generate([first_prompt], GREEDY, use_tqdm=False)[0]
    turn = first_prompt + first.token_ids + _prompts(1, seed=12, lo=5, hi=5)[0]
    other = _prompts(1, seed=13, lo=40, hi=40)[0]
    second, unrelated = e.generate([turn, other], GREEDY, use_tqdm=False)
    assert second.token_ids == reference(turn).token_ids
    assert unrelated.token_ids == reference(other).token_ids
    # 97 + 24 tokens, less the last sampled one (its KV was never computed); not a multiple of TPC
    assert second.metrics.prefix_tokens_reused == 97 + 24 - 1
    assert unrelated.metrics.prefix_tokens_reused == 0
    # a prompt that shares only part of the first prompt does not take the slot over
    partial = first_prompt[:80] + _prompts(1, seed=14, lo=30, hi=30)[0]
    out = e.generate([partial], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == reference(partial).token_ids
    assert out.metrics.prefix_tokens_reused in (0, TPC)  # whole chunks only
    e.free_cache()
    assert _in_use(e) == 0


def test_stop_strings_and_stop_token_ids(engine):
    prompt = "The stop test: "
    base = engine.generate(prompt, GREEDY, use_tqdm=False)[0]
    text = base.text
    stop = text[5:8]
    out = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                                 ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]
    assert out.token_ids == base.token_ids[:len(out.token_ids)]
    tok = base.token_ids[6]
    out = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24,
                                                 stop_token_ids=[tok], ignore_eos=True),
                          use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]


def test_detokenize_false_gives_token_ids_only(engine):
    prompt = "token ids only: "
    base = engine.generate(prompt, GREEDY, use_tqdm=False)[0]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2,
                            detokenize=False)
    out = engine.generate(prompt, params, use_tqdm=False)[0]
    assert out.token_ids == base.token_ids and out.text == "" and len(out.logprobs) == 24
    deltas = list(engine.stream(prompt, params))
    assert [t for d in deltas for t in d.token_ids] == base.token_ids
    assert all(d.text == "" for d in deltas)
    with pytest.raises(ValueError, match="stop strings and detokenize=False"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize must be a bool"):
        SamplingParams(detokenize=1)


def test_stream_deltas_add_up_and_close_aborts(engine):
    prompt = "streaming"
    full = engine.generate(prompt, GREEDY, use_tqdm=False)[0]
    deltas = list(engine.stream(prompt, GREEDY))
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert "".join(d.text for d in deltas) == full.text
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    it = engine.stream(prompt, GREEDY)
    next(it)
    it.close()
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_abort_and_completion_return_every_chunk(model):
    e = jvt.Engine(model, **ENGINE, enable_prefix_sharing=False)
    rng = random.Random(7)
    streams = [e.stream(p, SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 60),
                                          stop=["a"] if rng.random() < 0.3 else ()))
               for p in _prompts(12, seed=7, hi=200)]
    for s in streams[:6]:
        next(s)  # starts them; the rest run while these are being consumed
    for i, s in enumerate(streams):
        if i % 3 == 0:
            s.close()
        else:
            list(s)
    assert _in_use(e) == 0
    assert e.stats()["slots_free"] == e.stats()["slots"]


def test_sampling_seed_is_batch_independent_and_logprobs(engine, reference):
    p = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=16, logprobs=3,
                       ignore_eos=True)
    prompts = _prompts(5, seed=8, hi=90)
    batch = engine.generate(prompts, p, use_tqdm=False)
    alone = reference(prompts[2], p)
    assert batch[2].token_ids == alone.token_ids
    assert batch[0].token_ids != batch[1].token_ids
    for lp, tok in zip(alone.logprobs, alone.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert max(lp.top.values()) >= lp.logprob - 1e-6
    greedy = reference(prompts[2], SamplingParams(temperature=0.0, max_tokens=8, logprobs=1))
    for lp in greedy.logprobs:
        assert list(lp.top) == [lp.token_id]
        assert np.isclose(lp.top[lp.token_id], lp.logprob)


def test_bad_input_is_rejected_and_others_unaffected(engine, reference):
    prompt = _prompts(1, seed=10, hi=50)[0]
    it = engine.stream(prompt, GREEDY)
    first = next(it)
    bad = [
        ("", "empty"), ([], "prompts"), ([1, 2, 263], "outside"), ([1, -1], "outside"),
        ([0] * 384, "max_model_len"), (3.5, "prompts"), ([[1, 2], "ok", None], r"prompts\[2\]"),
    ]
    for p, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.generate(p, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        engine.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("a", SamplingParams(top_p=0.0), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        engine.stream("")  # validated at the call, not at the first next()
    with pytest.raises(ValueError, match="message"):
        engine.session().stream("")
    rest = list(it)
    tokens = first.token_ids + [t for d in rest for t in d.token_ids]
    assert tokens == reference(prompt).token_ids


def test_request_that_cannot_fit_alone_and_bad_config(model):
    e = jvt.Engine(model, **{**ENGINE, "max_num_seqs": 1, "token_buckets": (16, 128),
                             "seq_buckets": (1,)}, kv_budget_bytes=2 << 20)
    with pytest.raises(ValueError, match="KV chunks"):
        e.generate([1] * 50, SamplingParams(max_tokens=100), use_tqdm=False)
    assert len(e.generate([1] * 50, SamplingParams(max_tokens=10), use_tqdm=False)) == 1
    for kwargs, field in [({"max_num_seqs": 0}, "max_num_seqs"), ({"bogus": 1}, "bogus"),
                          ({"device": "tpu"}, "device"), ({"dtype": "int8"}, "dtype"),
                          ({"max_num_batched_tokens": 4}, "max_num_batched_tokens"),
                          ({"token_buckets": (16, 64)}, "token_buckets"),
                          ({"preemption_mode": "drop"}, "preemption_mode"),
                          ({"swap_space_bytes": -1}, "swap_space_bytes"),
                          ({"swap_space_bytes": 1.5}, "swap_space_bytes")]:
        with pytest.raises(ValueError, match=field):
            jvt.Engine(model, **{**ENGINE, **kwargs})


def test_cli_generate_and_piped_chat(capsys, monkeypatch):
    import io

    from jvt.__main__ import main

    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--prompt", "there",
                 "--max-tokens", "3", "--max-model-len", "64"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and "3 tokens" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    assert main(["chat", "--model", "tiny", "--max-tokens", "4", "--max-model-len", "128"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 2 and out.count("tok/s]") == 2
    assert main(["generate", "--model", "tiny", "--prompt", "", "--max-model-len", "64"]) == 2
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--max-model-len", "9999"]) == 2


def test_chat_example_runs_with_piped_stdin():
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "examples" / "chat.py"
    run = subprocess.run([sys.executable, str(script), "--model", "tiny", "--max-tokens", "5"],
                         input="hello\nbye\n", capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stdout
    assert run.stdout.count("you> ") == 2 and run.stdout.count("ttft") == 2


def test_add_request_and_step(engine, reference):
    prompts = _prompts(3, seed=12, hi=80)
    handles = [engine.add_request(p, GREEDY) for p in prompts]
    assert not any(h.finished for h in handles)
    while engine.has_unfinished():
        engine.step()
    for p, h in zip(prompts, handles):
        assert h.finished and h.output().token_ids == reference(p).token_ids
    assert not engine.abort(handles[0].request_id)  # already finished


def test_random_workload_with_sessions_sharing_and_aborts_leaks_nothing(model):
    e = jvt.Engine(model, **{**ENGINE, "max_num_seqs": 4, "seq_buckets": (4,)},
                   kv_budget_bytes=7 * (2 << 20))
    rng = random.Random(13)
    common = _prompts(1, seed=13, lo=70, hi=70)[0]
    sessions = [e.session() for _ in range(2)]
    handles = []
    for i in range(30):
        prefix = common if rng.random() < 0.5 else []
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 40),
                                stop=["ab"] if rng.random() < 0.2 else ())
        handles.append(e.add_request(_prompts(1, seed=100 + i, hi=120, prefix=prefix)[0], params))
        for _ in range(rng.randint(0, 4)):
            e.step()
        if rng.random() < 0.2:
            e.abort(rng.choice(handles).request_id)
        if i % 10 == 0:
            sessions[i % 2].send(f"turn {i}", SamplingParams(max_tokens=8))
    while e.has_unfinished():
        e.step()
    assert all(h.finished for h in handles)
    assert any(h.output().finish_reason == "abort" for h in handles)
    assert e.stats()["preemptions"] > 0  # the workload did exercise memory pressure
    assert sum(h.output().metrics.prefix_tokens_reused for h in handles) > 0
    for s in sessions:
        s.close()
    e.free_cache()
    kv = e.store.stats()
    assert kv.chunks_in_use == 0 and kv.mapped_bytes == 0
    assert e.stats()["slots_free"] == 4 and e.stats()["swapped_bytes"] == 0
