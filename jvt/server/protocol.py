"""The OpenAI wire format: pydantic request and response models (vLLM's ``protocol.py``).

This module is the only place where field names, defaults and ranges live (the published
OpenAPI schema shows them). Requests are validated strictly (no string-to-number coercion):
integers within what the step's int32 arrays hold, floats finite, strings valid Unicode (no
lone surrogates). Nothing is silently ignored: an unknown field is a 400 naming it, and a
field of OpenAI's or vLLM's API that this server does not implement is accepted only with its
no-effect value (``suffix: ""``, ...; see ``_inert``), a 400 naming it
otherwise. Fields that change nothing about the output
(``user``, ``metadata``, ``store``, ``service_tier``) are accepted. ``jvt.SamplingParams``
checks the sampling ranges once more (and the relations between fields: min_tokens <=
max_tokens).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jvt import tools as tool_calls
from jvt.types import CONSTRAINTS, INT32_MAX, MAX_LOGPROBS, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default for both endpoints
MAX_N = 128  # most choices of one request (OpenAI's bound); the server may allow fewer
SEED_MAX = 2**32 - 1


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text: a lone surrogate "
                         f"(U+{ord(text[e.start]):04X}) at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # every string of a request


def _inert(*allowed):
    """A field this server does not implement: None or one of the ``allowed`` values (those
    that change nothing) is accepted, anything else is a 400 naming the field."""
    shown = " or ".join(repr(a) for a in allowed)

    def check(value):
        if value is not None and value not in allowed:
            raise ValueError(f"not implemented by this server: only {shown} (no effect) is "
                             f"accepted, got {value!r}")
        return value
    return AfterValidator(check)


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]  # max_tokens and its aliases


def _token_key(value):
    """A logit_bias key: JSON object keys are strings, so "65" stands for token id 65."""
    if isinstance(value, str):
        if not value.isdecimal():
            raise ValueError(f"keys must be token ids written as decimal strings, got {value!r}")
        return int(value)
    return value


TokenKey = Annotated[TokenId, BeforeValidator(_token_key)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with "choices": [] and the request's usage


class JsonSchemaFormat(_Request):
    """response_format.json_schema (OpenAI's structured outputs)."""

    name: Text = Field(min_length=1, max_length=64)
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    description: Text | None = None
    strict: bool | None = None  # the output always follows the schema here


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with "type": "json_schema" and allowed '
                             "only with it")
        return self


class StructuredOutputs(_Request):
    """vLLM's structured_outputs: exactly one constraint."""

    json_: dict | Text | None = Field(None, alias="json")  # a JSON Schema
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None  # Lark, or GBNF with "::=" rules
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [n for n in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(self, n) not in (None, False)]
        if len(given) != 1:
            names = [n.rstrip("_") for n in given]
            raise ValueError("exactly one of json, regex, choice, grammar, json_object must be "
                             f"given, got {names or 'none'}")
        return self


CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")


class _SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Text | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0.0, allow_inf_nan=False)  # 0: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # vLLM's extension; -1, 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)  # independent choices of one prompt (seed + i if seeded)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted, changing nothing about the output.
    user: Text | None = None
    metadata: dict[Text, Text] | None = None
    store: bool | None = None
    service_tier: Text | None = None
    # Penalties and biases (jvt.SamplingParams says how they act); the last three are vLLM's.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[TokenKey, Bias] | None = None  # token id -> added to its logit
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # 1: off
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)  # no EOS / stop before this many tokens
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top-k per prompt token
    # Structured outputs (at most one of these; jvt.SamplingParams' constraints)
    response_format: ResponseFormat | None = None  # OpenAI's
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    guided_json: dict | Text | None = None  # vLLM's older fields
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    def constraint_fields(self) -> list[str]:
        """The request fields that constrain the output (response_format "text" does not)."""
        given = [n for n in CONSTRAINT_FIELDS if getattr(self, n) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        return given

    def renames(self) -> dict[str, str]:
        """SamplingParams field -> the request field that set it, where they differ (for the
        param of a 400)."""
        given = self.constraint_fields()
        return dict.fromkeys(CONSTRAINTS, given[0]) if given else {}

    def constraint(self) -> dict:
        """The jvt.SamplingParams constraint fields of this request."""
        rf, so = self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_object":
            return {"json_object": True}
        if rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.schema_
            return {"json_object": True} if schema is None else {"json_schema": schema}
        if so is not None:
            if so.json_ is not None:
                return {"json_schema": so.json_}
            return {n: getattr(so, n) for n in ("regex", "choice", "grammar", "json_object")
                    if getattr(so, n) not in (None, False)}
        for field, name in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                            ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, field) is not None:
                return {name: getattr(self, field)}
        return {}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None, constraint: dict) -> list[SamplingParams]:
        """One SamplingParams per choice (ValueError from SamplingParams for bad ranges);
        ``constraint``: its constraint fields."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        base = {
            "temperature": DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            "top_k": 0 if self.top_k in (None, -1) else self.top_k,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "max_tokens": max_tokens, "stop": stop,
            "stop_token_ids": tuple(self.stop_token_ids or ()), "ignore_eos": self.ignore_eos,
            "logprobs": logprobs, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias or {}, "min_tokens": self.min_tokens,
            "prompt_logprobs": prompt_logprobs, **constraint}
        if self.seed is None:
            return [SamplingParams(**base)] * self.n
        return [SamplingParams(**base, seed=(self.seed + i) % 2**32) for i in range(self.n)]


PromptIds = list[TokenId]


def _prompt_form(value) -> str | None:
    """Which form a prompt takes, from its first item, so that only that form is validated
    (trying every form of the union took 5x as long for a long list of token ids)."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0
    return "texts" if isinstance(first, str) else "id_lists" if isinstance(first, list) else "ids"


