"""OpenAI replies: the events of an OpenAI request's jobs (one per choice) turned into a chat.completion or a
legacy text_completion, streamed as chunks or collected into one body, with logprobs in the matching shape.
What a chat message holds (the assistant's words, nanochat_tool_calls) is openai_messages.ReplyContent's; the
jobs themselves run in replicas.py."""
import time
import uuid
from contextlib import aclosing

from fastapi.responses import Response
from fastapi.sse import format_sse_event

from nanochat.serve.openai_api import error_response, legacy_logprobs, sse, sum_usage
from nanochat.serve.openai_messages import ReplyContent

DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request checks whether its client is still there
REPLY_EVENTS = ("text", "python", "python_output", "special")


class OpenAIReply:
    """The reply to an OpenAI request's jobs: chat.completion (kind "chat") or text_completion (kind "text").
    per_prompt: choices per prompt (n; a text request may carry several prompts, prompt-major).
    model: the name the reply carries; fingerprint: its system_fingerprint; raw: chat content as the model
    wrote it; echo: each text choice starts with its prompt's text (echo[i])."""

    def __init__(self, kind, jobs, model, fingerprint, want_logprobs, include_usage, per_prompt=None, raw=False,
                 echo=None):
        self.kind, self.n, self.model, self.fingerprint = kind, len(jobs), model, fingerprint
        self.per_prompt = per_prompt or self.n
        self.want_logprobs, self.include_usage, self.echo = want_logprobs, include_usage, echo
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.created = int(time.time())
        self.contents = [ReplyContent(raw) for _ in jobs]
        self.carried = [[] for _ in jobs]  # logprob entries of events that showed nothing, for the next chunk
        self.offsets = [len(e) for e in echo] if echo else [0] * self.n  # legacy logprobs: next token's text offset

    def choice(self, i, finish=None, entries=None, delta=None, text=None):
        """A choice of a chunk (delta for chat, text for text) or, with neither, of the collected body."""
        chat = self.kind == "chat"
        c = {"index": i, "finish_reason": finish, "logprobs": None}
        if self.want_logprobs and entries is not None:
            if chat:
                c["logprobs"] = {"content": entries, "refusal": None}
            else:
                c["logprobs"], self.offsets[i] = legacy_logprobs(entries, self.offsets[i])
        if chat:
            if delta is not None:
                c["delta"] = delta
            else:
                c["message"] = self.contents[i].message()
        else:
            c["text"] = text if text is not None else (self.echo[i] if self.echo else "") + "".join(
                self.contents[i].pieces)
        return c

    def chunk(self, choices, usage=None):
        out = {"id": self.id, "object": self.object + (".chunk" if self.kind == "chat" else ""),
               "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
               "choices": choices}
        if self.include_usage:
            out["usage"] = usage  # as OpenAI: null on every chunk but the last
        return out

    def _delta(self, i, event):
        """A reply event -> the choice of a chunk, or None when it shows nothing."""
        added = self.contents[i].add(event)
        self.carried[i] += event.get("logprobs") or []
        if added is None:
            return None
        entries, self.carried[i] = self.carried[i], []
        if self.kind == "chat":
            return self.choice(i, entries=entries, delta=added)
        return self.choice(i, entries=entries, text=added.get("content", ""))

    async def stream(self, pool, jobs):
        """SSE events: one chunk per piece of the reply and per finished choice, then [DONE]."""
        chat = self.kind == "chat"
        if chat:
            yield sse(self.chunk([self.choice(i, delta={"role": "assistant", "content": ""}) for i in range(self.n)]))
        elif self.echo:
            yield sse(self.chunk([self.choice(i, text=self.echo[i]) for i in range(self.n)]))
        usages = [None] * self.n
        async with aclosing(pool.run_many(jobs)) as stream:
            async for i, event in stream:
                t = event["type"]
                if t == "queued":  # a comment: keeps the connection alive, clients ignore it
                    yield format_sse_event(comment=f"queued at position {event['position']}")
                elif t == "error":
                    yield sse({"error": {"message": event["message"], "type": "server_error", "param": None,
                                         "code": "server_error"}})
                    break
                elif t == "done":
                    usages[i] = event["usage"]
                    entries, self.carried[i] = self.carried[i] + (event.get("logprobs") or []), []
                    yield sse(self.chunk([self.choice(i, finish=event["finish_reason"], entries=entries,
                                                      delta={} if chat else None, text=None if chat else "")]))
                elif t in REPLY_EVENTS and (c := self._delta(i, event)) is not None:
                    yield sse(self.chunk([c]))
        if self.include_usage and all(usages):
            yield sse(self.chunk([], sum_usage(usages, self.per_prompt)))
        yield format_sse_event(data_str="[DONE]")

    async def collect(self, pool, jobs, request):
        """The whole reply as one body, or an error response; 499 when the client left meanwhile."""
        entries, finishes, usages = [[] for _ in jobs], [None] * self.n, [None] * self.n
        last_check = time.monotonic()
        async with aclosing(pool.run_many(jobs)) as stream:
            async for i, event in stream:
                t = event["type"]
                entries[i].extend(event.get("logprobs") or [])
                if t in REPLY_EVENTS:
                    self.contents[i].add(event)
                elif t == "done":
                    finishes[i], usages[i] = event["finish_reason"], event["usage"]
                elif t == "error":
                    status = event.get("status", 500)
                    return error_response(status, event["message"],
                                          kind="server_error" if status >= 500 else "invalid_request_error")
                if time.monotonic() - last_check > DISCONNECT_CHECK_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():  # nobody to answer: free the rows
                        return Response(status_code=499)
        if not all(usages):
            return error_response(500, "generation ended without a result", kind="server_error")
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [self.choice(i, finishes[i], entries[i]) for i in range(self.n)],
                "usage": sum_usage(usages, self.per_prompt)}
