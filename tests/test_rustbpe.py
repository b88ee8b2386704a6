"""
Tests for the rustbpe extension: the default-pattern scanner against the `regex` module,
training against a small pure-Python reference trainer, determinism, and encoding against
tiktoken.
"""
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rustbpe

PATTERN = rustbpe.DEFAULT_PATTERN
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# -----------------------------------------------------------------------------
# A tiny reference trainer: full recount of pair counts every merge (slow, obviously right).


def merge_ids(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_train(texts, vocab_size, pattern=PATTERN):
    counts = Counter(chunk for t in texts for chunk in regex.findall(pattern, t))
    words = [[list(chunk.encode("utf-8")), n] for chunk, n in counts.items()]
    vocab = [bytes([b]) for b in range(256)]
    for new_id in range(256, vocab_size):
        pair_counts = Counter()
        for ids, n in words:
            for p in zip(ids, ids[1:]):
                pair_counts[p] += n
        if not pair_counts:
            break
        # Highest count, then the smallest (left, right) pair.
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for w in words:
            w[0] = merge_ids(w[0], best, new_id)
    return [(b, i) for i, b in enumerate(vocab)]


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


# -----------------------------------------------------------------------------
# Corpora

NASTY = [
    "",
    " ",
    "   ",
    "\n",
    "\r\n",
    "a\r\n\r\nb",
    "\r\r\n \n\t \r x",
    "x \n \n",
    "  \t  hello",
    "hello   \n",
    "hello \u00a0world\u00a0\u00a0 x\u3000y\u2003z\u202f.",
    "\u0085\u2028\u2029\u1680 a\u180e b\u200b c\ufeff d",
    "\x1c\x1d\x1e\x1f a\x0b\x0cb",
    "it's It'S IT'LL we'Ve they'rE I'M don'T I'd 'sup '' 's 'l 'll' ſ 'ſ 'ſt 'K",
    "'ſt x'ſ y'ſt (')'s'S'LL'lL're'VE'd'M't'x'",
    "naïve cafe\u0301 e\u0301\u0301 \u0301x x\u0301 \u0915\u094d\u0937 \u0e01\u0e34",
    "1 12 123 1234 12345 \u0663\u0664\u0665 \u096b\u096c \u2167\u2168 \u00bd\u00bc 1\u00bd \u2460\u2461",
    "3.14159 -42 +7 1,000,000 0x1F 1e-9 v2.0.1",
    "emoji 👍👍🏽 👩\u200d👩\u200d👧 🇺🇸🇫🇷 ❤\ufe0f !!🎉",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Русский текст, ελληνικά, עברית, العربية",
    "((nested)) [brackets] {braces} <tags/> --- ... !? \"quotes\" 'single'",
    "mixed\ttabs\t\tand  spaces   \t\n\t\n",
    "  \n\n  \r\n  end",
    "trailing space ",
    " leading",
    "a" * 50 + " " + "ab" * 30,
    "\U0001d400\U0001d401 \U00010400\U00010428 \U0002a6d6",
    "x\u0345y \u2160\u2161 \u3007 \u02b0\u02b1 \u00aa\u00ba",
]

WORDS = (
    "the of and to in is was for that with as on by he at from his it an were are which this "
    "be or has had not but what all we can there been if more when will would who so no one "
    "don't it's we're they've I'll she'd you'm naïve café über straße 日本 中文 русский мир "
    "emoji 👍 🎉 👩\u200d💻 1 22 333 4444 2024 3.14 $100 #tag @user http://x.y/z?q=1&r=2"
).split()


def make_corpus(seed, n_docs, doc_words=40):
    rng = random.Random(seed)
    seps = [" ", " ", " ", " ", "  ", "\n", "\r\n", "\t", ", ", ". ", "\n\n", " \u00a0", "!", "(", ") "]
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(1, doc_words)):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(seps))
        docs.append("".join(parts))
    return docs + NASTY


SMALL_CORPUS = make_corpus(0, 60)  # a few KB


# -----------------------------------------------------------------------------
# Splitting


def test_default_pattern_value():
    assert PATTERN == (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
    )
    assert rustbpe.Tokenizer().get_pattern() == PATTERN


@pytest.mark.parametrize("text", NASTY + SMALL_CORPUS[:20])
def test_split_nasty(text):
    assert rustbpe.split_text(text) == regex.findall(PATTERN, text)
    assert rustbpe.split_text(text, PATTERN) == regex.findall(PATTERN, text)


def test_split_contractions():
    # '(?i:[sdmt]|ll|ve|re) after every kind of char, in every case (ſ folds to s).
    letters = "sdmtlvreSDMTLVRE\u017fKkx"
    for pre in ["", "a", "1", ".", " ", "\n", "\u017f"]:
        for a in letters:
            for b in letters + " '":
                text = f"{pre}'{a}{b}z"
                assert rustbpe.split_text(text) == regex.findall(PATTERN, text), text


def test_split_every_code_point():
    # Every code point in contexts that expose its class (letter, number, whitespace, other),
    # plus a sample in contexts around contractions and newlines.
    cps = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    contexts = [("a{}b", cps), (" {}1", cps), ("'{}s x", cps[::5]), ("\n{} ", cps[::5]), ("{}{}", cps[::5])]
    for ctx, chars in contexts:
        text = "".join(ctx.replace("{}", c) for c in chars)
        assert rustbpe.split_text(text) == regex.findall(PATTERN, text), ctx


INTERESTING = list("aZ0 '\t\r\n\u00a0\u2003\u3000\u0085!.,-_sStTlLvVeErRdDmM"
                   "\u017f\u0301\u0663\u2167\u00bd👍\u200d\ufe0f日й")
