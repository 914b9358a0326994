"""Structured outputs through `jvt serve`: OpenAI's response_format (json_object, json_schema)
and vLLM's structured_outputs / guided_* fields on both endpoints (tiny preset), the real
openai client's `parse` with Pydantic models on SmolLM2, and the 400s for bad constraints."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server_utils import RemoteServer

SERVER_ARGS = ["--model", "tiny", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
               "--token-buckets", "16,64", "--seq-buckets", "4,8", "--max-model-len", "1024"]
MESSAGES = [{"role": "user", "content": "Reply in JSON"}]
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 1,
                                                         "maximum": 9},
    "ok": {"type": "boolean"}}, "required": ["city", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(SERVER_ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def chat(http, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 400,
                                               "temperature": 1.0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_response_format_json_schema(http):
    for seed in range(6):
        out = chat(http, seed=seed, response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": SCHEMA, "strict": True}})
        jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMA)
        assert out["choices"][0]["finish_reason"] == "stop"
    r = http.post("/v1/completions", json={"prompt": "JSON:", "max_tokens": 400, "seed": 2,
                                           "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "a",
                                                                               "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)


def test_vllm_fields(http):
    out = chat(http, seed=3, structured_outputs={"regex": r"[a-c]{2}-[0-9]{3}"})
    assert re.fullmatch(r"[a-c]{2}-[0-9]{3}", out["choices"][0]["message"]["content"])
    out = chat(http, seed=4, structured_outputs={"choice": ["left", "right"]})
    assert out["choices"][0]["message"]["content"] in ("left", "right")
    out = chat(http, seed=5, guided_choice=["yes", "no"])
    assert out["choices"][0]["message"]["content"] in ("yes", "no")
    out = chat(http, seed=6, guided_json=SCHEMA)
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMA)
    out = chat(http, seed=7, guided_regex="(ab)+c")
    assert re.fullmatch("(ab)+c", out["choices"][0]["message"]["content"])
    out = chat(http, seed=8, structured_outputs={"grammar": 'root ::= "on" | "off"'})
    assert out["choices"][0]["message"]["content"] in ("on", "off")
    out = chat(http, seed=9, structured_outputs={"json": SCHEMA})
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMA)


def test_streamed_equals_non_streamed(http):
    body = {"messages": MESSAGES, "max_tokens": 400, "temperature": 1.0, "seed": 11,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a",
                                                                       "schema": SCHEMA}}}
    full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    r = http.post("/v1/chat/completions", json={**body, "stream": True})
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or "" \
                if json.loads(line[6:])["choices"] else ""
    assert text == full["content"]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a",
                                                                 "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a+("}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{oops"}, "guided_json"),
    ({"guided_regex": 5}, "guided_regex"),
])
def test_bad_constraints_are_400s_naming_the_field(http, body, param):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


class Colour(BaseModel):
    name: Literal["red", "green", "blue"]
    brightness: int = Field(ge=0, le=10)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(pattern=r"^[A-Z][a-z]{1,8}$")
    age: int = Field(ge=0, le=30)
    weight_kg: float = Field(ge=0, le=100)
    nickname: str | None
    colours: list[Colour] = Field(max_length=3)


@pytest.fixture(scope="module")
def smollm2():
    s = RemoteServer(["--model", "smollm2-135m", "--max-num-seqs", "8",
                      "--max-num-batched-tokens", "128", "--max-model-len", "1024"])
    yield s
    s.stop()


SMOLLM2_SCHEMAS = [  # strings and numbers bounded: 160 tokens hold any output
    {"$defs": {"Colour": {**Colour.model_json_schema(), "additionalProperties": False}},
     "type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]},
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
        "colours": {"type": "array", "items": {"$ref": "#/$defs/Colour"}, "maxItems": 3}},
     "required": ["kind", "name", "age", "colours"], "additionalProperties": False},
    {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 99_999_999}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number", "minimum": -10, "maximum": 10},
     "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "first": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
            "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 120}},
            "required": ["first", "age"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
     "required": ["person", "tags"], "additionalProperties": False},
    {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["unknown", "maybe"]},
               {"type": "object", "properties": {"v": {"type": "integer", "minimum": 1,
                                                       "maximum": 9}},
                "required": ["v"], "additionalProperties": False}]},
]


@pytest.mark.parametrize("schema", SMOLLM2_SCHEMAS, ids=range(len(SMOLLM2_SCHEMAS)))
def test_50_sampled_smollm2_outputs_validate(smollm2, schema):
    """One request, n=50 seeded choices at temperature 1: every one follows the schema."""
    with smollm2.http() as http:
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Reply with JSON."}], "n": 50, "seed": 1,
            "temperature": 1.0, "max_tokens": 160, "response_format": {
                "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}},
            timeout=300)  # 50 outputs of a 2-core CPU
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 50
    for c in choices:
        assert c["finish_reason"] == "stop", c
        jsonschema.validate(json.loads(c["message"]["content"]), schema)
    assert len({c["message"]["content"] for c in choices}) > 5  # sampling still varies


def test_openai_parse_with_pydantic_models_on_smollm2(smollm2):
    server = smollm2
    try:
        client = server.openai()
        for seed in range(3):
            out = client.chat.completions.parse(
                model="smollm2-135m", seed=seed, temperature=1.0, max_tokens=200,
                messages=[{"role": "system", "content": "You describe pets as JSON."},
                          {"role": "user", "content": "Describe a pet."}],
                response_format=Pet)
            pet = out.choices[0].message.parsed
            assert isinstance(pet, Pet), out.choices[0].message.content
            assert all(isinstance(c, Colour) for c in pet.colours)
        colour = client.chat.completions.parse(
            model="smollm2-135m", temperature=0.0, max_tokens=60, response_format=Colour,
            messages=[{"role": "user", "content": "Name a colour and its brightness."}])
        assert isinstance(colour.choices[0].message.parsed, Colour)
        obj = client.chat.completions.create(
            model="smollm2-135m", temperature=0.0, max_tokens=100,
            response_format={"type": "json_object"},
            messages=[{"role": "user", "content": 'Reply with {"capital": "Paris"}'}])
        assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    except BaseException:
        print(server.log()[-20000:])
        raise
