"""Training one LoRA adapter from a handful of conversations (live learning), and the losses that measure and
steer it; it runs the continual-learning loop on one task and knows nothing of serving.

What keeps the rest of the model intact while an adapter learns a few facts (each measured in dev/notes_live.md):
  replay     general chat rows (the SFT mixture's) make up `replay_ratio` of every batch, trained on as targets
  preserve   `preserve` * KL(base || adapted) of the next-token distributions on other general rows, the base
             being the frozen model without the adapter (distillation: answers stay the base's own, not the
             dataset's)
  subspace   A kept off the input directions general rows feed each layer (nanochat/lora/subspace.py), and
             inside the directions of the new examples' own inputs
"""
import random

import torch
import torch.nn.functional as F

from nanochat.continual.loop import ContinualConfig, train_loop
from nanochat.continual.strategies import Strategy
from nanochat.lora.adapter import LoRA
from nanochat.lora.router import set_centroid, set_keys
from nanochat.lora.subspace import InputSubspace
from nanochat.training import collate


class AdapterRecipe(Strategy):
    """One adapter on the frozen base, mixing replay rows (general chat) into every batch; optionally a preserve
    penalty on other general rows (preserve_rows, weight preserve) and A kept inside a subspace."""
    name = "adapter"

    def __init__(self, model, tokenizer, cfg, adapter, replay_rows, preserve_rows=(), preserve=0.0, preserve_batch=4,
                 subspace=None):
        super().__init__(model, tokenizer, cfg, [])
        self.adapter, self.replay_rows = adapter, replay_rows
        self.preserve_rows, self.preserve, self.preserve_batch = list(preserve_rows), preserve, preserve_batch
        self.subspace = subspace
        self._rng = random.Random(cfg.seed + 1)

    def params(self, i):
        return list(self.adapter.parameters())

    def lr(self):
        return self.cfg.lora_lr

    def rehearsal(self):
        rows = self.replay_rows
        return (lambda k, rng: [rows[rng.randrange(len(rows))] for _ in range(k)]) if rows else None

    def penalty(self):
        if not self.preserve or not self.preserve_rows:
            return None
        lora, device = self.model._lora, self.model.get_device()

        def term():
            pick = self._rng.randrange
            rows = [self.preserve_rows[pick(len(self.preserve_rows))] for _ in range(self.preserve_batch)]
            x, y = collate(rows, self.pad_id, device)
            return self.preserve * preserve_loss(self.model, lora, x, y)
        return term

    def after_step(self):
        if self.subspace is not None:  # the optimizer step moved A: back inside its subspace
            self.subspace.project(self.adapter)


def preserve_loss(model, lora, x, y):
    """Mean over the supervised positions of x (y >= 0) of KL(base || adapted): how far the active adapters move
    the next-token distribution from the frozen base model's. Exactly 0 when they change nothing (B = 0)."""
    keep = y >= 0
    if not keep.any():
        raise ValueError("preserve_loss: no supervised position in the rows (every target is -1)")
    with torch.no_grad(), lora.base_only():
        base = F.log_softmax(model(x)[keep].float(), dim=-1)
    adapted = F.log_softmax(model(x)[keep].float(), dim=-1)
    return F.kl_div(adapted, base, log_target=True, reduction="sum") / keep.sum()


