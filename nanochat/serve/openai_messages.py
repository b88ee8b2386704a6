"""OpenAI messages <-> the model's conversation: what a chat request's messages render to (system and
developer, user, assistant with its tool calls, tool results, text parts), and how a reply's built-in tool
calls go out as structured fields beside the assistant's words. Both directions live here so that a reply sent
back as history re-renders to exactly the tokens the model saw. No HTTP and no models: openai_schema.py has the
bodies, openai_reply.py the replies.

Built-in tool calls in replies (calculator, python REPL, search: nanochat.tools.registry) run on the server while
the reply is written, so they are not OpenAI `tool_calls` (those ask the client to run a function and answer with
a tool message; LangChain's agents would try to). They go out as the message's `nanochat_tool_calls`, shaped like
`tool_calls` entries plus what the server knows:
    {"index": 0, "id": "call_...", "type": "function", "function": {"name": "calculator", "arguments": "{...}"},
     "call": "6*7", "output": "42", "offset": 12}
`call` is the model's own text of the call, `output` the tool's answer (null when the reply ended first), `offset`
where in `content` (in characters, Python's len) the call was written. Streamed, an entry comes in a delta when
its call is complete, and its output in a later delta with the same index. `content` holds only the assistant's
words: no tool text and no special token. A request with "raw_content": true gets the text as the model wrote it
instead, tool markers included ("You said: hi<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>").
Either form sent back as an assistant message renders to the same tokens.
"""
import json
import re
import uuid

from nanochat.engine import TOOL_MARKERS, event_as_raw_text
from nanochat.serve.openai_api import RequestError
from nanochat.tools.registry import parse_call

TOOL_ARGUMENT = {"calculator": "expression", "python": "code", "search": "query"}  # each built-in's one argument
_TOOL_SPLIT = re.compile("(" + "|".join(re.escape(a) + ".*?" + re.escape(b) for a, b in TOOL_MARKERS.values()) + ")",
                         re.DOTALL)


# --------------------------------------------------------------------------------------------
# tool calls: the model's text <-> OpenAI's function shape

def call_as_function(call):
    """A call's text as the model wrote it -> {"name", "arguments"} (arguments: JSON text, as OpenAI's)."""
    name, arg = parse_call(call)
    return {"name": name, "arguments": json.dumps({TOOL_ARGUMENT[name]: arg})}


def function_as_call(name, arguments):
    """A function call from a client (name, arguments JSON text) -> the call text the model reads: a built-in
    tool in the model's own format ("python:\\ncode", "search: query", the expression), any other function
    as "name: arguments"."""
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError:
        args = None
    key = TOOL_ARGUMENT.get(name)
    if key and isinstance(args, dict) and list(args) == [key] and isinstance(args[key], str):
        return {"calculator": "", "python": "python:\n", "search": "search: "}[name] + args[key]
    return f"{name}: {arguments}"


def openai_text_as_parts(text):
    """An assistant's raw content (tool markers in it, as raw_content gives it) -> a list of parts."""
    parts = []
    for p in _TOOL_SPLIT.split(text):
        for kind, (start, end) in TOOL_MARKERS.items():
            if p.startswith(start) and p.endswith(end) and len(p) >= len(start) + len(end):
                parts.append({"type": kind, "text": p[len(start):-len(end)]})
                break
        else:
            if p:
                parts.append({"type": "text", "text": p})
    return parts


# --------------------------------------------------------------------------------------------
# requests: OpenAI messages -> the conversation render_conversation takes

def message_text(m, i):
    """A message's content as text: a string, or its text (and refusal) parts joined by newlines."""
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for k, p in enumerate(m.content):
        text = p.text if p.type == "text" else p.refusal if p.type == "refusal" else None
        if text is None:
            raise RequestError(f"messages[{i}].content[{k}] is a {p.type!r} part; this model reads text only: "
                               "send text parts ({\"type\": \"text\", \"text\": ...}) or a string",
                               f"messages[{i}].content[{k}]")
        texts.append(text)
    return "\n".join(texts)


def _server_calls_as_parts(m, i, text):
    """An assistant message's content and nanochat_tool_calls -> parts, each call at its offset."""
    parts, at = [], 0
    calls = sorted(m.nanochat_tool_calls, key=lambda c: len(text) if c.offset is None else c.offset)
    for k, c in enumerate(calls):
        offset = len(text) if c.offset is None else c.offset
        if not at <= offset <= len(text):
            raise RequestError(f"messages[{i}].nanochat_tool_calls: offset {offset} is outside the content "
                               f"({len(text)} characters)", f"messages[{i}].nanochat_tool_calls")
        if c.call is None and c.function is None:
            raise RequestError(f"messages[{i}].nanochat_tool_calls[{k}] has neither call nor function",
                               f"messages[{i}].nanochat_tool_calls")
        parts += openai_text_as_parts(text[at:offset])
        parts.append({"type": "python", "text": c.call if c.call is not None else
                      function_as_call(c.function.name, c.function.arguments)})
        if c.output is not None:
            parts.append({"type": "python_output", "text": c.output})
        at = offset
    return parts + openai_text_as_parts(text[at:])


