"""Export a checkpoint for the Hugging Face ecosystem: a folder transformers loads (and PEFT, for an adapter),
optionally uploaded to the hub.

    python -m scripts.export --to hf out/nanochat-d20                         # the SFT model, fp32
    python -m scripts.export --to hf out/d20-rl -i rl --dtype bf16 --push me/nanochat-d20
    python -m scripts.export --to hf out/facts --adapter facts                # + out/facts/adapters/facts (PEFT)
    python -m scripts.export --to hf out/merged --adapter domain --adapter facts:0.5 --merge

The folder: config.json (transformers' NanoChatForCausalLM; a model using something NanoChat lacks gets our
own modeling file and auto_map instead, loaded with trust_remote_code=True, as does --remote-code),
model.safetensors, generation_config.json (chat_cli's sampling defaults), tokenizer.json +
tokenizer_config.json + chat_template.jinja (our ids and chat format exactly), README.md (the model card,
from $NANOCHAT_BASE_DIR/report/report.md when there is one). Needs the `hf` extra: pip install -e '.[hf]'.
--push uploads it with huggingface_hub (token: HF_TOKEN or `hf auth login`).
"""
import argparse
import sys

from nanochat.common import script_argv
from nanochat.hf import hf_modules


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=["hf"], help="the target format (hf: transformers + PEFT)")
    p.add_argument("out_dir", help="the folder to write (refused if it exists and is not empty, unless --force)")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl", "dpo"],
                   help="which stage's model")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights in the safetensors file")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="a saved adapter ($NANOCHAT_BASE_DIR/adapters/NAME); one goes out in PEFT's layout, "
                        "several (a stack, in order) need --merge")
    p.add_argument("--merge", action="store_true", help="merge the adapter(s) into the exported weights")
    p.add_argument("--remote-code", action="store_true", help="ship our own modeling file even when transformers' "
                   "NanoChat can express the model")
    p.add_argument("--license", default="mit", help="the license in the model card's metadata")
    p.add_argument("--report", default=None, help="report.md for the model card (default: the base dir's)")
    p.add_argument("--push", default=None, metavar="REPO_ID",
                   help="upload the folder to the hub as REPO_ID (owner/name)")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    return p.parse_args(script_argv(argv))


def parse_adapters(specs):
    out = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise SystemExit(f"error: --adapter {spec!r}: the weight after ':' must be a number") from None
    return out


def main(argv=None):
    args = parse_args(argv)
    convert, hf_export = hf_modules("exporting", "convert", "export")
    try:
        if args.push:
            hf_export.check_repo_id(args.push)
        info = hf_export.export(args.out_dir, source=args.source, tag=args.model_tag, step=args.step,
                                dtype=args.dtype, adapters=parse_adapters(args.adapter), merge=args.merge,
                                remote_code=args.remote_code, license=args.license, repo_id=args.push,
                                report_path=args.report, force=args.force)
        layout = "our modeling file (load with trust_remote_code=True)" if info["layout"] == "remote" else \
            "transformers' NanoChatForCausalLM"
        print(f"exported {args.source}/{info['tag']} step {info['step']} to {info['out_dir']} as {layout}, "
              f"{args.dtype}; model card {'from report.md' if info['report'] else 'without a report'}")
        print("files: " + ", ".join(info["files"]))
        if args.push:
            print(f"uploaded: {hf_export.push(info['out_dir'], args.push, private=args.private)}")
    except (convert.ConversionError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
