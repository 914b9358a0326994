"""K decode steps per call (EngineConfig.decode_steps): for K in {2, 7, 16} every output equals
K = 1's (which runs the one-step-lag loop the rest of the suite checks against transformers):
greedy tokens and logprobs, seeded sampling, stops by EOS, stop token, stop string and length
inside a block, aborts, preemption, sessions, prefix sharing, tensor parallelism; and the KV
the engine keeps is what was emitted."""

import json
import re

import pytest

import jvt
from jvt import models
from jvt.types import SamplingParams

WIDE = models.ModelConfig(
    vocab_size=263, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=16,
    num_kv_heads=16, head_dim=128, max_position_embeddings=1024, dtype="float32",
    bos_token_id=256, eos_token_id=(257, 262))
EOS = 257
TOKEN_BYTES = 32 << 10  # KV bytes per token for WIDE
ENGINE = {"max_num_seqs": 8, "max_model_len": 384, "max_num_batched_tokens": 128,
          "token_buckets": (16, 128), "seq_buckets": (2, 8), "prefill_chunk": 48}
KS = (2, 7, 16)
PROMPTS = [[256, *range(65, 65 + n)] for n in (3, 11, 29, 47, 5, 60)]


@pytest.fixture(scope="module")
def model():
    return models.Model(WIDE, models.init_module(WIDE, seed=11), models.ByteTokenizer())


@pytest.fixture(scope="module")
def engines(model):
    """K -> an engine with decode_steps=K (K = 1: the reference)."""
    out = {k: jvt.Engine(model, decode_steps=k, **ENGINE) for k in (1, *KS)}
    yield out
    for e in out.values():
        e.close()


def kept_bytes(engine) -> int:
    return engine.stats()["kv_used_bytes"]


def retained_tokens(engine) -> list[list[int]]:
    return sorted(r.tokens for r in engine.scheduler.retained.values())


def run(engine, prompts, params):
    outs = engine.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.finish_reason, o.text) for o in outs], outs


def assert_same_as_k1(engines, k, prompts, params):
    ref, ref_outs = run(engines[1], prompts, params)
    got, outs = run(engines[k], prompts, params)
    assert got == ref
    for a, b in zip(outs, ref_outs):
        if b.logprobs is not None:
            assert [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs]
            assert [lp.logprob for lp in a.logprobs] == pytest.approx(
                [lp.logprob for lp in b.logprobs], abs=1e-5)
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.top == pytest.approx(y.top, abs=1e-5)
    # What the engines keep is what was emitted: retained slots hold prompt + output tokens;
    # K = 1 also holds the KV of a final stop token (its over-scheduled next row wrote it),
    # K > 1 not when the device stopped the row there.
    mine, ref_kept = retained_tokens(engines[k]), retained_tokens(engines[1])
    assert len(mine) == len(ref_kept) == len(prompts)
    for o in outs:
        emitted = o.prompt_token_ids + o.token_ids
        a = [r for r in mine if r == emitted[:len(r)] and len(r) > len(o.prompt_token_ids)]
        b = [r for r in ref_kept if r == emitted[:len(r)] and len(r) > len(o.prompt_token_ids)]
        assert len(a) == len(b) == 1
        assert len(emitted) - 2 <= len(b[0]) - 1 <= len(a[0]) <= len(b[0])
    assert kept_bytes(engines[k]) == sum(map(len, mine)) * TOKEN_BYTES
    for e in (engines[1], engines[k]):
        e.free_cache()
        assert e.stats()["chunks_in_use"] == 0
    return outs


