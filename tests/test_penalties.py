"""Penalties, logit_bias, min_tokens and prompt logprobs against independent references:
a NumPy model of the logits transformation, transformers' own logits processors in its
generate(), and log_softmax of transformers' logits."""

import numpy as np
import pytest
import torch
import transformers

import jvt
from jvt import models, penalties
from jvt.types import MAX_LOGPROBS, SamplingParams

EOS = 257  # hf_fixtures' eos_token_id
ENGINE = {"max_num_seqs": 4, "max_model_len": 160, "max_num_batched_tokens": 32,
          "token_buckets": (8, 32), "seq_buckets": (4,), "prefill_chunk": 13}


@pytest.fixture(scope="module")
def hf_and_engine(tmp_path_factory):
    from hf_fixtures import build_hf_model, save_hf_model

    path = tmp_path_factory.mktemp("hf")
    hf = build_hf_model("llama3", seed=2)
    save_hf_model(hf, path)
    engine = jvt.Engine(models.load(str(path), use_cache=False), **ENGINE)
    return hf, engine


def _prompt(n, seed):
    rng = np.random.default_rng(seed)
    return [256] + rng.integers(0, 256, n - 1).tolist()


# -- the transformation on fixed logits ----------------------------------------------------

def _reference(logits, counts, prompt_mask, banned, bias, p: SamplingParams, counter):
    """One row, float64, straight from the definitions."""
    x = logits.astype(np.float64) + bias
    if counter < p.min_tokens:
        x[banned] = -np.inf
    for t in range(x.size):
        if prompt_mask[t] or counts[t] > 0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    return x


def test_penalize_matches_numpy_reference():
    rng = np.random.default_rng(0)
    vocab, slots = 37, 6
    cases = [SamplingParams(repetition_penalty=1.7), SamplingParams(frequency_penalty=0.9),
             SamplingParams(presence_penalty=-1.3), SamplingParams(),
             SamplingParams(logit_bias={3: 100.0, 5: -100.0}, min_tokens=4, max_tokens=9,
                            stop_token_ids=(7,), repetition_penalty=0.6,
                            frequency_penalty=-0.4, presence_penalty=2.0),
             SamplingParams(min_tokens=2, max_tokens=2, ignore_eos=True, stop_token_ids=(1,))]
    counters = [0, 3, 1, 2, 3, 5]
    row_slot = [4, 0, 5, 1, 2, 3]
    tables = penalties.PenaltyTables.zeros(slots, vocab, None)
    ref_rows = []
    for p, slot in zip(cases, row_slot):
        tokens = rng.integers(0, vocab, 11).tolist()  # 6 prompt tokens, 5 output tokens
        row = penalties.rows(p, tokens, 6, vocab, eos_ids=(2, 9))
        tables = penalties.set_rows(tables, slot, row)
        counts = np.bincount(tokens[6:], minlength=vocab)
        prompt_mask = np.isin(np.arange(vocab), tokens[:6])
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else [2, 9])
        bias = np.zeros(vocab)
        for t, v in p.logit_bias:
            bias[t] = v
        ref_rows.append((counts, prompt_mask, banned, bias))
    logits = rng.normal(0, 3, (len(cases), vocab)).astype(np.float32)
    f = np.float32
    out = np.asarray(penalties.penalize(
        logits, tables, np.array(row_slot, np.int32),
        np.array([p.presence_penalty for p in cases], f),
        np.array([p.frequency_penalty for p in cases], f),
        np.array([p.repetition_penalty for p in cases], f),
        np.array([p.min_tokens for p in cases], np.int32), np.array(counters, np.int32),
        np.array([p.penalized for p in cases])))
    for i, (p, (counts, prompt_mask, banned, bias)) in enumerate(zip(cases, ref_rows)):
        ref = _reference(logits[i], counts, prompt_mask, banned, bias, p, counters[i])
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-4, err_msg=str(p))
    np.testing.assert_array_equal(out[3], logits[3])  # a plain row keeps its logits
    assert np.isneginf(out[4][[7, 2, 9]]).all() and np.isfinite(out[5]).all()


# -- through the engine, against transformers' generate -------------------------------------

class _FrequencyPresence(transformers.LogitsProcessor):
    """OpenAI's frequency and presence penalties over the generated tokens (NumPy)."""

    def __init__(self, prompt_len, frequency, presence):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        out = scores.numpy().astype(np.float64)
        for row, ids in enumerate(input_ids.numpy()):
            counts = np.bincount(ids[self.prompt_len:], minlength=out.shape[1])[:out.shape[1]]
            out[row] -= self.frequency * counts + self.presence * (counts > 0)
        return torch.tensor(out, dtype=scores.dtype)


def _hf_generate(hf, prompt, p: SamplingParams):
    procs = []
    if p.logit_bias:
        procs.append(transformers.SequenceBiasLogitsProcessor(
            {(t,): v for t, v in p.logit_bias}))
    if p.min_tokens:
        procs.append(transformers.MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens,
                                                                    EOS))
    if p.repetition_penalty != 1.0:
        procs.append(transformers.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.frequency_penalty or p.presence_penalty:
        procs.append(_FrequencyPresence(len(prompt), p.frequency_penalty, p.presence_penalty))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=p.max_tokens, do_sample=False,
                          eos_token_id=EOS, pad_token_id=258,
                          logits_processor=transformers.LogitsProcessorList(procs))
    return out[0, len(prompt):].tolist()


