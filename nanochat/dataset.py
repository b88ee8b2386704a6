"""Pretraining shards: read them, and download FineWeb-Edu's or ClimbMix's from the HuggingFace hub.
Building shards without internet is nanochat/offline's job (`python -m nanochat.offline`).

Layout: <base>/base_data/shard_00000.parquet, shard_00001.parquet, ... Every shard has a `text`
column (one document per row), written in several row groups so readers can stream. The LAST
shard (by sorted name) is the validation split, all the others are train.

    python -m nanochat.dataset -n 8 [-w 4]
        downloads FineWeb-Edu shards 0..7, plus the hub's last shard (index 1822), which sorts last
        and so becomes the validation shard. `-n -1` = all 1823. Downloads run in parallel, retry
        with exponential backoff, resume partial `.part` files with HTTP Range requests, check the
        parquet footer, and rename into place atomically.
    python -m nanochat.dataset -n 8 --source climbmix
        the same for ClimbMix (last shard 6542); a folder keeps one source (its _SOURCE file says which).
    python -m nanochat.offline
        builds shards in the same layout from registry packages (nanochat/offline/build.py).

Readers: list_parquet_files() and parquets_iter_batched(split, start, step).
"""
import argparse
import concurrent.futures
import os
import re
import sys
import threading
import time
from urllib.parse import urlparse

import pyarrow.parquet as pq

from nanochat.common import get_base_dir, logger, run_logged

# -----------------------------------------------------------------------------
# Layout and readers

OFFLINE_HINT = "python -m nanochat.offline"


def get_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None):
    """Sorted full paths of the parquet shards in data_dir (default <base>/base_data)."""
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    names = [f for f in os.listdir(data_dir) if f.endswith(".parquet") and not f.startswith(".")]
    return [os.path.join(data_dir, f) for f in sorted(names)]