Prompt = Annotated[
    Annotated[Text, Tag("text")] | Annotated[list[Text], Tag("texts")]
    | Annotated[PromptIds, Tag("ids")] | Annotated[list[PromptIds], Tag("id_lists")],
    Discriminator(_prompt_form, custom_error_type="prompt_form",
                  custom_error_message="prompt must be a string, a list of strings, a list of "
                                       "token ids or a list of lists of token ids")]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    # null: up to max_model_len; 0: the prompt only (its logprobs with echo)
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token
    echo: bool = False  # prepend the prompt to the text (with logprobs: the prompt's too)
    suffix: Annotated[Text | None, _inert("")] = None
    best_of: int | None = None  # only best_of == n (no effect)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo):
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"not implemented by this server: only best_of == n ({n}, no "
                             f"effect) is accepted, got {value}")
        return value

    def count(self) -> int:
        """Engine requests this asks for (prompts x n), without building anything."""
        p = self.prompt
        single = isinstance(p, str) or (p and isinstance(p[0], int))
        return (1 if single else len(p)) * self.n

    def prompts(self) -> list[str | PromptIds]:
        """The prompts as a list (each a string or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def sampling_params(self, max_model_len: int) -> list[SamplingParams]:
        max_tokens = max_model_len if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, self.scored_prompt,
                                     self.constraint())

    @property
    def scored_prompt(self) -> int | None:
        """The top-k of the prompt logprobs to compute: prompt_logprobs, else with echo the
        logprobs' (OpenAI's legacy echo + logprobs), else None."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class CalledFunction(_Request):
    name: Text
    arguments: Text  # a JSON object as text, as the API returned it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError(f"must be a JSON object as text, got {value[:80]!r}")
        return value


class MessageToolCall(_Request):
    """A tool call of an earlier assistant turn."""

    id: Text
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: system
    content: Text | list[TextPart] | None = None  # parts are joined with newlines (vLLM)
    tool_calls: list[MessageToolCall] | None = None  # assistant turns only
    tool_call_id: Text | None = None  # tool turns only: the call this result answers

    @model_validator(mode="after")
    def _tool_fields_by_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is allowed only in assistant messages, not in "
                             f"{self.role!r} ones")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id is required in tool messages and allowed only there")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""

    def as_template(self) -> dict:
        """The message as the chat template takes it (tool_calls: [(name, arguments)],
        jvt.tools' form; jvt.tools.template_messages writes transformers' form)."""
        m = {"role": "system" if self.role == "developer" else self.role,
             "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [(c.function.name, json.loads(c.function.arguments))
                               for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class FunctionDef(_Request):
    name: Text = Field(pattern=tool_calls.NAME_PATTERN)
    description: Text | None = None
    parameters: dict | None = None  # JSON Schema of the arguments; None: no arguments
    strict: bool | None = None  # constrained calls always follow the schema


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef

    def as_tool(self) -> tool_calls.Tool:
        f = self.function
        return tool_calls.Tool(f.name, f.description, f.parameters)


class FunctionName(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None  # preferred over the deprecated max_tokens
    max_tokens: Count | None = None  # neither: what is left of max_model_len
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True  # more than one call in a turn

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[ToolDef] | None):
        names = [t.function.name for t in value or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"function names must be unique, {twice} appear more than once")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_tools(cls, value: ToolChoice | None, info: ValidationInfo):
        names = [t.function.name for t in info.data.get("tools") or ()]
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names function {value.function.name!r}, which is not in tools "
                             f"({names or 'none given'})")
        if value == "required" and not names:
            raise ValueError('"required" needs at least one tool in tools')
        return value

    @property
    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named" (the output is one call of that function)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice == "required":
            return "required"
        return "auto" if self.tools and self.tool_choice != "none" else "none"

    def tool_list(self) -> list[tool_calls.Tool]:
        """The tools shown to the model (none with tool_choice "none")."""
        if self.tool_mode == "none":
            return []
        return [t.as_tool() for t in self.tools or ()]

    def constraint_fields(self) -> list[str]:
        """tool_choice constrains the output when "required" or named."""
        given = super().constraint_fields()
        return given + ["tool_choice"] if self.tool_mode in ("required", "named") else given

    def chat_constraint(self, parser: str) -> dict:
        """The SamplingParams constraint fields: tool calls in ``parser``'s format for
        "required" and named; for "auto" with a JSON response_format, that JSON or calls;
        else the structured-output fields'."""
        base, mode = self.constraint(), self.tool_mode
        tools = self.tool_list()
        if mode == "named":
            tools = [t for t in tools if t.name == self.tool_choice.function.name]
        if mode in ("required", "named"):
            return {"grammar": tool_calls.call_grammar(tools, self.parallel_tool_calls and
                                                       mode == "required", parser)}
        if mode == "auto" and base.keys() & {"json_schema", "json_object"}:
            schema = base.get("json_schema", {"type": "object"})
            schema = json.loads(schema) if isinstance(schema, str) else schema
            return {"grammar": tool_calls.call_grammar(tools, self.parallel_tool_calls, parser,
                                                       schema)}
        return base

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def sampling_params(self, max_model_len: int, tool_parser: str) -> list[SamplingParams]:
        max_tokens = next((m for m in (self.max_completion_tokens, self.max_tokens)
                           if m is not None), max_model_len)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs,
                                     self.chat_constraint(tool_parser))


