"""Direct Preference Optimization: render preference pairs, score them, and the DPO/IPO losses. It knows
nothing about where pairs come from (tasks/preference.py) or about checkpoints and schedules (the script).

A pair is {"prompt": [messages ending with a user message], "chosen": assistant content,
"rejected": assistant content}, content being a string or a list of parts as in tasks.common.
A reply is scored by its sequence log-probability: the sum of log p(token) over the tokens the
assistant wrote in that final reply (the render mask), never the prompt, earlier turns or tool outputs.

With pi the policy and ref the frozen starting model, the implicit reward of a reply is
beta * (log pi(reply) - log ref(reply)) and, with h = (log-ratio of chosen) - (log-ratio of rejected):
    sigmoid (DPO):  loss = -log sigmoid(beta * h)
    ipo:            loss = (h - 1 / (2 * beta))^2
The reference only enters through its log-probs of each reply, which never change: they are computed
once with the starting model before the first step and cached with the pairs.
"""
import torch
import torch.nn.functional as F

from nanochat.training import collate

LOSSES = ("sigmoid", "ipo")


def render_reply(tokenizer, prompt, reply, max_tokens):
    """(ids, mask) of prompt + assistant reply, mask 1 only on the tokens of the reply the model is
    trained to write (its text, tool calls and <|assistant_end|>; tool outputs stay 0)."""
    conversation = {"messages": list(prompt) + [{"role": "assistant", "content": reply}]}
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**9)
    n_prompt = len(tokenizer.render_for_completion({"messages": list(prompt)}))
    mask = [0] * n_prompt + mask[n_prompt:]  # earlier assistant turns in the prompt are context, not the reply
    if len(ids) > max_tokens:
        # keep the reply whole where possible: drop the start of the prompt, never the end of the reply
        cut = len(ids) - max_tokens
        if cut >= n_prompt:
            raise ValueError(f"a reply of {len(ids) - n_prompt} tokens does not fit in {max_tokens} tokens")
        ids, mask = ids[cut:], mask[cut:]
    return ids, mask


def render_pair(tokenizer, pair, max_tokens):
    """-> ((ids, mask) chosen, (ids, mask) rejected)."""
    return (render_reply(tokenizer, pair["prompt"], pair["chosen"], max_tokens),
            render_reply(tokenizer, pair["prompt"], pair["rejected"], max_tokens))


def sequence_logprobs(model, rows, pad_id, device):
    """Sum of log p(token) over the masked tokens of each (ids, mask) row. -> (n,) float32 tensor
    (with grad if grad is enabled)."""
    x, y = collate(rows, pad_id, device)
    nll = model(x, y, loss_reduction="none")  # (n, T), 0 where the target is -1
    return -nll.float().sum(dim=1)


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind="sigmoid"):
    """Per-pair loss and the implicit rewards. Arguments are (n,) log-prob tensors.
    -> (loss (n,), chosen_reward (n,), rejected_reward (n,)); margin = chosen_reward - rejected_reward."""
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSSES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    else:
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def pair_logprobs(model, rendered, pad_id, device):
    """rendered: list of (chosen_row, rejected_row). One forward over both sides. -> (chosen (n,), rejected (n,))."""
    rows = [c for c, _ in rendered] + [r for _, r in rendered]
    logp = sequence_logprobs(model, rows, pad_id, device)
    return logp[:len(rendered)], logp[len(rendered):]


@torch.no_grad()
def reference_logprobs(model, rendered, pad_id, device, batch_size):
    """Log-probs of every pair's chosen and rejected reply under `model` (the reference), batch_size
    pairs per forward. -> list of (chosen, rejected) floats."""
    device = torch.device(device)
    out = []
    for b in range(0, len(rendered), batch_size):
        c, r = pair_logprobs(model, rendered[b:b + batch_size], pad_id, device)
        out += list(zip(c.tolist(), r.tolist()))
    return out


def tokens_to_parts(tokenizer, tokens):
    """Sampled assistant tokens (stop token excluded) -> assistant content: a list of text / python /
    python_output parts, so a sampled reply can be stored as a conversation and rendered again."""
    S = tokenizer.encode_special
    python_start, python_end = S("<|python_start|>"), S("<|python_end|>")
    output_start, output_end = S("<|output_start|>"), S("<|output_end|>")
    parts, kind, buf = [], "text", []

    def flush():
        if buf:
            text = tokenizer.decode(buf)
            if parts and parts[-1]["type"] == kind == "text":
                parts[-1]["text"] += text
            else:
                parts.append({"type": kind, "text": text})
        buf.clear()

    for t in tokens:
        if t in (python_start, output_start):
            flush()
            kind = "python" if t == python_start else "python_output"
        elif t in (python_end, output_end):
            flush()
            kind = "text"
        else:
            buf.append(t)
    flush()
    return parts
