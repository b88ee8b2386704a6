"""The race: our base_train against a nanochat checkout's, each trained by its own training code on the same
documents for the same wall-clock budget at the same depth, sequence length and batch, then scored on the same
held-out bytes the same way (bits per byte, dev/race_score.py). A benchmark, not a test.

    python -m dev.bench_race --ref /work/ref --depth 4 --minutes 10 --sides ours ref ref-bf16
    python -m dev.bench_race --ref /work/ref --depth 2 --minutes 2 \\
        --sides ours "ours --model-options value_embeds=1" "ours --model-options smear=1,backout=1"

A side is a quoted string: its kind, then extra flags for its training script.
    ours       this checkout's scripts.base_train with its CPU defaults (dtype and compile auto)
    ref        the --ref checkout's scripts.base_train with its CPU defaults (fp32 on CPU, always compiled)
    ref-bf16   the same, told NANOCHAT_DTYPE=bfloat16
e.g. "ours --model-options value_embeds=1,window_pattern=SSSL" or "ref --window-pattern L".

What happens:
1. Data (once per --work dir): the offline corpus ($NANOCHAT_BASE_DIR/base_data, `python -m nanochat.offline`)
   is cut into documents of at most --doc-chars characters; its last shard gives the held-out documents (the
   first --val-bytes of them), everything else trains. The same shards are linked into each checkout's layout
   (ours: base_data/, nanochat master: base_data_climbmix/), the last one its validation shard.
2. Each checkout trains its own tokenizer (its tok_train, same text, same vocabulary size); the table says
   whether the two tokenize the held-out text identically.
3. Each side, one after another, never side by side (with --steps N: N steps each, no calibration): a
   calibration run of --calib-steps steps measures its step
   time; the real run then gets budget / step time steps (both scripts fix their LR schedule from the step
   count, so the horizon must be known up front). Its training time is the sum of the step times its own log
   prints, the first 3 steps (compilation) counted at the median step time instead; the table shows it, so a
   side that ran over or under its budget on a noisy machine is visible. A run that misses its budget by more
   than --time-tolerance is run again with the step time it just measured (at most --retries times).
4. Each final model is scored by dev/race_score.py through its own code, in fp32, on the same held-out text.

Runs write under --work (default $NANOCHAT_BASE_DIR/race): shared shards, one base dir per checkout, the logs
of every run, and results_<time>.json beside the printed table.
"""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir
from nanochat.dataset import list_parquet_files
from nanochat.offline.cleaning import split_long

OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"ours": "base_data", "ref": "base_data_climbmix", "ref-bf16": "base_data_climbmix"}
COMPILE_STEPS = 3  # steps whose time is mostly compilation: charged at the median step time
STEP_RE = re.compile(r"^step (\d+)/\d+ .*?\| dt:? ([\d.]+)ms", re.M)
DOCS_PER_SHARD = 20_000