@pytest.mark.parametrize("k", KS)
def test_greedy_tokens_and_logprobs_with_lengths_not_multiples_of_k(engines, k):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=3)
              for m in (1, 5, 23, 40, 17, 9)]
    ref = [engines[1].generate([p], sp, use_tqdm=False)[0] for p, sp in zip(PROMPTS, params)]
    outs = [engines[k].add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    while engines[k].has_unfinished():
        engines[k].step()
    for r, h in zip(ref, outs):
        o = h.output()
        assert o.token_ids == r.token_ids and len(o.token_ids) == h.seq.params.max_tokens
        assert [lp.logprob for lp in o.logprobs] == pytest.approx([lp.logprob for lp in r.logprobs],
                                                                  abs=1e-5)
    assert kept_bytes(engines[k]) == sum(len(p) + m.max_tokens for p, m in zip(PROMPTS, params)) \
        * TOKEN_BYTES - sum(TOKEN_BYTES for _ in PROMPTS)  # the last token has no KV yet
    engines[k].free_cache()
    engines[1].free_cache()


@pytest.mark.parametrize("k", KS)
def test_seeded_sampling_is_the_same_for_every_k(engines, k):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_tokens=31,
                            ignore_eos=True)
    assert_same_as_k1(engines, k, PROMPTS, params)


CONSTRAINED = [
    SamplingParams(temperature=0.0, max_tokens=60, regex=r"[a-f]{3,9}( [0-9]+)*\."),
    SamplingParams(temperature=1.0, seed=3, max_tokens=80, logprobs=2, json_schema={
        "type": "object", "properties": {"k": {"enum": ["ab", "cd"]},
                                         "v": {"type": "integer", "maximum": 999}},
        "required": ["k", "v"], "additionalProperties": False}),
    SamplingParams(temperature=0.8, seed=4, max_tokens=40, choice=["north", "south", "nope"]),
    SamplingParams(temperature=1.0, seed=5, max_tokens=80, regex=r"[a-z]{40,70}",
                   repetition_penalty=1.4, frequency_penalty=1.5, logit_bias={ord("x"): 3.0}),
    SamplingParams(temperature=1.0, seed=6, max_tokens=50, top_p=0.8, regex=r"[0-9a-z ]{5,30}"),
]
PATTERNS = [r"[a-f]{3,9}( [0-9]+)*\.", None, r"north|south|nope", r"[a-z]{40,70}",
            r"[0-9a-z ]{5,30}"]


@pytest.mark.parametrize("k", KS)
def test_constrained_rows_draw_k_steps_and_the_host_refuses_what_the_mask_would(engines, k):
    """Structured-output rows run in K-step calls whose later draws are made without the mask
    and checked on the host: every output equals K = 1's (each token masked), greedy and
    seeded, penalised (the tables are rewritten after a refusal: frequency_penalty would see
    the refused tokens otherwise), and draws were refused on the way (a random model rarely
    writes these). A filtered row (top_p) keeps its batch at one step per call: alone, no
    draw is made without its mask."""
    refused = engines[k].refused_draws
    outs = assert_same_as_k1(engines, k, PROMPTS[:4], CONSTRAINED[:4])
    assert engines[k].refused_draws > refused + 20
    refused = engines[k].refused_draws
    outs += assert_same_as_k1(engines, k, PROMPTS[4:5], CONSTRAINED[4:5])
    assert engines[k].refused_draws == refused
    outs += assert_same_as_k1(engines, k, PROMPTS[4:5] * 2, [CONSTRAINED[4], CONSTRAINED[0]])
    assert engines[1].refused_draws == 0
    for o, pattern in zip(outs, PATTERNS + PATTERNS[4:5] + PATTERNS[:1]):
        assert o.finish_reason in ("stop", "length")
        if pattern is None:
            assert set(json.loads(o.text)) == {"k", "v"}
        else:
            assert re.fullmatch(pattern, o.text), o.text


@pytest.mark.parametrize("k", KS)
def test_eos_inside_a_block(engines, k):
    """min_tokens holds back EOS, which logit_bias then forces: the output ends with EOS at
    exactly min_tokens + 1 tokens, in the middle of a K-block."""
    for m in (3, 9, 12):
        params = SamplingParams(temperature=0.0, max_tokens=40, min_tokens=m,
                                logit_bias={EOS: 100.0})
        outs = assert_same_as_k1(engines, k, PROMPTS[:3], params)
        for o in outs:
            assert o.token_ids[-1] == EOS and len(o.token_ids) == m + 1
            assert o.finish_reason == "stop"


