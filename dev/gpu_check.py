"""The Python half of dev/gpu_check.sh: makes its offline data, measures decoding, asks chat_web one
question through the OpenAI client, and prints the table; it knows nothing about launching stages.

    python dev/gpu_check.py data  BASE_DIR [--mb 40]      text shards + eval JSONL, no network
    python dev/gpu_check.py decode --device cuda           engine tokens/s of the SFT model
    python dev/gpu_check.py web --port 8123                one OpenAI-client request to a running chat_web
    python dev/gpu_check.py table LOG_DIR BASE_DIR         the summary table from the stage logs
"""
import argparse
import glob
import json
import os
import re
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(base_dir, mb):
    """Pretraining text that every machine with Python has (the standard library's sources and this repo's
    docs: the check measures speed and failures, not quality) and a held-out eval set of synthetic problems."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.gsm8k import GSM8KSynthetic

    texts, total = [], 0
    roots = [sysconfig.get_paths()["stdlib"], ROOT]
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                           + glob.glob(os.path.join(root, "**", "*.md"), recursive=True)):
            if "site-packages" in path or "/test" in path or "/.venv" in path:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if len(text) > 200:
                texts.append(text[:20000])
                total += len(texts[-1])
            if total > mb * 2**20:
                break
    if total < 2**20:
        raise SystemExit(f"found only {total} characters of local text under {roots}")
    data_dir = os.path.join(base_dir, "base_data")
    os.makedirs(data_dir, exist_ok=True)
    n_shards = 4  # the last one is the validation split
    schema = pa.schema([("text", pa.string()), ("source", pa.string())])
    for s in range(n_shards):
        part = texts[s::n_shards]
        with pq.ParquetWriter(os.path.join(data_dir, f"shard_{s:05d}.parquet"), schema) as w:
            for i in range(0, len(part), 256):
                chunk = part[i:i + 256]
                w.write_table(pa.table({"text": chunk, "source": ["local"] * len(chunk)}, schema=schema))

    held_out = GSM8KSynthetic(size=64, seed=99)  # mid/SFT train on seeds 0 and 1 of the same generator
    with open(os.path.join(base_dir, "gpu_check_eval.jsonl"), "w") as f:
        for i in range(len(held_out)):
            conv = held_out[i]
            f.write(json.dumps({"messages": conv["messages"], "answer": conv["answer"]}) + "\n")
    print(f"data: {len(texts)} documents, {total / 2**20:.1f} MiB in {n_shards} shards; "
          f"{len(held_out)} held-out eval problems")


def decode(device_type, new_tokens, batch_sizes=(1, 8)):
    import torch

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.tools.registry import ToolRegistry
    device = torch.device(device_type)
    model, tokenizer, _ = load_model("sft", device, phase="eval")  # computes in compute_dtype's choice
    engine = Engine(model, tokenizer, tools=ToolRegistry())
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Count to twenty."},
                                                           {"role": "assistant", "content": ""}]})
    for b in batch_sizes:
        for _ in engine.generate(prompt, num_samples=b, max_tokens=8, temperature=0.0):
            pass  # warm-up
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for column, _ in engine.generate(prompt, num_samples=b, max_tokens=new_tokens, temperature=1.0, seed=1):
            n += len(column)
        if device_type == "cuda":
            torch.cuda.synchronize()
        print(f"decode batch {b}: {n / (time.perf_counter() - t0):.1f} tok/s")


def web(port, timeout=120):
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=os.environ.get("NANOCHAT_API_KEY", "none"))
    t0 = time.time()
    while True:  # the server loads the model before it listens
        try:
            served = client.models.list().data[0].id  # the server answers only to its own model names
            reply = client.chat.completions.create(model=served, max_tokens=16,
                                                   messages=[{"role": "user", "content": "What is 2+2?"}])
            break
        except Exception as e:  # connection refused while it starts
            if time.time() - t0 > timeout:
                raise SystemExit(f"chat_web did not answer within {timeout}s: {e}")
            time.sleep(1)
    text = reply.choices[0].message.content
    print(f"web reply ({reply.usage.completion_tokens} tokens): {text!r}")


def last(pattern, text, default="-"):
    found = re.findall(pattern, text)
    return found[-1] if found else default


def table(log_dir, base_dir):
    rows = []
    report = os.path.join(base_dir, "report", "base-model-training.md")
    peak = last(r"Peak memory \(MiB\)\W+([0-9.]+)", open(report).read(), "n/a") if os.path.exists(report) else "n/a"
    with open(os.path.join(log_dir, "stages.tsv")) as f:
        stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for name, status, seconds in stages:
        path = os.path.join(log_dir, name + ".log")
        text = open(path, errors="replace").read() if os.path.exists(path) else ""
        detail = ""
        if name == "data":
            detail = last(r"data: ([^\n]*)", text)
        elif name.startswith("base_train"):  # the plain run, then --fp8 / --fa3 (each says if it fell back)
            used = " | ".join(re.findall(r"^(--(?:fp8|fa3): [^\n]*)", text, re.M)) or "plain"
            detail = (f"{used} | tok/s {last(r'tok/s ([0-9,]+)', text)} | mfu {last(r'mfu ([0-9.]+)%', text)}% | "
                      f"peak memory (MiB) {last(r'peak memory: ([0-9.]+) MiB', text, peak)}")
        elif name in ("mid_train", "chat_sft"):
            detail = f"tok/s {last(r'tok/s ([0-9,]+)', text)}"
        elif name == "base_loss":
            detail = f"val bpb {last(r'val bpb: ([0-9.]+)', text)}"
        elif name == "chat_eval":
            detail = last(r'(gpu_check_eval: [^\n]*)', text)
        elif name == "decode":
            detail = " | ".join(re.findall(r"decode (batch \d+: [0-9.]+ tok/s)", text))
        elif name == "chat_web":
            detail = last(r"web reply (\([^\n]*)", text)
        rows.append((name, status, seconds, detail))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'stage':<{width}} | status | seconds | measured")
    print(f"{'-' * width}-|--------|---------|---------")
    for name, status, seconds, detail in rows:
        print(f"{name:<{width}} | {status:<6} | {seconds:>7} | {detail}")
    return 0 if all(r[1] == "ok" for r in rows) else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("base_dir")
    d.add_argument("--mb", type=float, default=40)
    c = sub.add_parser("decode")
    c.add_argument("--device", default="cuda")
    c.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    w = sub.add_parser("web")
    w.add_argument("--port", type=int, required=True)
    t = sub.add_parser("table")
    t.add_argument("log_dir")
    t.add_argument("base_dir")
    args = p.parse_args()
    if args.cmd == "data":
        make_data(args.base_dir, args.mb)
    elif args.cmd == "decode":
        decode(args.device, args.tokens)
    elif args.cmd == "web":
        web(args.port)
    else:
        sys.exit(table(args.log_dir, args.base_dir))


if __name__ == "__main__":
    main()
