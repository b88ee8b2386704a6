"""Training-step throughput benchmark: tokens/s, achieved FLOP/s and MFU per depth (not a test).

One "step" = grad_accum x (forward + backward) on batch_size x seq_len tokens, then both optimizer
steps (AdamW + Muon), as base_train does it. Model FLOPs come from GPT.estimate_flops(); the peak is
the best large square matmul timed in the same run, in the dtype the matmuls run in (fp32 -- TF32 on
CUDA -- for --dtype fp32, bf16 for bf16 autocast), so MFU never credits bf16 against an fp32 peak; the
"MFU vs fp32 peak" column is printed too. Results and the CPU findings: dev/notes_train.md.

    python -m dev.bench_train                                   # CPU defaults (the fastest found)
    python -m dev.bench_train --dtype fp32 --compile 0          # the plain eager fp32 baseline
    python -m dev.bench_train --variants fp32,bf16,fp32+compile,bf16+compile   # compare settings
"""
import argparse
import sys
import time

import torch

from nanochat.common import reuse_freed_memory
from nanochat.gpt import GPT, GPTConfig


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, reps=5):
    """Best FLOP/s of single large square matmuls (best of reps, over a couple of sizes)."""
    sizes = (4096, 8192) if device.type == "cuda" else (2048, 4096)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def config_kwargs(depth, seq_len, vocab_size):
    """The benches' model shape: width 64 x depth, heads of dim 128 (the dev/bench_*.py all use it)."""
    width = 64 * depth
    heads = max(1, width // 128)
    return dict(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=heads, n_kv_head=heads,
                n_embd=width)


def build_model(depth, seq_len, vocab_size, device):
    with torch.device("meta"):
        model = GPT(GPTConfig(**config_kwargs(depth, seq_len, vocab_size)))
    model.to_empty(device=device)
    model.init_weights()
    return model


def bench_one(depth, dtype, compile_, args, device):
    torch.manual_seed(0)
    model = build_model(depth, args.seq_len, args.vocab_size, device)
    optimizers = model.setup_optimizers()
    model.compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32  # the model enters autocast itself
    fwd = torch.compile(model, dynamic=False, mode=args.compile_mode) if compile_ else model
    g = torch.Generator().manual_seed(1)
    # a fixed set of micro-batches, reused every step: losses are comparable across variants
    data = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
            for _ in range(args.grad_accum)]

    def step():
        c0, t0 = time.process_time(), time.perf_counter()
        for batch in data:
            loss = fwd(batch[:, :-1], batch[:, 1:])
            (loss / args.grad_accum).backward()
        sync(device)
        t1 = time.perf_counter()
        for opt in optimizers.values():
            opt.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        # util: share of the cores this process got (other jobs on a shared machine slow it down)
        util = (time.process_time() - c0) / ((t2 - t0) * torch.get_num_threads())
        return dict(loss=loss.item(), step_s=t2 - t0, opt_s=t2 - t1, util=util)

    t0 = time.perf_counter()
    warm = [step() for _ in range(args.warmup)]  # the first step includes compilation
    warmup_s = time.perf_counter() - t0
    runs = [step() for _ in range(args.iters)]
    # best of N: contention only ever slows a step down, so the fastest step is the cleanest measurement
    best = min(runs, key=lambda r: r["step_s"])
    tokens = args.batch_size * args.seq_len * args.grad_accum
    return dict(params=model.num_params(), tok_s=tokens / best["step_s"], step_s=best["step_s"],
                flops=model.estimate_flops() * tokens / best["step_s"], opt_frac=best["opt_s"] / best["step_s"],
                first_loss=warm[0]["loss"], last_loss=runs[-1]["loss"], warmup_s=warmup_s,
                util=best["util"] if device.type == "cpu" else float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--depths", default="4,6,8")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (autocast). Default: the best for the device")
    p.add_argument("--compile", type=int, default=None, help="torch.compile the model. Default: best for device")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--variants", default=None, help="comma list of dtype[+compile], overrides --dtype/--compile")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=4)
    args = p.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # as the training stages run (compute_init)
        reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # Measured best on the 2-core dev CPU (AVX512_BF16), and the usual choice on GPUs. On a CPU without
    # native bf16, pass --dtype fp32 (see dev/notes_train.md).
    best_default = "bf16+compile"
    if args.variants:
        variants = args.variants.split(",")
    else:
        dtype = args.dtype or best_default.split("+")[0]
        compile_ = args.compile if args.compile is not None else int("compile" in best_default)
        variants = [dtype + ("+compile" if compile_ else "")]

    print(f"device={device} threads={torch.get_num_threads()} seq_len={args.seq_len} vocab={args.vocab_size} "
          f"batch={args.batch_size}x{args.grad_accum} (tokens/step {args.batch_size * args.seq_len * args.grad_accum})")
    # The peak is a property of the hardware: keep the best seen anywhere in the run (re-measured before
    # every row), so a busy moment never inflates MFU.
    peaks = {"fp32": 0.0, "bf16": 0.0}
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for v in variants:
            for k in peaks:
                peaks[k] = max(peaks[k], matmul_peak(device, torch.float32 if k == "fp32" else torch.bfloat16))
            r = bench_one(depth, v.split("+")[0], "compile" in v, args, device)
            rows.append((v, depth, r))
            print(f"  {v} depth {depth}: {r['tok_s']:.0f} tok/s (util {100 * r['util']:.0f}%)", file=sys.stderr)
    print(f"Timings: fastest of {args.iters} steps (util = CPU time / (wall x threads) of that step: other jobs "
          f"on the machine lower it). Peaks: best single square matmul in the run: fp32 {peaks['fp32'] / 1e9:.0f}, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s. MFU = achieved / peak of the dtype the matmuls run in.")
    header = ("| variant | depth | params | tok/s | step s | opt % | GFLOP/s | MFU | MFU vs fp32 peak "
              "| loss@1 | loss@end | warmup s | util |")
    print(header)
    print("|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for v, depth, r in rows:
        own = peaks[v.split("+")[0]]
        print(f"| {v} | {depth} | {r['params'] / 1e6:.1f}M | {r['tok_s']:.0f} | {r['step_s']:.2f} | "
              f"{100 * r['opt_frac']:.0f}% | {r['flops'] / 1e9:.1f} | {100 * r['flops'] / own:.0f}% | "
              f"{100 * r['flops'] / peaks['fp32']:.0f}% | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
              f"{r['warmup_s']:.1f} | {100 * r['util']:.0f}% |")


if __name__ == "__main__":
    main()
