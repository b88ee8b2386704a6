"""Compression (bytes per token) of our tokenizer on several kinds of text, against GPT-2/GPT-4.

    python -m scripts.tok_eval
"""
import argparse
import collections

import pyarrow.parquet as pq
import tiktoken

from nanochat.common import script_argv
from nanochat.dataset import list_parquet_files
from nanochat.offline.sources import SOURCE_KIND
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

# Small fixed samples of kinds the shards lack, so every tokenizer sees the same bytes.
FIXED_SAMPLES = {
    "code": '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

if __name__ == "__main__":
    print([fib(i) for i in range(10)])
''',
    "math": r"Let $f(x) = 3x^2 - 12x + 7$. Then $f'(x) = 6x - 12 = 0$ gives $x = 2$, and f(2) = 12 - 24 + 7 = -5. "
            r"So 1234 + 5678 = 6912; 3.14159 * 2 = 6.28318; 2^10 = 1024.",
    "multilingual": "Le chat dort sur le canapé. Der Hund läuft schnell. Привет, как дела? "
                    "東京は日本の首都です。안녕하세요, 만나서 반갑습니다. مرحبا بالعالم",
}


def texts_by_kind(max_chars_per_kind):
    """Validation-shard text grouped by kind (prose, code_docs, speeches, dictionary, ...)."""
    val = list_parquet_files()[-1]
    table = pq.read_table(val, columns=["text", "source"])
    out = collections.defaultdict(list)
    size = collections.Counter()
    for text, source in zip(table.column("text").to_pylist(), table.column("source").to_pylist()):
        kind = SOURCE_KIND.get(source, source)
        if size[kind] < max_chars_per_kind:
            out[kind].append(text)
            size[kind] += len(text)
    return {k: "\n\n".join(v)[:max_chars_per_kind] for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-chars-per-kind", type=int, default=200_000)
    args = p.parse_args(script_argv(argv))

    texts = {**texts_by_kind(args.max_chars_per_kind), **FIXED_SAMPLES}
    ours = get_tokenizer()
    encoders = {"ours": lambda s: ours.encode(s)}
    notes = []
    for name, label in (("gpt2", "GPT-2"), ("cl100k_base", "GPT-4")):
        try:
            encoders[label] = tiktoken.get_encoding(name).encode_ordinary
        except Exception as e:  # offline: tiktoken fetches these files on first use
            notes.append(f"{label} comparison skipped: could not load tiktoken '{name}' "
                         f"({type(e).__name__}; no network?)")

    header = "| kind | bytes | " + " | ".join(f"{n} tokens | {n} bytes/token" for n in encoders) + " |"
    rows = [header, "|" + "---|" * (2 + 2 * len(encoders))]
    summary = {}
    for kind, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        cells = []
        for name, enc in encoders.items():
            n = len(enc(text))
            ratio = nbytes / max(n, 1)
            cells += [f"{n:,}", f"{ratio:.2f}"]
            if name == "ours":
                summary[kind] = round(ratio, 3)
        rows.append(f"| {kind} | {nbytes:,} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    for n in notes:
        print(n)
    get_report().log("Tokenizer evaluation", [
        {"vocab size": ours.get_vocab_size()},
        "Compression ratio (bytes per token, higher is better):", "\n".join(rows), *notes,
    ])


if __name__ == "__main__":
    main()