def train_adapter(model, tokenizer, conversations, replay_conversations=None, steps=50, name="adapter", lora=None,
                  rank=8, alpha=16.0, lr=1e-2, batch_size=4, replay_ratio=0.25, max_seq_len=None, seed=0,
                  progress=None, should_stop=None, replace=False, task=None, stack_under=None,
                  stack_weights=None, preserve=0.0, preserve_batch=4, subspace_energy=0.0, subspace_own=0.98,
                  resume=False):
    """Train a new LoRA adapter `name` on `conversations` (tokenizer chat format), mixing in
    `replay_conversations` (e.g. general chat data) at `replay_ratio` of each batch so that the
    adapter does not drift away from everything else. Uses model._lora (attaching one when there is
    none: the base is then frozen). The model is trained in place: callers that serve requests from
    the same model must not run inference meanwhile. The previously active adapter (or stack) is active
    again afterwards. stack_under: adapters that stay active (frozen, times stack_weights) beneath the new
    one while it trains - a nested adapter, recorded in its provenance and meant to be served on top
    of that same stack. progress(info) gets step, steps, loss, tok_per_sec, elapsed_s, eta_s; should_stop()
    -> True cancels (the adapter is then removed and None returned). It trains in the model's compute dtype.
    preserve > 0: the loss also gets preserve * preserve_loss on replay rows (half of them go to it, half stay
    replay targets); subspace_energy > 0: A is kept off the replay rows' input directions holding that fraction
    of their energy, and inside the new rows' own directions holding subspace_own of theirs (module docstring).
    resume: continue adapter `name`, already in the LoRA (its rank and alpha), instead of starting a new one.
    Returns the Adapter (resident in the LoRA; persist it with nanochat.lora.storage.save_adapter), its
    router keys and centroid set from the conversations' prompts."""
    lora = lora or getattr(model, "_lora", None) or LoRA(model)
    if not conversations:
        raise ValueError("train_adapter needs at least one conversation")
    if resume and name not in lora.adapters:
        raise ValueError(f"resume: adapter {name!r} is not loaded, so there is nothing to continue")
    T = min(max_seq_len or model.config.sequence_len, model.config.sequence_len)
    rows, replay, preserve_rows = _render(tokenizer, conversations, replay_conversations or [], T + 1, preserve)
    under = lora.make_stack(stack_under, stack_weights)
    if any(n == name for n, _ in under):
        raise ValueError(f"adapter {name!r} cannot be trained on top of itself")
    if replace and not resume and name in lora.adapters:
        lora.remove(name)
    previous = lora.stack
    if resume:
        ad = lora.adapters[name]
    else:
        info = {"task": task or name}
        if under:
            info["provenance"] = {"stacked_on": [{"name": n, "weight": w} for n, w in under]}
        ad = lora.add(name, rank=rank, alpha=alpha, seed=seed, info=info)
    cfg = ContinualConfig(steps=steps, batch_size=batch_size, lora_lr=lr, replay_ratio=replay_ratio,
                          warmup_steps=max(1, steps // 10), log_every=max(1, steps // 20), seed=seed)
    pad = tokenizer.get_bos_token_id()
    frozen = [n for n, _ in under if any(p.requires_grad for p in lora.adapters[n].parameters())]
    try:
        subspace = None
        if subspace_energy:
            subspace = confine_to_new_inputs(lora, ad, rows, replay + preserve_rows, pad, subspace_energy,
                                             subspace_own)
        recipe = AdapterRecipe(model, tokenizer, cfg, ad, replay, preserve_rows, preserve, preserve_batch, subspace)
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
        prompts = [r[0][:_prompt_end(tokenizer, r[0])] for r in rows]
        set_centroid(lora, name, prompts)
        set_keys(lora, name, prompts, [r[0][:_prompt_end(tokenizer, r[0])] for r in replay + preserve_rows],
                 [_text(c, "user") for c in conversations], [_text(c) for c in replay_conversations or []])
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
                          "seconds": stats["seconds"], "conversations": len(rows), "replay_conversations": len(replay),
                          "preserve_conversations": len(preserve_rows)}
    return ad


def _render(tokenizer, conversations, replay_conversations, max_tokens, preserve):
    """-> rows of the conversations, replay rows, preserve rows (with preserve: every other replay row)."""
    rows = [tokenizer.render_conversation(c, max_tokens=max_tokens) for c in conversations]
    replay = [tokenizer.render_conversation(c, max_tokens=max_tokens) for c in replay_conversations]
    if preserve and len(replay) > 1:
        return rows, replay[0::2], replay[1::2]
    return rows, replay, []


def confine_to_new_inputs(lora, ad, rows, general_rows, pad, energy, own, max_rows=64):
    """Keep adapter ad's A off the input directions of general_rows (energy) and inside those of rows (own), as
    nanochat/lora/subspace.py describes; projects A now. -> the InputSubspace (project after every step)."""
    model = lora.model
    device = model.get_device()
    subspace = InputSubspace(lora, energy)

    def run(rs):
        def forward():
            with torch.no_grad(), lora.base_only():
                for b in range(0, len(rs), 8):
                    model(collate(rs[b:b + 8], pad, device)[0])
        return forward
    if general_rows:
        subspace.add(subspace.covariances(run(general_rows[:max_rows])))
    if own:
        subspace.confine(subspace.covariances(run(rows[:max_rows])), own)
    subspace.project(ad)
    return subspace


def _text(conversation, role=None):
    """The text of a conversation's messages (only those of `role` when given): what the router's anchors read."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    return "\n".join(m["content"] for m in messages
                     if isinstance(m.get("content"), str) and role in (None, m.get("role")))


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
