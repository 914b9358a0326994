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
blocks is the message's content. Calls stream as they are written (``ToolParser``: a call's
id and name once its name is complete, then its arguments text piece by piece).
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
    """A call found in the output: arguments is the model's text of them (a JSON object when
    the output was well formed; what was written, when it broke off or was cut short)."""

    name: str
    arguments: str
    id: str


@dataclass(frozen=True)
class CallDelta:
    """A piece of a call as it streams: the first carries its id and name (arguments ""),
    the later ones the next part of its arguments text. index: the call's number in the
    output (0, 1, ...)."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


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


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may begin ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _Scanner:
    """Finds call objects in JSON text as it arrives: a top-level object, or the objects of a
    top-level list (hermes_list), or objects one after another (llama3_json's ``;``). A call
    starts once its "name" string is complete and names a known function; its arguments
    ("arguments", or llama3's "parameters") stream as their text arrives (a JSON string value
    is decoded when it closes: some models write the arguments as a string). Objects without
    a known name are kept as text (``stray``)."""

    def __init__(self, names: set[str], first_index: int):
        self.names = names
        self.first_index = first_index
        self.next_index = first_index  # the next call's index
        self.text = ""
        self.pos = 0  # scanned up to here
        self.depth = 0
        self.in_str = self.esc = False
        self.level = None  # depth of a call object's members (1: an object body, 2: a list)
        self.obj = None  # the call object being scanned (dict), or None
        self.stray: list[str] = []  # text of objects that are not calls of known functions
        self.empty_list = False  # the text is an empty list (SmolLM2's "no call")

    @property
    def started(self) -> bool:
        """Whether a call was given out."""
        return self.next_index > self.first_index

    def feed(self, text: str) -> list[CallDelta]:
        self.text += text
        out: list[CallDelta] = []
        t = self.text
        while self.pos < len(t):
            self._char(t, self.pos, out)
            self.pos += 1
        if self.obj is not None and self.obj["call"] is not None:
            self._send_arguments(out, final=False)
        return out

    def _char(self, t: str, i: int, out: list[CallDelta]) -> None:
        c = t[i]
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                if self.obj is not None and self.depth == self.level:
                    self._string_end(t, i, out)
            return
        if self.level is None and not c.isspace():
            self.level = 2 if c == "[" else 1
        obj = self.obj
        if c == '"':
            self.in_str = True
            if obj is not None and self.depth == self.level:
                obj["str_start"] = i
                self._value_starts(obj, i)
            return
        if c in "{[":
            if obj is None and c == "{" and self.depth == self.level - 1:
                self.obj = {"start": i, "key": None, "expect": "key", "name": None,
                            "args": None, "call": None, "sent": 0}
            elif obj is not None and self.depth == self.level:
                self._value_starts(obj, i)
            self.depth += 1
            return
        if c in "}]":
            self.depth -= 1
            if obj is not None and self.depth == self.level - 1:
                self._member_ends(obj, i)
                self._object_ends(obj, i, out)
            elif self.depth == 0 and c == "]" and not self.started and not self.stray \
                    and t[:i].strip() == "[":
                self.empty_list = True
            return
        if obj is None or self.depth != self.level:
            return
        if c == ":":
            obj["expect"] = "value"
        elif c == ",":
            self._member_ends(obj, i)
            obj["expect"] = "key"
        elif not c.isspace():
            self._value_starts(obj, i)

    def _value_starts(self, obj: dict, i: int) -> None:
        if obj["expect"] == "value":
            obj["expect"] = "in_value"
            if obj["key"] in ("arguments", "parameters") and obj["args"] is None:
                obj["args"] = [i, None]

    def _string_end(self, t: str, i: int, out: list[CallDelta]) -> None:
        obj = self.obj
        try:
            value = json.loads(t[obj["str_start"]:i + 1])
        except ValueError:  # a bad escape: neither a key nor a name we know
            value = None
        if obj["expect"] == "key":
            obj["key"], obj["expect"] = value, "colon"
        elif obj["expect"] == "in_value" and obj["key"] == "name" and obj["name"] is None:
            obj["name"] = value
            if obj["name"] in self.names:
                obj["call"] = {"id": f"call_{uuid.uuid4().hex[:24]}", "name": obj["name"],
                               "index": self.next_index, "arguments": ""}
                self.next_index += 1
                out.append(CallDelta(obj["call"]["index"], "", obj["call"]["id"],
                                     obj["name"]))
                self._send_arguments(out, final=False)

    def _member_ends(self, obj: dict, i: int) -> None:
        if obj["expect"] == "in_value" and obj["args"] is not None and obj["args"][1] is None:
            obj["args"][1] = i
        obj["expect"] = "done"

    def _object_ends(self, obj: dict, i: int, out: list[CallDelta]) -> None:
        if obj["call"] is None:
            self.stray.append(self.text[obj["start"]:i + 1])
        else:
            self._send_arguments(out, final=True)
        self.obj = None

    def _send_arguments(self, out: list[CallDelta], final: bool) -> None:
        """The call's arguments text not yet given out: up to where the scan is (trailing
        whitespace held back), or all of it once the value (or the text) ended."""
        obj = self.obj
        if obj["args"] is None:
            return
        start, end = obj["args"]
        done = end is not None or final
        raw = self.text[start:end if end is not None else self.pos + 1]
        raw = raw.rstrip() if done else raw.rstrip(" \t\n\r")
        if raw.startswith('"'):  # arguments written as a JSON string: decoded when complete
            if not done:
                return
            try:
                raw = json.loads(raw)
            except ValueError:
                pass
        call = obj["call"]
        if len(raw) > obj["sent"] and raw.startswith(call["arguments"]):
            out.append(CallDelta(call["index"], raw[obj["sent"]:]))
            call["arguments"] = raw
            obj["sent"] = len(raw)

    def close(self) -> list[CallDelta]:
        """The text ended: a call object left open keeps the arguments written so far."""
        out: list[CallDelta] = []
        if self.obj is not None and self.obj["call"] is not None:
            self._send_arguments(out, final=True)
        return out


class ToolParser:
    """Splits a streamed output into content and tool-call pieces, delta by delta (``feed``)
    and at the end (``finish``). Joining every content piece gives the non-streamed content:
    the text outside the calls, whitespace next to a call dropped; the pieces of each call
    (``CallDelta``) add up to the non-streamed call.

    A block (hermes forms; the whole output for llama3_json) is calls once one of its objects
    has a known function's name: that call is given out then, its arguments as they are
    written; its objects that are not such calls are content. A block where none is stays
    content (an empty list, SmolLM2's "no call", disappears).

    names: the functions that may be called.
    """

    def __init__(self, names: set[str], parser: str):
        self.names = names
        self.parser = parser
        self.buf = ""  # text not yet given out (outside blocks)
        self.scanner: _Scanner | None = None  # the block (or llama3 output) being read
        self.calls = 0  # calls given out
        self.started = False  # some non-whitespace output has been seen (llama3_json)
        self.after_call = False  # no content since the last call (its whitespace is dropped)

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        """Content to send now and call pieces settled by ``text``."""
        if self.parser == LLAMA3_JSON:
            return self._feed_json(text)
        self.buf += text
        content, pieces = "", []
        while True:
            if self.scanner is not None:
                end = self.buf.find(CLOSE)
                if end < 0:  # scan all but what may be the start of CLOSE
                    keep = len(self.buf) - _held(self.buf, CLOSE)
                    pieces += self._scan(self.buf[:keep])
                    self.buf = self.buf[keep:]
                    return content, pieces
                pieces += self._scan(self.buf[:end])
                self.buf = self.buf[end + len(CLOSE):]
                more, rest = self._end_block(CLOSE)
                pieces += more
                content += rest
                continue
            if self.after_call:
                self.buf = self.buf.lstrip()
                self.after_call = not self.buf
            start = self.buf.find(OPEN)
            if start >= 0:
                content += self.buf[:start].rstrip()
                self.buf = self.buf[start + len(OPEN):]
                self.scanner = _Scanner(self.names, self.calls)
                continue
            keep = _held(self.buf, OPEN)
            head, tail = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            stripped = head.rstrip()  # whitespace before a call is dropped: hold it
            content += stripped
            self.buf = head[len(stripped):] + tail
            return content, pieces

    def _scan(self, text: str) -> list[CallDelta]:
        pieces = self.scanner.feed(text)
        self.calls = self.scanner.next_index
        return pieces

    def _end_block(self, close: str) -> tuple[list[CallDelta], str]:
        """The block read ends (at CLOSE, or at the end of the output: ``close`` ""): its last
        pieces and the content it leaves (a block without calls: its whole text)."""
        sc, self.scanner = self.scanner, None
        pieces = sc.close()
        if sc.started or sc.empty_list:
            self.after_call = True
            return pieces, "".join(sc.stray)
        if self.parser == LLAMA3_JSON:
            return pieces, sc.text
        return pieces, f"{OPEN}{sc.text}{close}"

    def _feed_json(self, text: str) -> tuple[str, list[CallDelta]]:
        if not self.started:
            self.buf += text
            lead = self.buf.lstrip()
            if not lead:
                return "", []
            self.started, text, self.buf = True, self.buf, ""
            if lead.startswith("{"):
                self.scanner = _Scanner(self.names, 0)
                text = lead
        if self.scanner is not None:
            return "", self._scan(text)
        return text, []

    def finish(self) -> tuple[str, list[CallDelta]]:
        """What is left when the output ends: an unclosed block ends there (a call in it keeps
        the arguments written so far; a block without calls is content: nothing is lost)."""
        if self.scanner is None:
            text, self.buf = self.buf, ""
            return (text.strip() if self.calls else text), []
        pieces = self._scan(self.buf)
        self.buf = ""
        more, content = self._end_block("")
        return content, pieces + more


def assemble(pieces: list[CallDelta]) -> list[ToolCall]:
    """The calls that ``pieces`` (in order) add up to."""
    calls: dict[int, list] = {}
    for p in pieces:
        if p.id is not None:
            calls[p.index] = [p.name, "", p.id]
        calls[p.index][1] += p.arguments
    return [ToolCall(*calls[i]) for i in sorted(calls)]


def parse(text: str, names: set[str], parser: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output's content (None when only calls were written) and calls."""
    p = ToolParser(names, parser)
    content, pieces = p.feed(text)
    rest, more = p.finish()
    content += rest
    calls = assemble(pieces + more)
    return (content or None) if calls else content, calls
