"""Training one LoRA adapter from a handful of conversations (live learning), and the mean loss over
rows that measures it; it runs the continual-learning loop on one task and knows nothing of serving.
"""
import torch

from nanochat.continual.loop import ContinualConfig, train_loop
from nanochat.continual.strategies import Strategy
from nanochat.lora.router import set_centroid
from nanochat.training import collate


class AdapterRecipe(Strategy):
    """One adapter on the frozen base, mixing replay rows (general chat) into every batch."""
    name = "adapter"

    def __init__(self, model, tokenizer, cfg, adapter, replay_rows):
        super().__init__(model, tokenizer, cfg, [])
        self.adapter, self.replay_rows = adapter, replay_rows

    def params(self, i):
        return list(self.adapter.parameters())

    def lr(self):
        return self.cfg.lora_lr

    def rehearsal(self):
        rows = self.replay_rows
        return (lambda k, rng: [rows[rng.randrange(len(rows))] for _ in range(k)]) if rows else None


def train_adapter(model, tokenizer, conversations, replay_conversations=None, steps=50, name="adapter", lora=None,
                  rank=8, alpha=16.0, lr=1e-2, batch_size=4, replay_ratio=0.25, max_seq_len=None, seed=0,
                  progress=None, should_stop=None, replace=False, task=None, stack_under=None, stack_weights=None):
    """Train a new LoRA adapter `name` on `conversations` (tokenizer chat format), mixing in
    `replay_conversations` (e.g. general chat data) at `replay_ratio` of each batch so that the
    adapter does not drift away from everything else. Uses model._lora (attaching one when there is
    none: the base is then frozen). The model is trained in place: callers that serve requests from
    the same model must not run inference meanwhile. The previously active adapter (or stack) is active
    again afterwards. stack_under: adapters that stay active (frozen, times stack_weights) beneath the new
    one while it trains - a nested adapter, recorded in its provenance and meant to be served on top
    of that same stack. progress(info) gets step, steps, loss, tok_per_sec, elapsed_s, eta_s; should_stop()
    -> True cancels (the adapter is then removed and None returned). It trains in the model's compute dtype.
    Returns the Adapter (resident in the LoRA; persist it with nanochat.lora.storage.save_adapter)."""
    from nanochat.lora.adapter import LoRA
    lora = lora or getattr(model, "_lora", None) or LoRA(model)
    if not conversations:
        raise ValueError("train_adapter needs at least one conversation")
    T = min(max_seq_len or model.config.sequence_len, model.config.sequence_len)
    rows = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in conversations]
    replay = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in (replay_conversations or [])]
    under = lora.make_stack(stack_under, stack_weights)
    if any(n == name for n, _ in under):
        raise ValueError(f"adapter {name!r} cannot be trained on top of itself")
    if replace and name in lora.adapters:
        lora.remove(name)
    previous = lora.stack
    info = {"task": task or name}
    if under:
        info["provenance"] = {"stacked_on": [{"name": n, "weight": w} for n, w in under]}
    ad = lora.add(name, rank=rank, alpha=alpha, seed=seed, info=info)
    cfg = ContinualConfig(steps=steps, batch_size=batch_size, lora_lr=lr, replay_ratio=replay_ratio,
                          warmup_steps=max(1, steps // 10), log_every=max(1, steps // 20), seed=seed)
    recipe = AdapterRecipe(model, tokenizer, cfg, ad, replay)
    pad = tokenizer.get_bos_token_id()
    frozen = [n for n, _ in under if any(p.requires_grad for p in lora.adapters[n].parameters())]
    try:
        for n in frozen:
            lora.freeze(n)
        lora.activate([n for n, _ in under] + [name], [w for _, w in under] + [1.0])
        loss_before = mean_loss(model, rows, pad)
        with torch.enable_grad():
            stats = train_loop(model, rows, recipe, seed=seed, progress=progress, label=f"[adapter {name}] ",
                               should_stop=should_stop)
        if should_stop is not None and should_stop():
            lora.remove(name)
            return None
        loss_after = mean_loss(model, rows, pad)
        set_centroid(lora, name, [r[0][:_prompt_end(tokenizer, r[0])] for r in rows])
    except BaseException:
        if name in lora.adapters:
            lora.remove(name)
        raise
    finally:
        for n in frozen:
            if n in lora.adapters:
                lora.freeze(n, False)
        kept = [(n, w) for n, w in previous if n in lora.adapters]
        lora.activate([n for n, _ in kept], [w for _, w in kept])
    ad.info["metrics"] = {"loss_before": loss_before, "loss_after": loss_after, "steps": stats["steps"],
                          "seconds": stats["seconds"], "conversations": len(rows), "replay_conversations": len(replay)}
    return ad


def _prompt_end(tokenizer, ids):
    a = tokenizer.encode_special("<|assistant_start|>")
    return ids.index(a) + 1 if a in ids else len(ids)


@torch.no_grad()
def mean_loss(model, rows, pad, batch_size=8):
    """Mean loss per supervised token over rows ((ids, mask) pairs)."""
    device = model.get_device()
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        x, y = collate(rows[b:b + batch_size], pad, device)
        total += model(x, y, loss_reduction="sum").item()
        count += int((y >= 0).sum().item())
    return total / count if count else float("nan")
