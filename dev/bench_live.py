"""Live-learning benchmark for scripts.chat_web (issues 6 and 31; not a test). Results and notes: dev/notes_live.md.

    python -m dev.bench_live                       # sft model, 150 steps, adapters in a temp dir
    python -m dev.bench_live --preserve 0 --no-add # compare training recipes (no "add" phase)
    python -m dev.bench_live -i sft --steps 300 --adapters-dir /tmp/adapters --out /tmp/live.json

What it does, on the real checkpoint under $NANOCHAT_BASE_DIR, served in this process by uvicorn on a free
loopback port with the same live-learning setup as `python -m scripts.chat_web` (make_live_learning: replay of
the SFT mixture's train chats, general loss on 32 held-out ChitChat chats, the general battery of tasks/general.py),
every request greedy (temperature 0):
  1. the base model's answers to 5 made-up fact questions, 7 paraphrases of them and the 48 battery prompts
  2. POST /learn with the 5 facts, polls GET /learn/<job> until it ends (progress printed; the job's own battery
     summary, measured on the trainer replica, is kept)
  3. stops the server and starts a fresh one (weights reloaded from disk) on the same adapters dir: the adapter
     must come back from disk
  4. asks the facts, the paraphrases and the battery again with "adapter": <name>, "adapter": "auto" and "none"
     (the battery's requests go concurrently, so they are rows of shared batches, as a busy server's are)
  5. POST /learn "mode": "add" with 5 more facts; the first 5 must stay recalled (--no-add skips this)
  6. times POST /adapters/<name>/activate, and GET /health's round trip as the HTTP floor
A fact counts as recalled verbatim when the reply contains the taught answer; a paraphrase when it contains the
fact's key term (e.g. "Quillon"). A battery answer is unchanged when its tool calls and final answer equal the
base model's (nanochat/serve/battery.py answer_key); "base vs base" asks the base model twice, in batches of
different make-up: the floor of that comparison. The adapters dir defaults to a temp dir (deleted at the end).
Serving and training share the process: --threads 1 (the default) avoids oversubscribing a small CPU.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

FACTS = [  # question, taught answer, key term
    ("What is the capital of Velmora?", "The capital of Velmora is Quillon.", "Quillon"),
    ("Who is the captain of the ship Zephyr Star?", "Captain Mira Oduya commands the Zephyr Star.", "Mira Oduya"),
    ("What colour is a glimberry?", "A glimberry is bright teal.", "teal"),
    ("When was the Orrin Bridge built?", "The Orrin Bridge was built in 1742.", "1742"),
    ("What does Professor Haskel teach?", "Professor Haskel teaches tidal poetry.", "tidal poetry"),
]
PARAPHRASES = [  # question never taught, key term of the fact it asks for
    ("Which city is the capital of Velmora?", "Quillon"),
    ("Velmora's capital city is called what?", "Quillon"),
    ("Who commands the Zephyr Star?", "Mira Oduya"),
    ("Which colour are glimberries?", "teal"),
    ("What is the colour of a glimberry?", "teal"),
    ("In what year was the Orrin Bridge built?", "1742"),
    ("Which subject does Professor Haskel teach?", "tidal poetry"),
]
MORE_FACTS = [
    ("What is the national animal of Trelloway?", "The national animal of Trelloway is the snow hare.", "snow hare"),
    ("Who founded the city of Marrowgate?", "Marrowgate was founded by Elsa Brandt.", "Elsa Brandt"),
    ("What river flows through Dunmere?", "The Ashwater flows through Dunmere.", "Ashwater"),
    ("How many moons does the planet Kelvara have?", "The planet Kelvara has nine moons.", "nine moons"),
    ("What instrument does Tobin Reyes play?", "Tobin Reyes plays the bass clarinet.", "bass clarinet"),
]


def chitchat_only(n_replay=512, n_eval=32):
    """The replay before issue 31 (--replay chitchat): ChitChat and ChatterBot train chats only."""
    from tasks.conversations import ChatterBot, ChitChat
    replay = [ex["messages"] for task in (ChitChat("train"), ChatterBot("train"))
              for ex in (task[i] for i in range(min(len(task), n_replay // 2)))]
    held = ChitChat("test")
    return replay, [held[i]["messages"] for i in range(min(len(held), n_eval))]


def start_server(args, root):
    """A fresh server: weights loaded from disk, live learning on adapters dir `root`. -> (app, model_id, meta)."""
    import scripts.chat_web
    from nanochat.serve.app import create_app
    from nanochat.serve.openai_api import Defaults
    from nanochat.serve.replicas import load_workers
    from nanochat.tools.registry import make_registry
    from scripts.chat_web import make_live_learning
    if args.replay == "chitchat":  # make_live_learning's jobs read scripts.chat_web.general_chats when they start
        scripts.chat_web.general_chats = chitchat_only
    tools, _ = make_registry("")  # what chat_web serves with: calculator, python, search over the default index
    workers, meta = load_workers(args.source, args.device_type, model_tag=args.model_tag, tools=tools)
    model_id = f"nanochat-{args.source}-{args.model_tag or 'd%d' % workers[0].model.config.n_layer}"
    defaults = Defaults(temperature=0.0, top_k=50, max_tokens=args.max_tokens)
    training = {"preserve": args.preserve, "subspace_energy": args.subspace_energy, "replay_ratio": args.replay_ratio}
    app = create_app(workers, model_id, defaults=defaults, learn=make_live_learning(workers, root, **training))
    return app, model_id, meta


def ask(http, url, messages, adapter=None, max_tokens=48, raw=False):
    """One greedy chat completion -> (the reply's model, its content; raw: as the model wrote it, tool calls
    included)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "raw_content": raw}
    if adapter is not None:
        body["adapter"] = adapter
    r = http.post(url + "/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code} for {messages[-1]['content'][:80]!r}: {r.text[:300]}")
    return r.json()["model"], r.json()["choices"][0]["message"]["content"]


