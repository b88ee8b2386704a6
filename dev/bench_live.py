"""Live-learning benchmark for scripts.chat_web (issue 6; not a test). Results and notes: dev/notes_live.md.

    python -m dev.bench_live                       # sft model, 150 steps, adapters in a temp dir
    python -m dev.bench_live -i sft --steps 300 --adapters-dir /tmp/adapters --out /tmp/live.json

What it does, on the real checkpoint under $NANOCHAT_BASE_DIR, served in this process by uvicorn on a free
loopback port with the same live-learning setup as `python -m scripts.chat_web` (make_live_learning:
replay of ChitChat/ChatterBot train chats, general eval on 32 held-out ChitChat test chats):
  1. asks 5 made-up fact questions (greedy, temperature 0): the base model's answers
  2. POST /learn with the 5 facts, polls GET /learn/<job> until it ends (progress printed)
  3. stops the server and starts a fresh one (weights reloaded from disk) on the same adapters dir:
     the adapter must come back from disk
  4. asks the 5 questions again with "adapter": <name>, and with "adapter": "none" (the base, unchanged)
  5. times POST /adapters/<name>/activate (the server's switch_ms and the client's round trip; median of
     --switches, alternating the adapter and "none"), and GET /health's round trip as the HTTP floor
Targets (issue 6): >= 4/5 facts recalled after the restart, general chat loss up < 5%, switch < 50 ms.

A fact counts as recalled when the reply contains the taught answer verbatim ("strict"); "key" counts replies
that contain the fact's key term (e.g. "Quillon") anywhere, a looser reading of "answered with the fact".
The adapters dir defaults to a temp dir (deleted at the end), so the user's adapters are never touched.
Serving and training share the process: --threads 1 (the default) avoids oversubscribing a small CPU.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time

FACTS = [  # question, taught answer, key term
    ("What is the capital of Velmora?", "The capital of Velmora is Quillon.", "Quillon"),
    ("Who is the captain of the ship Zephyr Star?", "Captain Mira Oduya commands the Zephyr Star.", "Mira Oduya"),
    ("What colour is a glimberry?", "A glimberry is bright teal.", "teal"),
    ("When was the Orrin Bridge built?", "The Orrin Bridge was built in 1742.", "1742"),
    ("What does Professor Haskel teach?", "Professor Haskel teaches tidal poetry.", "tidal poetry"),
]


def start_server(args, root):
    """A fresh server: weights loaded from disk, live learning on adapters dir `root`. -> (app, model_id)."""
    from nanochat.serve.app import create_app
    from nanochat.serve.openai_api import Defaults
    from nanochat.serve.replicas import load_workers
    from scripts.chat_web import make_live_learning
    workers, meta = load_workers(args.source, args.device_type, model_tag=args.model_tag)
    model_id = f"nanochat-{args.source}-{args.model_tag or 'd%d' % workers[0].model.config.n_layer}"
    defaults = Defaults(temperature=0.0, top_k=50, max_tokens=args.max_tokens)
    app = create_app(workers, model_id, defaults=defaults, learn=make_live_learning(workers, root))
    return app, model_id, meta


def chat(http, url, question, adapter=None, max_tokens=48):
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0.0}
    if adapter is not None:
        body["adapter"] = adapter
    r = http.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def ask_all(http, url, args, adapter=None, label=""):
    replies = []
    for q, a, key in FACTS:
        reply = chat(http, url, q, adapter, args.max_tokens)
        replies.append(reply)
        mark = "strict" if a in reply else ("key" if key.lower() in reply.lower() else "-")
        print(f"  {label}[{mark:>6}] {q}\n  {' ' * len(label)}         -> {reply!r}", flush=True)
    return replies


def recall(replies):
    strict = sum(a in r for (_, a, _), r in zip(FACTS, replies))
    key = sum(k.lower() in r.lower() for (_, _, k), r in zip(FACTS, replies))
    return strict, key


def wait_job(http, url, job_id, timeout, every=10.0):
    t0 = time.monotonic()
    last = -every
    while True:
        job = http.get(f"{url}/learn/{job_id}").json()
        now = time.monotonic() - t0
        if job["status"] in ("done", "failed"):
            return job, now
        if now - last >= every:
            last = now
            loss = f"{job['loss']:.3f}" if job.get("loss") is not None else "-"
            eta = f"{job['eta_seconds']:.0f}s" if job.get("eta_seconds") is not None else "-"
            print(f"  [{now:6.1f}s] {job['status']:>7} step {job['step']}/{job['steps']} loss {loss} eta {eta}",
                  flush=True)
        if now > timeout:
            raise RuntimeError(f"job {job_id} did not finish in {timeout}s: {job}")
        time.sleep(0.5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's model")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--device-type", default="cpu", help="cpu|cuda|mps (default: cpu)")
    p.add_argument("--steps", type=int, default=150, help="training steps of the learn job")
    p.add_argument("--adapter", default="bench-facts", help="adapter name to train")
    p.add_argument("--adapters-dir", default="", help="adapters dir (default: a temp dir, removed afterwards)")
    p.add_argument("--max-tokens", type=int, default=48, help="reply length limit for the fact questions")
    p.add_argument("--switches", type=int, default=20, help="activate calls timed (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--job-timeout", type=float, default=3600, help="seconds to wait for the learn job")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)

    import httpx
    import torch
    torch.set_num_threads(args.threads)
    from nanochat.common import get_base_dir
    from nanochat.serve.app import serve_in_thread

    root = args.adapters_dir or tempfile.mkdtemp(prefix="nanochat-bench-live-")
    facts = [{"question": q, "answer": a} for q, a, _ in FACTS]
    res = {"source": args.source, "steps": args.steps, "adapters_dir": root, "threads": args.threads,
           "base_dir": get_base_dir(), "device_type": args.device_type}
    try:
        with httpx.Client(timeout=600) as http:
            # --- server 1: base answers, then learn ---------------------------------------------------
            t0 = time.perf_counter()
            app, model_id, meta = start_server(args, root)
            with serve_in_thread(app, startup_timeout=300) as url:
                res["model"], res["model_step"] = model_id, meta.get("step")
                res["startup_s"] = round(time.perf_counter() - t0, 2)
                print(f"serving {model_id} (step {meta.get('step')}) at {url}, adapters in {root} "
                      f"({res['startup_s']}s to start)", flush=True)
                print("before learning (base model):")
                before = ask_all(http, url, args, label="base ")
                print(f"POST /learn: {len(facts)} facts, {args.steps} steps -> adapter {args.adapter!r}")
                t_submit = time.perf_counter()
                r = http.post(url + "/learn", json={"adapter": args.adapter, "facts": facts, "steps": args.steps,
                                                    "replace": True})
                if r.status_code != 202:
                    sys.exit(f"POST /learn refused: {r.status_code} {r.text}")
                job, _ = wait_job(http, url, r.json()["job"], args.job_timeout)
                res["learn_wall_s"] = round(time.perf_counter() - t_submit, 2)
                if job["status"] != "done":
                    sys.exit(f"learn job failed: {job.get('error')}")
                res["job"] = job["metrics"]
                listing = http.get(url + "/adapters").json()
                res["adapter_meta"] = next(a for a in listing["adapters"] if a["name"] == args.adapter)
            # --- server 2: a restart on the same adapters dir ------------------------------------------
            t0 = time.perf_counter()
            app, _, _ = start_server(args, root)
            with serve_in_thread(app, startup_timeout=300) as url:
                res["restart_s"] = round(time.perf_counter() - t0, 2)
                names = [a["name"] for a in http.get(url + "/adapters").json()["adapters"]]
                print(f"restarted in {res['restart_s']}s; adapters loaded from disk: {names}", flush=True)
                if args.adapter not in names:
                    sys.exit(f"adapter {args.adapter!r} did not come back after the restart")
                print(f"after the restart, adapter={args.adapter!r}:")
                after = ask_all(http, url, args, adapter=args.adapter, label="lora ")
                print("after the restart, adapter='none':")
                base_again = ask_all(http, url, args, adapter="none", label="none ")
                server_ms, client_ms = [], []
                for i in range(args.switches):
                    name = args.adapter if i % 2 == 0 else "none"
                    t = time.perf_counter()
                    r = http.post(f"{url}/adapters/{name}/activate", json={})
                    client_ms.append((time.perf_counter() - t) * 1000)
                    r.raise_for_status()
                    server_ms.append(r.json()["switch_ms"])
                http.post(f"{url}/adapters/none/activate", json={}).raise_for_status()  # leave the base as the default
                floor_ms = []  # the HTTP round trip of a request that does nothing, for comparison
                for _ in range(args.switches):
                    t = time.perf_counter()
                    http.get(f"{url}/health").raise_for_status()
                    floor_ms.append((time.perf_counter() - t) * 1000)
    finally:
        if not args.adapters_dir:
            shutil.rmtree(root, ignore_errors=True)

    res["before"], res["after"], res["after_none"] = before, after, base_again
    res["recall_before"], res["recall_after"] = recall(before), recall(after)
    res["base_unchanged_after_restart"] = base_again == before
    res["switch_ms_server_median"] = statistics.median(server_ms)
    res["switch_ms_client_median"] = statistics.median(client_ms)
    res["health_ms_client_median"] = statistics.median(floor_ms)
    m, ad = res["job"], res["adapter_meta"]
    (sb, kb), (sa, ka) = res["recall_before"], res["recall_after"]
    change = 100 * m.get("general_loss_change", float("nan"))
    rows = [
        ("facts recalled, strict (x/5)", f"{sb}/5", f"{sa}/5", ">= 4/5", sa >= 4),
        ("facts recalled, key term (x/5)", f"{kb}/5", f"{ka}/5", "", None),
        ("loss on the 5 facts", f"{m['loss_before']:.3f}", f"{m['loss_after']:.3f}", "", None),
        ("general chat loss (32 held-out ChitChat)", f"{m.get('general_loss_base', float('nan')):.4f}",
         f"{m.get('general_loss_adapter', float('nan')):.4f}", "", None),
        ("general chat loss change", "", f"{change:+.2f}%", "< +5%", change < 5),
        ("training: job seconds / submit->done wall", "", f"{m['seconds']:.1f}s / {res['learn_wall_s']:.1f}s", "",
         None),
        ("switch (activate) ms, server / round trip, median", "",
         f"{res['switch_ms_server_median']:.3f} / {res['switch_ms_client_median']:.2f}", "< 50 ms",
         res["switch_ms_client_median"] < 50),
        ("GET /health round trip ms, median (HTTP floor)", "", f"{res['health_ms_client_median']:.2f}", "", None),
        ("adapter params / bytes", "", f"{ad['trainable_params']:,} / {ad['bytes']:,}", "", None),
        ("base answers unchanged after restart (adapter=none)", "", str(res["base_unchanged_after_restart"]), "",
         None),
    ]
    table = ["| metric | before | after | target | ok |", "|---|---|---|---|---|"]
    for name, b, a, target, ok in rows:
        table.append(f"| {name} | {b} | {a} | {target} | {'' if ok is None else ('yes' if ok else 'NO')} |")
    res["table"] = "\n".join(table)
    print()
    print(f"{res['model']} step {res['model_step']}, {args.steps} steps, {args.threads} thread(s), "
          f"{args.device_type}, replay {m.get('replay_conversations')} chats")
    print(res["table"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
