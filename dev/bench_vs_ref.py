"""Side-by-side speed of our model/optimizers/engine against nanochat's reference code (not a test).

The reference is imported from a checkout given on the command line (nothing of it lives in this repo):

    git --git-dir=/path/to/karpathy+nanochat/repo archive HEAD | tar -x -C /tmp/nanochat_ref
    python -m dev.bench_vs_ref --ref /tmp/nanochat_ref
    python -m dev.bench_vs_ref --ref /tmp/nanochat_ref --skip-train --decode-dtypes fp32,bf16

Both sides get the same configuration (depth d: width 64*d, heads width/128, seq 512, vocab 8192; the
reference with full-context attention, window pattern "L", so both do the same attention work), the same
batches and the same tricks (bf16 autocast + torch.compile of the model; each side's own optimizer step,
as its training script runs it). Runs alternate ours, ref, ours, ref... in one process, so a busy moment
on a shared machine hits both alike; each side's time is its fastest step (contention only slows a step
down). Decode: greedy, a fixed random prompt, each side's own Engine.generate with batch-1 prefill and
one row per sample, timed end to end (prefill included). util = process CPU time / (wall x threads).
With --decode-dtypes bf16 a third side runs where the CPU has native bf16: ours with oneDNN-packed bf16
Linears (nanochat.fastlinear, row "[ours-packed]"), against the reference's plain bf16 weights.
Results: dev/notes_train.md, dev/notes_decode.md.
"""
import argparse
import importlib
import sys
import time

import torch

from dev.bench_train import config_kwargs, sync
from nanochat.common import reuse_freed_memory
from nanochat.engine import Engine
from nanochat.fastlinear import pack_linears, packing_supported
from nanochat.gpt import GPT, GPTConfig


def load_ref(path):
    """Import the reference's gpt and engine modules from `path` under their own names, then put ours back:
    both packages are called `nanochat`, so ours are set aside from sys.modules while the reference loads."""
    ours = {k: m for k, m in sys.modules.items() if k == "nanochat" or k.startswith("nanochat.")}
    for k in ours:
        del sys.modules[k]
    sys.modules.setdefault("kernels", None)  # no hub kernels: the reference falls back to SDPA
    sys.path.insert(0, path)
    try:
        gpt = importlib.import_module("nanochat.gpt")
        engine = importlib.import_module("nanochat.engine")
    finally:
        sys.path.remove(path)
        # Re-home the reference's modules as nanochat_ref.*: torch.compile looks globals up by module name,
        # and must find the reference's modules, not ours.
        for k in [k for k in sys.modules if k == "nanochat" or k.startswith("nanochat.")]:
            mod = sys.modules.pop(k)
            mod.__name__ = "nanochat_ref" + k[len("nanochat"):]
            sys.modules[mod.__name__] = mod
        sys.modules.update(ours)
    return gpt, engine


def build(side, ref, depth, args, device):
    torch.manual_seed(0)
    kw = config_kwargs(depth, args.seq_len, args.vocab_size)
    if side != "ref":
        with torch.device("meta"):
            model = GPT(GPTConfig(**kw))
    else:
        with torch.device("meta"):
            model = ref.GPT(ref.GPTConfig(**kw, window_pattern="L"))
    model.to_empty(device=device)
    model.init_weights()
    return model


class TrainSide:
    """One side's model, optimizers and compiled forward; step() runs one timed optimizer step."""

    def __init__(self, side, ref, depth, variant, args, device, data):
        self.model = build(side, ref, depth, args, device)
        opts = self.model.setup_optimizer() if side == "ref" else self.model.setup_optimizers()
        if side == "ours-ns32":  # ours with Muon's Newton-Schulz in fp32, as before it went bf16 on such CPUs
            for group in opts["muon"].param_groups:
                group["ns_dtype"] = torch.float32
        self.optimizers = list(opts.values()) if isinstance(opts, dict) else [opts]
        self.bf16 = variant.startswith("bf16")
        if side != "ref":  # ours enters autocast itself; the reference's model is driven from outside
            self.model.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
            self.bf16 = False
        compile_ = "compile" in variant
        self.fwd = torch.compile(self.model, dynamic=False) if compile_ else self.model
        self.device, self.data, self.args = device, data, args
        self.times, self.losses, self.utils = [], [], []

    def step(self):
        c0, t0 = time.process_time(), time.perf_counter()
        for x, y in self.data:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.fwd(x, y)
            (loss / len(self.data)).backward()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        sync(self.device)
        wall = time.perf_counter() - t0
        self.times.append(wall)
        self.utils.append((time.process_time() - c0) / (wall * torch.get_num_threads()))