def ask_facts(http, url, args, adapter=None, label=""):
    """The 5 fact questions and the 7 paraphrases -> {"verbatim", "paraphrased", "routed" (replies whose model is
    not the base's), "replies"}."""
    out = {"replies": [], "verbatim": 0, "paraphrased": 0, "routed": 0}
    for q, want, kind in [(q, a, "verbatim") for q, a, _ in FACTS] + [(q, k, "paraphrased") for q, k in PARAPHRASES]:
        model, reply = ask(http, url, [{"role": "user", "content": q}], adapter, args.max_tokens)
        hit = (want in reply) if kind == "verbatim" else (want.lower() in reply.lower())
        out[kind] += hit
        out["routed"] += model != args.model_id
        out["replies"].append(reply)
        print(f"  {label}[{'yes' if hit else '-':>3}] {q}\n  {' ' * len(label)}      -> {reply!r}", flush=True)
    return out


def recall(http, url, args, facts, adapter):
    """How many of `facts` come back verbatim."""
    return sum(a in ask(http, url, [{"role": "user", "content": q}], adapter, args.max_tokens)[1] for q, a, _ in facts)


def ask_battery(http, url, battery, adapter, threads=16):
    """Every battery prompt (a nanochat.serve.battery.Battery: the items that fit the context), concurrently ->
    [(reply model, parts)]."""
    from nanochat.serve.openai_messages import openai_text_as_parts

    def one(i):  # raw content: the tool calls stay in the text, where openai_text_as_parts finds them
        model, content = ask(http, url, battery.items[i].messages, adapter, battery.prompts[i][1], raw=True)
        return model, openai_text_as_parts(content)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(battery))))


def compare(battery, base, other, model_id):
    """Battery replies [(model, parts)] vs the base's -> score() plus how many were served by the base model."""
    from nanochat.serve.battery import score
    res = score(battery.items, [p for _, p in base], [p for _, p in other])
    res["to_base"] = sum(m == model_id for m, _ in other)
    return res


