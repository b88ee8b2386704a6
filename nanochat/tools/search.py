"""BM25 search over a local corpus of passages, stored as one SQLite FTS5 file; it knows nothing of models,
chat or where the text came from (scripts/build_index.py feeds it).

    build_index(docs, path)      # docs: iterable of (source, text); text is cut into passages
    searcher = Searcher(path)    # callable: query -> the top passages as one string, for the model
    searcher.search("capital of Velmora", k=3) -> [(score, source, passage), ...]

Why SQLite FTS5 (dev/notes_search.md has the measurements against bm25s and rank_bm25): it is in the
standard library, the index lives on disk (a server with many workers maps it, nothing is loaded into
each process), queries use the inverted index instead of scoring every passage, and its ranking is
BM25 (k1 1.2, b 0.75). Queries are reduced to their words, OR-ed, so any word can match and BM25
decides; the Porter stemmer folds "capitals"/"capital". Words in more than 1/16 of the passages are
left out of a query, or only the two rarest kept when it has no other (see COMMON_FRACTION).
"""
import os
import re
import sqlite3
import threading
from collections import Counter

INDEX_FILE = "passages.sqlite"
# Query words found in more than this fraction of the passages are dropped (unless the query has nothing
# else): their BM25 weight is small, but ranking their long posting lists made queries ~100x slower.
COMMON_FRACTION = 1 / 16
MIN_PASSAGES_FOR_COMMON = 1000  # below that, document frequencies say little
_WORD = re.compile(r"\w+", re.UNICODE)


def split_passages(text, max_chars=500):
    """Cut a document into passages of at most ~max_chars: paragraphs are packed together while they
    fit; a paragraph that is longer is cut at sentence ends, then (a run-on line) at spaces."""
    pieces = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        for sent in re.split(r"(?<=[.!?])\s+", para):
            while len(sent) > max_chars:
                cut = sent.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                pieces.append(sent[:cut])
                sent = sent[cut:].lstrip()
            if sent:
                pieces.append(sent)
    passages, cur = [], ""
    for p in pieces:
        if cur and len(cur) + 1 + len(p) > max_chars:
            passages.append(cur)
            cur = p
        else:
            cur = f"{cur} {p}" if cur else p
    if cur:
        passages.append(cur)
    return passages


def build_index(docs, path, max_chars=500, batch=5000):
    """Write the passages of `docs` ((source, text) pairs) to a new FTS5 index at `path` (a file);
    it is built under a temporary name and renamed, so a reader never sees half an index.
    Returns {"documents", "passages", "bytes"}."""
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n_docs = n_passages = 0
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("CREATE VIRTUAL TABLE passages USING fts5(text, source UNINDEXED, tokenize='porter unicode61')")
        con.execute("CREATE TABLE common_words(word TEXT PRIMARY KEY, passages INTEGER)")
        rows, df = [], Counter()
        for source, text in docs:
            n_docs += 1
            for p in split_passages(text, max_chars):
                rows.append((p, source))
                df.update(set(w.lower() for w in _WORD.findall(p)))
            if len(rows) >= batch:
                con.executemany("INSERT INTO passages(text, source) VALUES (?, ?)", rows)
                n_passages += len(rows)
                rows = []
        if rows:
            con.executemany("INSERT INTO passages(text, source) VALUES (?, ?)", rows)
            n_passages += len(rows)
        if n_passages == 0:
            raise ValueError(f"no text to index: {n_docs} document(s) gave no passages")
        if n_passages >= MIN_PASSAGES_FOR_COMMON:
            common = [(w, n) for w, n in df.items() if n > n_passages * COMMON_FRACTION]
            con.executemany("INSERT INTO common_words(word, passages) VALUES (?, ?)", common)
        con.execute("INSERT INTO passages(passages) VALUES ('optimize')")  # one b-tree per term: faster queries
        con.commit()
    except BaseException:
        con.close()
        os.remove(tmp)
        raise
    con.close()
    os.replace(tmp, path)
    return {"documents": n_docs, "passages": n_passages, "bytes": os.path.getsize(path)}


def match_expression(query, max_terms=32, common=None):
    """A free-text query -> an FTS5 MATCH expression: its words, quoted (so no word is read as an
    operator), OR-ed, without the `common` ones ({word: passages containing it}); when every word is
    common, the two rarest of them. None when the query has no words."""
    common = common or {}
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:max_terms]
    words = [w for w in words if w not in common] or sorted(words, key=common.get)[:2]
    return " OR ".join(f'"{w}"' for w in words) if words else None


class Searcher:
    """Read-only access to an index file. search(query, k) -> [(score, source, passage)], best first
    (score: BM25, higher is better). __call__(query) is the chat tool: the top k passages numbered
    [1], [2], ..., cut to max_chars in all, or a sentence saying nothing matched."""

    def __init__(self, path, k=2, max_chars=700):
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no search index at {path}: "
                                    "build one with `python -m scripts.build_index --shards` "
                                    "(or --input DIR for a folder of .txt/.md/.jsonl)")
        self.path, self.k, self.max_chars = path, k, max_chars
        self._con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()  # one connection shared by the server's threads
        try:
            self.common = dict(self._con.execute("SELECT word, passages FROM common_words").fetchall())
        except sqlite3.OperationalError:
            raise ValueError(f"{path} is not a search index built by this version of nanochat.tools.search: rebuild it "
                             "with `python -m scripts.build_index`") from None

    def __len__(self):
        with self._lock:
            return self._con.execute("SELECT count(*) FROM passages").fetchone()[0]

    def search(self, query, k=None):
        expr = match_expression(query, common=self.common)
        if expr is None:
            return []
        with self._lock:
            return self._con.execute("SELECT -bm25(passages), source, text FROM passages WHERE passages MATCH ? "
                                     "ORDER BY rank LIMIT ?", (expr, k or self.k)).fetchall()

    def __call__(self, query):
        query = query.strip()
        if not query:
            return "search: empty query; write words after 'search:'"
        hits = self.search(query)
        if not hits:
            return f"search: no passage matches {query[:100]!r}"
        return format_passages([text for _, _, text in hits], self.max_chars)

    def close(self):
        self._con.close()


def format_passages(passages, max_chars=700):
    """Numbered passages, one per line, cut so that the whole fits in max_chars (each passage gets an
    equal share; a cut passage ends with '...')."""
    share = max(40, max_chars // max(1, len(passages)) - 5)
    lines = []
    for i, p in enumerate(passages, 1):
        p = p if len(p) <= share else p[:share - 3].rstrip() + "..."
        lines.append(f"[{i}] {p}")
    return "\n".join(lines)
