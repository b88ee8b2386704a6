"""Spelling tasks over a real English word list (Debian wamerican: usr/share/dict/american-english).

SpellingBee: "How many r are in strawberry?" The reply spells the word out, counts the letter as it
goes, checks the count with the python tool ('strawberry'.count('r')) and ends with '#### 3'.
SimpleSpelling: "Spell the word apple" -> "a-p-p-l-e". Both generative.

Words are split between train and test by a hash of the word, so test words never appear in training.
"""
import os
import random
import re
import zlib

from nanochat.offline import packages
from tasks import fetch
from tasks.common import Task, check_split, extract_final_number, response_text

_SYSTEM_LISTS = ("/usr/share/dict/american-english",)
_FALLBACK_LISTS = ("/usr/share/dict/words",)
SPLITS = ("train", "test")


def _read_words(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        words = {w.strip() for w in f}
    return sorted(w for w in words if re.fullmatch(r"[a-z]{3,}", w))


def load_words():
    """Sorted lowercase alphabetic words (3+ letters)."""
    def local():
        for path in _SYSTEM_LISTS:
            if os.path.exists(path):
                return _read_words(path)
        return _read_words(packages.fetch_path(fetch.WAMERICAN, "usr/share/dict/american-english"))

    def other():
        for path in _FALLBACK_LISTS:
            if os.path.exists(path):
                return _read_words(path)
        raise FileNotFoundError(f"none of {_FALLBACK_LISTS}")

    return fetch.load_with_fallback("SpellingBee word list",
                                    [("Debian wamerican", local), ("the system word list", other)])


_WORDS_CACHE = {}


def split_words(split):
    check_split(split, SPLITS)
    if "all" not in _WORDS_CACHE:
        _WORDS_CACHE["all"] = load_words()
    if split not in _WORDS_CACHE:
        in_test = lambda w: zlib.crc32(w.encode()) % 10 == 0  # noqa: E731 -- 10% of words are test words
        _WORDS_CACHE[split] = [w for w in _WORDS_CACHE["all"] if in_test(w) == (split == "test")]
    return _WORDS_CACHE[split]


_QUESTIONS = [
    "How many {l} are in {w}?",
    "How many {l}'s are in the word {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the letter {l} in the word \"{w}\".",
    "How many '{l}' are there in '{w}'?",
    "In the word {w}, how many times does {l} occur?",
    "how many {l} in {w}",
    "Can you tell me how many times {l} shows up in {w}?",
]


def spelling_bee_example(word, letter, rng):
    """A conversation counting `letter` in `word`, with a manual count and a python check."""
    question = rng.choice(_QUESTIONS).format(l=letter, w=word)
    count = word.count(letter)
    steps, running = [], 0
    for ch in word:
        if ch == letter:
            running += 1
            steps.append(f"{ch} ({running})")
        else:
            steps.append(ch)
    text = (f"Let me spell '{word}' and count the letter '{letter}' as I go:\n"
            f"{', '.join(steps)}\n"
            f"That makes {count}. Let me double-check with Python: ")
    parts = [
        {"type": "text", "text": text},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\nBoth give {count}, so the letter '{letter}' appears {count} "
                                 f"time{'s' if count != 1 else ''} in '{word}'.\n#### {count}"},
    ]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "word": word, "letter": letter, "answer": str(count)}


class _WordTask(Task):
    """`size` generated questions over the split's words; example i is fixed by (name, seed, split, i)."""
    name = ""

    def __init__(self, size=1000, split="train", seed=0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.split, self.seed = size, split, seed
        self.words = split_words(split)

    eval_type = "generative"

    def num_examples(self):
        return self.size

    def _rng(self, index):
        return random.Random(f"{self.name}/{self.seed}/{self.split}/{index}")


class SpellingBee(_WordTask):
    """Letter-counting questions: spell the word, count, check with the python tool."""
    name = "spellingbee"

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter (often a count of 0)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        return spelling_bee_example(word, letter, rng)

    def evaluate(self, conversation, assistant_response):
        pred = extract_final_number(assistant_response)
        return int(pred is not None and pred == conversation["answer"])

    reward = evaluate


_SPELL_QUESTIONS = ["Spell the word {w}.", "How do you spell {w}?", "spell {w}", "Spell {w} letter by letter.",
                    "Can you spell \"{w}\" for me?"]


class SimpleSpelling(_WordTask):
    """"Spell the word" requests; the reply is the word's letters joined by '-'."""
    name = "simplespelling"

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        return {"messages": [{"role": "user", "content": rng.choice(_SPELL_QUESTIONS).format(w=word)},
                             {"role": "assistant", "content": "-".join(word)}],
                "word": word}

    def evaluate(self, conversation, assistant_response):
        letters = re.findall(r"[a-z]", response_text(assistant_response).lower())
        return int("".join(letters) == conversation["word"])
