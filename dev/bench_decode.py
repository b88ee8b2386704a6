"""Decode and prefill speed of the Engine against the memory-bandwidth roofline (not a test).

Decode: greedy Engine.generate from a fixed random prompt (untrained model with random projections, special
tokens never sampled), tokens/s = batch x new tokens / wall time of the decode steps (prefill excluded).
Roofline: one decode step reads every matmul weight once plus each row's KV cache, so
    tok/s <= batch x bandwidth / (weight bytes + batch x cache bytes at the average context),
bandwidth = the best large tensor copy measured in the same run (bytes read + written per second).
Variants: fp32 weights; bf16 weights (model.to(torch.bfloat16)); bf16-packed = nanochat.fastlinear.pack_linears
(bf16 weights prepacked for oneDNN; CPUs with native bf16 only, what scripts/chat_cli.py decodes with there);
bf16+compile = Engine(compile=True) (StaticKVCache, torch.compile; the first call compiles and is not timed).
TTFT: a batch-1 prompt of N tokens to its first sampled token (one batched prefill forward).

    python -m dev.bench_decode                                     # d4,d8,d12 x batch 1,8,32, fp32 and bf16
    python -m dev.bench_decode --depths 8 --batches 1,8 --variants bf16,bf16+compile
    python -m dev.bench_decode --depths 8 --batches 1,8 --variants fp32,bf16,bf16-packed --threads 1
Results: dev/notes_decode.md.
"""
import argparse
import time

import torch

from dev.bench_train import config_kwargs, sync
from nanochat.engine import Engine
from nanochat.fastlinear import PackedLinear, pack_linears
from nanochat.gpt import GPT, GPTConfig


def bandwidth(device, mb=512, reps=5):
    """Best bytes/s (read + write) of copying one large tensor into another."""
    n = mb * 2 ** 20 // 4
    a, b = torch.ones(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    best = 0.0
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0))
    return best


class Specials:
    """The tokenizer surface Engine needs; special tokens are ids the model can never produce."""

    def encode_special(self, s):
        return -1 - ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                     "<|output_end|>"].index(s)

    def get_bos_token_id(self):
        return -1

    def decode(self, ids):
        return ""

    def encode(self, s):
        return []


def build(depth, seq_len, vocab, device, dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config_kwargs(depth, seq_len, vocab)))
    with torch.no_grad():  # zero output projections would make the blocks the identity
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def weight_bytes(model):
    """Bytes of every weight a decode step reads: all matmuls (the lm_head included); one embedding row is noise.
    Packed Linears hold their bf16 weight outside the parameters."""
    packed = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    return packed + sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wte" not in n)


def cache_bytes(model, ctx, itemsize):
    c = model.config
    return c.n_layer * 2 * c.n_kv_head * (c.n_embd // c.n_head) * ctx * itemsize


def time_decode(engine, prompt, batch, new_tokens, device):
    """-> (seconds of the decode steps, util, tokens). The clock starts at the first yielded column (prefill done)."""
    gen = engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0)
    first, _ = next(gen)
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    cols = [first] + [c for c, _ in gen]
    sync(device)
    wall = time.perf_counter() - t0
    return wall, (time.process_time() - c0) / (wall * torch.get_num_threads()), cols


def ttft(engine, prompt, device, reps):
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        next(engine.generate(prompt, num_samples=1, max_tokens=1, temperature=0.0))
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--depths", default="4,8,12")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--variants", default="fp32,bf16",
                   help="comma list of fp32, bf16, bf16-packed, bf16+compile, fp32+compile")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="timed runs per row (fastest kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--ttft", default="512,2048", help="prompt lengths for time-to-first-token ('' to skip)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    ttft_lens = [int(x) for x in args.ttft.split(",") if x]
    seq_len = max([args.prompt_len + args.new_tokens] + ttft_lens) + 1
    bw = bandwidth(device)
    print(f"device={device} threads={torch.get_num_threads()} measured copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; fastest of {args.reps}")
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=g).tolist()
    rows, ttft_rows = [], []
    variants = args.variants.split(",")
    for depth in [int(d) for d in args.depths.split(",")]:
        engines = {}
        for v in variants:
            model = build(depth, seq_len, args.vocab_size, device,
                          torch.bfloat16 if v.startswith("bf16") else torch.float32)
            if v == "bf16-packed":
                model = pack_linears(model)
            engines[v] = Engine(model, Specials(), compile="compile" in v)
        for batch in [int(b) for b in args.batches.split(",")]:
            best = {}
            for v, engine in engines.items():  # warm-up (a compiled engine compiles for this batch here)
                time_decode(engine, prompt, batch, args.new_tokens if "compile" in v else 4, device)
            for _ in range(args.reps):  # variants interleaved, so a busy moment on the machine hits all alike
                for v, engine in engines.items():
                    r = time_decode(engine, prompt, batch, args.new_tokens, device)
                    best[v] = min(best.get(v, r), r, key=lambda x: x[0])
            for v, (wall, util, cols) in best.items():
                model = engines[v].model
                itemsize = 2 if v.startswith("bf16") else 4  # the KV cache (packed: bf16 Linear outputs)
                tok_s = batch * len(cols) / wall
                ctx = args.prompt_len + args.new_tokens / 2  # average context of the eager cache
                if "compile" in v:  # the static cache is read to its (rounded) capacity every step
                    ctx = min(-(-(args.prompt_len + args.new_tokens) // 256) * 256, seq_len)
                step_bytes = weight_bytes(model) + batch * cache_bytes(model, ctx, itemsize)
                roof = batch * bw / step_bytes
                rows.append((depth, v, batch, tok_s, roof, step_bytes / batch, util))
                print(f"  d{depth} {v} batch {batch}: {tok_s:.1f} tok/s ({100 * tok_s / roof:.0f}% of roofline)",
                      flush=True)
            first = variants[0]
            for v in variants[1:]:  # an untrained model's logits are near ties: fp32 vs bf16 may differ
                a, b = best[first][2], best[v][2]
                same = sum(x == y for ca, cb in zip(a, b) for x, y in zip(ca, cb)) / max(1, sum(map(len, a)))
                print(f"  d{depth} batch {batch}: {v} gives {100 * same:.0f}% of {first}'s greedy tokens")
        for n in ttft_lens:
            long_prompt = torch.randint(0, args.vocab_size, (n,), generator=g).tolist()
            for v, engine in engines.items():
                ttft(engine, long_prompt, device, 1)
            for v, engine in engines.items():
                ttft_rows.append((depth, v, n, ttft(engine, long_prompt, device, args.reps)))
    print("| depth | variant | batch | tok/s | roofline tok/s | of roofline | MB read per token | util |")
    print("|---|---|---|---|---|---|---|---|")
    for depth, v, batch, tok_s, roof, per_tok, util in rows:
        print(f"| {depth} | {v} | {batch} | {tok_s:,.1f} | {roof:,.0f} | {100 * tok_s / roof:.0f}% | "
              f"{per_tok / 1e6:.1f} | {100 * util:.0f}% |")
    if ttft_rows:
        print("| depth | variant | prompt tokens | TTFT s | prefill tok/s |")
        print("|---|---|---|---|---|")
        for depth, v, n, t in ttft_rows:
            print(f"| {depth} | {v} | {n} | {t:.3f} | {n / t:,.0f} |")


if __name__ == "__main__":
    main()