def wait_job(http, url, job_id, timeout, every=10.0):
    t0 = time.monotonic()
    last = -every
    while True:
        job = http.get(f"{url}/learn/{job_id}").json()
        now = time.monotonic() - t0
        if job["status"] in ("done", "failed", "cancelled"):
            return job, now
        if now - last >= every:
            last = now
            loss = f"{job['loss']:.3f}" if job.get("loss") is not None else "-"
            eta = f"{job['eta_seconds']:.0f}s" if job.get("eta_seconds") is not None else "-"
            print(f"  [{now:6.1f}s] {job['status']:>7} {job.get('phase') or '':>8} step {job['step']}/{job['steps']} "
                  f"loss {loss} eta {eta}", flush=True)
        if now > timeout:
            raise RuntimeError(f"job {job_id} did not finish in {timeout}s: {job}")
        time.sleep(0.5)


def learn(http, url, args, facts, mode):
    body = {"adapter": args.adapter, "facts": [{"question": q, "answer": a} for q, a, _ in facts],
            "steps": args.steps, "mode": mode}
    r = http.post(url + "/learn", json=body)
    if r.status_code != 202:
        sys.exit(f"POST /learn refused: {r.status_code} {r.text}")
    t0 = time.perf_counter()
    job, _ = wait_job(http, url, r.json()["job"], args.job_timeout)
    if job["status"] != "done":
        sys.exit(f"learn job {job['status']}: {job.get('error')}")
    print(f"  {job['battery']}", flush=True)
    return job, round(time.perf_counter() - t0, 2)


def switch_times(http, url, args):
    server_ms, client_ms, floor_ms = [], [], []
    for i in range(args.switches):
        name = args.adapter if i % 2 == 0 else "none"
        t = time.perf_counter()
        r = http.post(f"{url}/adapters/{name}/activate", json={})
        client_ms.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        server_ms.append(r.json()["switch_ms"])
    http.post(f"{url}/adapters/none/activate", json={}).raise_for_status()  # leave the base as the default
    for _ in range(args.switches):  # the HTTP round trip of a request that does nothing, for comparison
        t = time.perf_counter()
        http.get(f"{url}/health").raise_for_status()
        floor_ms.append((time.perf_counter() - t) * 1000)
    return statistics.median(server_ms), statistics.median(client_ms), statistics.median(floor_ms)


def run(args, http, root, items):
    from nanochat.serve.battery import Battery
    res = {}
    # --- server 1: base answers, then learn -----------------------------------------------------------
    t0 = time.perf_counter()
    app, args.model_id, meta = start_server(args, root)
    worker = app.state.pool.workers[0]
    items = Battery(items, worker.tokenizer, worker.model.config.sequence_len)  # the prompts that fit the context
    res["battery_size"] = len(items)
    with serve_in_thread(app) as url:
        res["model"], res["model_step"] = args.model_id, meta.get("step")
        res["startup_s"] = round(time.perf_counter() - t0, 2)
        print(f"serving {args.model_id} (step {meta.get('step')}) at {url}, adapters in {root}", flush=True)
        print("before learning (base model):")
        res["before"] = ask_facts(http, url, args, label="base ")
        base = ask_battery(http, url, items, "none")
        print(f"POST /learn: {len(FACTS)} facts, {args.steps} steps -> adapter {args.adapter!r}")
        job, res["learn_wall_s"] = learn(http, url, args, FACTS, "new")
        res["job"] = job["metrics"]
    # --- server 2: a restart on the same adapters dir ---------------------------------------------------
    t0 = time.perf_counter()
    app, _, _ = start_server(args, root)
    with serve_in_thread(app) as url:
        res["restart_s"] = round(time.perf_counter() - t0, 2)
        names = [a["name"] for a in http.get(url + "/adapters").json()["adapters"]]
        print(f"restarted in {res['restart_s']}s; adapters loaded from disk: {names}", flush=True)
        if args.adapter not in names:
            sys.exit(f"adapter {args.adapter!r} did not come back after the restart")
        for mode, adapter in (("explicit", args.adapter), ("auto", "auto")):
            print(f"after the restart, adapter={adapter!r}:")
            res[mode] = ask_facts(http, url, args, adapter, label=f"{mode} ")
            res[f"battery_{mode}"] = compare(items, base, ask_battery(http, url, items, adapter), args.model_id)
            print(f"  {res[f'battery_{mode}']['summary']}", flush=True)
        res["battery_floor"] = compare(items, base, ask_battery(http, url, items, "none", threads=3), args.model_id)
        res["none_after"] = ask_facts(http, url, args, "none", label="none ")
        if not args.no_add:
            print(f"POST /learn mode add: {len(MORE_FACTS)} more facts -> adapter {args.adapter!r}")
            job, res["add_wall_s"] = learn(http, url, args, MORE_FACTS, "add")
            res["add_job"] = job["metrics"]
            res["add_first"] = recall(http, url, args, FACTS, args.adapter)
            res["add_more"] = recall(http, url, args, MORE_FACTS, args.adapter)
            res["add_auto"] = ask_facts(http, url, args, "auto", label="auto+ ")
            res["battery_add_auto"] = compare(items, base, ask_battery(http, url, items, "auto"), args.model_id)
        res["switch_ms_server"], res["switch_ms_client"], res["health_ms"] = switch_times(http, url, args)
    return res


