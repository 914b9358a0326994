"""Tool calling (OpenAI's ``tools``): the tools in the prompt, the grammar of valid calls, and
the parsers that find calls in a model's output.

Formats, chosen per chat template (``parser_for``):
- ``hermes``: one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block per call
  (Qwen 2.5 / 3 and Hermes templates, which render ``tools`` themselves).
- ``hermes_list``: one ``<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`` block
  holding a JSON list of the calls (SmolLM2's documented form), for templates that never read
  ``tools`` (SmolLM2-135M's, the presets' byte template): ``tool_prompt`` shows them the tools in
  the system message and asks for this form, and the conversation's earlier tool calls and tool
  results are written as ``<tool_call>`` and ``<tool_response>`` text in ordinary assistant and
  user turns (as Qwen's template renders them). Measured on SmolLM2-135M, greedy: with one block
  per call the model writes the same call again and again until max_tokens; with the list it
  closes the list and ends its turn.
- ``llama3_json``: the whole output is one JSON object ``{"name": ..., "parameters": {...}}``,
  or several joined by ``;`` (Llama 3.1-3.3 templates, which write ``<|python_tag|>``).

Both hermes forms are parsed alike (a block may hold an object or a list); text outside the
blocks is the message's content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from jvt.structured import JSON_STYLE

HERMES, HERMES_LIST, LLAMA3_JSON = "hermes", "hermes_list", "llama3_json"
PARSERS = (HERMES, HERMES_LIST, LLAMA3_JSON)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str | None = None
    parameters: dict | None = None  # JSON Schema of the arguments; None: no arguments

    def as_template(self) -> dict:
        """The tool as chat templates take it (transformers' convention)."""
        function = {"name": self.name, "parameters": self.parameters or _NO_ARGUMENTS}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """A call found in the output: arguments is JSON text (an object), as OpenAI sends it."""

    name: str
    arguments: str
    id: str

    @staticmethod
    def new(name: str, arguments: dict) -> ToolCall:
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False),
                        f"call_{uuid.uuid4().hex[:24]}")


