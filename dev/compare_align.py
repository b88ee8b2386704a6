"""RL (chat_rl) and DPO (chat_dpo) from the same SFT checkpoint with the same number of sampled answers,
measured side by side; writes dev/notes_align.md (table) and dev/align_curves.png (reward/margin curves).

    python -m dev.compare_align                         # the SFT model in $NANOCHAT_BASE_DIR
    python -m dev.compare_align --build-sft --base-dir /tmp/align   # build a small SFT model first (CPU)

Both stages run as the real scripts (subprocesses) on the same training problems: GSM8KSynthetic
(seed 0) problems 0 .. steps x prompts - 1, each sampled --num-samples times (RL: --rl-steps steps of
--prompts problems; DPO: the same problems once, then --dpo-epochs over the pairs). Then every model
(SFT, RL, DPO) is scored the same way: pass@1 (mean success of --eval-samples samples at temperature 1)
on held-out synthetic problems (another seed: the same templates, different problems) and on the first
--eval-problems GSM8K test problems, and ChatCORE from scripts.chat_eval (all its tasks, --chat-eval-problems
each). Wall time is each stage's own, sampling included.

--build-sft makes a model small enough for a shared CPU: a BPE tokenizer (--vocab) trained on synthetic
GSM8K text, a randomly initialised depth --depth GPT saved as a "base" checkpoint, then scripts.chat_sft
on the synthetic GSM8K conversations only (--sft-steps). There is no pretraining or midtraining in it: it is a
model that has only ever seen these word problems, which the notes say.
"""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-dir", default="", help="NANOCHAT_BASE_DIR to use (default: the environment's)")
    p.add_argument("--build-sft", action="store_true", help="build the small SFT model described above first")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--rl-steps", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8, help="problems per RL step")
    p.add_argument("--num-samples", type=int, default=8, help="answers sampled per problem (both methods)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dpo-epochs", type=int, default=2)
    p.add_argument("--dpo-pairs-per-step", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--heldout", type=int, default=64, help="held-out synthetic problems for pass@1")
    p.add_argument("--eval-problems", type=int, default=64, help="GSM8K test problems for pass@1")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--chat-eval-problems", type=int, default=64, help="problems per chat_eval task (ChatCORE)")
    p.add_argument("--skip", default="", help="comma-separated phases already done: sft,rl,dpo,eval")
    p.add_argument("--notes", default=os.path.join(ROOT, "dev", "notes_align.md"))
    return p.parse_args()


def run(module, *args, log):
    """Run a stage, its output streaming into `log` (watch it with tail -f); -> (stdout, seconds)."""
    with open(log, "a") as f:
        f.write(f"$ {module} {' '.join(map(str, args))}\n")
        start = f.tell()
    t0 = time.time()
    with open(log, "a") as f:
        p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, stdout=f,
                           stderr=subprocess.STDOUT,
                           env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    dt = time.time() - t0
    with open(log) as f:
        f.seek(start)
        out = f.read()
    if p.returncode != 0:
        raise SystemExit(f"{module} failed ({p.returncode}):\n{out[-4000:]}")
    print(f"{module}: {dt:.0f}s", flush=True)
    return out, dt


def build_sft(args, base, log):
    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT
    from nanochat.tokenizer import Tokenizer
    from scripts.base_train import model_config
    from tasks.gsm8k import synthetic_problem
    texts = [q + "\n" + a for q, a in (synthetic_problem(1, i) for i in range(4000))]
    tok = Tokenizer.train_from_iterator(iter(texts), args.vocab)
    tok.save(os.path.join(base, "tokenizer"))
    config = model_config(args.depth, 512, tok.get_vocab_size())
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(os.path.join(base, "base_checkpoints", f"d{args.depth}"), 0, model.state_dict(), None,
                    {"step": 0, "model_config": dataclasses.asdict(config), "note": "random init (compare_align)"})
    _, dt = run("scripts.chat_sft", "--source", "base", "--mixture", "gsm8k", "--max-seq-len", 256,
                "--device-batch-size", 8, "--examples-per-step", 8, "--num-iterations", args.sft_steps,
                "--init-lr-frac", 1.0, "--val-examples", 100, "--eval-every", 200, "--eval-mc", "",
                "--compile", "off", "--dtype", "float32", "--device-type", "cpu", log=log)
    return dt


def pass_at_1(source, task, n, args):
    """pass@1 and pass@k of a stage's model on the first n problems of task (temperature 1)."""
    import torch

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.tools.registry import ToolRegistry
    from scripts.chat_rl import evaluate_pass_at_k
    torch.manual_seed(0)
    model, tok, _ = load_model(source, "cpu", "eval")
    return evaluate_pass_at_k(task, n, Engine(model, tok, tools=ToolRegistry()), tok, args.eval_samples,
                              args.max_new_tokens, 1.0, 50, model.config.sequence_len)


def chatcore(source, args, base, log):
    run("scripts.chat_eval", "-i", source, "-x", args.chat_eval_problems, "-m", args.max_new_tokens,
        "--device-type", "cpu", log=log)
    with open(os.path.join(base, "report", f"chat-evaluation-{source}.json")) as f:
        return json.load(f)["summary"]


def plot(rl_rewards, dpo_hist, path):
    from nanochat.report import close_figure, subplots
    fig, (a, b) = subplots(1, 2, figsize=(11, 4))
    a.plot(range(len(rl_rewards)), rl_rewards, marker=".")
    a.set_title("RL: mean reward of the step's samples")
    a.set_xlabel("step")
    b.plot([h["step"] for h in dpo_hist], [h["margin"] for h in dpo_hist], label="margin")
    b.plot([h["step"] for h in dpo_hist], [h["chosen"] for h in dpo_hist], label="chosen reward")
    b.plot([h["step"] for h in dpo_hist], [h["rejected"] for h in dpo_hist], label="rejected reward")
    b.plot([h["step"] for h in dpo_hist], [h["accuracy"] for h in dpo_hist], label="reward accuracy")
    b.set_title("DPO: implicit rewards on the step's pairs")
    b.set_xlabel("step")
    b.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    close_figure(fig)


def main():
    args = parse_args()
    if args.base_dir:
        os.environ["NANOCHAT_BASE_DIR"] = args.base_dir
    from nanochat.common import get_base_dir
    base = get_base_dir()
    work = os.path.join(base, "compare_align")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "log.txt")
    state_path = os.path.join(work, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    skip = set(filter(None, args.skip.split(",")))

    def save_state():
        with open(state_path, "w") as f:
            json.dump(state, f, indent=1)

    if args.build_sft and "sft" not in skip:
        state["sft_s"] = build_sft(args, base, log)
        save_state()
    n_problems = args.rl_steps * args.prompts
    common = ["--source", "sft", "--num-samples", args.num_samples, "--max-new-tokens", args.max_new_tokens,
              "--device-type", "cpu", "--dtype", "float32", "--eval-problems", args.eval_problems,
              "--eval-samples", args.eval_samples]
    if "rl" not in skip:
        out, state["rl_s"] = run("scripts.chat_rl", *common, "--num-steps", args.rl_steps, "--prompts-per-step",
                                 args.prompts, "--eval-every", -1, "--save-every", -1, log=log)
        state["rl_rewards"] = [float(m) for m in re.findall(r"mean reward ([0-9.]+)", out)]
        save_state()
    if "dpo" not in skip:
        loss_file = os.path.join(work, "dpo_history.jsonl")
        if os.path.exists(loss_file):
            os.remove(loss_file)
        out, state["dpo_s"] = run("scripts.chat_dpo", *common, "--problems", "gsm8k-synthetic", "--num-problems",
                                  n_problems, "--pairs-per-problem", 2, "--num-epochs", args.dpo_epochs,
                                  "--pairs-per-step", args.dpo_pairs_per_step, "--beta", args.beta,
                                  "--loss-file", loss_file, log=log)
        state["dpo_hist"] = [json.loads(line) for line in open(loss_file)]
        state["dpo_log"] = [line for line in out.splitlines() if line.startswith(("pairs:", "train pairs:"))
                            or "val margin" in line]
        save_state()
    if "eval" not in skip:
        from tasks.gsm8k import GSM8K, GSM8KSynthetic
        heldout, test = GSM8KSynthetic(size=args.heldout, seed=7), GSM8K(split="test")
        for src in ("sft", "rl", "dpo"):
            t0 = time.time()
            state[f"{src}_heldout"] = pass_at_1(src, heldout, args.heldout, args)
            state[f"{src}_gsm8k"] = pass_at_1(src, test, args.eval_problems, args)
            state[f"{src}_chat"] = chatcore(src, args, base, log)
            print(f"eval {src}: {time.time() - t0:.0f}s", flush=True)
            save_state()
    if all(f"{src}_chat" in state for src in ("sft", "rl", "dpo")):
        plot(state["rl_rewards"], state["dpo_hist"], os.path.join(ROOT, "dev", "align_curves.png"))
        write_notes(args, state, n_problems)


def write_notes(args, state, n_problems):
    k = args.eval_samples
    rows = []
    for src, name in (("sft", "SFT (start)"), ("rl", "RL (chat_rl)"), ("dpo", "DPO (chat_dpo)")):
        chat = state[f"{src}_chat"]
        wall = {"sft": "-", "rl": f"{state['rl_s']:.0f} s", "dpo": f"{state['dpo_s']:.0f} s"}[src]
        rows.append(f"| {name} | {state[f'{src}_heldout'][0]:.3f} / {state[f'{src}_heldout'][1]:.3f} | "
                    f"{state[f'{src}_gsm8k'][0]:.3f} / {state[f'{src}_gsm8k'][1]:.3f} | {chat['ChatCORE']:.4f} | "
                    f"{chat.get('GSM8K', float('nan')):.3f} | {wall} |")
    hist = state["dpo_hist"]
    first, last = hist[0], hist[-1]
    rl = state["rl_rewards"]
    text = "\n".join([
        "# RL vs DPO from the same SFT checkpoint (dev/compare_align.py)",
        "",
        f"Same training problems and the same number of sampled answers: {n_problems} GSM8KSynthetic problems x "
        f"{args.num_samples} samples = {n_problems * args.num_samples} answers each (RL: {args.rl_steps} steps x "
        f"{args.prompts} problems; DPO: every problem once, then {args.dpo_epochs} epochs over the pairs, beta "
        f"{args.beta}, sigmoid loss). Max {args.max_new_tokens} new tokens, temperature 1, calculator on.",
        "",
        f"pass@1 / pass@{k}: mean success over {k} samples at temperature 1 / any of them right, on {args.heldout} "
        f"held-out synthetic problems (seed 7, never trained on) and the first {args.eval_problems} GSM8K test "
        f"problems. ChatCORE and its GSM8K column: scripts.chat_eval (greedy), {args.chat_eval_problems} problems "
        "per task. Wall time: the stage's own run, sampling and its before/after evaluation included.",
        "",
        f"| model | synthetic held-out pass@1 / pass@{k} | GSM8K test pass@1 / pass@{k} | ChatCORE | GSM8K (greedy) "
        "| wall time |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "DPO pairs: " + " | ".join(state.get("dpo_log", [])),
        "",
        f"DPO training margin (chosen - rejected implicit reward): {first['margin']:+.3f} at the first step, "
        f"{last['margin']:+.3f} at the last; reward accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f}. "
        f"RL mean reward per step: first {rl[0]:.3f}, last {rl[-1]:.3f}, mean {sum(rl) / len(rl):.3f}.",
        "",
        "![reward and margin curves](align_curves.png)",
        "",
    ])
    # a hand-written "## Discussion" at the end of the notes survives a re-run
    if os.path.exists(args.notes):
        old = open(args.notes).read()
        if "\n## Discussion" in old:
            text += old[old.index("\n## Discussion") + 1:]
    with open(args.notes, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
