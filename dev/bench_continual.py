"""Benchmarks for continual learning (numbers go to dev/notes_continual.md, never into tests).

    python -m dev.bench_continual lora  [-i sft]
        adapter mechanics on a real checkpoint: trainable parameters and bytes per adapter, activate /
        deactivate / switch (hooks) and switch-with-merge latency, merge/unmerge exactness, save and load
        time, base-hash time, and the forward-pass overhead of an active (unmerged) adapter.

    python -m dev.bench_continual sweep --strategy ewc --sweep ewc_lambda=1e4,1e5,1e6 [-i sft] [--steps 40]
        naive once, then the strategy once per value: forgetting, the cut relative to naive, new-task
        performance (LA) and time, on the default LM sequence (or --sequence).

Use OMP_NUM_THREADS=1 on a machine that other jobs keep busy: two OpenMP threads that share two
busy cores stall at every barrier and a d4 step gets several times slower.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from nanochat.common import compute_init, resolve_dtype
from nanochat.continual import ContinualConfig, evaluate_tasks, run_strategy


def _ms(fn, repeat=20):
    """Median wall time of fn() in milliseconds."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_lora(args, device):
    from nanochat.checkpoint_manager import load_model
    from nanochat.lora import LoRA, load_adapter, model_state_hash, save_adapter
    if args.random_depth > 0:  # a larger model than the CPU profile trains, with random weights (timings only)
        from nanochat.gpt import GPT
        from scripts.base_train import model_config
        with torch.device(device):
            model = GPT(model_config(args.random_depth, 2048, 65536))
        model.eval()
        what = "random"
    else:
        model, _, _ = load_model(args.source, device, "eval", model_tag=args.model_tag)
        what = args.source
    c = model.config
    print(f"model: {what} d{c.n_layer} n_embd {c.n_embd}, {model.num_params():,} parameters, device {device}")
    t0 = time.perf_counter()
    lora = LoRA(model)
    t_attach = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_state_hash(model)
    t_hash = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    names = []
    for r in (4, 8, 16):
        name = f"r{r}"
        ad = lora.add(name, rank=r, alpha=2 * r)
        with torch.no_grad():
            for b in ad.B:
                b.copy_(torch.randn(b.shape, generator=g).to(b) * 0.01)
        names.append(name)
        print(f"adapter rank {r:2d}: {ad.num_params():>9,} trainable parameters ({100 * ad.num_params() / model.num_params():.2f}% "
              f"of the model), {ad.num_bytes():>10,} bytes fp32")
    x = torch.randint(0, c.vocab_size, (4, min(256, c.sequence_len)), device=device)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        t_base = _ms(lambda: model(x), 5)
        lora.activate("r8")
        t_hooked = _ms(lambda: model(x), 5)
        lora.merge()
        t_merged = _ms(lambda: model(x), 5)
        lora.unmerge()
    diff = max((v - base_state[k]).abs().max().item() for k, v in model.state_dict().items())
    i = [0]

    def switch():
        i[0] += 1
        lora.activate(names[i[0] % 3])

    def switch_merged():
        i[0] += 1
        lora.activate(names[i[0] % 3], merge=True)
    t_switch = _ms(switch, 200)
    t_switch_merge = _ms(switch_merged, 20)
    lora.deactivate()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_adapter(lora, "r8", os.path.join(d, "r8"))
        t_save = time.perf_counter() - t0
        lora.remove("r8")
        t0 = time.perf_counter()
        load_adapter(lora, os.path.join(d, "r8"))
        t_load = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, "r8", f)) for f in os.listdir(os.path.join(d, "r8")))
    print(f"attach (hooks + base hash): {t_attach * 1e3:.0f} ms | base hash alone: {t_hash * 1e3:.0f} ms")
    print(f"switch adapter (hooks): {t_switch:.4f} ms | switch with merge (unmerge + merge): {t_switch_merge:.2f} ms "
          f"(target < 50 ms)")
    print(f"unmerge restores the base: max abs diff {diff:.1e}")
    print(f"forward 4x{x.size(1)} tokens: base {t_base:.1f} ms | adapter active (hooks) {t_hooked:.1f} ms "
          f"(+{100 * (t_hooked / t_base - 1):.0f}%) | merged {t_merged:.1f} ms")
    print(f"save rank-8 adapter: {t_save * 1e3:.0f} ms ({size:,} bytes on disk) | load: {t_load * 1e3:.0f} ms")


def _cast(current, text):
    """A command-line string as the type of the config field it overrides."""
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(float(text))
    return type(current)(text)


def bench_sweep(args, device):
    from nanochat.checkpoint_manager import load_model
    from tasks.continual import build_sequence, load_sequence_spec
    model, tok, _ = load_model(args.source, device, "train", model_tag=args.model_tag)
    spec = load_sequence_spec(args.sequence)
    base_cfg = ContinualConfig(steps=args.steps, batch_size=args.batch_size, log_every=10**9)
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=", 1)
        setattr(base_cfg, k, _cast(getattr(base_cfg, k), v))
    param, values = args.sweep.split("=", 1)
    values = [_cast(getattr(base_cfg, param), v) for v in values.split(",")]
    dtype = resolve_dtype("auto", device.type)
    tasks = build_sequence(spec, tok, args.seq_len, base_cfg.steps * base_cfg.batch_size, n_eval_rows=args.eval_rows,
                           dtype=dtype)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = evaluate_tasks(model, tasks)
    naive = run_strategy(model, tok, tasks, "naive", base_cfg, base=base, dtype=dtype)["matrices"]["naive"]
    print(f"\nnaive: forgetting {naive['forgetting']:.4f} | LA {naive['LA']:.4f} | ACC {naive['ACC']:.4f}")
    rows = []
    for v in values:
        cfg = ContinualConfig(**{**vars(base_cfg), param: v})
        model.load_state_dict(initial)
        r = run_strategy(model, tok, tasks, args.strategy, cfg, base=base, dtype=dtype)
        m = r["matrices"][args.strategy]
        rows.append((v, m["forgetting"], 100 * (1 - m["forgetting"] / naive["forgetting"]), m["LA"],
                     m["LA"] - naive["LA"], m["ACC"], r["wall_seconds"]))
    print(f"\n{args.strategy}, sweeping {param} ({tasks[0].metric}; naive forgetting {naive['forgetting']:.4f}, "
          f"LA {naive['LA']:.4f})")
    print(f"| {param} | forgetting | cut vs naive % | LA | LA vs naive | ACC | wall s |")
    print("|---|---|---|---|---|---|---|")
    for v, f, cut, la, dla, acc, wall in rows:
        print(f"| {v:g} | {f:.4f} | {cut:.0f} | {la:.4f} | {dla:+.4f} | {acc:.4f} | {wall:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["lora", "sweep"])
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"])
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("--device-type", default="")
    p.add_argument("--sequence", default="lm-domains")
    p.add_argument("--strategy", default="ewc")
    p.add_argument("--sweep", default="ewc_lambda=1e4,1e5,1e6", help="param=v1,v2,... (a ContinualConfig field)")
    p.add_argument("--set", default="", help="other ContinualConfig overrides: k=v,k=v")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--random-depth", type=int, default=0, help="lora: time a random model of this depth instead")
    args = p.parse_args()
    _, _, _, _, device = compute_init(args.device_type or None)
    bench_lora(args, device) if args.what == "lora" else bench_sweep(args, device)


if __name__ == "__main__":
    main()
