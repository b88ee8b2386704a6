"""Benchmark BM25 backends for the search tool: SQLite FTS5 (what nanochat.tools.search uses), bm25s and rank_bm25.

    python dev/bench_search.py                        # 100k passages, 200 queries
    python dev/bench_search.py --passages 300000 --queries 500

Passages come from the pretraining shards (<base>/base_data) when there are any, topped up with generated
Zipf-distributed text over the system word list to reach --passages. Each backend runs in its own forked
process; it prints passages/s indexed (from CPU time: on a shared, loaded machine wall time measures the
neighbours; the backends are single-threaded, so on a quiet machine the two agree; wall seconds are shown
too), peak memory added (VmHWM minus the RSS at the start), index size on disk (FTS5 only: the others live
in memory), and query latency p50/p99 (CPU time) for top-3 retrieval. Backends that are not installed are
skipped (pip install bm25s rank_bm25).
"""
import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load_passages(n, seed=0):
    from nanochat.tools.search import split_passages
    passages, source = [], "generated"
    try:
        from nanochat.common import get_base_dir
        from nanochat.dataset import parquets_iter_batched
        data_dir = os.path.join(get_base_dir(), "base_data")
        if os.path.isdir(data_dir) and any(f.endswith(".parquet") for f in os.listdir(data_dir)):
            for batch in parquets_iter_batched("train", data_dir=data_dir):
                for text in batch:
                    passages.extend(split_passages(text))
                if len(passages) >= n:
                    break
            source = f"shards ({len(passages):,}) + generated"
    except Exception as e:  # no shards / unreadable: generated text only
        print(f"(shards not used: {e})")
    passages = passages[:n]
    rng = random.Random(seed)
    words = []
    for path in ("/usr/share/dict/american-english", "/usr/share/dict/words"):
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                words = [w.strip() for w in f if w.strip().isalpha()]
            break
    if not words:
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                 for _ in range(50000)]
    rng.shuffle(words)
    cum, total = [], 0.0
    for r in range(len(words)):  # Zipf: a few very common words, a long tail
        total += 1.0 / (r + 1)
        cum.append(total)
    while len(passages) < n:
        passages.append(" ".join(rng.choices(words, cum_weights=cum, k=rng.randint(40, 90))) + ".")
    return passages, source


def make_queries(passages, n, seed=1):
    rng = random.Random(seed)
    queries = []
    for _ in range(n):
        words = [w for w in passages[rng.randrange(len(passages))].split() if w.isalpha() and len(w) > 3]
        queries.append(" ".join(rng.sample(words, min(4, len(words)))) or "the")
    return queries


def run_fts5(passages, queries, tmpdir):
    from nanochat.tools.search import Searcher, build_index
    path = os.path.join(tmpdir, "fts5.sqlite")
    build_index((("b", p) for p in passages), path, max_chars=10**9)  # one passage per input text
    s = Searcher(path, k=3)
    return lambda q: s.search(q, 3), os.path.getsize(path)


def run_bm25s(passages, queries, tmpdir):
    import bm25s
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    return lambda q: retriever.retrieve(bm25s.tokenize([q], stopwords="en", show_progress=False), k=3,
                                               show_progress=False), None


def run_rank_bm25(passages, queries, tmpdir):
    from rank_bm25 import BM25Okapi
    bm = BM25Okapi([p.lower().split() for p in passages])
    return lambda q: bm.get_top_n(q.lower().split(), passages, n=3), None


BACKENDS = {"sqlite-fts5": (run_fts5, None), "bm25s": (run_bm25s, "bm25s"), "rank_bm25": (run_rank_bm25, "rank_bm25")}


def bench_one(name, passages, queries, max_queries):
    fn, _ = BACKENDS[name]
    rss0 = _vm("VmRSS")
    with tempfile.TemporaryDirectory() as tmpdir:
        c0, w0 = time.process_time(), time.perf_counter()
        query, disk = fn(passages, queries, tmpdir)
        build, wall = time.process_time() - c0, time.perf_counter() - w0
        lat = []
        for q in queries[:max_queries]:
            t0 = time.process_time()
            query(q)
            lat.append(time.process_time() - t0)
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
    return {"build_s": build, "wall_s": wall, "docs_per_s": len(passages) / build,
            "mem_mb": (_vm("VmHWM") - rss0) / 2**20, "disk_mb": None if disk is None else disk / 2**20,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "n_q": len(lat)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rank-bm25-queries", type=int, default=50, help="rank_bm25 scores every passage per query: fewer")
    p.add_argument("--backends", default=",".join(BACKENDS))
    args = p.parse_args()
    passages, source = load_passages(args.passages)
    queries = make_queries(passages, args.queries)
    mb = sum(map(len, passages)) / 2**20
    print(f"{len(passages):,} passages ({mb:.1f} MB of text; {source}), {len(queries)} queries of 4 words, top-3")
    print(f"{'backend':<12} {'build s':>8} {'(wall)':>7} {'passages/s':>11} {'peak MB':>8} {'disk MB':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'queries':>8}")
    for name in args.backends.split(","):
        module = BACKENDS[name][1]
        if module:
            try:
                __import__(module)
            except ImportError:
                print(f"{name:<12} (not installed: pip install {module})")
                continue
        r_fd, w_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: a clean memory baseline per backend
            os.close(r_fd)
            n_q = args.rank_bm25_queries if name == "rank_bm25" else args.queries
            r = bench_one(name, passages, queries, n_q)
            os.write(w_fd, repr(r).encode())
            os._exit(0)
        os.close(w_fd)
        data = b""
        while chunk := os.read(r_fd, 65536):
            data += chunk
        os.close(r_fd)
        os.waitpid(pid, 0)
        r = eval(data.decode())  # our own child's repr of a dict of numbers
        disk = "-" if r["disk_mb"] is None else f"{r['disk_mb']:.1f}"
        print(f"{name:<12} {r['build_s']:>8.1f} {r['wall_s']:>7.0f} {r['docs_per_s']:>11,.0f} {r['mem_mb']:>8.0f} "
              f"{disk:>8} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['n_q']:>8}")


if __name__ == "__main__":
    main()
