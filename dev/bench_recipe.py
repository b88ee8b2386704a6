"""What each recipe piece costs per training step: the step time of the model with each set of --model-options
against the plain model, interleaved (a benchmark, not a test).

    python -m dev.bench_recipe --depth 4                                  # every piece alone, and all of them
    python -m dev.bench_recipe --depth 4 --variants "" "window_pattern=SSSL" "window_pattern=SSSL,value_embeds=1"

One step = forward + backward on batch x seq_len random tokens and both optimizer steps, as base_train runs it
(its dtype and compile defaults; --dtype/--compile override). Variants take turns, --steps steps each per round,
so a busy moment on a shared machine hits all of them; each variant's time is its median step. Per-step quality
is the race's job (dev/bench_race.py --steps); this gives the other half of "faster to a loss": the time a
step costs. Results: dev/notes_recipe.md.
"""
import argparse
import dataclasses
import statistics
import time

import torch

from dev.bench_train import config_kwargs, sync
from nanochat.common import DTYPES, compute_dtype, dtype_name, reuse_freed_memory
from nanochat.gpt import GPT, GPTConfig, config_overrides

PIECES = ["value_embeds=1", "resid_scalars=1", "smear=1", "backout=1", "window_pattern=SSSL", "polar_express=1",
          "normuon=1", "muon_weight_decay=0.1"]


class Variant:
    def __init__(self, options, args, device):
        torch.manual_seed(0)
        config = dataclasses.replace(GPTConfig(**config_kwargs(args.depth, args.seq_len, args.vocab_size)),
                                     **config_overrides(options))
        with torch.device("meta"):
            self.model = GPT(config)
        self.model.to_empty(device=device)
        self.model.init_weights()
        self.optimizers = self.model.setup_optimizers()
        self.fwd = torch.compile(self.model, dynamic=False) if args.compile else self.model
        self.model.compute_dtype = DTYPES[args.dtype]
        self.options, self.device = options or "(plain)", device
        self.params = self.model.num_params()
        self.times, self.losses = [], []

    def step(self, x, y):
        t0 = time.perf_counter()
        loss = self.fwd(x, y)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        sync(self.device)
        return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=None, help="--model-options strings ('' is the plain model); "
                   "default: the plain model, each piece alone, all of them")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: common.compute_dtype")
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = dtype_name(compute_dtype(device.type, args.dtype))
    if device.type == "cpu":
        reuse_freed_memory()
    variants = args.variants if args.variants is not None else ["", *PIECES, ",".join(PIECES)]
    sides = [Variant(v, args, device) for v in variants]
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    for s in sides:
        for _ in range(args.warmup):
            s.step(x, y)
    for _ in range(args.rounds):
        for s in sides:
            s.times += [s.step(x, y) for _ in range(args.steps)]
    base = statistics.median(sides[0].times)
    tokens = args.batch * args.seq_len
    print(f"device={device} threads={torch.get_num_threads()} dtype={args.dtype} compile={bool(args.compile)} "
          f"depth={args.depth} tokens/step={tokens:,}; median of {args.rounds * args.steps} interleaved steps")
    print(f"| variant | params | step ms | vs {sides[0].options} | tok/s | loss after {len(sides[0].losses)} steps |")
    print("|---|---|---|---|---|---|")
    for s in sides:
        t = statistics.median(s.times)
        print(f"| {s.options} | {s.params / 1e6:.2f}M | {1000 * t:.0f} | {t / base:.3f}x | {tokens / t:,.0f} | "
              f"{s.losses[-1]:.3f} |")


if __name__ == "__main__":
    main()
