"""Routing when the task is unknown at inference: each adapter may carry a centroid, the mean of the base
model's last-block hidden states over its training data, and route() picks for each prompt the adapter
whose centroid is nearest (cosine) to the prompt's mean hidden state under the base model. It reads a
LoRA's adapters and runs the base model; it never changes the active stack.

    set_centroid(lora, "facts", [ids, ...])    # after training "facts"
    route(lora, [prompt_ids, ...])              # -> ["facts", ...]
"""
import torch
import torch.nn.functional as F


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


def route(lora, ids_list, candidates=None):
    """For each token list, the name of the candidate adapter (default: all with a centroid)
    whose centroid is nearest by cosine similarity to its base hidden mean."""
    names = [n for n in (candidates or lora.adapters) if lora.adapters[n].centroid is not None]
    if not names:
        raise RuntimeError("no adapter has a router centroid (set_centroid after training)")
    cents = F.normalize(torch.stack([lora.adapters[n].centroid.float().cpu() for n in names]), dim=-1)
    h = F.normalize(hidden_means(lora, ids_list), dim=-1)
    return [names[i] for i in (h @ cents.T).argmax(dim=1).tolist()]
