"""Routing when the task is unknown at inference: it reads a LoRA's adapters and runs the base model, never
changing the active stack. Two rules, on the mean of the base model's last-block hidden states over a prompt:

  route()       nearest centroid: each adapter's centroid is the mean over its training prompts, and every
                prompt goes to the adapter with the nearest one (cosine). The task is known to be one of them.
  route_auto()  adapter or base model: each adapter keeps its training prompts' hidden means (keys) and those
                of the general prompts it was trained beside (general keys). An adapter claims a prompt whose
                nearest key (cosine) is one of its own rather than a general one; of several claims the one
                with the widest lead wins, and a prompt no adapter claims goes to the base model. One
                nearest neighbour and not a centroid: a fact question's neighbourhood is its own examples,
                the general prompts are too varied for one mean to stand for them.
                Anchors: when every prompt an adapter was taught names something the general chats never
                mention (a made-up name, a rare word; its "anchors", word stems), it claims only prompts that
                name one of them too. Hidden means blur one word into a whole question, so "What is the
                capital of Zuxgund?" sits as close to a taught "What is the capital of Velmora?" as its
                paraphrases do; the words tell them apart. An adapter taught on common words only has no
                anchors and routes on hidden states alone.

    set_centroid(lora, "facts", [ids, ...])               # after training "facts"
    set_keys(lora, "facts", [ids, ...], [general_ids, ...], texts, general_texts)
    route(lora, [prompt_ids, ...])                        # -> ["facts", ...]
    route_auto(lora, [prompt_ids, ...], texts=[prompt_text, ...])   # -> ["facts", None, ...]
"""
import re

import torch
import torch.nn.functional as F

MAX_KEYS = 1024  # an adapter's own prompts kept as keys (evenly spaced when it has more)
MAX_GENERAL_KEYS = 128  # general prompts kept per adapter: enough neighbours, a small file (128 x n_embd fp32)
MAX_ANCHORS = 4096  # anchor stems kept per adapter (a few per taught fact)
STEM = 5  # a word's first 5 letters: "glimberries" still names "glimberry"; shorter words are too common to count


@torch.no_grad()
def hidden_means(lora, ids_list, batch_size=16):
    """(n, n_embd): for each token list, the mean over its positions of the base model's
    RMS-normed last-block output (what the lm_head reads)."""
    model = lora.model
    device = model.get_device()
    captured = {}
    handle = model.transformer.h[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    out = []
    try:
        with lora.base_only():
            for b in range(0, len(ids_list), batch_size):
                chunk = [list(ids)[:model.config.sequence_len] for ids in ids_list[b:b + batch_size]]
                L = max(len(c) for c in chunk)
                x = torch.zeros((len(chunk), L), dtype=torch.long, device=device)
                valid = torch.zeros((len(chunk), L, 1), dtype=torch.float32, device=device)
                for r, c in enumerate(chunk):
                    x[r, :len(c)] = torch.tensor(c, dtype=torch.long)
                    valid[r, :len(c)] = 1.0
                model(x)
                h = F.rms_norm(captured["h"].float(), (captured["h"].size(-1),))
                out.append((h * valid).sum(1) / valid.sum(1))
    finally:
        handle.remove()
    return torch.cat(out).cpu()


def set_centroid(lora, name, ids_list):
    """The adapter's router centroid: the mean of hidden_means over examples of its task."""
    lora.adapters[name].centroid = hidden_means(lora, ids_list).mean(0)
    return lora.adapters[name].centroid


def set_keys(lora, name, ids_list, general_ids_list=(), texts=None, general_texts=()):
    """route_auto's keys of adapter `name`: hidden means of its training prompts (at most MAX_KEYS), and of
    general prompts it must leave to the base model (at most MAX_GENERAL_KEYS; evenly spaced when more).
    texts (its training prompts' words) and general_texts (all the general chats' words) set its anchors."""
    ad = lora.adapters[name]
    ad.keys = hidden_means(lora, _spaced(list(ids_list), MAX_KEYS))
    general = _spaced(list(general_ids_list), MAX_GENERAL_KEYS)
    ad.general_keys = hidden_means(lora, general) if general else None
    ad.anchors = anchors(texts, general_texts) if texts else None


def stems(text):
    """The word stems of a text that can be anchors: lowercased words of 4+ characters, cut to STEM."""
    return {w[:STEM] for w in re.findall(r"\w+", text.lower()) if len(w) >= 4}


def anchors(texts, general_texts):
    """The stems that name what the prompts `texts` are about: each text's stems that no general text has.
    None (no anchors, route on hidden states alone) when one of the texts has none."""
    common = set().union(*map(stems, general_texts))
    own = [stems(t) - common for t in texts]
    if not own or not all(own):
        return None
    return frozenset(sorted(set().union(*own))[:MAX_ANCHORS])


def _spaced(items, n):
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def route(lora, ids_list, candidates=None):
    """For each token list, the name of the candidate adapter (default: all with a centroid)
    whose centroid is nearest by cosine similarity to its base hidden mean."""
    names = [n for n in (candidates or lora.adapters) if lora.adapters[n].centroid is not None]
    if not names:
        raise RuntimeError("no adapter has a router centroid (set_centroid after training)")
    cents = F.normalize(torch.stack([lora.adapters[n].centroid.float().cpu() for n in names]), dim=-1)
    h = F.normalize(hidden_means(lora, ids_list), dim=-1)
    return [names[i] for i in (h @ cents.T).argmax(dim=1).tolist()]


def route_auto(lora, ids_list, adapters=None, texts=None):
    """For each token list, the name of the adapter that claims it (module docstring) or None (the base model).
    adapters: the Adapter objects to choose from (default: every adapter of the LoRA with keys); texts: the
    prompts as text, for the anchors (without them, adapters with anchors claim nothing)."""
    adapters = [ad for ad in (adapters if adapters is not None else lora.adapters.values())
                if getattr(ad, "keys", None) is not None and ad.general_keys is not None]
    if not adapters or not ids_list:
        return [None] * len(ids_list)
    picked = pick_adapters(hidden_means(lora, ids_list), adapters, texts)
    return [None if ad is None else ad.name for ad in picked]


def pick_adapters(h, adapters, texts=None):
    """route_auto's rule on hidden means h (n, d) -> for each row, the Adapter object claiming it, or None."""
    h = F.normalize(h.float(), dim=-1)
    words = [stems(t) for t in texts] if texts is not None else [set()] * len(h)
    leads = []
    for ad in adapters:
        own = (h @ F.normalize(ad.keys.float(), dim=-1).T).amax(dim=1)
        general = (h @ F.normalize(ad.general_keys.float(), dim=-1).T).amax(dim=1)
        named = torch.tensor([ad.anchors is None or bool(ad.anchors & w) for w in words])
        leads.append((own - general).masked_fill(~named, float("-inf")))  # an anchor unnamed: no claim
    leads = torch.stack(leads, dim=1)  # (n, adapters)
    best, which = leads.max(dim=1)
    return [adapters[i] if lead > 0 else None for lead, i in zip(best.tolist(), which.tolist())]
