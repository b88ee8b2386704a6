"""Serving benchmark: time to first token and tokens/s of scripts.chat_web at 1 and 8 concurrent clients
(not a test). Results and notes: dev/notes_serve.md. Goal: time to first token < 500 ms at one client on CPU.

    python -m dev.bench_serve                          # starts the server on the best checkpoint there is
    python -m dev.bench_serve -i base --device-type cpu --concurrency 1,8 --requests 4 --max-tokens 64
    python -m dev.bench_serve --url http://127.0.0.1:8000   # measure a server that is already running

It starts `python -m scripts.chat_web` as its own process (so the clients don't share its interpreter),
waits for /health, sends one warm-up request, then for each concurrency level c runs c clients at once,
each sending --requests streaming requests one after another to POST /v1/chat/completions (the OpenAI
route, with stream_options.include_usage), and times every request from the client's side:
  TTFT        request sent -> first chunk with content (queueing included: one worker serves one request
              at a time, so with c clients most requests wait for others)
  decode tok/s  (completion tokens - 1) / (last chunk - first content chunk), per request
  total tok/s   all completion tokens / wall time of the level (the server's throughput)
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from nanochat.checkpoint_manager import SOURCES, complete_steps
from nanochat.common import get_base_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Why is the sky blue?", "Tell me a short story about a cat.", "What is the capital of France?",
           "Write a sentence about rivers.", "How do plants grow?", "What is 12 times 7?",
           "Name three colors.", "Describe a city at night."]


def pick_source(requested):
    """The stage to serve: the one asked for, or else the most trained one that has a checkpoint."""
    if requested != "auto":
        return requested
    for source in ("rl", "sft", "mid", "base"):
        root = os.path.join(get_base_dir(), SOURCES[source][0])
        if os.path.isdir(root) and any(complete_steps(os.path.join(root, t)) for t in os.listdir(root)):
            return source
    sys.exit(f"no checkpoint under {get_base_dir()}: train one first (bash speedrun.sh)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(http, prompt, args, seed):
    body = {"model": "nanochat", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_k": args.top_k, "seed": seed}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return {"ttft": None if first is None else first - t0, "tokens": tokens,
            "decode_tps": (tokens - 1) / (last - first) if first is not None and last > first else None}


async def run_level(url, clients, args):
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as http:
        async def client(c):
            return [await one_request(http, PROMPTS[(c + i) % len(PROMPTS)], args, seed=1000 * c + i)
                    for i in range(args.requests)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in results for r in rs], wall


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="auto", choices=["auto", "base", "mid", "sft", "rl"],
                   help="checkpoint stage to serve (auto: rl, sft, mid, base, the first that exists)")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("--device-type", default="", help="passed to chat_web (default: autodetect)")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    args = p.parse_args()

    proc = None
    url = args.url
    if url is None:
        source = pick_source(args.source)
        port = free_port()
        cmd = [sys.executable, "-m", "scripts.chat_web", "-i", source, "--port", str(port), "--num-gpus", str(args.num_gpus)]
        if args.device_type:
            cmd += ["--device-type", args.device_type]
        if args.model_tag:
            cmd += ["-g", args.model_tag]
        print("starting:", " ".join(cmd[1:]), file=sys.stderr)
        proc = subprocess.Popen(cmd, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                    sys.exit("the server did not come up")
                time.sleep(0.2)
        asyncio.run(run_level(url, 1, argparse.Namespace(**{**vars(args), "requests": 1})))  # warm-up
        rows = []
        for clients in [int(c) for c in args.concurrency.split(",")]:
            results, wall = asyncio.run(run_level(url, clients, args))
            ttfts = [r["ttft"] * 1000 for r in results if r["ttft"] is not None]
            decode = [r["decode_tps"] for r in results if r["decode_tps"] is not None]
            tokens = sum(r["tokens"] for r in results)
            rows.append((clients, len(results), statistics.median(ttfts), pct(ttfts, 0.9), max(ttfts),
                         statistics.mean(decode) if decode else float("nan"), tokens / len(results), tokens / wall))
        stats = httpx.get(url + "/stats").json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nmodel {health['model']}, {health['workers']} worker(s) on {stats['workers'][0]['device']}; "
          f"max_tokens {args.max_tokens}, temperature {args.temperature}, top_k {args.top_k}, "
          f"{args.requests} requests per client\n")
    print("| clients | requests | TTFT p50 ms | TTFT p90 ms | TTFT max ms | decode tok/s per request | tokens/request | total tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for c, n, p50, p90, mx, dec, tpr, tot in rows:
        print(f"| {c} | {n} | {p50:.0f} | {p90:.0f} | {mx:.0f} | {dec:.1f} | {tpr:.1f} | {tot:.1f} |")
    one = [r for r in rows if r[0] == 1]
    if one:
        print(f"\ngoal: TTFT < 500 ms at 1 client: p50 {one[0][2]:.0f} ms -> {'met' if one[0][2] < 500 else 'NOT met'}")
    print(f"server /stats: {stats['tokens_generated']} tokens, {stats['tokens_per_second']} tok/s while generating")


if __name__ == "__main__":
    main()
