"""Serve a chat model over HTTP: a chat page and an OpenAI-compatible API. This file holds the flags and starts
the server; the app is nanochat/serve/ (app.py puts it together: routes.py the chat and OpenAI routes, replicas.py
the replicas and continuous batching, openai_api.py request bodies and limits, live_routes.py live learning).

    python -m scripts.chat_web                          # the SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web -i rl --num-gpus 8 --host 0.0.0.0 --port 8000
    python -m scripts.chat_web -i base                  # a base model: /v1/completions is the useful route
    python -m scripts.chat_web --quantize int4          # a 4-bit frozen base: adapters learn and serve on it

Endpoints
    GET  /                      the chat page (nanochat/serve/ui.html, self-contained)
    POST /chat/completions      the page's own stream (SSE): one JSON event per `data:` line, each with a
                                "type": queued {position} | text {text} | python {text} | python_output {text}
                                | done {finish_reason, usage} | error {message}
    POST /v1/chat/completions   OpenAI chat completions, stream or not; n, stop, logprobs + top_logprobs, top_p,
                                presence/frequency_penalty, seed, stream_options.include_usage
    POST /v1/completions        OpenAI (legacy) text completions of a plain prompt, for base models too
    GET  /v1/models             the served model and every loaded adapter (`model: "<adapter>"` selects one)
    Every generating route takes "adapter": a name, "none" (the base), or a list of names with an optional
    "adapter_weights" list: a stack, all applied together (openai client: extra_body={"adapter": [...]}).
    GET  /health, GET /stats    liveness, queue depth; per-replica and total requests, tokens, tokens/s
    GET  /metrics               Prometheus text format
    /learn, /adapters           live learning (nanochat/serve/live_routes.py), unless --no-learn

Every replica decodes all of its requests as one batch (requests join and leave at token boundaries;
rows may use different adapters and stacks). A request waits only when its replica already holds --max-batch.

Tools (nanochat/tools/registry.py): calculator, a python REPL over the sandbox, and search over --index (default
<base>/search_index when built; without one, search calls get no output). Each request has its own tool
session; python and search calls run off the batch's thread, so their row sits out while the rest decode.

Security (nanochat/serve/security.py)
    --api-key KEY (or NANOCHAT_API_KEY): every endpoint but GET /health and the page itself (GET /) needs
    "Authorization: Bearer KEY" (what the OpenAI client sends); the page asks for the key in its settings
    when the server answers 401, and keeps it in the browser's localStorage. --admin-key KEY (or
    NANOCHAT_ADMIN_KEY) is then needed for /learn and for changing adapters (activate, delete); without
    one, the API key is enough. Without any key the server listens on loopback only; another --host then
    needs --insecure. Without an API key, web pages the user visits must not reach the server through the
    browser: the Host header must be a loopback name (or --host, or one of --allowed-hosts), so a page whose
    DNS name was rebound to 127.0.0.1 is refused (400), and a POST must be JSON (Content-Type:
    application/json, as the page and the OpenAI client send) or carry an X-Requested-With header, else 415:
    `curl -X POST .../adapters/NAME/activate -H 'Content-Type: application/json'`. A request (headers and body)
    must arrive within --request-timeout seconds of its first byte, or the connection is closed.
"""
import argparse
import copy
import logging
import os
import sys

import uvicorn

from nanochat.common import autodetect_device_type, script_argv, setup_logging
from nanochat.lora.storage import adapters_dir
from nanochat.serve.app import create_app
from nanochat.serve.live import LiveLearning
from nanochat.serve.openai_api import Defaults, Limits
from nanochat.serve.replicas import load_workers
from nanochat.serve.security import check_exposure, guarded_protocol
from nanochat.tools.registry import make_registry
from tasks.conversations import ChatterBot, ChitChat

logger = logging.getLogger("nanochat.chat_web")


