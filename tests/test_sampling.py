"""jvt.sampling against numpy references of the filtered distributions."""

import jax
import numpy as np
import pytest

from jvt.sampling import SamplingArrays, sample
from jvt.types import MAX_LOGPROBS, SamplingParams

_sample = jax.jit(sample)


def _reference_probs(logits, p: SamplingParams) -> np.ndarray:
    """The distribution sampling should draw from: temperature, then top-k, top-p, min-p."""
    x = logits.astype(np.float64) / p.temperature
    order = np.argsort(-x, kind="stable")
    xs = x[order]
    keep = np.ones_like(xs, bool)
    if p.top_k:
        keep[p.top_k:] = False
    probs = np.where(keep, np.exp(xs - xs.max()), 0.0)
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep &= before < p.top_p
    keep &= probs >= p.min_p * probs[0]
    out = np.zeros_like(x)
    out[order] = np.where(keep, probs, 0.0)
    return out / out.sum()


def _draw(logits, p: SamplingParams, n: int, seed: int = 7) -> np.ndarray:
    rows = [(p, seed, c) for c in range(n)]
    res = _sample(np.tile(logits, (n, 1)), SamplingArrays.pack(rows, n))
    return np.asarray(res.tokens)


def test_greedy_is_argmax_and_logprobs_match_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(17, 97)).astype(np.float32) * 3
    res = _sample(logits, SamplingArrays.pack([], 17))
    np.testing.assert_array_equal(np.asarray(res.tokens), logits.argmax(-1))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(res.logprob), ref.max(-1), rtol=1e-5, atol=1e-5)
    top = np.argsort(-ref, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(res.top_ids), top)
    np.testing.assert_allclose(np.asarray(res.top_logprobs), np.take_along_axis(ref, top, -1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=4, top_p=0.8, min_p=0.05),
])
def test_empirical_distribution_matches_reference(params):
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -3.0], np.float32)
    n = 4000
    tokens = _draw(logits, params, n)
    ref = _reference_probs(logits, params)
    freq = np.bincount(tokens, minlength=len(logits)) / n
    assert np.all(freq[ref == 0] == 0), (freq, ref)  # filtered tokens are never drawn
    np.testing.assert_allclose(freq, ref, atol=4 * np.sqrt(0.25 / n))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = np.random.default_rng(1).normal(size=33).astype(np.float32)
    tokens = _draw(logits, SamplingParams(temperature=5.0, top_k=1), 50)
    assert set(tokens.tolist()) == {int(logits.argmax())}


def test_row_result_is_independent_of_batch_composition():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 61)).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.0),
              SamplingParams(temperature=2.0, top_k=10), SamplingParams(temperature=0.5),
              SamplingParams(temperature=1.0, min_p=0.1)]
    rows = [(p, 100 + i, 3 * i) for i, p in enumerate(params)]
    padded = np.pad(logits, ((0, 3), (0, 0)))
    together = np.asarray(_sample(padded, SamplingArrays.pack(rows, 8)).tokens)[:5]
    for i in range(5):
        alone = _sample(logits[i:i + 1], SamplingArrays.pack([rows[i]], 1)).tokens
        assert int(alone[0]) == together[i]


def test_same_seed_same_counter_reproduces_and_counter_varies():
    logits = np.zeros(1000, np.float32)
    p = SamplingParams(temperature=1.0)
    a = _draw(logits, p, 20, seed=5)
    b = _draw(logits, p, 20, seed=5)
    c = _draw(logits, p, 20, seed=6)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) > 10  # the counter moves the key: not one token repeated
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": -1}, "max_tokens"),
    ({"stop": [""]}, "stop"), ({"seed": -3}, "seed"), ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"temperature": "hot"}, "temperature"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_device_side_choice_equals_the_static_variants():
    """greedy_only=None (lax.cond on the device, the CPU runner's single variant) gives the
    tokens of greedy_only=True for all-greedy steps and of False for mixed steps."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
    auto = jax.jit(lambda x, p: sample(x, p, greedy_only=None))
    greedy = SamplingArrays.pack([(SamplingParams(temperature=0.0), 1, 0)] * 4, 4)
    mixed = SamplingArrays.pack([(SamplingParams(temperature=0.0), 1, 0),
                                 (SamplingParams(temperature=1.2, top_p=0.9), 2, 5),
                                 (SamplingParams(temperature=0.7, top_k=5), 3, 1),
                                 (SamplingParams(temperature=0.0), 4, 0)], 4)
    np.testing.assert_array_equal(
        np.asarray(auto(logits, greedy).tokens),
        np.asarray(jax.jit(lambda x, p: sample(x, p, greedy_only=True))(logits, greedy).tokens))
    np.testing.assert_array_equal(np.asarray(auto(logits, mixed).tokens),
                                  np.asarray(_sample(logits, mixed).tokens))


ALLOWED = np.array([True, False, True, False, True, True, False])  # of the 7 logits below


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_p=0.7),
    SamplingParams(temperature=0.9, top_k=2, min_p=0.1),
])
def test_allowed_tokens_restrict_the_distribution_exactly(params):
    """With a constraint's allowed tokens, a draw follows the distribution restricted to them
    (filters applied after the restriction): the first draw kept when allowed, else a second
    one from the allowed tokens (rejection sampling) for unfiltered rows; filtered rows draw
    from the restricted distribution directly."""
    logits = np.array([0.5, 2.0, 1.0, 1.5, -0.5, 0.0, -3.0], np.float32)
    n = 6000
    rows = [(params, 11, c) for c in range(n)]
    res = _sample(np.tile(logits, (n, 1)), SamplingArrays.pack(rows, n),
                  allowed=np.tile(ALLOWED, (n, 1)))
    tokens = np.asarray(res.tokens)
    restricted = np.where(ALLOWED, logits, -np.inf)
    ref = _reference_probs(restricted, params)
    freq = np.bincount(tokens, minlength=len(logits)) / n
    assert np.all(freq[~ALLOWED] == 0)
    np.testing.assert_allclose(freq, ref, atol=4 * np.sqrt(0.25 / n))
    logprobs = logits - np.log(np.exp(logits).sum())  # still those of the raw distribution
    np.testing.assert_allclose(np.asarray(res.logprob), logprobs[tokens], rtol=1e-5, atol=1e-5)


def test_an_allowed_first_draw_is_the_unmasked_draw():
    """What a K-step call relies on: an unfiltered row's token under the mask equals its draw
    without the mask whenever that draw is allowed (same seed and counter), greedy or not."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(64, 40)).astype(np.float32) * 2
    allowed = rng.random((64, 40)) < 0.6
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)):
        p = SamplingArrays.pack([(params, 9, c) for c in range(64)], 64)
        free = np.asarray(_sample(logits, p).tokens)
        masked = np.asarray(_sample(logits, p, allowed=allowed).tokens)
        ok = allowed[np.arange(64), free]
        assert ok.any() and not ok.all()
        np.testing.assert_array_equal(masked[ok], free[ok])
        assert allowed[np.arange(64), masked].all()