text_strategy = st.text(
    alphabet=st.one_of(st.sampled_from(INTERESTING), st.characters(blacklist_categories=("Cs",))),
    max_size=60,
)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_strategy)
def test_split_matches_regex_property(text):
    assert rustbpe.split_text(text) == regex.findall(PATTERN, text)


def test_split_custom_pattern():
    for text in NASTY + SMALL_CORPUS[:10]:
        assert rustbpe.split_text(text, GPT2_PATTERN) == regex.findall(GPT2_PATTERN, text)


def test_split_bad_pattern():
    with pytest.raises(ValueError, match="pattern"):
        rustbpe.split_text("abc", "(unclosed")


# -----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("vocab_size", [256, 257, 300, 420])
def test_train_matches_reference(vocab_size):
    tok = train(SMALL_CORPUS, vocab_size)
    assert tok.get_mergeable_ranks() == reference_train(SMALL_CORPUS, vocab_size)


def test_train_custom_pattern_matches_reference():
    tok = train(SMALL_CORPUS, 350, pattern=GPT2_PATTERN)
    assert tok.get_pattern() == GPT2_PATTERN
    assert tok.get_mergeable_ranks() == reference_train(SMALL_CORPUS, 350, GPT2_PATTERN)


def test_train_ties_and_repeats():
    # Overlapping pairs ("aaaa"), equal counts everywhere, and a word-internal repeat.
    texts = ["aaaa aaa aa a", "abab ba ab", "zzzz yy xx ww", "\n\n\n  \t\t"]
    for vs in (256, 260, 270, 300):
        assert train(texts, vs).get_mergeable_ranks() == reference_train(texts, vs)


def test_train_stops_early():
    tok = train(["ab ab", "c"], 1000)
    ranks = tok.get_mergeable_ranks()
    assert ranks == reference_train(["ab ab", "c"], 1000)
    assert [b for b, _ in ranks[256:]] == [b"ab", b" ab"]
    assert len(train([], 300).get_mergeable_ranks()) == 256


def test_mergeable_ranks_layout():
    ranks = train(SMALL_CORPUS, 400).get_mergeable_ranks()
    assert len(ranks) == 400
    assert ranks[:256] == [(bytes([i]), i) for i in range(256)]
    assert [r for _, r in ranks] == list(range(400))


def test_buffer_size_independent():
    expected = train(SMALL_CORPUS, 400).get_mergeable_ranks()
    for bs in (1, 7, 64, 100000):
        assert train(SMALL_CORPUS, 400, buffer_size=bs).get_mergeable_ranks() == expected


def test_any_iterable_and_generator():
    expected = train(SMALL_CORPUS, 300).get_mergeable_ranks()
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator((t for t in SMALL_CORPUS), 300)
    assert tok.get_mergeable_ranks() == expected
    tok.train_from_iterator(list(SMALL_CORPUS), 300)  # retraining replaces the old state
    assert tok.get_mergeable_ranks() == expected


DETERMINISM_SCRIPT = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from test_rustbpe import make_corpus
import rustbpe
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(make_corpus(1, 3000, 200)), 2000, buffer_size=500)
print(hashlib.sha256(repr(tok.get_mergeable_ranks()).encode()).hexdigest())
"""


def test_thread_count_independent():
    here = os.path.dirname(os.path.abspath(__file__))
    digests = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, here], env=env,
                             capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip())
    assert len(digests[0]) == 64 and len(set(digests)) == 1, digests


# -----------------------------------------------------------------------------
# Encoding

ENCODE_TEXTS = NASTY + SMALL_CORPUS[:10] + [
    "The quick brown fox jumps over the lazy dog. It's 2024!\r\nNew line, new rules.",
    "Unseen words: zyzzyva quixotic Ωμέγα 🦀 rust\tand\tpython  \n\n",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module")
def trained():
    return train(SMALL_CORPUS, 500)


def test_encode_roundtrip(trained):
    decoder = {r: b for b, r in trained.get_mergeable_ranks()}
    for text in ENCODE_TEXTS:
        ids = trained.encode(text)
        assert all(0 <= i < 500 for i in ids)
        assert b"".join(decoder[i] for i in ids).decode("utf-8") == text


def test_encode_matches_tiktoken(trained):
    enc = tiktoken.Encoding(name="rustbpe_test", pat_str=trained.get_pattern(),
                            mergeable_ranks=dict(trained.get_mergeable_ranks()), special_tokens={})
    for text in ENCODE_TEXTS:
        assert trained.encode(text) == enc.encode_ordinary(text), text
    # Encoding compresses what it was trained on.
    text = "".join(SMALL_CORPUS[:20])
    assert len(trained.encode(text)) < len(text.encode("utf-8")) / 2


def test_untrained_encode_is_bytes():
    assert rustbpe.Tokenizer().encode("hé") == list("hé".encode("utf-8"))


# -----------------------------------------------------------------------------
# Errors


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train(["abc"], 255)


def test_non_str_item():
    with pytest.raises(TypeError, match="str.*int"):
        train(["fine", 123], 300)
    with pytest.raises(TypeError, match="bytes"):
        train([b"bytes"], 300)


def test_bad_custom_pattern():
    with pytest.raises(ValueError, match="pattern"):
        train(["abc"], 300, pattern="(unclosed")


def test_iterator_exception_propagates():
    def gen():
        yield "ok"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        rustbpe.Tokenizer().train_from_iterator(gen(), 300)
