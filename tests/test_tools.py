"""Tool calling without a server (jvt.tools): the grammar of valid calls drives the tiny engine
to calls whose arguments validate against their schemas in every format; the parsers split
outputs into content and calls the same way whole and streamed in arbitrary pieces; the tools
reach chat templates that take them, and are written into the messages of those that do not."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

import jvt
from jvt import tools
from jvt.models.tokenizer import ByteTokenizer, HFTokenizer
from jvt.types import SamplingParams

WEATHER = tools.Tool("get_weather", "Weather of a city", {
    "type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False})
CLOCK = tools.Tool("now", None, None)  # no arguments
MOVE = tools.Tool("move-to", "Go somewhere", {
    "type": "object", "properties": {"xy": {"type": "array", "items": {"type": "number"},
                                            "minItems": 2, "maxItems": 2}},
    "required": ["xy"], "additionalProperties": False})
TOOLS = [WEATHER, CLOCK, MOVE]
NAMES = {t.name for t in TOOLS}
SCHEMAS = {t.name: t.as_template()["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def engine():
    e = jvt.Engine("tiny", max_num_seqs=8, max_model_len=768, max_num_batched_tokens=64,
                   token_buckets=(16, 64), seq_buckets=(1, 8))
    yield e
    e.close()


def _check_calls(calls: list[tools.ToolCall], names: set[str]) -> None:
    for c in calls:
        assert c.name in names and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


@pytest.mark.parametrize("parser", tools.PARSERS)
@pytest.mark.parametrize("parallel", [False, True])
def test_constrained_calls_are_valid_in_every_format(engine, parser, parallel):
    grammar = tools.call_grammar(TOOLS, parallel, parser)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=600, grammar=grammar)
              for i in range(12)]
    outs = engine.generate(["Call a tool:"] * len(params), params, use_tqdm=False)
    counts = []  # calls per finished output (random weights may run to max_tokens in a list)
    for o in outs:
        assert o.finish_reason == "stop" or parallel, o.text
        if o.finish_reason == "stop":
            content, calls = tools.parse(o.text, NAMES, parser)
            assert content is None and calls, o.text
            _check_calls(calls, NAMES)
            counts.append(len(calls))
    assert len(counts) >= len(outs) // 2
    assert len({c.name for o in outs for c in tools.parse(o.text, NAMES, parser)[1]}) > 1
    if not parallel:
        assert set(counts) == {1}
    elif parser != tools.HERMES:  # (one block per call: these weights end after the first)
        assert max(counts) > 1


def test_a_named_function_only(engine):
    grammar = tools.call_grammar([MOVE], False, tools.HERMES_LIST)
    outs = engine.generate(["Go:"] * 6, [SamplingParams(temperature=1.0, seed=i, max_tokens=300,
                                                        grammar=grammar) for i in range(6)],
                           use_tqdm=False)
    for o in outs:
        _, calls = tools.parse(o.text, NAMES, tools.HERMES_LIST)
        assert [c.name for c in calls] == ["move-to"], o.text
        _check_calls(calls, {"move-to"})


def test_content_or_calls_with_a_json_response_format(engine):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}},
              "required": ["answer"], "additionalProperties": False}
    grammar = tools.call_grammar(TOOLS, True, tools.HERMES, schema)
    outs = engine.generate(["Answer:"] * 16, [SamplingParams(temperature=1.0, seed=i,
                                                             max_tokens=600, grammar=grammar)
                                              for i in range(16)], use_tqdm=False)
    kinds = set()
    for o in outs:
        content, calls = tools.parse(o.text, NAMES, tools.HERMES)
        if calls:
            _check_calls(calls, NAMES)
            kinds.add("calls")
        else:
            jsonschema.validate(json.loads(content), schema)
            kinds.add("content")
    assert kinds == {"calls", "content"}


ARGS = '{"city": "Oslo", "unit": "celsius"}'
CALL = f'{{"name": "get_weather", "arguments": {ARGS}}}'
OUTPUTS = [  # (parser, text, content, [(name, arguments text)])
    (tools.HERMES, (f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n"
                   '{"name": "now", "arguments": {}}\n</tool_call>\n'),
     "Let me look.", [("get_weather", ARGS), ("now", "{}")]),
    (tools.HERMES_LIST, (f'<tool_call>\n[{CALL}, {{"name": "now", "arguments": "{{}}"}}]\n'
                        "</tool_call>"),
     None, [("get_weather", ARGS), ("now", "{}")]),  # arguments as a JSON string: decoded
    (tools.HERMES, "no calls here, only a <tool mention and < signs\n\n",
     "no calls here, only a <tool mention and < signs\n\n", []),
    (tools.HERMES, '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
    (tools.HERMES, "<tool_call>{not json}</tool_call> after", "<tool_call>{not json}</tool_call> after",
     []),
    (tools.HERMES, f"<tool_call>\n{CALL}", None,  # unclosed at the end of the output
     [("get_weather", ARGS)]),
    (tools.HERMES, '<tool_call>\n{"name": "now", "argu', None,  # cut off: what was written
     [("now", "")]),
    (tools.HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": "Os', None,
     [("get_weather", '{"city": "Os')]),
    (tools.HERMES, '<tool_call>\n<b>not a call</b>', '<tool_call>\n<b>not a call</b>', []),
    (tools.HERMES, '<tool_call>{"na\\q": 1, "name": "no\\w"}</tool_call>',  # bad escapes
     '<tool_call>{"na\\q": 1, "name": "no\\w"}</tool_call>', []),
    (tools.HERMES, f"<tool_call>{CALL}</tool_call>\n\nThat was it.", "That was it.",
     [("get_weather", ARGS)]),
    (tools.HERMES, f'<tool_call>{{"arguments": {ARGS}, "name": "get_weather"}}</tool_call>',
     None, [("get_weather", ARGS)]),  # the name after the arguments
    (tools.HERMES_LIST, ('<tool_call>[{"name": "bad", "arguments": {}}, '
                         '{"name": "now", "arguments": {"x": "}]\\"{"}}]</tool_call>'),
     '{"name": "bad", "arguments": {}}', [("now", '{"x": "}]\\"{"}')]),
    (tools.LLAMA3_JSON, (' {"name": "move-to", "parameters": {"xy": [1, 2]}}; '
                        '{"name": "now", "parameters": {}}'),
     None, [("move-to", '{"xy": [1, 2]}'), ("now", "{}")]),
    (tools.LLAMA3_JSON, '{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}',
     []),
    (tools.LLAMA3_JSON, "  Plain answer {with braces}", "  Plain answer {with braces}", []),
    (tools.HERMES_LIST, "None of them fits.\n<tool_call>\n[]\n</tool_call>", "None of them fits.",
     []),  # SmolLM2's "no call"
]


@pytest.mark.parametrize("parser, text, content, calls", OUTPUTS, ids=range(len(OUTPUTS)))
def test_parse_whole_and_streamed(parser, text, content, calls):
    """Whole, and fed in random pieces: the same content, and call pieces (first the id and
    name, then the arguments text as it is written) that add up to the same calls."""
    got_content, got_calls = tools.parse(text, NAMES, parser)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)
    rng = random.Random(0)
    for _ in range(50):
        p, streamed, pieces, i = tools.ToolParser(NAMES, parser), "", [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            piece, found = p.feed(text[i:j])
            streamed, pieces, i = streamed + piece, pieces + found, j
        piece, found = p.finish()
        streamed, pieces = streamed + piece, pieces + found
        assert (streamed or None if pieces else streamed) == content
        assert [(c.name, c.arguments) for c in tools.assemble(pieces)] == calls
        for c in range(len(calls)):  # each call starts with its id and name, then arguments
            mine = [x for x in pieces if x.index == c]
            assert mine[0].id and mine[0].name and mine[0].arguments == ""
            assert all(x.id is None and x.name is None for x in mine[1:])


def test_arguments_stream_as_they_are_written():
    p = tools.ToolParser(NAMES, tools.HERMES)
    text = f"<tool_call>\n{CALL}\n</tool_call>"
    seen = []
    for ch in text:
        _, pieces = p.feed(ch)
        seen += [(x.id is not None, x.arguments) for x in pieces]
    assert seen[0][0] and len(seen) > 10  # the start, then many small argument pieces
    assert "".join(a for _, a in seen) == ARGS
    assert p.finish() == ("", [])


def test_parser_per_template(smollm2_template):
    assert tools.parser_for(smollm2_template) == tools.HERMES_LIST
    assert tools.parser_for(ByteTokenizer().chat_template) == tools.HERMES_LIST
    assert tools.parser_for(QWEN_LIKE) == tools.HERMES
    assert tools.parser_for("{% if tools %}<|python_tag|>{{ tools | tojson }}{% endif %}") == \
        tools.LLAMA3_JSON


@pytest.fixture(scope="module")
def smollm2_template():
    from jvt.models import load_tokenizer

    return load_tokenizer("smollm2-135m").chat_template


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and the time?"},
    {"role": "assistant", "content": "",
     "tool_calls": [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("now", {})]},
    {"role": "tool", "content": '{"c": 3}', "tool_call_id": "call_1"},
    {"role": "tool", "content": "12:00", "tool_call_id": "call_2"},
]


def test_inline_tools_for_a_template_without_them():
    msgs = tools.inline_tools(CONVERSATION, TOOLS)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    for t in TOOLS:
        assert json.dumps(t.as_template()) in msgs[0]["content"]
    listed = json.loads(msgs[2]["content"].removeprefix("<tool_call>\n").removesuffix(
        "\n</tool_call>"))
    assert listed == [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}},
                      {"name": "now", "arguments": {}}]
    assert msgs[3]["content"] == ('<tool_response>\n{"c": 3}\n</tool_response>\n'
                                  "<tool_response>\n12:00\n</tool_response>")
    plain = [{"role": "user", "content": "hi"}]
    assert tools.inline_tools(plain, []) == plain  # no tools: the messages as they were
    ids = ByteTokenizer().apply_chat_template(msgs)  # only the roles the byte template knows
    assert ByteTokenizer().decode(ids).count("<tool_response>") == 2


# A Qwen 2.5-like template: tools in the system turn, calls and results as it renders them.
QWEN_LIKE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|end|>{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|user|><tool_response>"
    "{{ m.content }}</tool_response><|end|>{% elif m.tool_calls %}<|assistant|>"
    "{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|end|>{% else %}"
    "<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tools_reach_a_template_that_takes_them(tmp_path):
    fast = ByteTokenizer().hf_fast()
    fast.chat_template = QWEN_LIKE
    fast.save_pretrained(tmp_path)
    tok = HFTokenizer(tmp_path)
    assert tools.takes_tools(tok.chat_template)
    ids = tok.apply_chat_template(tools.template_messages(CONVERSATION),
                                  tools=[t.as_template() for t in TOOLS])
    text = tok.decode(ids)
    assert json.dumps(WEATHER.as_template(), ensure_ascii=False) in text
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": '
            '"celsius"}}</tool_call><tool_call>{"name": "now", "arguments": {}}</tool_call>'
            in text)
    assert "<tool_response>12:00</tool_response>" in text