PENALISED = [
    SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=0.7),
    SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=1.5),
    SamplingParams(temperature=0.0, max_tokens=24, presence_penalty=2.0,
                   frequency_penalty=-0.5),
    SamplingParams(temperature=0.0, max_tokens=24, logit_bias={17: 8.0, 40: -3.5}),
    SamplingParams(temperature=0.0, max_tokens=24, min_tokens=20, repetition_penalty=1.2,
                   logit_bias={EOS: 6.0}),
]


def test_penalised_greedy_matches_transformers_in_a_mixed_batch(hf_and_engine):
    hf, engine = hf_and_engine
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = [_prompt(n, seed) for seed, n in enumerate((1, 17, 30, 13, 26, 40))]
    alone = [engine.generate([p], plain, use_tqdm=False)[0].token_ids for p in prompts]
    for params in PENALISED:
        # every penalised request shares its batch with plain ones
        batch = [x for p in prompts for x in ((p, params), (p, plain))]
        outs = engine.generate([b[0] for b in batch], [b[1] for b in batch], use_tqdm=False)
        for i, prompt in enumerate(prompts):
            assert outs[2 * i].token_ids == _hf_generate(hf, prompt, params), (params, i)
            assert outs[2 * i + 1].token_ids == alone[i]
        changed = sum(outs[2 * i].token_ids != alone[i] for i in range(len(prompts)))
        assert changed >= 3, params  # the penalty changes most continuations


def test_min_tokens_holds_back_eos_and_stop_ids_while_sampling(hf_and_engine):
    _, engine = hf_and_engine
    params = SamplingParams(temperature=1.5, top_k=3, max_tokens=12, min_tokens=10, seed=5,
                            stop_token_ids=(3, 4, 5), logit_bias={EOS: 30.0, 4: 30.0})
    outs = engine.generate([_prompt(9, s) for s in range(6)], params, use_tqdm=False)
    for out in outs:
        assert len(out.token_ids) >= 10
        assert not {EOS, 3, 4, 5} & set(out.token_ids[:10])
        assert out.token_ids[10] in (EOS, 4)  # the bias wins as soon as they are allowed


def test_logit_bias_bans_and_forces(hf_and_engine):
    _, engine = hf_and_engine
    prompt = _prompt(21, 7)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    base = engine.generate([prompt], greedy, use_tqdm=False)[0].token_ids
    banned = {t: -100.0 for t in set(base)}
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True, seed=3,
                           logit_bias=banned)
        assert not set(engine.generate([prompt], p, use_tqdm=False)[0].token_ids) & set(base)
        p = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True, seed=3,
                           logit_bias={123: 100.0})
        assert engine.generate([prompt], p, use_tqdm=False)[0].token_ids == [123] * 16


# -- prompt logprobs -----------------------------------------------------------------------

def _check_prompt_logprobs(out, prompt, hf, k):
    from hf_fixtures import hf_logits

    ref = torch.log_softmax(torch.tensor(hf_logits(hf, prompt), dtype=torch.float64),
                            -1).numpy()
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    for pos in range(1, len(prompt)):
        row, lp = ref[pos - 1], lps[pos]
        assert lp.token_id == prompt[pos]
        assert lp.logprob == pytest.approx(row[prompt[pos]], abs=1e-4)
        assert lp.rank == 1 + int(np.sum(row > row[prompt[pos]] + 1e-6))
        assert len(lp.top) == k
        best = np.argsort(-row)[:k]
        np.testing.assert_allclose(sorted(lp.top.values(), reverse=True), row[best], atol=1e-4)


def test_prompt_logprobs_match_transformers(hf_and_engine):
    hf, engine = hf_and_engine
    prompts = [_prompt(n, 10 + n) for n in (45, 2, 14, 27)]  # 45 > 3 chunks of 13
    params = [SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=k)
              for k in (MAX_LOGPROBS, 0, 3, 1)]
    outs = engine.generate(prompts, params, use_tqdm=False)
    for out, prompt, p in zip(outs, prompts, params):
        assert out.token_ids == [] and out.finish_reason == "length"
        _check_prompt_logprobs(out, prompt, hf, p.prompt_logprobs)
    # The same prompt again (its KV retained for prefix sharing) with tokens generated too
    p = SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2, logprobs=2)
    again = engine.generate([prompts[0]], p, use_tqdm=False)[0]
    _check_prompt_logprobs(again, prompts[0], hf, 2)
    assert again.metrics.prefix_tokens_reused == 0
    plain = engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=5),
                            use_tqdm=False)[0]
    assert again.token_ids == plain.token_ids and plain.prompt_logprobs is None
    deltas = list(engine.stream(prompts[2], p))
    assert deltas[0].prompt_logprobs == engine.generate([prompts[2]], p, use_tqdm=False)[
        0].prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])


# -- bad values ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logit_bias": {5: 101.0}}, "logit_bias value"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token id"),
    ({"logit_bias": [(1, 2.0, 3)]}, "logit_bias"),
    ({"logit_bias": [(1, 2.0), (1, 3.0)]}, "logit_bias"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
])
def test_bad_values_are_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_logit_bias_outside_the_vocabulary_is_refused(hf_and_engine):
    _, engine = hf_and_engine
    with pytest.raises(ValueError, match=r"logit_bias .* outside \[0, 301\)"):
        engine.generate([[1, 2]], SamplingParams(logit_bias={301: 1.0}), use_tqdm=False)