@pytest.mark.parametrize("k", KS)
def test_stop_token_inside_a_block(engines, k):
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    tokens = engines[1].generate([PROMPTS[1]], plain, use_tqdm=False)[0].token_ids
    engines[1].free_cache()
    for j in (2, 5, 9):  # the first occurrence of tokens[j] ends the output there
        stop = tokens[j]
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                stop_token_ids=(stop,))
        outs = assert_same_as_k1(engines, k, [PROMPTS[1]], params)
        assert outs[0].token_ids == tokens[:tokens.index(stop) + 1]
    many = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,  # more ids than
                          stop_token_ids=tuple(range(300, 309)) + (tokens[6],))  # the device
    outs = assert_same_as_k1(engines, k, [PROMPTS[1]], many)  # checks: the host stops it
    assert outs[0].token_ids == tokens[:tokens.index(tokens[6]) + 1]


@pytest.mark.parametrize("k", KS)
def test_stop_string_spanning_two_blocks(engines, k):
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    text = engines[1].generate([PROMPTS[2]], plain, use_tqdm=False)[0].text
    engines[1].free_cache()
    starts = [a for a in range(1, 30) if text[a:a + 3].isascii() and len(text[a:a + 3]) == 3
              and text.find(text[a:a + 3]) == a]
    assert len(starts) >= 3, text
    for a in starts[:6]:  # K-blocks split some of them
        stop = text[a:a + 3]
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
        outs = assert_same_as_k1(engines, k, [PROMPTS[2]], params)
        assert outs[0].text == text[:a] and outs[0].finish_reason == "stop"


@pytest.mark.parametrize("k", KS)
def test_stream_delivers_each_call_and_abort_mid_block(engines, k):
    e = engines[k]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    ref = engines[1].generate([PROMPTS[3]], params, use_tqdm=False)[0].token_ids
    deltas = list(e.stream(PROMPTS[3], params))
    assert [t for d in deltas for t in d.token_ids] == ref
    assert max(len(d.token_ids) for d in deltas) <= k  # up to K tokens per delta
    h = e.add_request(PROMPTS[3], params)
    while len(h.seq.tokens) - h.seq.num_prompt < 3:
        e.step()
    assert e.abort(h.request_id)
    while e.has_unfinished():
        e.step()
    out = h.output()
    assert out.finish_reason == "abort" and out.token_ids == ref[:len(out.token_ids)]
    assert len(out.token_ids) < 3 + 2 * k  # nothing sampled after the abort was taken
    e.free_cache()
    assert kept_bytes(e) == 0 and e.stats()["chunks_in_use"] == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_with_k_steps(model, mode):
    budget = {**ENGINE, "kv_budget_bytes": 5 * (2 << 20), "enable_prefix_sharing": False,
              "preemption_mode": mode}
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    prompts = [[256, *[(13 * i + j) % 256 for j in range(40 + 13 * i)]] for i in range(6)]
    outs = {}
    for k in (1, 7):
        e = jvt.Engine(model, decode_steps=k, **budget)
        outs[k] = [o.token_ids for o in e.generate(prompts, params, use_tqdm=False)]
        assert e.stats()["preemptions"] > 0
        assert e.stats()["chunks_in_use"] == 0 and e.stats()["swapped_bytes"] == 0
        e.close()
    assert outs[7] == outs[1]