def general_chats(n_replay=512, n_eval=32):
    """Offline human chats (tasks/conversations.py): train-split ones to replay while an adapter learns,
    test-split ones to measure what it costs. ([], []) with a warning when they can't be read."""
    try:
        replay = [ex["messages"] for task in (ChitChat("train"), ChatterBot("train"))
                  for ex in (task[i] for i in range(min(len(task), n_replay // 2)))]
        held = ChitChat("test")
        return replay, [held[i]["messages"] for i in range(min(len(held), n_eval))]
    except (OSError, ValueError, ImportError) as e:
        logger.warning("no general chat data for replay (%s): adapters will learn without it", e)
        return [], []


def make_live_learning(workers, root):
    """pool -> LiveLearning: adapters under root, trained on a private copy of the served weights."""
    trainer = copy.deepcopy(workers[0].model)  # taken before the workers get their LoRA hooks
    return lambda pool: LiveLearning(pool, trainer, workers[0].tokenizer, root, general_chats=general_chats)


LIMIT_HELP = {  # one flag per field of openai_api.Limits
    "max_messages": "most messages in one request", "max_message_chars": "most characters in one message",
    "max_total_chars": "most characters in one request's messages (or prompt)",
    "max_temperature": "highest temperature a request may ask for", "max_top_k": "highest top_k a request may ask for",
    "max_max_tokens": "highest max_tokens a request may ask for", "max_body_bytes": "largest request body",
    "max_learn_items": "most facts + conversations in one POST /learn", "max_learn_steps": "most steps of one /learn job",
    "max_learn_jobs": "most /learn jobs queued or running (more get 429)", "max_adapters": "most adapters kept",
    "max_adapter_bytes": "most bytes of adapters on disk, all together",
    "job_ttl": "seconds a finished /learn job stays visible", "request_timeout": "seconds for a request's headers "
    "and body to arrive", "max_n": "most choices (n) per request", "max_stop": "most stop strings per request",
    "max_stop_chars": "most characters per stop string", "max_stack": "most adapters in one request's stack",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl", "dpo"], help="which stage's model")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--num-gpus", type=int, default=1, help="model replicas, one per GPU (ignored without CUDA)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--index", default="", help="search index for the search tool (default <base>/search_index if built)")
    p.add_argument("--adapters-dir", default="", help="where learned adapters live (default: $NANOCHAT_BASE_DIR/adapters)")
    p.add_argument("--no-learn", action="store_true", help="serve without live learning (no /learn, no adapters)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="serve and learn adapters on a weight-only quantized frozen base (int8: ~2x, int4: ~3.8x "
                        "less weight memory than bf16; adapters are bound to the base they were learned on)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests one replica decodes together")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY", ""),
                   help="require 'Authorization: Bearer KEY' (default $NANOCHAT_API_KEY; none: loopback only)")
    p.add_argument("--admin-key", default=os.environ.get("NANOCHAT_ADMIN_KEY", ""),
                   help="key for /learn and adapter changes (default $NANOCHAT_ADMIN_KEY; none: the API key)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    p.add_argument("--allowed-hosts", default="", help="without --api-key: comma-separated names the Host header "
                   "may carry besides loopback ones and --host, e.g. a LAN name with --insecure ('*': any)")
    d, lim = Defaults(), Limits()
    p.add_argument("-t", "--temperature", type=float, default=d.temperature, help="default temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=d.top_k, help="default top-k (0 = none)")
    p.add_argument("-m", "--max-tokens", type=int, default=d.max_tokens, help="default reply length limit")
    for name, value in vars(lim).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                       help=LIMIT_HELP[name] + " (default %(default)s)")
    args = p.parse_args(script_argv(argv))
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        p.error("need --temperature >= 0, --top-k >= 0, --max-tokens >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    try:
        exposure = check_exposure(args.host, args.api_key, args.insecure, allowed_hosts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    device_type = args.device_type or autodetect_device_type()
    try:
        tools, tools_line = make_registry(args.index)
        workers, meta = load_workers(args.source, device_type, args.num_gpus, args.model_tag, args.step,
                                     max_batch=args.max_batch, tools=tools, quantize=args.quantize)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model_id = f"nanochat-{args.source}-{args.model_tag or 'd%d' % workers[0].model.config.n_layer}"
    limits = Limits(**{name: getattr(args, name) for name in vars(Limits())})
    defaults = Defaults(args.temperature, args.top_k, args.max_tokens)
    learn = None
    if not args.no_learn:
        learn = make_live_learning(workers, args.adapters_dir or adapters_dir())
    if args.host not in ("0.0.0.0", "::"):  # a wildcard is no name a client could use
        allowed_hosts.append(args.host)
    app = create_app(workers, model_id, limits, defaults, learn=learn, api_key=args.api_key or None,
                     admin_key=args.admin_key or None, allowed_hosts=allowed_hosts)
    devices = ", ".join(str(w.device) for w in workers)
    if args.quantize != "none":
        devices += f" ({args.quantize} weight-only base)"
    print(f"serving {model_id} (step {meta.get('step', '?')}) on {devices}: http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    print(exposure, file=sys.stderr, flush=True)
    print(tools_line, file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=guarded_protocol(args.request_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
