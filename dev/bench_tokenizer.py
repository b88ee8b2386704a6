"""
Benchmark BPE tokenizer training: our rustbpe vs the `rustbpe` package from PyPI vs the
HuggingFace `tokenizers` BPE trainer, same text, same split pattern, same vocab sizes.
Prints training wall time and peak RSS; each trainer runs in its own process.

Text: the nanochat pretraining shards ($NANOCHAT_BASE_DIR/base_data/*.parquet, default
~/.cache/nanochat/base_data) when present, else --text-file. The peers live in a separate venv
(they share our module name):
    python3 -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install rustbpe==0.1.0 tokenizers

    python dev/bench_tokenizer.py [--text-file F] [--peer-python /tmp/peer-venv/bin/python]
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import rustbpe

# Runs inside each trainer's process: stream documents from a JSON-lines file, train, report.
WORKER = r"""
import json, resource, sys, time
kind, docs_path, vocab_size, pattern = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def docs():
    with open(docs_path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)

if kind == "hf":
    from tokenizers import Tokenizer, Regex, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    tok.train_from_iterator(docs(), trainer)
    secs = time.perf_counter() - t0
    n_vocab = tok.get_vocab_size()
    ranks = None
else:
    import rustbpe
    tok = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(docs(), vocab_size, pattern=pattern)
    secs = time.perf_counter() - t0
    ranks = [list(b) for b, _ in tok.get_mergeable_ranks()]
    n_vocab = len(ranks)
ru = resource.getrusage(resource.RUSAGE_SELF)
# Peak RSS of this process image. Not ru_maxrss: Linux carries that over from the parent
# across fork + exec, so it would include the benchmark driver's memory.
with open("/proc/self/status") as f:
    peak_mb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps({"secs": secs, "cpu_secs": ru.ru_utime + ru.ru_stime, "peak_mb": peak_mb,
                  "vocab": n_vocab, "ranks": ranks}))
"""


def shard_texts(base_dir):
    import pyarrow.parquet as pq
    for path in sorted(glob.glob(os.path.join(base_dir, "*.parquet"))):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def file_texts(path, doc_chars=4000):
    # Documents of about doc_chars, cut at line boundaries.
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, n = [], 0
        for line in f:
            buf.append(line)
            n += len(line)
            if n >= doc_chars:
                yield "".join(buf)
                buf, n = [], 0
        if buf:
            yield "".join(buf)


def write_docs(texts, out_path, max_bytes):
    total = ndocs = 0
    with open(out_path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
            total += len(t.encode("utf-8"))
            ndocs += 1
            if total >= max_bytes:
                break
    return total, ndocs


def run(python, kind, docs_path, vocab_size, pattern):
    with tempfile.TemporaryDirectory() as cwd:  # keep the repo's rustbpe/ dir off sys.path
        p = subprocess.run([python, "-c", WORKER, kind, docs_path, str(vocab_size), pattern],
                           capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        sys.exit(f"{kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-file", help="plain text to train on when there are no parquet shards")
    ap.add_argument("--peer-python", default="/tmp/peer-venv/bin/python",
                    help="python of a venv with rustbpe==0.1.0 (PyPI) and tokenizers installed")
    ap.add_argument("--max-mb", type=float, default=100, help="use at most this much text (MB of UTF-8)")
    ap.add_argument("--vocab-sizes", default="8192,32768")
    ap.add_argument("--trainers", default="ours,pypi,hf", help="comma list of ours,pypi,hf")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per trainer (interleaved); report the fastest and the highest peak RSS")
    args = ap.parse_args()

    base_dir = os.path.join(os.environ.get("NANOCHAT_BASE_DIR", os.path.expanduser("~/.cache/nanochat")), "base_data")
    if glob.glob(os.path.join(base_dir, "*.parquet")):
        source, texts = f"shards in {base_dir}", shard_texts(base_dir)
    elif args.text_file:
        source, texts = args.text_file, file_texts(args.text_file)
    else:
        sys.exit(f"no parquet shards in {base_dir}; pass --text-file PATH")

    trainers = args.trainers.split(",")
    peer_ok = os.path.exists(args.peer_python)
    if not peer_ok and {"pypi", "hf"} & set(trainers):
        print(f"NOTE: peer python {args.peer_python} not found: skipping the PyPI rustbpe and HF tokenizers runs.\n"
              f"  Create it with: python3 -m venv /tmp/peer-venv && "
              f"/tmp/peer-venv/bin/pip install rustbpe==0.1.0 tokenizers\n"
              f"  and/or pass --peer-python PATH.", file=sys.stderr)
        trainers = [t for t in trainers if t == "ours"]
    pythons = {"ours": sys.executable, "pypi": args.peer_python, "hf": args.peer_python}
    labels = {"ours": "rustbpe (ours)", "pypi": "rustbpe 0.1.0 (PyPI)", "hf": "HF tokenizers"}

    with tempfile.TemporaryDirectory() as tmp:
        docs_path = os.path.join(tmp, "docs.jsonl")
        nbytes, ndocs = write_docs(texts, docs_path, int(args.max_mb * 1e6))
        print(f"text: {source}: {ndocs} documents, {nbytes / 1e6:.1f} MB; {os.cpu_count()} CPUs")
        print(f"| {'trainer':<22} | {'vocab':>6} | {'time (s)':>8} | {'CPU (s)':>7} | {'peak RSS (MB)':>13} |")
        print(f"|{'-' * 24}|{'-' * 8}|{'-' * 10}|{'-' * 9}|{'-' * 15}|")
        for vocab_size in map(int, args.vocab_sizes.split(",")):
            runs = {kind: [] for kind in trainers}
            for _ in range(args.repeat):  # interleaved, so background load hits all trainers alike
                for kind in trainers:
                    runs[kind].append(run(pythons[kind], kind, docs_path, vocab_size, rustbpe.DEFAULT_PATTERN))
            for kind in trainers:
                best = min(runs[kind], key=lambda r: r["secs"])
                peak = max(r["peak_mb"] for r in runs[kind])
                print(f"| {labels[kind]:<22} | {vocab_size:>6} | {best['secs']:>8.1f} | {best['cpu_secs']:>7.1f} "
                      f"| {peak:>13.0f} |")
            if "ours" in runs and "pypi" in runs:
                a, b = runs["ours"][0]["ranks"], runs["pypi"][0]["ranks"]
                same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  (ours and PyPI rustbpe agree on the first {same - 256} of {len(a) - 256} merges)")
            sys.stdout.flush()

if __name__ == "__main__":
    main()
