"""What a live-learning job is and what it measures besides training: the job record, the general loss and the
general battery with its adapter vs the base model, the examples an adapter keeps, and the part of a prompt
"auto" routes on; queuing and running jobs is nanochat/serve/live.py's.
"""
import time
from dataclasses import asdict, dataclass, field

from nanochat.continual.adapter_train import mean_loss
from nanochat.lora.router import route_auto
from nanochat.lora.storage import read_examples


@dataclass
class LearnJob:
    id: str
    adapter: str
    steps: int
    examples: int
    mode: str = "new"
    status: str = "queued"  # queued -> running -> done | failed | cancelled
    phase: str | None = None  # while running: training -> battery -> saving (no cancelling from saving on)
    step: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    battery: str | None = None  # the general battery's one-line summary, once measured
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_requested: bool = False

    def view(self, brief=False):
        out = asdict(self)
        out["progress"] = round(self.step / self.steps, 4) if self.steps else None
        if brief:  # the job list: what it is and where it stands, not every number it measured
            out.pop("metrics")
        return out


def routing_ids(tokenizer, prompt):
    """What "auto" routes a prompt on: its last user message as a one-turn chat prompt (earlier turns would blur
    what this request asks; adapters keep one-turn prompts as keys), or the whole prompt when it has no user
    message (a plain completion)."""
    S = tokenizer.encode_special
    start, end = S("<|user_start|>"), S("<|user_end|>")
    prompt = list(prompt)
    if start not in prompt:
        return prompt
    i = len(prompt) - 1 - prompt[::-1].index(start)
    j = prompt.index(end, i) if end in prompt[i:] else len(prompt) - 1
    return [tokenizer.get_bos_token_id()] + prompt[i:j + 1] + [S("<|assistant_start|>")]


def saved_examples(tokenizer, directory):
    """What the adapter at `directory` was trained on (its examples.json), each checked to render. Raises
    ValueError naming the file and the conversation that cannot be trained on."""
    examples = read_examples(directory)
    for i, conv in enumerate(examples):
        try:
            tokenizer.render_conversation(conv, max_tokens=10 ** 9)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{directory}/examples.json: conversation {i} cannot be trained on: {e}") from None
    return examples


def general_loss(lora, tokenizer, conversations, name):
    """Mean loss on held-out general conversations with adapter `name` active and without it (nothing else
    active on `lora`)."""
    if not conversations:
        return {}
    model = lora.model
    rows = [tokenizer.render_conversation(c, max_tokens=model.config.sequence_len + 1) for c in conversations]
    pad = tokenizer.get_bos_token_id()
    base = mean_loss(model, rows, pad)
    lora.activate(name)
    try:
        adapted = mean_loss(model, rows, pad)
    finally:
        lora.activate(None)
    return {"general_loss_base": base, "general_loss_adapter": adapted, "general_loss_change": (adapted - base) / base}


def battery_report(battery, scheduler, lora, tokenizer, ad):
    """The general battery (nanochat/serve/battery.py) with adapter `ad` on every prompt, and with "auto" choosing
    between it and the base model, on `scheduler` (a private replica's, with `lora`)."""
    prompts = [routing_ids(tokenizer, ids) for ids, _ in battery.prompts]
    routed = [name is not None for name in route_auto(lora, prompts, [ad], [tokenizer.decode(p) for p in prompts])]
    return battery.run(scheduler, lambda item: ad, routed)
