"""Export to and import from Hugging Face: our checkpoints as transformers models (with tokenizer, chat
template, model card and PEFT adapters), and published NanoChat models as checkpoints of ours.

    convert.py               config and weight names between our GPT and transformers' NanoChat (the rotary
                             sign), and the choice between NanoChat's layout and our own modeling file
    tokenizer_json.py        our BPE as tokenizer.json (merges that re-encode exactly) + the chat template, and back
    modeling_nanochat_gpt.py our GPT as a self-contained transformers model, shipped in exports that need it
    peft.py                  one LoRA adapter of ours in PEFT's layout
    model_card.py            README.md for the hub, from report.md when there is one
    export.py                a checkpoint -> a folder (atomic), and the upload to the hub
    import_.py               a folder or hub id -> a checkpoint + tokenizer in $NANOCHAT_BASE_DIR (checked, atomic)

Everything here needs the `hf` extra (transformers, peft, tokenizers): pip install -e '.[hf]'.
"""
import importlib
import sys


def hf_modules(what, *names):
    """nanochat.hf.<name> for each name, or exit saying that `what` needs the hf extra and how to install it: a
    script run without the extra should name the fix, not end in an ImportError's traceback."""
    try:
        return [importlib.import_module(f"nanochat.hf.{name}") for name in names]
    except ImportError as e:
        sys.exit(f"error: {what} needs the hf extra ({e}): pip install -e '.[hf]'")
