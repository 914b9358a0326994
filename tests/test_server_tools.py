"""Tool calling through `jvt serve` with the real openai client: tool_choice "required" and a
named function give valid calls (tiny preset and SmolLM2), "auto" parses the calls SmolLM2
writes (streamed deltas equal the whole response), a full round trip (call, tool result,
answer), the openai client's `parse` with Pydantic tools, and 400s naming the field for bad
tools, tool_choice and tool messages."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_utils import RemoteServer
from tests.test_server_structured import SERVER_ARGS

TINY_ARGS = [*SERVER_ARGS, "--max-model-len", "2048"]  # the tool prompt is ~900 bytes here

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "local_time", "description": "Get the local time of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid(calls) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, after checking its id and arguments."""
    out = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


def _streamed(chunks) -> tuple[str | None, list[tuple[str, str]], str]:
    """Content, (name, arguments) calls and finish_reason of a streamed choice, assembled as
    clients assemble them (arguments concatenated per call index)."""
    content, calls, finish = None, {}, None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        if d.content:
            content = (content or "") + d.content
        for tc in d.tool_calls or ():
            name, args = calls.get(tc.index, ("", ""))
            calls[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
        finish = ch.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.fixture(scope="module")
def tiny():
    s = RemoteServer(TINY_ARGS)
    yield s
    s.stop()


@pytest.mark.parametrize("parallel", [False, True])
def test_required_and_named_on_tiny(tiny, parallel):
    client = tiny.openai()
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=seed,
            temperature=1.0, max_tokens=400, parallel_tool_calls=parallel)
        choice = out.choices[0]
        if choice.finish_reason == "length":  # a list of calls run to max_tokens (parallel)
            assert parallel
            continue
        assert choice.finish_reason == "tool_calls", choice
        calls = _valid(choice.message.tool_calls)
        assert choice.message.content is None
        assert len(calls) == 1 or parallel
        named = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=400,
            tool_choice={"type": "function", "function": {"name": "local_time"}})
        assert [n for n, _ in _valid(named.choices[0].message.tool_calls)] == ["local_time"]


def test_streamed_calls_equal_the_response(tiny):
    client = tiny.openai()
    kw = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
          "temperature": 1.0, "max_tokens": 400, "n": 3, "seed": 7,
          "parallel_tool_calls": False}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for i, choice in enumerate(whole.choices):
        mine = [c for c in chunks if c.choices and c.choices[0].index == i]
        content, calls, finish = _streamed(mine)
        assert finish == choice.finish_reason == "tool_calls"
        assert content is None
        assert calls == [(c.function.name, c.function.arguments)
                         for c in choice.message.tool_calls]
        # As OpenAI streams them: a first delta with id, type and name (arguments ""), then
        # the arguments in pieces as they are written.
        pieces = [tc for c in mine for tc in c.choices[0].delta.tool_calls or ()]
        first = pieces[0]
        assert first.id.startswith("call_") and first.type == "function"
        assert first.function.name in SCHEMAS and first.function.arguments == ""
        rest = pieces[1:]
        assert len(rest) > 1 and all(p.id is None and p.type is None and p.function.name is None
                                     for p in rest)


def test_tools_with_tool_choice_none_change_nothing(tiny):
    client = tiny.openai()
    kw = {"model": "tiny", "messages": ASK, "temperature": 0.0, "max_tokens": 12,
          "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kw)
    none = client.chat.completions.create(**kw, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


def test_auto_with_a_json_response_format_gives_json_or_calls(tiny):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}},
              "required": ["answer"], "additionalProperties": False}
    kinds = set()
    for seed in range(12):
        with tiny.http() as http:
            r = http.post("/v1/chat/completions", json={
                "messages": ASK, "tools": TOOLS, "temperature": 1.0, "seed": seed,
                "max_tokens": 400, "parallel_tool_calls": False, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        if message.get("tool_calls"):
            kinds.add("calls")
            for c in message["tool_calls"]:
                jsonschema.validate(json.loads(c["function"]["arguments"]),
                                    SCHEMAS[c["function"]["name"]])
        else:
            kinds.add("json")
            jsonschema.validate(json.loads(message["content"]), schema)
    assert kinds == {"calls", "json"}


BAD = [  # (extra body fields, param)
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}]},
     "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": [WEATHER], "guided_regex": "[a-z]+"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "12"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f",
                                                                      "arguments": "{bad"}}]}]},
     "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f",
                                                                      "arguments": "[1]"}}]}]},
     "messages"),
]