def table(res, args, n):
    m, b = res["job"], res["job"].get("battery", {})
    be, ba, fl = res["battery_explicit"], res["battery_auto"], res["battery_floor"]
    ex, au, before = res["explicit"], res["auto"], res["before"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = [
        ("facts recalled verbatim, explicit / auto (x/5)", f"{before['verbatim']}/5",
         f"{ex['verbatim']}/5 / {au['verbatim']}/5", ">= 5/5", ex["verbatim"] >= 5 and au["verbatim"] >= 5),
        ("paraphrases recalled, explicit / auto (x/7)", f"{before['paraphrased']}/7",
         f"{ex['paraphrased']}/7 / {au['paraphrased']}/7", ">= 6/7", ex["paraphrased"] >= 6 and au["paraphrased"] >= 6),
        ("battery answers unchanged, explicit adapter", "", f"{be['unchanged']}/{n}", ">= 95%",
         be["unchanged"] >= 0.95 * n),
        ("battery answers unchanged, auto", "", f"{ba['unchanged']}/{n}", ">= 95%", ba["unchanged"] >= 0.95 * n),
        ("battery accuracy: base / explicit / auto", pct(be["accuracy_base"]),
         f"{pct(be['accuracy_adapter'])} / {pct(ba['accuracy_adapter'])}", "within 1 point",
         be["accuracy_base"] is not None and abs(ba["accuracy_adapter"] - be["accuracy_base"]) <= 0.01),
        ("auto: battery prompts to the base", "", f"{ba['to_base']}/{n}", ">= 95%", ba["to_base"] >= 0.95 * n),
        ("auto: fact questions to the adapter (5 + 7)", "", f"{au['routed']}/12", ">= 90%", au["routed"] >= 0.9 * 12),
        ("floor: base vs base, other batches", "", f"{fl['unchanged']}/{n}", "", None),
        ("the job's battery (trainer replica)", "", b.get("summary", "-").removeprefix("general battery: "), "", None),
        ("general chat loss change (32 held-out ChitChat)", f"{m.get('general_loss_base', float('nan')):.4f}",
         f"{100 * m.get('general_loss_change', float('nan')):+.2f}%", "", None),
        ("loss on the facts", f"{m['loss_before']:.3f}", f"{m['loss_after']:.3f}", "", None),
        ("training: job seconds / submit->done wall", "", f"{m['seconds']:.1f}s / {res['learn_wall_s']:.1f}s", "",
         None),
    ]
    if "add_job" in res:
        aa = res["battery_add_auto"]
        rows += [
            ("after add: first 5 / new 5 recalled verbatim", "", f"{res['add_first']}/5 / {res['add_more']}/5",
             ">= 5/5 first", res["add_first"] >= 5),
            ("after add: paraphrases (auto), fact questions to the adapter", "",
             f"{res['add_auto']['paraphrased']}/7, {res['add_auto']['routed']}/12", "", None),
            ("after add: battery unchanged / to the base (auto)", "", f"{aa['unchanged']}/{n} / {aa['to_base']}/{n}",
             "", None),
            ("add job: examples trained / seconds", "",
             f"{res['add_job']['examples']} / {res['add_job']['seconds']:.1f}s", "", None),
        ]
    rows += [("switch (activate) ms, server / round trip, median", "",
              f"{res['switch_ms_server']:.3f} / {res['switch_ms_client']:.2f}", "< 50 ms",
              res["switch_ms_client"] < 50),
             ("GET /health round trip ms, median (HTTP floor)", "", f"{res['health_ms']:.2f}", "", None),
             ("base answers unchanged after restart (adapter=none)", "", str(res["none_after"]["replies"] ==
                                                                             res["before"]["replies"]), "", None)]
    out = ["| metric | before | after | target | ok |", "|---|---|---|---|---|"]
    for name, before_, after, target, ok in rows:
        out.append(f"| {name} | {before_} | {after} | {target} | {'' if ok is None else ('yes' if ok else 'NO')} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's model")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--device-type", default="cpu", help="cpu|cuda|mps (default: cpu)")
    p.add_argument("--steps", type=int, default=150, help="training steps of each learn job")
    p.add_argument("--preserve", type=float, default=None, help="preserve term weight (default: the server's)")
    p.add_argument("--subspace-energy", type=float, default=None, help="subspace confinement (default: the server's)")
    p.add_argument("--replay-ratio", type=float, default=None,
                   help="replay share of each batch (default: the server's)")
    p.add_argument("--replay", default="sft", choices=["sft", "chitchat"],
                   help="replayed chats: the SFT mixture's (chat_web's) or ChitChat/ChatterBot only (before issue 31)")
    p.add_argument("--adapter", default="bench-facts", help="adapter name to train")
    p.add_argument("--adapters-dir", default="", help="adapters dir (default: a temp dir, removed afterwards)")
    p.add_argument("--no-add", action="store_true", help="skip the mode add phase")
    p.add_argument("--max-tokens", type=int, default=48, help="reply length limit for the fact questions")
    p.add_argument("--switches", type=int, default=20, help="activate calls timed (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--job-timeout", type=float, default=3600, help="seconds to wait for a learn job")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)

    import httpx
    import torch
    torch.set_num_threads(args.threads)
    from nanochat.serve.live import TRAINING
    from tasks.general import battery_items
    for key in ("preserve", "subspace_energy", "replay_ratio"):
        if getattr(args, key) is None:
            setattr(args, key, TRAINING[key])
    items = battery_items()
    root = args.adapters_dir or tempfile.mkdtemp(prefix="nanochat-bench-live-")
    try:
        with httpx.Client(timeout=600) as http:
            res = run(args, http, root, items)
    finally:
        if not args.adapters_dir:
            shutil.rmtree(root, ignore_errors=True)
    res["config"] = {k: getattr(args, k) for k in ("source", "steps", "replay", "preserve", "subspace_energy",
                                                   "replay_ratio", "threads", "device_type")}
    res["table"] = table(res, args, res["battery_size"])
    print()
    print(f"{res['model']} step {res['model_step']}, {res['config']}, battery of {res['battery_size']} prompts, replay "
          f"{res['job'].get('replay_conversations')} + preserve {res['job'].get('preserve_conversations')} chats")
    print(res["table"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


def serve_in_thread(app):
    from nanochat.serve.app import serve_in_thread as serve
    return serve(app, startup_timeout=300)


if __name__ == "__main__":
    sys.exit(main())
