"""Structured outputs in the engine (llguidance masks applied on the device): every seeded
sampled output of several JSON schemas validates with `jsonschema`; regex, choice and grammar
outputs match; plain requests batched with constrained ones get the tokens they get alone;
bad constraints are ValueErrors naming the field."""

import json
import re

import jsonschema
import pytest

import jvt
from jvt.types import SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 99},
                                      "b": {"enum": ["x", "yy", "zzz"]}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"v": {"type": "number", "minimum": 0,
                                                        "maximum": 1}},
                  "required": ["v"], "additionalProperties": False}},
     "required": ["name", "tags", "inner"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
     "maxItems": 4},
    {"type": "object", "properties": {"opt": {"type": "string", "maxLength": 3},
                                      "n": {"type": ["integer", "null"]}},
     "required": ["n"], "additionalProperties": False},
    {"enum": [1, "two", None, True]},
]
ENGINE = {"max_num_seqs": 8, "max_model_len": 640, "max_num_batched_tokens": 64,
          "token_buckets": (16, 64), "seq_buckets": (1, 8)}


@pytest.fixture(scope="module")
def engine():
    e = jvt.Engine("tiny", **ENGINE)
    yield e
    e.close()


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_sampled_outputs_validate(engine, schema):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=400, json_schema=schema)
              for i in range(10)]
    outs = engine.generate(["Answer in JSON:"] * 10, params, use_tqdm=False)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
    assert len({o.text for o in outs}) > 1  # sampling still varies within the constraint


def test_greedy_json_object_regex_choice_and_grammar(engine):
    params = [SamplingParams(temperature=0.0, max_tokens=400, json_object=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=30, regex=r"[a-c]{3}-[0-9]{2}"),
              SamplingParams(temperature=1.0, seed=4, max_tokens=30,
                             choice=["red", "green", "blue"]),
              SamplingParams(temperature=1.0, seed=5, max_tokens=30,
                             grammar='start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'),
              SamplingParams(temperature=1.0, seed=6, max_tokens=30,
                             grammar='root ::= "up" | "down"')]  # GBNF
    outs = engine.generate(["Q:"] * 5, params, use_tqdm=False)
    assert isinstance(json.loads(outs[0].text), dict)
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", outs[1].text)
    assert outs[2].text in ("red", "green", "blue")
    assert re.fullmatch(r"yes|no|maybe [0-9]", outs[3].text)
    assert outs[4].text in ("up", "down")
    assert all(o.finish_reason == "stop" for o in outs)


def test_streamed_equals_generated(engine):
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=400, json_schema=SCHEMAS[1])
    full = engine.generate(["S:"], params, use_tqdm=False)[0]
    assert "".join(d.text for d in engine.stream("S:", params)) == full.text


def test_plain_requests_in_a_constrained_batch_keep_their_tokens(engine):
    plain = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)]
    prompts = ["free one", "free two"]
    alone = engine.generate(prompts, plain, use_tqdm=False)
    mixed = engine.generate(prompts + ["J:", "K:"], plain + [
        SamplingParams(temperature=1.0, seed=1, max_tokens=400, json_schema=SCHEMAS[0]),
        SamplingParams(temperature=0.0, max_tokens=30, choice=["a", "b"])], use_tqdm=False)
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[2].text), SCHEMAS[0])
    assert mixed[3].text in ("a", "b")


@pytest.mark.parametrize("kwargs, field", [
    ({"json_schema": {"type": "strin"}}, "json_schema"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": 5}, "json_schema"),
    ({"regex": "a+("}, "regex"),
    ({"regex": ""}, "regex"),
    ({"grammar": "start: foo"}, "grammar"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", 3]}, "choice"),
    ({"json_object": "yes"}, "json_object"),
    ({"regex": "a", "choice": ["a"]}, "choice"),
])
def test_bad_constraints_name_the_field(engine, kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        engine.generate(["x"], SamplingParams(**kwargs), use_tqdm=False)
    assert not engine.has_unfinished()
