"""Fuzz chat_web's HTTP API with schemathesis against its own /openapi.json: 0 server errors expected, and
every answer must match the document (status codes, content types, bodies, SSE events).

    python -m dev.fuzz_web                      # ~60 s: a tiny random GPT with live learning, on loopback
    python -m dev.fuzz_web --max-time 20 --max-examples 10

Bodies' sampling floats are, about half the time, float32/float64 edge values (dev/fuzz_floats.py, a schemathesis
hook), and a second run fuzzes the three generating routes alone, where such a float reaches the sampler most often
(each run gets --max-time).

The server runs in this process on a loopback port (never another interface), with an API key and an
admin key that the fuzzer sends, so every endpoint is reachable; its adapters live in a temp dir that is
deleted at the end. The model is a depth-1 GPT with random weights over a byte-level tokenizer: replies
are noise, which is all a fuzzer needs. Exit status 0 when schemathesis found nothing.
"""
import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.serve.app import create_app, serve_in_thread
from nanochat.serve.live import LiveLearning
from nanochat.serve.openai_api import Defaults, Limits
from nanochat.serve.replicas import Worker
from nanochat.tokenizer import Tokenizer

API_KEY, ADMIN_KEY = "fuzz-api-key", "fuzz-admin-key"


def tiny_server(adapters_root):
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=64))
    model.init_weights()
    trainer = copy.deepcopy(model)
    learn = lambda pool: LiveLearning(pool, trainer, tok, adapters_root)
    limits = Limits(max_learn_steps=3, max_learn_jobs=2, max_adapters=4, max_message_chars=2000,
                    max_total_chars=4000)
    return create_app([Worker(0, model, tok)], "nanochat-fuzz", limits=limits,
                      defaults=Defaults(temperature=0.0, top_k=50, max_tokens=8), learn=learn,
                      api_key=API_KEY, admin_key=ADMIN_KEY)


def schemathesis_runs(exe, url, args):
    """The schemathesis command lines: the whole API (every phase), then, unless --no-extreme-floats, the three
    generating routes alone (fuzzing), where dev/fuzz_floats.py's requests reach the sampler most often."""
    cmd = [exe, "run", f"{url}/openapi.json", "--checks", args.checks, "--max-examples", str(args.max_examples),
           "--exclude-checks", args.exclude_checks, "--max-time", str(args.max_time), "--seed", str(args.seed),
           "--request-timeout", "30", "-H", f"Authorization: Bearer {ADMIN_KEY}", "--continue-on-failure",
           "--no-color", "--suppress-health-check", "all"]
    if not args.extreme_floats:
        return [cmd]
    return [cmd, cmd + ["--phases", "fuzzing", "--include-path-regex", "completions$"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-time", type=int, default=60, help="time budget of each schemathesis run, seconds")
    p.add_argument("--max-examples", type=int, default=25, help="cases per operation")
    p.add_argument("--checks", default="all", help="schemathesis checks (default: all)")
    # positive_data_acceptance expects every schema-valid body to be accepted; ours are also checked for
    # meaning (a conversation ends with a user message, fits the context, limits set by flags), which
    # JSON Schema can't say, so those 400s are correct answers, not findings.
    p.add_argument("--exclude-checks", default="positive_data_acceptance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-extreme-floats", dest="extreme_floats", action="store_false",
                   help="no float32/float64 edge values in the bodies (dev/fuzz_floats.py), and no second run")
    args = p.parse_args(argv)
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        print("schemathesis is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.extreme_floats:  # the hook module, importable from the repository root
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env |= {"SCHEMATHESIS_HOOKS": "dev.fuzz_floats",
                "PYTHONPATH": os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))}
    root = tempfile.mkdtemp(prefix="nanochat-fuzz-")
    torch.set_num_threads(1)
    try:
        with serve_in_thread(tiny_server(os.path.join(root, "adapters"))) as url:
            status = 0
            for cmd in schemathesis_runs(exe, url, args):
                print("$ " + " ".join(cmd), flush=True)
                # its example database and reports go to root
                status = max(status, subprocess.run(cmd, cwd=root, env=env).returncode)
            return status
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
