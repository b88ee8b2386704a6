"""The export checked on a real model: a trained checkpoint (default: the speedrun's SFT model) exported with
scripts.export, loaded back by transformers, and asked a few questions through the transformers pipeline; each
greedy reply is compared with chat_cli's greedy reply to the same question (its chat_turn, -t 0, fp32). Prints a
table; the result is recorded in dev/notes_hf.md.

    python -m dev.hf_demo                    # the SFT model
    python -m dev.hf_demo -i rl --max-tokens 64
"""

import argparse
import io
import os
import sys
import tempfile

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.tools.registry import make_registry
from scripts.chat_cli import chat_turn

PROMPTS = ["Hello! Who are you?", "What is the capital of France?", "Why is the sky blue?",
           "Write a short poem about the sea.", "Tell me a fun fact about cats.", "How are you today?",
           "What do you like to do?", "Can you help me with my homework?"]


def chat_cli_replies(source, prompts, max_tokens):
    """chat_cli's greedy replies (-t 0, fp32), each streamed to a buffer through chat_cli's own chat_turn, as
    a user sees them, less the closing note when a reply hits --max-tokens (a tool call would show as
    [tool: ...] and differ: the pipeline runs no tools)."""
    model, tokenizer, _ = load_model(source, torch.device("cpu"), "eval", dtype="float32")
    engine = Engine(model, tokenizer, tools=make_registry("")[0])
    replies = []
    for prompt in prompts:
        buf = io.StringIO()
        chat_turn(engine, tokenizer, [{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens,
                  out=buf)
        replies.append(buf.getvalue().replace(f"[stopped: reached --max-tokens {max_tokens}]", "").strip())
    return replies


def cell(text):
    """Text fit for one markdown table cell."""
    return text.replace("\n", " ").replace("|", "\\|")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft")
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # the optional hf extra

    from nanochat.hf.export import export
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "export")
        info = export(folder, source=args.source)
        print(f"exported {args.source} ({info['layout']} layout): {', '.join(sorted(info['files']))}")
        # our modeling file when the model uses what NanoChat cannot express (base_train's qk_gain)
        remote = info["layout"] == "remote"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
        chat = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(folder))
        same = until_tool = 0
        ours_all = chat_cli_replies(args.source, PROMPTS, args.max_tokens)
        print("| prompt | transformers pipeline (greedy) | chat_cli -t 0 | same |\n|---|---|---|---|")
        # chat_cli runs the model's tool calls (shown as [tool: call -> output]); the pipeline has no tools and
        # lets the model write an output itself, so a reply with a tool call can only agree up to the call

        for prompt, ours in zip(PROMPTS, ours_all):
            conv = [{"role": "user", "content": prompt}]
            theirs = chat(conv, max_new_tokens=args.max_tokens, do_sample=False)[0]["generated_text"][-1]["content"]
            theirs = theirs.strip()
            before_call = "[" in ours and theirs.startswith(ours.split("[", 1)[0])
            same += theirs == ours
            until_tool += before_call and theirs != ours
            verdict = "yes" if theirs == ours else "up to the tool call" if before_call else "NO"
            print(f"| {prompt} | {cell(theirs)} | {cell(ours)} | {verdict} |")
        print(f"\n{same}/{len(PROMPTS)} greedy replies identical, {until_tool} more identical up to a tool call "
              "that chat_cli ran")
        return 0 if same + until_tool == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())