def log(msg):
    print(f"[race {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# data and tokenizers


def cut_docs(paths, doc_chars):
    for path in paths:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            yield from split_long(text, doc_chars)


def write_shard(path, docs):
    pq.write_table(pa.table({"text": docs}), path + ".tmp", row_group_size=1024)
    os.replace(path + ".tmp", path)


def prepare_data(work, corpus, doc_chars, val_bytes):
    """Shards of <= doc_chars documents under work/data (the last one held out) and work/heldout.json."""
    data = os.path.join(work, "data")
    settings = {"corpus": corpus, "doc_chars": doc_chars, "val_bytes": val_bytes}
    stamp = os.path.join(data, "_READY")
    if os.path.exists(stamp) and json.load(open(stamp)) == settings:
        return data
    shards = list_parquet_files(corpus)
    if len(shards) < 2:
        raise SystemExit(f"no offline corpus in {corpus} (need >= 2 shards): "
                         "build it with `python -m nanochat.offline`")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    n, buf = 0, []
    for doc in cut_docs(shards[:-1], doc_chars):
        buf.append(doc)
        if len(buf) == DOCS_PER_SHARD:
            write_shard(os.path.join(data, f"shard_{n:05d}.parquet"), buf)
            n, buf = n + 1, []
    if buf:
        write_shard(os.path.join(data, f"shard_{n:05d}.parquet"), buf)
        n += 1
    held, size = [], 0
    for doc in cut_docs(shards[-1:], doc_chars):
        if size >= val_bytes:
            break
        held.append(doc)
        size += len(doc.encode("utf-8"))
    write_shard(os.path.join(data, f"shard_{n:05d}.parquet"), held)  # the validation shard of both sides
    with open(os.path.join(work, "heldout.json"), "w") as f:
        json.dump(held, f)
    with open(stamp, "w") as f:
        json.dump(settings, f)
    log(f"data: {n} training shards, {len(held)} held-out documents ({size:,} bytes)")
    return data


def side_env(base, kind):
    """The environment of a side's processes: its base dir and the numerics its kind asks for."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_DTYPE", "PYTHONPATH")}
    env["NANOCHAT_BASE_DIR"] = base
    if kind == "ref-bf16":
        env["NANOCHAT_DTYPE"] = "bfloat16"
    return env


LAUNCHER = '''"""Run a module of the checkout in the working directory as __main__ (the race's launcher for the
reference).
Our checkout is installed in this interpreter, so its paths come off sys.path first: its `scripts` is a regular
package and would win over the checkout's namespace package of the same name. This directory stays on the path
for its stub `wandb` (the reference imports wandb at the top of base_train; the race never logs to it)."""
import os
import runpy
import sys

ours, module = os.path.abspath(sys.argv[1]), sys.argv[2]
sys.path[:] = [os.getcwd()] + [p for p in sys.path if p and os.path.abspath(p) != ours]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def make_shim(work):
    """work/shim: the launcher and a stub wandb module."""
    shim = os.path.join(work, "shim")
    os.makedirs(os.path.join(shim, "wandb"), exist_ok=True)
    with open(os.path.join(shim, "wandb", "__init__.py"), "w") as f:
        f.write('"""Stub for the race: runs are never logged to wandb."""\n\n\ndef init(*args, **kwargs):\n'
                '    raise RuntimeError("the race runs without wandb: pass --run dummy")\n')
    with open(os.path.join(shim, "run_module.py"), "w") as f:
        f.write(LAUNCHER)
    return shim


def module_cmd(kind, module, args, shim):
    """The command line that runs `module` of the side's checkout (the working directory of the run)."""
    if kind == "ours":
        return [args.python, "-m", module]
    return [args.python, os.path.join(shim, "run_module.py"), OURS, module]


def prepare_base(work, kind, code, data, args, shim):
    """The checkout's base dir: the race shards linked into its layout, and its own tokenizer trained once."""
    base = os.path.join(work, "base_ours" if kind == "ours" else "base_ref")
    layout = os.path.join(base, KINDS[kind])
    os.makedirs(layout, exist_ok=True)
    for name in os.listdir(layout):  # links of an earlier data build may not all exist now
        os.unlink(os.path.join(layout, name))
    for path in sorted(glob.glob(os.path.join(data, "shard_*.parquet"))):
        os.symlink(path, os.path.join(layout, os.path.basename(path)))
    if not os.path.exists(os.path.join(base, "tokenizer", "tokenizer.pkl")):
        log(f"training the tokenizer of {code} (vocab {args.vocab_size}, {args.tok_chars:,} chars)")
        cmd = module_cmd(kind, "scripts.tok_train", args, shim) + ["--vocab-size", str(args.vocab_size),
                                                                   "--max-chars", str(args.tok_chars)]
        run_logged(cmd, code, side_env(base, kind), os.path.join(base, "tok_train.log"), timeout=3600)
    return base


# ------------------------------------------------------------------------------------------------
# runs


def run_logged(cmd, cwd, env, log_path, timeout):
    """Run cmd to the end with its output in log_path; raise with the log's tail when it fails."""
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    text = open(log_path).read()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (exit {r.returncode}) in {cwd}; "
                           f"log {log_path}:\n{text[-3000:]}")
    return text


