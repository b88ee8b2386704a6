"""Train the BPE tokenizer on the first --max-chars of the pretraining shards.

    python -m scripts.tok_train --vocab-size 65536 --max-chars 2000000000
"""
import argparse
import time

from nanochat.common import script_argv
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir


def text_iterator(max_chars, doc_cap):
    """Train-split documents, each capped at doc_cap chars, until max_chars in total."""
    seen = 0
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            doc = doc[:doc_cap]
            yield doc
            seen += len(doc)
            if seen >= max_chars:
                return


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of training text to use")
    p.add_argument("--doc-cap", type=int, default=10_000, help="max characters taken from any one document")
    p.add_argument("--vocab-size", type=int, default=65536, help="final vocab size, special tokens included")
    args = p.parse_args(script_argv(argv))
    print(f"training tokenizer: vocab_size={args.vocab_size:,} max_chars={args.max_chars:,} doc_cap={args.doc_cap:,}")

    chars = 0
    def counted():
        nonlocal chars
        for doc in text_iterator(args.max_chars, args.doc_cap):
            chars += len(doc)
            yield doc

    t0 = time.time()
    tok = Tokenizer.train_from_iterator(counted(), args.vocab_size)
    train_time = time.time() - t0
    out_dir = get_tokenizer_dir()
    tok.save(out_dir)
    print(f"trained in {train_time:.1f}s on {chars:,} chars; saved to {out_dir}")

    # sanity: an encode/decode round trip on text with the awkward cases
    sample = "Hello world! It's 2026, 12345 tokens... \r\n\tÜnïcödé ✓ 👋 <|bos|> done."
    assert tok.decode(tok.encode(sample)) == sample, "tokenizer round trip failed"

    tb = tok.token_bytes().float()
    nonzero = tb[tb > 0]
    get_report().log("Tokenizer training", [
        vars(args),
        {"train time (s)": round(train_time, 1), "training chars": chars,
         "vocab size": tok.get_vocab_size(), "special tokens": len(tok.get_special_tokens()),
         "token bytes min": int(nonzero.min()), "token bytes max": int(nonzero.max()),
         "token bytes mean": round(nonzero.mean().item(), 3)},
    ])


if __name__ == "__main__":
    main()
