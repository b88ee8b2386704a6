"""Import a published NanoChat (a hub id or a local folder in transformers' layout) as a checkpoint of ours,
so chat_cli, chat_web (live learning, adapters), chat_eval, continual learning and mid/SFT/RL/DPO take it.

    python -m scripts.import_hf karpathy/nanochat-d32                 # -> chatsft_checkpoints/d32 + tokenizer/
    python -m scripts.import_hf ./my-export --as mid -g imported      # then: python -m scripts.chat_sft -g imported
    python -m scripts.chat_cli -g d32 -p "Hello"

Refused, with the reason and nothing written: another architecture, settings our GPT cannot reproduce, a
vocab size that does not match the tokenizer, a tokenizer that is not a nanochat one, missing or truncated
safetensors, weights only as a pickle (pytorch_model.bin), a tag that already holds checkpoints or a base dir
with a different tokenizer (both unless --force, which keeps the old ones as .prev). Needs the `hf` extra.
"""
import argparse
import sys

from nanochat.common import script_argv
from nanochat.hf import hf_modules


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a local folder (config.json, model.safetensors, tokenizer.json) or a hub id owner/name")
    p.add_argument("--as", dest="as_", default="sft", choices=["base", "mid", "sft", "rl", "dpo"],
                   help="which stage's checkpoint it becomes (what later stages load it as)")
    p.add_argument("-g", "--model-tag", default=None, help="the tag to write (default: d<layers>)")
    p.add_argument("--revision", default=None, help="a hub branch, tag or commit")
    p.add_argument("--force", action="store_true", help="replace the tag's checkpoints / a different tokenizer "
                   "(kept as <tag>.prev / tokenizer.prev)")
    return p.parse_args(script_argv(argv))


def main(argv=None):
    args = parse_args(argv)
    convert, hf_import = hf_modules("importing", "convert", "import_")
    try:
        info = hf_import.import_model(args.src, as_=args.as_, tag=args.model_tag, force=args.force,
                                      revision=args.revision)
    except convert.ConversionError as e:
        sys.exit(f"error: {e}")
    c = info["config"]
    print(f"imported {args.src} -> {info['checkpoint']} ({c['n_layer']} layers, width {c['n_embd']}, "
          f"{c['n_head']} heads / {c['n_kv_head']} kv, vocab {c['vocab_size']}, context {c['sequence_len']}); "
          f"tokenizer {'written' if info['tokenizer_written'] else 'already there'}")
    print(f"chat with it: python -m scripts.chat_cli -i {info['as']} -g {info['tag']}")


if __name__ == "__main__":
    main()