def split_files(split, data_dir=None):
    """Parquet paths of a split: every shard but the last is train, the last one is val."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = list_parquet_files(data_dir)
    if len(paths) < 2:
        where = data_dir or get_data_dir()
        raise FileNotFoundError(
            f"need at least 2 parquet shards in {where} (the last one is validation), found {len(paths)}. "
            f"Make them with `{OFFLINE_HINT}` (no internet needed) or download FineWeb-Edu with "
            f"`python -m nanochat.dataset -n 8`.")
    return paths[:-1] if split == "train" else paths[-1:]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield lists of texts, one list per parquet row group of the split.

    Row groups are numbered globally across the split's files (in sorted order); this yields
    numbers start, start+step, start+2*step, ... So rank r of W readers passes start=r, step=W
    and the ranks together read every row group exactly once."""
    assert start >= 0 and step >= 1, f"need start >= 0 and step >= 1, got start={start} step={step}"
    offset = 0  # global index of the current file's first row group
    for path in split_files(split, data_dir):
        pf = pq.ParquetFile(path)
        n = pf.num_row_groups
        first = start - offset if start >= offset else (start - offset) % step
        for rg in range(first, n, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        offset += n


# -----------------------------------------------------------------------------
# Online: FineWeb-Edu (the default) or ClimbMix shards from the HuggingFace hub

SOURCES = {  # name -> (base URL, index of its last shard, which always serves as validation)
    "fineweb-edu": ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
    # upstream's pretraining data since 2026-03 (NVIDIA's ClimbMix, reshuffled into the same shard layout): its
    # largest single gain in time to GPT-2 CORE (2 h 46 -> 2 h 01 on 8xH100). Not yet trained on here (no GPU).
    "climbmix": ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
}
BASE_URL, MAX_SHARD = SOURCES["fineweb-edu"]
SOURCE_FILE = "_SOURCE"  # in a download folder: which source its shards came from (they must not mix)


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def shard_url(index, base_url=None):
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    return f"{base_url.rstrip('/')}/{shard_name(index)}"


def verify_parquet(path):
    """True when the file's parquet footer reads and it has rows."""
    try:
        return pq.ParquetFile(path).metadata.num_rows > 0
    except Exception:
        return False


def check_reachable(base_url=None, timeout=5.0):
    """Fail fast (a few seconds) with a useful message when the data host cannot be reached.
    The probe runs in a thread so that even a hanging DNS lookup cannot hold us up."""
    import requests
    url = shard_url(0, base_url)
    result = {}

    def probe():
        try:
            result["response"] = requests.head(url, timeout=(min(timeout, 3.0), timeout), allow_redirects=True)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if "response" not in result:
        reason = type(result["error"]).__name__ if "error" in result else f"no answer within {timeout:.0f}s"
        raise RuntimeError(f"cannot reach {urlparse(url).netloc} ({reason}). Offline? Build the shards from "
                           f"package-registry text instead: `{OFFLINE_HINT}`")
    if result["response"].status_code >= 400:
        raise RuntimeError(f"{url} answered HTTP {result['response'].status_code}; "
                           f"without the hub use `{OFFLINE_HINT}`")


def _expected_size(r):
    """Total file size announced by a (possibly partial) response, or None when unknown."""
    if r.headers.get("Content-Encoding", "identity") != "identity":
        return None  # the body is decoded on the fly; its length is not Content-Length
    if r.status_code == 206:
        m = re.match(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
        return int(m.group(1)) if m else None
    n = r.headers.get("Content-Length")
    return int(n) if n is not None else None


def download_file(url, path, verify, retries=5, backoff=2.0, timeout=(5, 60)):
    """Download url to path; returns the path, or None after `retries` failed attempts.

    A complete file is skipped. Bytes land in `<path>.part`; a later attempt continues it with a
    Range request. The part is renamed into place only when verify(part) says it is whole."""
    import requests
    name = os.path.basename(path)
    if os.path.exists(path):
        return path  # only verified files are ever renamed to this name
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    for attempt in range(1, retries + 1):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if not (r.status_code == 416 and have):  # 416: the part already holds everything
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        logger.error(f"{name}: HTTP {r.status_code} from {url}, not retrying")
                        return None
                    r.raise_for_status()
                    resumed = have > 0 and r.status_code == 206
                    expected = _expected_size(r)
                    with open(part, "ab" if resumed else "wb") as f:
                        for chunk in r.iter_content(chunk_size=1 << 20):
                            f.write(chunk)
                    size = os.path.getsize(part)
                    if expected is not None and size != expected:
                        raise IOError(f"got {size} of {expected} bytes")  # keep the part: resume next time
            if not verify(part):
                os.remove(part)
                raise IOError("the downloaded file failed verification; deleted it")
            os.replace(part, path)
            logger.info(f"{name}: done ({os.path.getsize(path) / 1e6:.1f} MB)")
            return path
        except (requests.RequestException, OSError) as e:
            wait = backoff * 2 ** (attempt - 1)
            if attempt == retries:
                logger.error(f"{name}: failed after {retries} attempts: {e}")
                return None
            logger.warning(f"{name}: attempt {attempt}/{retries} failed ({e}); retrying in {wait:.1f}s")
            time.sleep(wait)
    return None


def download_shard(index, data_dir=None, base_url=None, retries=5, backoff=2.0, timeout=(5, 60)):
    """Download one shard into data_dir (resumable, parquet footer checked); the path, or None."""
    path = os.path.join(data_dir or get_data_dir(), shard_name(index))
    return download_file(shard_url(index, base_url), path, verify_parquet, retries, backoff, timeout)


def claim_source(data_dir, source):
    """Record `source` in data_dir, or refuse when the folder holds another source's shards (a folder of shards
    without the record holds FineWeb-Edu: downloads before the record existed)."""
    path = os.path.join(data_dir, SOURCE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            held = f.read().strip()
    else:
        held = "fineweb-edu" if list_parquet_files(data_dir) else source
    if held != source:
        raise RuntimeError(f"{data_dir} holds {held} shards; {source} shards would mix with them (the last shard "
                           f"is the validation split). Use another NANOCHAT_BASE_DIR, or --source {held}.")
    os.makedirs(data_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(source + "\n")


def download(num_files=-1, workers=4, base_url=None, data_dir=None, retries=5, backoff=2.0, source="fineweb-edu"):
    """Download the first num_files shards (-1: all) of `source` (a SOURCES name) plus its last one
    (validation). Returns paths."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")
    data_dir = data_dir or get_data_dir()
    if any(os.path.exists(os.path.join(data_dir, f)) for f in ("_SUCCESS", "_BUILDING")):
        raise RuntimeError(f"{data_dir} holds an offline build (it has _SUCCESS); downloaded shards would mix "
                           f"with it. Remove that folder or point NANOCHAT_BASE_DIR elsewhere.")
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or SOURCES[source][0]
    last = SOURCES[source][1]
    claim_source(data_dir, source)
    check_reachable(base_url)
    n = last + 1 if num_files < 0 else min(num_files, last)
    ids = list(range(n)) + ([last] if n <= last else [])
    logger.info(f"downloading {len(ids)} {source} shards ({n} train + shard {last} as validation) "
                f"to {data_dir} with {workers} workers")
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        paths = list(pool.map(lambda i: download_shard(i, data_dir, base_url, retries, backoff), ids))
    ok = [p for p in paths if p]
    logger.info(f"{len(ok)}/{len(ids)} shards present in {data_dir} ({time.time() - t0:.0f}s)")
    if len(ok) != len(ids):
        raise RuntimeError(f"{len(ids) - len(ok)} shards failed to download; run the same command again to resume")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu or ClimbMix shards (the last shard is the "
                                                 f"validation split); without the hub, build shards with "
                                                 f"`{OFFLINE_HINT}`.")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="hub: number of train shards to download (-1 = all); the source's last shard "
                             f"(FineWeb-Edu {MAX_SHARD}, ClimbMix {SOURCES['climbmix'][1]}) is always fetched "
                             "too and serves as validation")
    parser.add_argument("--source", default="fineweb-edu", choices=list(SOURCES), help="which pretraining data")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=None, help=f"hub base URL (env NANOCHAT_DATA_URL; default {BASE_URL})")
    parser.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    args = parser.parse_args(argv)
    return run_logged(download, args.num_files, args.num_workers, base_url=args.base_url, data_dir=args.data_dir,
                      source=args.source)


if __name__ == "__main__":
    sys.exit(main())