def assistant_parts(m, i, pending):
    """An assistant message -> its parts; the calls of its tool_calls go into `pending` (id -> part), where
    the tool messages answering them find their place."""
    text = message_text(m, i)
    parts = _server_calls_as_parts(m, i, text) if m.nanochat_tool_calls else openai_text_as_parts(text)
    for k, c in enumerate(m.tool_calls or []):
        if c.function is not None:
            call = function_as_call(c.function.name, c.function.arguments)
        elif c.custom is not None:
            call = f"{c.custom.get('name')}: {c.custom.get('input')}"
        else:
            raise RequestError(f"messages[{i}].tool_calls[{k}] has no function", f"messages[{i}].tool_calls")
        part = {"type": "python", "text": call}
        parts.append(part)
        pending[c.id if c.id is not None else f"#{len(pending)}"] = part
    return parts


def _add_result(parts, pending, m, i):
    """A tool message's text goes right after the call it answers (by tool_call_id; else after the first call
    still waiting for its answer; else at the end)."""
    call = pending.pop(m.tool_call_id, None) if m.tool_call_id is not None else None
    if call is None and pending and m.tool_call_id is None:
        call = pending.pop(next(iter(pending)))
    at = next((k for k, p in enumerate(parts) if p is call), len(parts) - 1)
    parts.insert(at + 1, {"type": "python_output", "text": message_text(m, i)})


def _simplify(parts):
    """Adjacent text parts joined, empty ones dropped; all text -> one string (the plain form)."""
    out = []
    for p in parts:
        if p["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + p["text"]}
        elif p["type"] != "text" or p["text"]:
            out.append(p)
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out


def conversation(messages):
    """A ChatRequest's messages -> (the conversation render_conversation takes, continues). Leading system and
    developer messages become one system message; consecutive messages of one speaker are joined; an assistant
    message, the tool results that follow it and the assistant messages after those are one assistant turn.
    continues: the conversation ends with a tool's result, so the reply goes on with the assistant's turn.
    Raises RequestError (400) naming the message that cannot be rendered."""
    out, pending, continues = [], {}, False
    i = 0
    while i < len(messages) and messages[i].role in ("system", "developer"):
        i += 1
    if i:
        out.append({"role": "system", "content": "\n\n".join(message_text(m, k) for k, m in enumerate(messages[:i]))})
    for k in range(i, len(messages)):
        m, last = messages[k], out[-1] if out else None
        if m.role in ("system", "developer"):
            raise RequestError(f"messages[{k}] is a {m.role} message after the conversation started; this model "
                               "reads instructions only at the start: move it before the first user message",
                               f"messages[{k}].role")
        if m.role == "user":
            text = message_text(m, k)
            if last is not None and last["role"] == "user":
                last["content"] += "\n\n" + text
            else:
                out.append({"role": "user", "content": text})
                pending.clear()
            continues = False
        elif m.role == "assistant":
            parts = assistant_parts(m, k, pending)
            if last is not None and last["role"] == "assistant":
                last["content"] += parts
            else:
                out.append({"role": "assistant", "content": parts})
            continues = False
        else:  # tool, or the deprecated function: a result the client computed
            if last is None or last["role"] != "assistant":
                raise RequestError(f"messages[{k}] is a {m.role} result, but no assistant message with its call "
                                   "comes before it", f"messages[{k}].role")
            _add_result(last["content"], pending, m, k)
            continues = True
    for m in out:
        if m["role"] == "assistant":
            m["content"] = _simplify(m["content"])
    return out, continues


# --------------------------------------------------------------------------------------------
# replies: ReplyParser events -> content and nanochat_tool_calls

class ReplyContent:
    """One choice's events -> its message: `content` (the assistant's words) and `calls` (nanochat_tool_calls),
    or with raw=True the text as the model wrote it. add(event) also returns the event's stream delta."""

    def __init__(self, raw=False):
        self.raw = raw
        self.pieces, self.length, self.calls = [], 0, []

    def add(self, event):
        """A text / python / python_output / special event -> its delta ({"content"} or {"nanochat_tool_calls"}),
        or None when it adds nothing to what the client sees."""
        kind, text = event["type"], event["text"]
        if self.raw or kind == "text":
            piece = event_as_raw_text(event) if self.raw else text
            self.pieces.append(piece)
            self.length += len(piece)
            return {"content": piece} if piece else None
        if kind == "python":
            entry = {"index": len(self.calls), "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                     "function": call_as_function(text), "call": text, "output": None, "offset": self.length}
            self.calls.append(entry)
            return {"nanochat_tool_calls": [dict(entry)]}
        if kind == "python_output":
            if not self.calls or self.calls[-1]["output"] is not None:  # no call before it: none to attach to
                return None
            self.calls[-1]["output"] = text
            return {"nanochat_tool_calls": [{"index": self.calls[-1]["index"], "output": text}]}
        return None  # a special token out of place: never part of the words

    def message(self):
        msg = {"role": "assistant", "content": "".join(self.pieces), "refusal": None}
        if self.calls:
            msg["nanochat_tool_calls"] = self.calls
        return msg