def train_flags(kind, args):
    B = args.batch_tokens // args.seq_len
    if B * args.seq_len != args.batch_tokens:
        raise SystemExit(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq-len {args.seq_len}")
    flags = ["--run", "dummy", "--depth", str(args.depth), "--max-seq-len", str(args.seq_len),
             "--device-batch-size", str(B), "--total-batch-size", str(args.batch_tokens),
             "--eval-every", "-1", "--sample-every", "-1"]
    if kind == "ours":
        return flags + ["--eval-tokens", str(args.batch_tokens)]  # (it evaluates once at the end: one batch)
    return flags + ["--core-metric-every", "-1"]


def step_times(text):
    """{step: seconds} from a training log (both scripts print `step N/M ... dt[:] X ms`)."""
    return {int(s): float(ms) / 1000 for s, ms in STEP_RE.findall(text)}


def numerics(kind, text):
    if kind == "ours":
        m = re.search(r"dtype: (\w+) \| compile: (\w+)", text)
        return (m.group(1), m.group(2)) if m else ("?", "?")
    m = re.search(r"COMPUTE_DTYPE: torch\.(\w+)", text)
    return (m.group(1) if m else "?"), "True (always)"


def train_time(times):
    """Sum of step times, the compilation steps counted at the median step time."""
    later = [t for s, t in times.items() if s >= COMPILE_STEPS]
    med = statistics.median(later) if later else max(times.values())
    return sum(later) + med * min(COMPILE_STEPS, len(times)), med


def run_side(spec, args, work, data, shim):
    kind, *extra = spec.split()
    if kind not in KINDS:
        raise SystemExit(f"unknown side {spec!r}: a side starts with one of {', '.join(KINDS)}")
    code = OURS if kind == "ours" else os.path.abspath(args.ref)
    base = prepare_base(work, kind, code, data, args, shim)
    env = side_env(base, kind)
    tag = "race_" + re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")[:80]
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    flags = train_flags(kind, args) + extra
    budget = args.minutes * 60

    def train(steps, suffix):
        cmd = module_cmd(kind, "scripts.base_train", args, shim) + [*flags, "--num-iterations", str(steps),
                                                                    "--model-tag", tag + suffix]
        return run_logged(cmd, code, env, os.path.join(logs, f"{tag}{suffix}.log"), timeout=3 * budget + 1800)

    if args.steps:
        steps = args.steps
    else:
        log(f"{spec}: calibrating ({args.calib_steps} steps)")
        _, step_s = train_time(step_times(train(args.calib_steps, "_calib")))
        shutil.rmtree(os.path.join(base, "base_checkpoints", tag + "_calib"), ignore_errors=True)
        steps = max(COMPILE_STEPS + 1, int(budget / step_s))
        log(f"{spec}: {step_s * 1000:.0f} ms/step -> {steps} steps for {args.minutes} min")
    for attempt in range(1 + (0 if args.steps else args.retries)):
        load = os.getloadavg()[0]
        log(f"{spec}: training {steps} steps (load {load:.2f})")
        t0 = time.time()
        text = train(steps, "")
        wall = time.time() - t0
        times = step_times(text)
        if len(times) != steps:
            raise RuntimeError(f"{spec}: the log shows {len(times)} steps, expected {steps}")
        seconds, step_s = train_time(times)
        log(f"{spec}: trained {steps} steps in {seconds:.0f} s (process {wall:.0f} s)")
        if args.steps or abs(seconds / budget - 1) <= args.time_tolerance:
            break
        # the machine's load changed since the calibration: again, with this run's own step time
        steps = max(COMPILE_STEPS + 1, int(budget / step_s))
    log(f"{spec}: scoring")
    score_env = dict(env, NANOCHAT_DTYPE="float32")
    score = json.loads(run_logged([args.python, os.path.join(OURS, "dev", "race_score.py"), "--code", code,
                                   "--tag", tag, "--text", os.path.join(work, "heldout.json")],
                                  code, score_env, os.path.join(logs, f"{tag}_score.log"),
                                  timeout=3600).strip().splitlines()[-1])
    if not args.keep:
        shutil.rmtree(os.path.join(base, "base_checkpoints", tag), ignore_errors=True)
    dtype, compiled = numerics(kind, text)
    tokens = steps * args.batch_tokens
    return dict(side=spec, dtype=dtype, compile=compiled, load=load, steps=steps, tokens=tokens, train_s=seconds,
                tok_s=tokens / seconds, process_s=wall, attempts=attempt + 1, **score)


# ------------------------------------------------------------------------------------------------
# the table


def machine():
    name = "?"
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and name == "?":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    bf16 = [x for x in ("avx512_bf16", "amx_bf16") if x in flags.split()]
    return f"{name}, {os.cpu_count()} cores, native bf16: {'/'.join(bf16) or 'no'}"


def table(results, args):
    lines = [f"machine: {machine()}",
             f"race: depth {args.depth}, seq {args.seq_len}, {args.batch_tokens:,} tokens/step, "
             + (f"{args.steps} steps" if args.steps else f"{args.minutes:g} min") +
             f" each, vocab {args.vocab_size}, held-out {results[0]['bytes']:,} bytes", "",
             "| side | dtype | compile | params | load before | runs | steps | tokens | train s | tok/s | val bpb |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['side']} | {r['dtype']} | {r['compile']} | {r['params'] / 1e6:.2f}M | {r['load']:.2f} | "
                     f"{r['attempts']} | "
                     f"{r['steps']} | {r['tokens'] / 1e6:.2f}M | {r['train_s']:.0f} | {r['tok_s']:,.0f} | "
                     f"**{r['bpb']:.4f}** |")
    hashes = {r["side"].split()[0]: r["token_hash"] for r in results}
    same = len(set(hashes.values())) == 1
    lines += ["", f"tokenizers: {'identical' if same else 'DIFFERENT'} on the held-out text ("
              + ", ".join(f"{k} {r['heldout_tokens']:,} tokens"
                          for k, r in {r['side'].split()[0]: r for r in results}.items())
              + ")"]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="", help="a nanochat checkout (its repo root); needed by ref sides")
    p.add_argument("--sides", nargs="+", default=["ours", "ref"], help="sides, each a quoted string (see above)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step (one micro-batch)")
    p.add_argument("--minutes", type=float, default=10, help="training budget of each side")
    p.add_argument("--calib-steps", type=int, default=12, help="steps of the calibration run")
    p.add_argument("--time-tolerance", type=float, default=0.15, help="a run whose training time misses the budget "
                   "by more than this fraction is run again with its own step time (the load changed)")
    p.add_argument("--retries", type=int, default=2, help="at most this many such reruns per side")
    p.add_argument("--steps", type=int, default=0, help="train every side this many steps instead of --minutes: "
                   "the per-step race (quality per step, whatever the machine's load; "
                   "time it with dev/bench_recipe.py)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tok-chars", type=int, default=50_000_000, help="characters each tokenizer trains on")
    p.add_argument("--doc-chars", type=int, default=2000, help="longest document, in characters")
    p.add_argument("--val-bytes", type=int, default=1_000_000, help="held-out text scored")
    p.add_argument("--corpus", default="", help="offline corpus shards (default $NANOCHAT_BASE_DIR/base_data)")
    p.add_argument("--work", default="", help="work dir (default $NANOCHAT_BASE_DIR/race)")
    p.add_argument("--python", default=sys.executable, help="the interpreter both sides run under")
    p.add_argument("--keep", action="store_true", help="keep the final checkpoints")
    args = p.parse_args()
    if any(s.split()[0] != "ours" for s in args.sides) and not os.path.isdir(os.path.join(args.ref, "nanochat")):
        raise SystemExit(f"--ref {args.ref!r} is not a nanochat checkout (no nanochat/ in it)")
    work = os.path.abspath(args.work or os.path.join(get_base_dir(), "race"))
    os.makedirs(work, exist_ok=True)
    data = prepare_data(work, args.corpus or os.path.join(get_base_dir(), "base_data"), args.doc_chars, args.val_bytes)
    shim = make_shim(work)
    results = []
    for spec in args.sides:
        results.append(run_side(spec, args, work, data, shim))
        log(f"{spec}: val bpb {results[-1]['bpb']:.4f}")
    out = table(results, args)
    print(out)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    with open(os.path.join(work, f"results_{stamp}.json"), "w") as f:
        json.dump({"args": vars(args), "machine": machine(), "results": results, "table": out}, f, indent=1)


if __name__ == "__main__":
    main()
