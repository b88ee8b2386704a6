"""Build the search tool's BM25 index (<base>/search_index/passages.sqlite) from the pretraining shards and/or
a folder of text, plus the invented facts the tool-use tasks ask about.

    python -m scripts.build_index --shards --facts          # what speedrun.sh runs
    python -m scripts.build_index --input ~/notes --out /tmp/notes_index

--shards indexes the training shards only: the last shard (validation) stays out, so the RAG measurement
in chat_eval reads documents the index does not hold. --input DIR takes every .txt/.md/.rst file (one
document each) and .jsonl file (one document per line: its "text" field, or the line itself if it is a
string) under DIR. --facts adds tasks.tools.fact_documents(): without them the `facts` group of
`chat_eval -a tools` cannot be answered with tools on either.
"""
import argparse
import json
import os
import time

from nanochat.common import get_base_dir, script_argv
from nanochat.report import get_report
from nanochat.tools.search import INDEX_FILE, build_index

TEXT_EXTS = (".txt", ".md", ".rst")


def folder_documents(root):
    """(source, text) for every text/JSONL file under root, in sorted order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--input {root}: not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name.endswith(TEXT_EXTS):
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield rel, f.read()
            elif name.endswith(".jsonl"):
                with open(path, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                        text = obj.get("text") if isinstance(obj, dict) else obj
                        if not isinstance(text, str):
                            raise ValueError(f"{path}:{lineno}: expected a string or an object with a \"text\" string")
                        yield f"{rel}:{lineno}", text


def shard_documents(data_dir=None):
    from nanochat.dataset import parquets_iter_batched
    for i, batch in enumerate(parquets_iter_batched("train", data_dir=data_dir)):
        for j, text in enumerate(batch):
            yield f"shard-rg{i}:{j}", text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="", help="a folder of .txt/.md/.rst/.jsonl files to index")
    p.add_argument("--shards", action="store_true", help="index the pretraining shards (training split)")
    p.add_argument("--facts", action="store_true", help="add the invented facts of the tool-use tasks")
    p.add_argument("--max-docs", type=int, default=-1, help="at most this many documents from the shards/folder")
    p.add_argument("--passage-chars", type=int, default=500, help="passages are cut to about this many characters")
    p.add_argument("--out", default="", help="index folder (default <base>/search_index)")
    return p.parse_args(script_argv(argv))


def main(argv=None):
    args = parse_args(argv)
    if not (args.input or args.shards or args.facts):
        raise SystemExit("nothing to index: give --shards, --input DIR and/or --facts")
    out_dir = args.out or os.path.join(get_base_dir(), "search_index")
    path = os.path.join(out_dir, INDEX_FILE)

    def docs():
        n = 0
        sources = ([shard_documents()] if args.shards else []) + ([folder_documents(args.input)] if args.input else [])
        for src in sources:
            for doc in src:
                if 0 <= args.max_docs <= n:
                    break
                n += 1
                yield doc
        if args.facts:
            from tasks.tools import fact_documents
            yield from fact_documents()

    t0 = time.time()
    stats = build_index(docs(), path, max_chars=args.passage_chars)
    dt = time.time() - t0
    print(f"indexed {stats['documents']:,} documents as {stats['passages']:,} passages in {dt:.1f}s "
          f"({stats['passages'] / dt:,.0f} passages/s), {stats['bytes'] / 2**20:.1f} MB -> {path}")
    get_report().log(section="Search index", data=[vars(args), {**stats, "seconds": round(dt, 2), "path": path}])
    return stats


if __name__ == "__main__":
    main()