@pytest.mark.parametrize("extra, param", BAD, ids=range(len(BAD)))
def test_bad_tools_are_400s_naming_the_field(tiny, extra, param):
    with tiny.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


class Weather(BaseModel):
    city: str = Field(max_length=16)
    unit: str


def _call(city: str, i: int) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{i}", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


@pytest.fixture(scope="module")
def smollm2():
    s = RemoteServer(["--model", "smollm2-135m", "--max-num-seqs", "4",
                      "--max-num-batched-tokens", "128", "--max-model-len", "2048"])
    yield s
    s.stop()


def test_smollm2_required_named_and_round_trip(smollm2):
    client = smollm2.openai()
    try:
        out = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS,
                                             tool_choice="required", temperature=0.0,
                                             max_tokens=120)
        assert out.choices[0].finish_reason == "tool_calls", out.choices[0]
        calls = out.choices[0].message.tool_calls
        (name, args), = _valid(calls)  # one call: the model closes its list after it
        assert args["city"] == "Paris"
        named = client.chat.completions.create(
            model="smollm2-135m", messages=ASK, tools=TOOLS, temperature=0.0, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "local_time"}})
        assert [n for n, _ in _valid(named.choices[0].message.tool_calls)] == ["local_time"]
        # the round trip: the call and its result go back, the model answers in text
        result = '{"temperature": 18, "sky": "sunny"}'
        turn2 = [*ASK, out.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": calls[0].id, "content": result}]
        answer = client.chat.completions.create(model="smollm2-135m", messages=turn2,
                                                tools=TOOLS, temperature=0.0, max_tokens=60)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.choices[0].message.tool_calls is None
        assert answer.choices[0].message.content
        # what the model saw: the tools, its own call and the tool's result
        with smollm2.http() as http:
            seen = http.post("/tokenize", json={"messages": turn2, "tools": TOOLS,
                                                "return_token_strs": True}).json()
        text = "".join(seen["token_strs"])
        assert json.dumps([{"name": name, "arguments": args}]) in text
        assert f"<tool_response>\n{result}\n</tool_response>" in text
        assert '"description": "Get the current weather of a city"' in text
    except BaseException:
        print(smollm2.log()[-20000:])
        raise


def test_smollm2_auto_parses_its_calls(smollm2):
    """A conversation where the model called the tool before: greedy SmolLM2 calls it again,
    and the streamed deltas assemble to the same calls."""
    client = smollm2.openai()
    history = [{"role": "user", "content": "What is the weather in Rome?"}, _call("Rome", 1),
               {"role": "user", "content": "What is the weather in Madrid?"}, _call("Madrid", 2)]
    for city in ("Paris", "Oslo"):
        kw = {"model": "smollm2-135m", "tools": [WEATHER], "temperature": 0.0,
              "max_tokens": 60, "messages": [*history, {
                  "role": "user", "content": f"What is the weather in {city}?"}]}
        whole = client.chat.completions.create(**kw)
        choice = whole.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert _valid(choice.message.tool_calls) == [("get_weather", {"city": city})]
        content, calls, finish = _streamed(client.chat.completions.create(**kw, stream=True))
        assert (content or None, finish) == (choice.message.content, "tool_calls")
        assert calls == [("get_weather", json.dumps({"city": city}))]


def test_smollm2_openai_parse_with_pydantic_tools(smollm2):
    client = smollm2.openai()
    out = client.chat.completions.parse(
        model="smollm2-135m", messages=ASK, temperature=0.0, max_tokens=120,
        tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
        tool_choice="required")
    call = out.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather), call
    assert call.function.parsed_arguments.city == "Paris"
