"""Benchmarks for continual learning (numbers go to dev/notes_continual.md, never into tests).

    python -m dev.bench_continual lora  [-i sft]
        adapter mechanics on a real checkpoint: trainable parameters and bytes per adapter, activate /
        deactivate / switch (hooks) and switch-with-merge latency, merge/unmerge exactness, save and load
        time, base-hash time, and the forward-pass overhead of an active (unmerged) adapter.

    python -m dev.bench_continual sweep --strategy ewc --sweep ewc_lambda=1e4,1e5,1e6 [-i sft] [--steps 40]
        naive once, then the strategy once per value: forgetting, the cut relative to naive, new-task
        performance (LA) and time, on the default LM sequence (or --sequence, or --synthetic N as table).

    python -m dev.bench_continual table [--synthetic 4 | -i sft --sequence lm-domains] [--steps 40]
        every strategy (naive, replay, ewc, lora + router, ssr, merge, olora) on one sequence: ACC, LA,
        BWT, forgetting, the cut relative to naive, added bytes, wall time. --synthetic N builds N text
        domains with disjoint letter sets and a small model pretrained on all of them in-process (no
        checkpoint needed); otherwise the -i checkpoint and --sequence are used.

    python -m dev.bench_continual stack [--random-depth 4]
        serving cost of adapter stacks: forward tokens/s with 0, 1, 2 and 5 rank-8 adapters active through
        the hooks, the 5 served as the scheduler serves them (per_row, folded) and merged, on a
        prefill-shaped (4x256) and decode-shaped (16x1, 1x1) forwards.

    python -m dev.bench_continual quant [--depth 2]
        int8 weight-only bases (nanochat/lora/quant.py: blocks only, and blocks + embedding + lm_head) and 4-bit
        ones (every matrix; --int4-formats nf4,int4 x --int4-groups 32,64) vs the fp32 base: weight memory
        (vs fp32 and bf16), forward tokens/s, and the new-task bpb of the same adapter (same seed, data,
        steps) trained on each base.

Use OMP_NUM_THREADS=1 on a machine that other jobs keep busy: two OpenMP threads that share two
busy cores stall at every barrier and a d4 step gets several times slower.
"""
import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from nanochat.common import compute_dtype, compute_init
from nanochat.continual.loop import STRATEGIES, ContinualConfig, evaluate_tasks, run_strategy, train_loop


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
    from nanochat.lora.adapter import LoRA, model_state_hash
    from nanochat.lora.storage import load_adapter, save_adapter
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
    tok, tasks, model, _ = _setup(args, device)
    base_cfg = ContinualConfig(steps=args.steps, batch_size=args.batch_size, log_every=10**9)
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=", 1)
        setattr(base_cfg, k, _cast(getattr(base_cfg, k), v))
    param, values = args.sweep.split("=", 1)
    values = [_cast(getattr(base_cfg, param), v) for v in values.split(",")]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = evaluate_tasks(model, tasks)
    naive = run_strategy(model, tok, tasks, "naive", base_cfg, base=base)["matrices"]["naive"]
    print(f"\nnaive: forgetting {naive['forgetting']:.4f} | LA {naive['LA']:.4f} | ACC {naive['ACC']:.4f}")
    rows = []
    for v in values:
        cfg = ContinualConfig(**{**vars(base_cfg), param: v})
        model.load_state_dict(initial)
        r = run_strategy(model, tok, tasks, args.strategy, cfg, base=base)
        m = r["matrices"][args.strategy]
        rows.append((v, m["forgetting"], 100 * (1 - m["forgetting"] / naive["forgetting"]), m["LA"],
                     m["LA"] - naive["LA"], m["ACC"], m["BWT"], r["added_bytes"], r["wall_seconds"]))
    print(f"\n{args.strategy}, sweeping {param} ({tasks[0].metric}; naive forgetting {naive['forgetting']:.4f}, "
          f"LA {naive['LA']:.4f}, ACC {naive['ACC']:.4f}, BWT {naive['BWT']:+.4f})")
    print(f"| {param} | forgetting | cut vs naive % | LA | LA vs naive | ACC | BWT | added bytes | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, f, cut, la, dla, acc, bwt, added, wall in rows:
        print(f"| {v} | {f:.4f} | {cut:.0f} | {la:.4f} | {dla:+.4f} | {acc:.4f} | {bwt:+.4f} | {added:,} | {wall:.0f} |")


# ---------------------------------------------------------------------------------------------
# a self-contained setup: synthetic text domains and a small model that saw a little of each

def synthetic_docs(k, n, n_docs, seed):
    """Documents of domain k of n: words over its own letters, its own separator and ending."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    own = letters[k::n]
    vocab_rng, rng = random.Random(f"{k}/{n}"), random.Random(seed)
    vocab = ["".join(vocab_rng.choice(own) for _ in range(vocab_rng.randint(2, 6))) for _ in range(32)]
    sep, end = " -_/=+~:"[k % 8], ".!?;,*#@"[k % 8]
    return [sep.join(rng.choice(vocab) for _ in range(120)) + end for _ in range(n_docs)]


def synthetic_setup(n_domains, depth, seq_len, n_train, n_eval, pretrain_steps, device):
    """(tokenizer, tasks, model): byte-level domains; the model is pretrained briefly on all of them."""
    from nanochat.continual.strategies import Strategy
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    from tasks.continual import LMTask
    tok = Tokenizer.byte_level()
    tasks = []
    for k in range(n_domains):
        docs = synthetic_docs(k, n_domains, 40, seed=k)
        tasks.append(LMTask(f"dom{k}", tok, docs[:32], docs[32:], seq_len, n_train, n_eval, batch_size=16))
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(sequence_len=2 * seq_len, vocab_size=tok.get_vocab_size(), n_layer=depth, n_head=2,
                              n_kv_head=2, n_embd=64 * depth))
    model.compute_dtype = compute_dtype(device.type)
    rows = [r for t in tasks for r in t.train_rows[:n_train // 4]]
    cfg = ContinualConfig(steps=pretrain_steps, batch_size=16, lr=3e-3, log_every=10**9)
    train_loop(model, rows, Strategy(model, tok, cfg, []))
    return tok, tasks, model


def _setup(args, device):
    """(tokenizer, tasks, model, description): the synthetic domains and model (--synthetic N), else the
    -i checkpoint and --sequence."""
    if args.synthetic:
        tok, tasks, model = synthetic_setup(args.synthetic, args.depth, args.seq_len, args.steps * args.batch_size,
                                            args.eval_rows, args.pretrain_steps, device)
        return tok, tasks, model, (f"synthetic {args.synthetic} domains, d{args.depth} byte-level model pretrained "
                                   f"{args.pretrain_steps} steps")
    from nanochat.checkpoint_manager import load_model
    from tasks.continual import build_sequence, load_sequence_spec
    model, tok, _ = load_model(args.source, device, "train", model_tag=args.model_tag)
    tasks = build_sequence(load_sequence_spec(args.sequence), tok, args.seq_len, args.steps * args.batch_size,
                           n_eval_rows=args.eval_rows)
    return tok, tasks, model, f"{args.source} checkpoint, sequence {args.sequence}"


def bench_table(args, device):
    tok, tasks, model, what = _setup(args, device)
    cfg = ContinualConfig(steps=args.steps, batch_size=args.batch_size, log_every=10**9)
    for kv in filter(None, args.set.split(",")):
        k, v = kv.split("=", 1)
        setattr(cfg, k, _cast(getattr(cfg, k), v))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = evaluate_tasks(model, tasks)
    rows = []
    for strategy in args.strategies.split(","):
        model.load_state_dict(initial)
        r = run_strategy(model, tok, tasks, strategy, cfg, base=base)
        for name, m in r["matrices"].items():
            rows.append((name, m, r["added_bytes"], r["wall_seconds"]))
    naive = next((m for name, m, _, _ in rows if name == "naive"), None)
    print(f"\n{what}; {len(tasks)} tasks, {args.steps} steps x {args.batch_size} rows x {args.seq_len} tokens per task "
          f"({tasks[0].metric}, lower is better)")
    print("| strategy | ACC | LA | BWT | forgetting | cut vs naive | added bytes | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, added, wall in rows:
        cut = f"{100 * (1 - m['forgetting'] / naive['forgetting']):.0f}%" if naive and name != "naive" else "-"
        print(f"| {name} | {m['ACC']:.4f} | {m['LA']:.4f} | {m['BWT']:+.4f} | {m['forgetting']:.4f} | {cut} | "
              f"{added:,} | {wall:.0f} |")


def _random_model(depth, device, seq_len=256):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=4096, n_layer=depth, n_head=max(1, depth // 2),
                              n_kv_head=max(1, depth // 2), n_embd=64 * depth))
    model.eval()
    return model


def _tok_per_sec(model, x, repeat):
    """Forward tokens/s from the fastest of `repeat` passes: on a machine other jobs share, the minimum is
    the least disturbed measurement."""
    with torch.no_grad():
        model(x)  # warm up
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return x.numel() / best


def bench_stack(args, device):
    from contextlib import nullcontext
    from nanochat.lora.adapter import LoRA
    model = _random_model(args.random_depth or 4, device)
    V = model.config.vocab_size
    # a prefill-like forward (4 prompts x 256 tokens) and decode-like ones (16 rows and 1 row x 1 token, timed
    # 20x in a row: one such forward is too short to time alone)
    shapes = [("prefill 4x256", torch.randint(0, V, (4, 256), device=device), 1),
              ("decode 16x1", torch.randint(0, V, (16, 1), device=device), 20),
              ("decode 1x1", torch.randint(0, V, (1, 1), device=device), 20)]
    lora = LoRA(model)
    names = [f"a{k}" for k in range(5)]
    for k, n in enumerate(names):
        lora.add(n, rank=8, alpha=16, seed=k)
    five = tuple((lora.adapters[n], 1.0) for n in names)
    print(f"model d{model.config.n_layer} n_embd {model.config.n_embd}, {model.num_params():,} parameters, "
          f"rank-8 adapters on all six block matrices, device {device}, {torch.get_num_threads()} threads, "
          f"{'CPU' if device.type == 'cpu' else 'wall'} time, {args.repeat} interleaved rounds")
    # (label, stack to activate, merge, per_row: every row's stack for the scheduler's path, else None)
    configs = [(f"{k}", names[:k] or None, False, None) for k in (0, 1, 2, 5)] + [
        ("5, served as the scheduler does (per_row: folded)", None, False, five),
        ("5, merged into the weights", names, True, None)]
    times = [[[] for _ in configs] for _ in shapes]
    # on a CPU, this process's CPU time: what other jobs on a shared machine disturb least (run with
    # OMP_NUM_THREADS=1); on a GPU, wall time after a synchronize
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(args.repeat):  # round-robin, so that load from other jobs hits every setting alike
            for c, (_, stack, merge, rows) in enumerate(configs):
                lora.activate(stack, merge=merge)
                for s, (_, x, inner) in enumerate(shapes):
                    ctx = (lambda: lora.per_row([rows] * x.size(0))) if rows else nullcontext
                    for _ in range(lora.fold_after):  # packs and folds are built once, not timed: serving reuses them
                        with ctx():
                            model(x)
                    sync()
                    t0 = clock()
                    for _ in range(inner):
                        with ctx():
                            model(x)
                    sync()
                    times[s][c].append((clock() - t0) / inner)
    print("| active adapters | " + " | ".join(f"{label} tokens/s | vs base" for label, _, _ in shapes) + " |")
    print("|---|" + "---|---|" * len(shapes))
    for c, (label, *_) in enumerate(configs):
        # tokens/s from the fastest round; the change from the median of the per-round ratios to the base,
        # which a load that comes and goes disturbs less than a ratio of two minima
        cells = [f"{x.numel() / min(times[s][c]):,.0f} | "
                 f"{100 * (statistics.median(b / t for b, t in zip(times[s][0], times[s][c])) - 1):+.1f}%"
                 for s, (_, x, _) in enumerate(shapes)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    folded = sum(w.numel() * w.element_size() for w in lora._fold[2].values())
    lora._fold, lora._fold_seen, lora.fold_after = None, (None, 0), 1
    t0 = time.perf_counter()
    with torch.no_grad():
        assert lora._folded_weights(five) is not None
    fold_ms = 1000 * (time.perf_counter() - t0)
    print(f"folding the 5-stack (once, after {lora.fold_after} forwards with it on every row): "
          f"{fold_ms:.1f} ms and {folded / 2**20:.1f} MiB for the folded copy of the target weights")


def bench_quant(args, device):
    from functools import partial

    from nanochat.gpt import GPT
    from nanochat.lora.adapter import LoRA
    from nanochat.continual.adapter_train import AdapterRecipe
    from nanochat.lora.quant import quantize_base, quantize_blocks, weight_bytes
    from tasks.continual import LMTask
    quantizers = {"int8 blocks": quantize_blocks, "int8 all": quantize_base}
    for fmt, group in ((f, int(g)) for f in args.int4_formats.split(",") for g in args.int4_groups.split(",")):
        quantizers[f"{fmt} g{group} all"] = partial(quantize_base, bits=4, fmt=fmt, group_size=group)
    # speed and memory on random models of --random-depth (fresh from one seed each, so all hold the same
    # weights), timed round-robin so that load from other jobs hits every base alike
    bases = {"fp32": _random_model(args.random_depth or 4, device)}
    for kind, quantize in quantizers.items():
        bases[kind] = _random_model(args.random_depth or 4, device)
        quantize(bases[kind])
    cfg0 = bases["fp32"].config
    x = torch.randint(0, cfg0.vocab_size, (4, 256), device=device)
    best = {k: float("inf") for k in bases}
    with torch.no_grad():
        for m in bases.values():
            m(x)  # warm up
        for _ in range(args.repeat):
            for kind, m in bases.items():
                t0 = time.perf_counter()
                m(x)
                best[kind] = min(best[kind], time.perf_counter() - t0)
    # weight matrices: every module but the model itself and its plain containers (the rotary buffers are not weights)
    def matrices(m):
        return weight_bytes(m) - sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    fp_total = matrices(bases["fp32"])
    print(f"random d{cfg0.n_layer} model (n_embd {cfg0.n_embd}, vocab {cfg0.vocab_size}), forward of 4x256 tokens, "
          f"device {device}, best of {args.repeat}")
    print("| base | weight matrices (bytes) | fp32 / this | bf16 / this | tokens/s |")
    print("|---|---|---|---|---|")
    for kind, m in bases.items():
        total = matrices(m)
        print(f"| {kind} | {total:,} | {fp_total / total:.2f}x | {fp_total / 2 / total:.2f}x | "
              f"{x.numel() / best[kind]:,.0f} ({100 * (best['fp32'] / best[kind] - 1):+.0f}%) |")
    # the same at the speedrun's size, from shapes only (a meta-device model allocates nothing)
    from scripts.base_train import model_config
    with torch.device("meta"):
        big = GPT(model_config(20, 2048, 65536))
    mats = [m.weight for m in big.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    blocks = [m.weight for m in big.transformer.h.modules() if isinstance(m, torch.nn.Linear)]
    n_all, rows_all = sum(w.numel() for w in mats), sum(w.size(0) for w in mats)
    n_blocks, rows_blocks = sum(w.numel() for w in blocks), sum(w.size(0) for w in blocks)
    for name, b in (("fp32", 4), ("bf16", 2)):  # int8 + one fp32 scale per row; the rest stays in the base's dtype
        full = b * n_all
        q_blocks = n_blocks + 4 * rows_blocks + b * (n_all - n_blocks)
        q_all = n_all + 4 * rows_all
        # 4-bit: half a byte per weight, one fp16 scale per group, 16 fp32 levels per matrix
        q4 = {g: n_all // 2 + 2 * n_all // g + 64 * len(mats) for g in (32, 64, 128)}
        print(f"d20 (n_embd 1280, vocab 65536), weight matrices only, {name} base: {full / 2**20:,.0f} MiB; int8 blocks "
              f"{q_blocks / 2**20:,.0f} MiB ({full / q_blocks:.2f}x less); int8 all {q_all / 2**20:,.0f} MiB "
              f"({full / q_all:.3f}x less); "
              + "; ".join(f"4-bit g{g} all {q / 2**20:,.0f} MiB ({full / q:.2f}x less)" for g, q in q4.items()))

    # one new domain, learned as an adapter on each base with the same seed, data and steps
    n = args.synthetic or 4
    tok, tasks, model = synthetic_setup(n, args.depth, args.seq_len, args.steps * args.batch_size, args.eval_rows,
                                        args.pretrain_steps, device)
    new_docs = synthetic_docs(n, n + 1, 40, seed=99)  # a letter set none of the pretraining domains used alone
    new = LMTask("new", tok, new_docs[:32], new_docs[32:], args.seq_len, args.steps * args.batch_size, args.eval_rows,
                 batch_size=16)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = ContinualConfig(steps=args.steps, batch_size=args.batch_size, log_every=10**9)
    print(f"\nadapter (rank {cfg.lora_rank}, lr {cfg.lora_lr}, {args.steps} steps) on a new domain, d{args.depth} "
          f"synthetic model (bpb on held-out text of the new domain; 'old domains': the base alone on the {n} "
          f"domains it was pretrained on, mean bpb - what quantizing cost before any adapter)")
    print("| base | old domains | before | after | adapter train s |")
    print("|---|---|---|---|---|")
    results, befores, olds = {}, {}, {}
    for kind in ("fp32", *quantizers):
        with torch.device(device):
            model = GPT(model.config)
        model.compute_dtype = compute_dtype(device.type)
        model.load_state_dict(state)
        if kind in quantizers:
            quantizers[kind](model)
        lora = LoRA(model)
        ad = lora.add("new", rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=0)
        lora.activate("new")
        olds[kind] = statistics.mean(evaluate_tasks(model, tasks))
        before = befores[kind] = new.evaluate(model)
        t0 = time.perf_counter()
        train_loop(model, new.train_rows, AdapterRecipe(model, tok, cfg, ad, []), seed=0)
        seconds = time.perf_counter() - t0
        results[kind] = new.evaluate(model)
        print(f"| {kind} | {olds[kind]:.4f} | {before:.4f} | {results[kind]:.4f} | {seconds:.1f} |")
    for kind in quantizers:
        print(f"{kind}: adapter bpb vs fp32 {100 * (results[kind] / results['fp32'] - 1):+.2f}%, "
              f"before training {100 * (befores[kind] / befores['fp32'] - 1):+.2f}%, "
              f"old domains {100 * (olds[kind] / olds['fp32'] - 1):+.2f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["lora", "sweep", "table", "stack", "quant"])
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
    p.add_argument("--random-depth", type=int, default=0, help="lora/stack/quant: time a random model of this depth")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="table: which strategies")
    p.add_argument("--synthetic", type=int, default=0, help="table/sweep/quant: N synthetic domains and an in-process model")
    p.add_argument("--depth", type=int, default=2, help="synthetic model depth (n_embd = 64 x depth)")
    p.add_argument("--pretrain-steps", type=int, default=150, help="synthetic model: steps on all domains first")
    p.add_argument("--repeat", type=int, default=10, help="stack/quant: forward passes timed (median)")
    p.add_argument("--int4-formats", default="nf4,int4", help="quant: 4-bit level sets to compare (nf4, int4)")
    p.add_argument("--int4-groups", default="32,64", help="quant: 4-bit group sizes to compare")
    args = p.parse_args()
    _, _, _, _, device = compute_init(args.device_type or None)
    {"lora": bench_lora, "sweep": bench_sweep, "table": bench_table, "stack": bench_stack,
     "quant": bench_quant}[args.what](args, device)


if __name__ == "__main__":
    main()