def bench_train(ref, depth, variant, args, device):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
               for _ in range(args.grad_accum)]
    data = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]  # the reference .view()s targets
    sides = {s: TrainSide(s, ref, depth, variant, args, device, data) for s in args.sides.split(",")}
    for _ in range(args.warmup):  # compilation happens here
        for s in sides.values():
            s.step()
    for s in sides.values():
        s.times, s.utils = [], []
    for _ in range(args.rounds):
        for s in sides.values():
            for _ in range(args.steps):
                s.step()
    tokens = args.batch_size * args.seq_len * args.grad_accum
    out = {}
    for name, s in sides.items():
        i = min(range(len(s.times)), key=s.times.__getitem__)
        out[name] = dict(tok_s=tokens / s.times[i], util=s.utils[i], loss=s.losses[-1],
                         median_tok_s=tokens / sorted(s.times)[len(s.times) // 2])
    return out


class FakeTokenizer:
    """What the engines ask of a tokenizer, with special tokens outside the vocabulary so greedy decoding of a
    random model never stops early and never enters a tool call."""

    def encode_special(self, s):
        return -1 - ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                     "<|output_start|>", "<|output_end|>"].index(s)

    def get_bos_token_id(self):
        return -1

    def encode(self, s):
        return []

    def decode(self, ids):
        return ""


def bench_decode(ref, depth, batch, dtype, args, device):
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=g).tolist()
    # bf16: a third side, ours with oneDNN-packed bf16 Linears (nanochat.fastlinear), where this machine has it;
    # the reference keeps plain bf16 weights, its own best
    sides = ["ours", "ref"]
    if dtype == "bf16" and packing_supported(device)[0]:
        sides.insert(1, "ours-packed")
    engines, outputs, times = {}, {}, {side: [] for side in sides}
    # the reference picks its activation/cache dtype from a module global (COMPUTE_DTYPE): set it to match
    ref.gpt.COMPUTE_DTYPE = ref.engine.COMPUTE_DTYPE = torch.bfloat16 if dtype == "bf16" else torch.float32
    for side in sides:
        model = build("ref" if side == "ref" else "ours", ref, depth, args, device).eval()
        if side == "ours-packed":
            model = pack_linears(model)
        elif dtype == "bf16":
            model = model.to(torch.bfloat16)
        engines[side] = ref.engine.Engine(model, FakeTokenizer()) if side == "ref" else Engine(model, FakeTokenizer())

    def run(side):
        c0, t0 = time.process_time(), time.perf_counter()
        cols = [c for c, _ in engines[side].generate(prompt, num_samples=batch, max_tokens=args.new_tokens,
                                                       temperature=0.0)]
        sync(device)
        wall = time.perf_counter() - t0
        outputs[side] = cols
        times[side].append((wall, (time.process_time() - c0) / (wall * torch.get_num_threads())))

    for _ in range(args.decode_warmup):
        for side in sides:
            run(side)
    times = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            run(side)
    res = {}
    for side in sides:
        wall, util = min(times[side])
        res[side] = dict(tok_s=batch * args.new_tokens / wall, util=util, n=len(outputs[side]))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="path of a nanochat reference checkout (its repo root)")
    p.add_argument("--device", default=None)
    p.add_argument("--depths", default="4,8")
    p.add_argument("--variants", default="fp32,bf16+compile")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per side (compilation)")
    p.add_argument("--rounds", type=int, default=3, help="alternations ours/ref")
    p.add_argument("--steps", type=int, default=1, help="training steps per side per round")
    p.add_argument("--sides", default="ours,ref", help="training sides: ours, ref, ours-ns32 (Muon in fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--decode-depth", type=int, default=8)
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--decode-dtypes", default="fp32", help="weights' dtype at decode: fp32 and/or bf16")
    p.add_argument("--decode-warmup", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # as our stages run (compute_init); process-wide, so both sides get it
        reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpt, engine = load_ref(args.ref)
    ref = argparse.Namespace(GPT=gpt.GPT, GPTConfig=gpt.GPTConfig, gpt=gpt, engine=engine)
    print(f"device={device} threads={torch.get_num_threads()} seq_len={args.seq_len} vocab={args.vocab_size} "
          f"tokens/step={args.batch_size}x{args.seq_len}x{args.grad_accum}; fastest of {args.rounds * args.steps} "
          f"interleaved steps per side")
    rows = []
    if not args.skip_train:
        for depth in [int(d) for d in args.depths.split(",")]:
            for v in args.variants.split(","):
                r = bench_train(ref, depth, v, args, device)
                rows.append((f"train d{depth} {v}", r))
                print(f"  train d{depth} {v}: ours {r['ours']['tok_s']:.0f} ref {r['ref']['tok_s']:.0f} tok/s",
                      file=sys.stderr)
    if not args.skip_decode:
        for dtype in args.decode_dtypes.split(","):
            for b in [int(x) for x in args.decode_batches.split(",")]:
                r = bench_decode(ref, args.decode_depth, b, dtype, args, device)
                rows.append((f"decode d{args.decode_depth} {dtype} batch {b} ({args.prompt_len}+{args.new_tokens})", r))
                print(f"  decode b{b} {dtype}: " + " ".join(f"{k} {v['tok_s']:.1f}" for k, v in r.items()) + " tok/s",
                      file=sys.stderr)
    print("| work | ref tok/s | ours tok/s | ours / ref | util ref / ours | loss ref / ours |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        f = r["ref"]
        for side in [s for s in r if s != "ref"]:
            o = r[side]
            loss = f"{f['loss']:.4f} / {o['loss']:.4f}" if "loss" in o else "-"
            label = name if side == "ours" else f"{name} [{side}]"
            print(f"| {label} | {f['tok_s']:,.0f} | {o['tok_s']:,.0f} | {o['tok_s'] / f['tok_s']:.2f}x | "
                  f"{100 * f['util']:.0f}% / {100 * o['util']:.0f}% | {loss} |")


if __name__ == "__main__":
    main()