def takes_tools(template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` it is given."""
    return template is not None and re.search(r"\btools\b", template) is not None


def parser_for(template: str | None) -> str:
    """The output format of a template's tool calls: ``hermes_list`` for templates that take
    no tools (``tool_prompt`` asks for it), ``llama3_json`` for Llama 3 templates (they write
    ``<|python_tag|>`` and no ``<tool_call>``), ``hermes`` otherwise."""
    if not takes_tools(template):
        return HERMES_LIST
    if OPEN not in template and "<|python_tag|>" in template:
        return LLAMA3_JSON
    return HERMES


def tool_prompt(tools: list[Tool]) -> str:
    """The system-prompt text that shows a template-less model its tools (hermes_list)."""
    lines = "\n".join(json.dumps(t.as_template(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou can call functions to help with the user's request. Their "
            f"signatures are inside <tools></tools>:\n<tools>\n{lines}\n</tools>\n\nTo call "
            "functions, answer with a JSON list of calls, each an object of a function's name "
            "and arguments, inside <tool_call></tool_call> tags:\n<tool_call>\n"
            '[{"name": <function name>, "arguments": <JSON object of arguments>}, ...]\n'
            "</tool_call>")


def _calls_text(calls: list[tuple[str, dict]]) -> str:
    """An earlier turn's calls in the hermes_list form."""
    listed = [{"name": name, "arguments": args} for name, args in calls]
    return f"{OPEN}\n{json.dumps(listed, ensure_ascii=False)}\n{CLOSE}"


def inline_tools(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """``messages`` for a template that takes no tools: the tool prompt in the system message,
    assistant tool calls as ``<tool_call>`` text, tool results as a user turn of
    ``<tool_response>`` blocks (consecutive results in one turn).

    messages: dicts of role, content and, for assistants, ``tool_calls`` [(name, arguments)].
    """
    out: list[dict] = []
    after_result = False  # the last message written is a turn of tool results
    if tools:
        prompt = tool_prompt(tools)
        if messages and messages[0]["role"] == "system":
            first, *messages = messages
            prompt = f"{first['content']}\n\n{prompt}" if first["content"] else prompt
        out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if after_result:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m.get("tool_calls"):
            calls = _calls_text(m["tool_calls"])
            out.append({"role": "assistant",
                        "content": f"{m['content']}\n{calls}" if m["content"] else calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
        after_result = m["role"] == "tool"
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """``messages`` for a template that takes tools: assistant tool calls in transformers'
    convention ({"type": "function", "function": {"name", "arguments": dict}})."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}}
                               for n, a in m["tool_calls"]]
        out.append(m)
    return out


def _call_schema(tools: list[Tool], parser: str) -> dict:
    key = "parameters" if parser == LLAMA3_JSON else "arguments"
    options = [{"type": "object", "properties": {"name": {"const": t.name},
                                                 key: t.parameters or _NO_ARGUMENTS},
                "required": ["name", key], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_STYLE}


def call_grammar(tools: list[Tool], parallel: bool, parser: str,
                 content_schema: dict | None = None) -> str:
    """A Lark grammar (llguidance's, with ``%json``) of one call, or one or more when
    ``parallel``, of ``tools`` in ``parser``'s format. ``content_schema``: the output may
    instead be JSON following it (tool_choice "auto" with a JSON response_format)."""
    call = "%json" + json.dumps(_call_schema(tools, parser), ensure_ascii=False)
    if parser == HERMES:
        # One or two newlines between calls and after the last (before the end of the turn).
        more = " (GAP call)*" if parallel else ""
        rules = (f'calls: call{more} GAP?\nGAP: /\\n\\n?/\n'
                 f'call: "{OPEN}\\n" {call} "\\n{CLOSE}"\n')
    elif parser == HERMES_LIST:
        more = ' (", " call)*' if parallel else ""
        rules = f'calls: "{OPEN}\\n[" call{more} "]\\n{CLOSE}"\ncall: {call}\n'
    else:
        more = ' ("; " call)*' if parallel else ""
        rules = f"calls: call{more}\ncall: {call}\n"
    if content_schema is None:
        return "start: calls\n" + rules
    content = "%json" + json.dumps({**content_schema, "x-guidance": JSON_STYLE},
                                   ensure_ascii=False)
    return f"start: calls | content\ncontent: {content}\n" + rules


def _calls(body: str, names: set[str], parser: str) -> list[ToolCall] | None:
    """The calls written in ``body`` (a hermes block, or a llama3_json output; an empty list,
    SmolLM2's "no call", is none); None when it is not JSON of known functions (then it stays
    content)."""
    try:
        value = json.loads(body)
    except ValueError:
        if parser != LLAMA3_JSON:
            return None
        try:
            value = [json.loads(part) for part in body.split(";")]
        except ValueError:
            return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall.new(item["name"], args))
    return calls


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may begin ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    """Splits a streamed output into content and tool calls, delta by delta (``feed``) and at
    the end (``finish``). Joining every content piece gives the non-streamed content: the text
    outside the calls, whitespace next to a call dropped.

    names: the functions that may be called (a call of any other stays content).
    """

    def __init__(self, names: set[str], parser: str):
        self.names = names
        self.parser = parser
        self.buf = ""  # text not yet given out
        self.inside = False  # in a hermes block (or a llama3_json output)
        self.started = False  # some non-whitespace output has been seen
        self.called = False  # a call has been given out
        self.after_call = False  # no content since the last call (its whitespace is dropped)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content to send now and calls completed by ``text``."""
        self.buf += text
        if self.parser == LLAMA3_JSON:
            return self._feed_json()
        content, calls = "", []
        while True:
            if self.inside:
                end = self.buf.find(CLOSE)
                if end < 0:
                    return content, calls
                body, self.buf = self.buf[:end], self.buf[end + len(CLOSE):]
                self.inside = False
                found = _calls(body, self.names, self.parser)
                if found is None:
                    content += f"{OPEN}{body}{CLOSE}"
                else:
                    calls += found
                    self.called = self.called or bool(found)
                    self.after_call = True
                continue
            if self.after_call:
                self.buf = self.buf.lstrip()
                self.after_call = not self.buf
            start = self.buf.find(OPEN)
            if start >= 0:
                content += self.buf[:start].rstrip()
                self.buf, self.inside = self.buf[start + len(OPEN):], True
                continue
            keep = _held(self.buf, OPEN)
            head, tail = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            stripped = head.rstrip()  # whitespace before a call is dropped: hold it
            content += stripped
            self.buf = head[len(stripped):] + tail
            return content, calls

    def _feed_json(self) -> tuple[str, list[ToolCall]]:
        if not self.started:
            lead = self.buf.lstrip()
            if not lead:
                return "", []
            self.started, self.inside = True, lead.startswith("{")
            if self.inside:
                self.buf = lead
        if self.inside:
            return "", []  # the call is parsed when the output ends
        text, self.buf = self.buf, ""
        return text, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left when the output ends: an unclosed block that parses is a call, else
        the text is content (nothing is lost)."""
        text, self.buf = self.buf, ""
        if not self.inside:
            return (text.strip() if self.called else text), []
        self.inside = False
        found = _calls(text.strip(), self.names, self.parser)
        if found is not None:
            self.called = self.called or bool(found)
            return "", found
        return (text if self.parser == LLAMA3_JSON else f"{OPEN}{text}"), []


def parse(text: str, names: set[str], parser: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output's content (None when only calls were written) and calls."""
    p = ToolParser(names, parser)
    content, calls = p.feed(text)
    rest, more = p.finish()
    content += rest
    calls += more
    return (content or None) if calls else content, calls