def _tokenize_form(value) -> str:
    return "chat" if isinstance(value, dict) and "messages" in value else "prompt"


class TokenizeCompletionRequest(_Request):
    """POST /tokenize with a prompt (vLLM's shape)."""

    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True  # the tokenizer's BOS rule, as for /v1/completions
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    """POST /tokenize with chat messages: the ids /v1/chat/completions would run."""

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None  # shown to the model as chat completions would
    add_generation_prompt: Annotated[bool, _inert(True)] = True
    continue_final_message: Annotated[bool, _inert(False)] = False
    add_special_tokens: Annotated[bool, _inert(False)] = False  # the template writes its own
    return_token_strs: bool = False


class TokenizeRequest(RootModel):
    root: Annotated[Annotated[TokenizeCompletionRequest, Tag("prompt")]
                    | Annotated[TokenizeChatRequest, Tag("chat")], Discriminator(_tokenize_form)]


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's shape)."""

    model: Text | None = None
    tokens: list[TokenId]


# -- responses ---------------------------------------------------------------------------

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _now() -> int:
    return int(time.time())


def _omitted_if_none(default=None):
    """A field left out of the JSON when None (stream deltas, usage of streamed chunks)."""
    return Field(default, exclude_if=lambda v: v is None)


class PromptTokensDetails(_Response):
    cached_tokens: int  # prompt tokens whose KV was reused (prefix sharing, a kept turn)


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogProbs(_Response):
    """The legacy completions logprobs: parallel lists, one entry per token (with echo the
    prompt's tokens first, the very first one's logprob and top_logprobs null)."""

    text_offset: list[int]  # where each token's text starts in the choice's text
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]  # the token itself and the top alternatives


class PromptLogprob(_Response):
    """vLLM's prompt_logprobs entry of one token."""

    logprob: float
    rank: int  # 1: the most likely token at that position
    decoded_token: str


PromptLogprobs = list[dict[int, PromptLogprob] | None]  # per prompt token (the first: null)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None  # "stop", "length", or "abort" (server shutdown)
    prompt_logprobs: PromptLogprobs | None = _omitted_if_none()  # when the request asked


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = _omitted_if_none()  # chunks: only the include_usage one has it


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]  # UTF-8 bytes of token


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob]


class FunctionCall(_Response):
    name: str
    arguments: str  # a JSON object as text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: the turn is only tool calls
    tool_calls: list[ToolCallOut] | None = _omitted_if_none()


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = _omitted_if_none()  # when the request asked


class FunctionCallDelta(_Response):
    name: str | None = _omitted_if_none()  # in a call's first delta only
    arguments: str  # the next part of the arguments text ("" in the first delta)


class ToolCallDelta(_Response):
    """A piece of a call, as OpenAI streams them: the first delta of a call carries its id,
    type and name with arguments "", the later ones (index only) the next part of its
    arguments text."""

    index: int
    id: str | None = _omitted_if_none()
    type: Literal["function"] | None = _omitted_if_none()
    function: FunctionCallDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = _omitted_if_none()
    content: str | None = _omitted_if_none()
    tool_calls: list[ToolCallDelta] | None = _omitted_if_none()


class ChatStreamChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = _omitted_if_none()
    prompt_logprobs: PromptLogprobs | None = _omitted_if_none()  # on the first chunk, if asked


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "jvt"
    root: str  # what --model named: a preset, a checkpoint path
    parent: str | None = None
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str  # "invalid_request_error", "authentication_error", "server_error"
    param: str | None = None  # the request field at fault, when known
    code: int  # the HTTP status


class ErrorResponse(_Response):
    error: ErrorInfo


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = _omitted_if_none()  # each token decoded on its own


class DetokenizeResponse(_Response):
    prompt: str
