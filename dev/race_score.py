"""The race's scorer: loads one side's trained base model through that side's own code and scores held-out text,
bits per byte = summed nats / ln 2 / UTF-8 bytes. It knows both checkouts' shared API (load_model, the
tokenizer's encode and BOS, a forward with targets and loss_reduction="none") and nothing else of either.

    NANOCHAT_BASE_DIR=<side's base dir> python dev/race_score.py --code <checkout> --tag race --text heldout.json

Run as a script, not a module: it puts --code first on sys.path, so `nanochat` is that checkout's package
(both are called nanochat; dev/bench_race.py runs one scorer process per side). Scored the same way for every
side: fp32 (the caller sets NANOCHAT_DTYPE=float32 for a checkout that reads it), every document on its own as
<|bos|> + its tokens, cut into windows of the model's sequence length where longer (a window starts without
context), every token of the text predicted exactly once. Prints one JSON line.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time


def windows(ids, T):
    """(inputs, targets) pairs of at most T positions covering ids[1:] as targets once each."""
    return [(ids[a:a + T], ids[a + 1:a + T + 1]) for a in range(0, len(ids) - 1, T)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", required=True, help="the checkout whose nanochat package loads the model")
    p.add_argument("--tag", required=True, help="base_checkpoints/<tag> in NANOCHAT_BASE_DIR")
    p.add_argument("--text", required=True, help="JSON list of held-out documents")
    p.add_argument("--batch", type=int, default=16, help="windows per forward")
    args = p.parse_args()
    # only this checkout's nanochat: every other directory holding one (our editable install's) comes off the path
    sys.path[:] = [args.code] + [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "nanochat"))]
    import torch

    from nanochat.checkpoint_manager import load_model

    t0 = time.time()
    model, tokenizer, meta = load_model("base", torch.device("cpu"), "eval", model_tag=args.tag)
    model.float()  # one numeric for every side, whatever it trained in
    T = model.config.sequence_len
    with open(args.text) as f:
        docs = json.load(f)
    bos = tokenizer.get_bos_token_id()
    rows, n_tokens, digest = [], 0, hashlib.blake2b(digest_size=8)
    for doc in docs:
        ids = [bos] + tokenizer.encode(doc)
        n_tokens += len(ids) - 1
        digest.update(json.dumps(ids).encode())
        rows += windows(ids, T)
    rows.sort(key=lambda r: len(r[0]))  # batches of similar lengths: little padding
    nats = 0.0
    with torch.no_grad():
        for b in range(0, len(rows), args.batch):
            chunk = rows[b:b + args.batch]
            L = max(2, max(len(x) for x, _ in chunk))  # (a one-position forward is decoding to some models)
            x = torch.zeros(len(chunk), L, dtype=torch.long)
            y = torch.full((len(chunk), L), -1, dtype=torch.long)
            for i, (inp, tgt) in enumerate(chunk):
                x[i, :len(inp)] = torch.tensor(inp)
                y[i, :len(tgt)] = torch.tensor(tgt)
            nats += model(x, y, loss_reduction="none").double().sum().item()  # 0 where the target is -1
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(json.dumps({"bpb": nats / math.log(2) / n_bytes, "nats": nats, "bytes": n_bytes, "heldout_tokens": n_tokens,
                      "token_hash": digest.hexdigest(), "step": meta.get("step"),
                      "params": sum(p.numel() for p in model.parameters()), "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
