"""The general battery: fixed general prompts answered greedily with and without an adapter, scored by how many
answers stayed the same and by task accuracy; it runs and scores prompts, which prompts is the caller's choice
(tasks/general.py builds them from held-out chat eval tasks).

    battery = Battery(items)                                   # items: BatteryItem
    result = battery.run(scheduler, lambda item: adapter)     # -> {"unchanged", "total", "summary", ...}
    result["summary"]                                          # "general battery: 47/48 answers unchanged ..."

Why this and not the loss on general chats: an adapter that moves the mean loss on held-out chats by 2% can
still turn "What is 12*7?" from a calculator call into "A glad is teal.". A user sees greedy answers, so the
battery compares those: an answer is unchanged when the tool calls the reply made and its final answer (the
text after the last "####", else the whole reply text, whitespace normalised) are the same as the base
model's. Accuracy uses each item's own check (the eval task's), where it has one.

The replies come from a nanochat.serve.scheduler.Scheduler run synchronously: the serving code path, every
prompt a row of one batch, greedy. The base model's replies are computed once and kept (the base does not
change while a server runs). Rows of one batch are computed together, so a reply can differ from the same
prompt answered alone by a float rounding that flips a near tie; dev/bench_live.py measures that floor.
"""
from dataclasses import dataclass

from nanochat.engine import TOOL_MARKERS, ReplyParser
from nanochat.serve.scheduler import Request


@dataclass
class BatteryItem:
    """One general prompt: messages up to the user's turn; evaluate(reply text) -> bool, or None when the
    prompt has no right answer (chit-chat)."""
    id: str
    kind: str  # calculator, python, search, spelling, mc, math, chat: what the per-kind counts group by
    messages: list
    max_tokens: int = 64
    evaluate: object = None


def answer_key(parts):
    """What must stay the same for an answer to count as unchanged: (tool calls made, final answer). A special token
    out of place is not part of it: no reply shows one to the user."""
    calls = tuple(p["text"].strip() for p in parts if p["type"] == "python")
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    if "####" in text:
        text = text.rsplit("####", 1)[1].split("\n")[0]
    return calls, " ".join(text.split())


def reply_text(parts):
    """Parts as one string, tool calls in the model's own markers (what chat_eval's checks read); a special token
    out of place (a "special" part) by its name."""
    return "".join(TOOL_MARKERS[p["type"]][0] + p["text"] + TOOL_MARKERS[p["type"]][1] if p["type"] in TOOL_MARKERS
                   else p["text"] for p in parts)


def greedy_replies(scheduler, prompts, adapters):
    """prompts: [(ids, max_tokens)], adapters: one per prompt (an Adapter, a stack or None) -> the parts of each
    greedy reply, all prompts rows of one batch on `scheduler` (not started: run here until idle)."""
    tokens = [[] for _ in prompts]
    finish = [None] * len(prompts)

    def collect(i):
        def on_event(event):
            if event.token is not None and event.token not in scheduler.engine.stop_tokens:
                tokens[i].append(event.token)
            if event.finish is not None:
                finish[i] = event
        return on_event

    for i, ((ids, max_tokens), adapter) in enumerate(zip(prompts, adapters)):
        scheduler.submit(Request(list(ids), max_tokens=max_tokens, temperature=0.0, adapter=adapter), collect(i))
    scheduler.run_until_idle()
    failed = [e.error for e in finish if e is not None and e.finish == "error"]
    if failed:
        raise RuntimeError(f"the battery's generation failed: {failed[0]}")
    out = []
    for toks in tokens:
        parser = ReplyParser(scheduler.tokenizer)
        parts = [e for t in toks for e in parser.push(t)] + parser.finish()
        out.append(_merge_text(parts))
    return out


def _merge_text(parts):
    """Consecutive text deltas joined into one part."""
    out = []
    for p in parts:
        if p["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + p["text"]}
        else:
            out.append(dict(p))
    return out


class Battery:
    """Items that fit the model's context, and the base model's replies to them once computed."""

    def __init__(self, items, tokenizer, context):
        self.items, self.prompts = [], []
        for item in items:
            ids = tokenizer.render_for_completion(item.messages)
            if len(ids) + 1 < context:  # room for at least one new token
                self.items.append(item)
                self.prompts.append((ids, min(item.max_tokens, context - len(ids))))
        self.base = None  # the base model's reply parts, computed by the first run

    def __len__(self):
        return len(self.items)

    def replies(self, scheduler, adapter_for):
        """adapter_for(item) -> Adapter / stack / None for each item -> reply parts."""
        return greedy_replies(scheduler, self.prompts, [adapter_for(item) for item in self.items])

    def run(self, scheduler, adapter_for, routed=None):
        """Replies with adapter_for(item) vs the base model's -> score()'s dict; routed (one bool per item:
        whether "auto" sends it to the adapter) adds what "auto" serving would answer."""
        if self.base is None:
            self.base = self.replies(scheduler, lambda item: None)
        return score(self.items, self.base, self.replies(scheduler, adapter_for), routed)


def score(items, base, adapted, routed=None, examples=4):
    """Base and adapted reply parts of each item -> {"unchanged", "total", "scored" (items with a check),
    "accuracy_base", "accuracy_adapter", "by_kind", "changed" (a few examples), "summary"}. With routed (one bool
    per item: sent to the adapter), also "auto": the same counts when each item gets what routing gives it (a
    prompt routed to the base model gets the base model's reply) and "to_base"."""
    same = [answer_key(b) == answer_key(a) for b, a in zip(base, adapted)]
    checks = [i for i, it in enumerate(items) if it.evaluate is not None]

    def right(replies):
        return sum(bool(items[i].evaluate(reply_text(replies[i]))) for i in checks)

    def acc(n):
        return n / len(checks) if checks else None

    by_kind = {}
    for it, s in zip(items, same):
        k = by_kind.setdefault(it.kind, {"unchanged": 0, "total": 0})
        k["unchanged"] += s
        k["total"] += 1
    changed = [{"id": it.id, "prompt": it.messages[-1]["content"][:200], "base": reply_text(b)[:200],
                "adapter": reply_text(a)[:200]}
               for it, b, a, s in zip(items, base, adapted, same) if not s][:examples]
    n, u = len(items), sum(same)
    rb, ra = right(base), right(adapted)
    out = {"unchanged": u, "total": n, "scored": len(checks), "accuracy_base": acc(rb), "accuracy_adapter": acc(ra),
           "by_kind": by_kind, "changed": changed}
    summary = f"general battery: {u}/{n} answers unchanged"
    if checks:
        summary += f"; accuracy {rb}/{len(checks)} base, {ra}/{len(checks)} adapter"
    if routed is not None:
        served = [a if r else b for b, a, r in zip(base, adapted, routed)]
        ua = sum(s or not r for s, r in zip(same, routed))
        out["auto"] = {"unchanged": ua, "to_base": sum(not r for r in routed), "accuracy": acc(right(served))}
        summary += f"; auto: {ua}/{n} unchanged, {out['auto']['to_base']}/{n} routed to the base"
    out["summary"] = summary
    return out