@pytest.mark.parametrize("k", KS)
def test_sessions_and_prefix_sharing(engines, k):
    params = SamplingParams(temperature=0.0, max_tokens=13)
    turns = {}
    for kk in (1, k):
        with engines[kk].session(system="be brief") as chat:
            turns[kk] = [chat.send(m, params).token_ids for m in ("hi", "and again", "more")]
        engines[kk].free_cache()
    assert turns[k] == turns[1]
    shared = [(7 * i) % 256 for i in range(150)]  # two whole 64-token chunks and more
    prompts = [shared + [i] * (i + 3) for i in range(5)]
    greedy = SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True)
    first = engines[k].generate(prompts[:1], greedy, use_tqdm=False)
    rest = engines[k].generate(prompts[1:], greedy, use_tqdm=False)
    assert all(o.metrics.prefix_tokens_reused == 128 for o in rest)
    ref = engines[1].generate(prompts, greedy, use_tqdm=False)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in ref]
    for e in (engines[1], engines[k]):
        e.free_cache()


def test_session_turns_reuse_the_kept_kv(engines):
    """After a K-step turn the session's next turn reuses the slot's KV of everything
    emitted, as with K = 1."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reuse = {}
    for k in (1, 7):
        with engines[k].session() as chat:
            chat.send("first", params)
            out = chat.send("second", params)
            reuse[k] = out.metrics.prefix_tokens_reused
        engines[k].free_cache()
    assert reuse[7] == reuse[1] > 0


def test_tensor_parallel_two_devices_with_k_steps(model):
    params = SamplingParams(temperature=0.0, max_tokens=19, ignore_eos=True)
    outs = {}
    for n, k in ((1, 1), (2, 7)):
        e = jvt.Engine(model, tensor_parallel=n, decode_steps=k, **ENGINE)
        outs[n] = [o.token_ids for o in e.generate(PROMPTS, params, use_tqdm=False)]
        e.close()
    assert outs[2] == outs[1]


def test_pure_decode_steps_are_k_step_calls_and_waiting_requests_shrink_k(model):
    e = jvt.Engine(model, decode_steps=7, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    schedule, seen = e.scheduler.schedule, []  # (plan.steps, a request was waiting)

    def spy():
        waiting = bool(e.scheduler.waiting)
        plan = schedule()
        if plan is not None:
            seen.append((plan.steps, waiting))
        return plan
    e.scheduler.schedule = spy
    ref = e.generate([PROMPTS[0]], params, use_tqdm=False)[0].token_ids
    assert 7 in [s for s, _ in seen]  # decode ran in K-step calls
    seen.clear()
    prompts = [PROMPTS[i % 6] for i in range(8)] + [PROMPTS[0]]  # the ninth waits for a slot
    handles = [e.add_request(p, params) for p in prompts]
    while e.has_unfinished():
        e.step()
    assert handles[8].output().token_ids == ref
    assert any(w for _, w in seen) and all(s == 1 for s, w in seen if w)
    assert any(s > 1 for s, _ in seen)
    e.close()


def test_tiny_preset_k_steps_equal_one_step():
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=1)
              for m in (3, 17, 30)] + [SamplingParams(temperature=0.9, seed=5, max_tokens=25,
                                                      ignore_eos=True)]
    prompts = ["Hello", "The quick brown fox", "a", "Once upon a time"]
    outs = {}
    for k in (1, 2, 7, 16):
        e = jvt.Engine("tiny", decode_steps=k, max_num_seqs=4, max_model_len=256,
                       max_num_batched_tokens=64, token_buckets=(16, 64), seq_buckets=(4,))
        outs[k] = [(o.token_ids, [lp.logprob for lp in o.logprobs or []])
                   for o in e.generate(prompts, params, use_tqdm=False)]
        e.close()
    for k in (2, 7, 16):
        assert [t for t, _ in outs[k]] == [t for t, _ in outs[1]], k
        for (_, a), (_, b) in zip(outs[k], outs[1]):
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4"])
def test_bad_decode_steps(value):
    with pytest.raises(ValueError, match="decode_steps"):
        jvt.EngineConfig(decode_steps=value)
