"""Chat with a trained model in the terminal.

    python -m scripts.chat_cli                      # the SFT model, interactive
    python -m scripts.chat_cli -i mid -p "Hi!"      # one prompt to the midtrained model, then exit
    python -m scripts.chat_cli -i rl -t 0.8 -k 40 --max-tokens 256
    python -m scripts.chat_cli --dtype float32      # plain fp32 weights on a CPU
    python -m scripts.chat_cli --adapter facts      # with a learned LoRA adapter ($NANOCHAT_BASE_DIR/adapters/facts)
    python -m scripts.chat_cli --adapter domain facts --adapter-weights 1 0.5   # a stack, each times its weight

Numerics: the compute dtype is nanochat.common.compute_dtype's (--dtype, $NANOCHAT_DTYPE): bf16 on CUDA; on a
CPU with native bf16 (avx512_bf16/amx_bf16) bf16 means the Linears' weights packed to bf16 for oneDNN
(nanochat.fastlinear, one q/k/v matrix per block) around an fp32 model, else fp32. Measured on this project's
CPU against fp32 (dev/notes_decode.md): prompts prefill 1.5-2.5x faster, one-row decoding level to 1.4x faster
(d4-d12, 1 or 2 threads), while bf16 autocast decodes slower than fp32 there; bf16 greedy tokens agree with
fp32's at >= 99% of positions. --dtype bfloat16 asks for the packed path and says why when it can't.
Adapters (--adapter, loaded and checked by nanochat.lora.storage) are folded into the weights, so replies cost what
the base model's do; packed Linears cannot carry them, so with adapters the CPU runs the fp32 weights.

Interactive commands: `quit` / `exit` (or Ctrl-D) to leave, `clear` to start a new conversation.
Replies stream as they are generated; tool calls show with their output: [calculator: 2+3 → 5],
[python: x * 7 → 42], [search: capital of Velmora → [1] Velmora is ...]. The python REPL's variables
last the whole conversation (until `clear`).
"""
import argparse
import sys

from nanochat.checkpoint_manager import add_model_args, load_model
from nanochat.common import compute_dtype, compute_init, dtype_name, script_argv
from nanochat.engine import Engine, ReplyParser
from nanochat.fastlinear import pack_linears, packing_supported
from nanochat.lora.adapter import LoRA
from nanochat.lora.storage import adapter_path, load_adapter
from nanochat.tools.registry import make_registry, parse_call


class ContextFullError(ValueError):
    """The conversation no longer fits in the model's context."""


def render_prompt(engine, tokenizer, conversation):
    """The prompt ids for the next assistant reply; ContextFullError if they leave no room to answer."""
    prompt = tokenizer.render_for_completion(conversation)
    context_len = engine.model.config.sequence_len
    if len(prompt) >= context_len:
        raise ContextFullError(f"the conversation is {len(prompt)} tokens but the model's context is {context_len}")
    return prompt


def chat_turn(engine, tokenizer, conversation, temperature=0.6, top_k=50, max_tokens=512, seed=42, out=None):
    """Generate the assistant's reply to `conversation` (a list of messages ending with the user's),
    streaming it to `out` (a text stream, default stdout). Returns the reply's content in the format
    render_conversation takes: a str, or a list of {"type": "text"|"python"|"python_output", "text"}
    parts when the reply used the calculator. The caller appends it to the conversation.
    Raises ContextFullError when the conversation leaves no room in the model's context."""
    out = sys.stdout if out is None else out
    prompt = render_prompt(engine, tokenizer, conversation)
    context_len = engine.model.config.sequence_len
    parser = ReplyParser(tokenizer)
    parts = []  # [type, text] pairs of the reply
    pending_call = None  # an expression whose output (or lack of one) isn't known yet

    def write(s):
        if s:
            out.write(s)
            out.flush()

    def show_call(call, result):
        name, arg = parse_call(call)
        write(f"[{name}: {arg.strip()} → {result if result is not None else 'no result'}]")

    def show(events):
        nonlocal pending_call
        for e in events:
            kind, text = e["type"], e["text"]
            if pending_call is not None:  # its output, or anything else: the tool gave nothing
                show_call(pending_call, text if kind == "python_output" else None)
                pending_call = None
            if kind == "python":
                pending_call = text
            elif kind == "text":
                write(text)
            if kind == "text" and parts and parts[-1][0] == "text":
                parts[-1][1] += text
            else:
                parts.append([kind, text])

    stopped = False
    n = 0
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, seed=seed):
        tok = column[0]
        n += 1
        if tok in engine.stop_tokens:
            stopped = True
            break
        show(parser.push(tok))
    show(parser.finish())
    show([{"type": "text", "text": ""}])  # a call still waiting for its output gets none
    parts = [p for p in parts if p[1] or p[0] != "text"]
    if not stopped:
        if len(prompt) + n >= context_len:
            write("\n[stopped: the model's context is full; type 'clear' to start over]")
        else:
            write(f"\n[stopped: reached --max-tokens {max_tokens}]")
    write("\n")

    if all(kind == "text" for kind, _ in parts):
        return "".join(text for _, text in parts)
    return [{"type": kind, "text": text} for kind, text in parts]


def chat_loop(engine, tokenizer, temperature=0.6, top_k=50, max_tokens=512, seed=42, input_fn=input, out=None):
    """The interactive loop: read a line, answer it, keep the history. Returns when the user quits."""
    out = sys.stdout if out is None else out
    conversation = []
    turn = 0
    out.write("nanochat — type 'quit' or 'exit' to leave, 'clear' to start a new conversation\n")
    while True:
        try:
            line = input_fn("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            conversation = []
            out.write("(conversation cleared)\n")
            continue
        conversation.append({"role": "user", "content": line})
        try:
            render_prompt(engine, tokenizer, conversation)
            out.write("\nAssistant: ")
            out.flush()
            reply = chat_turn(engine, tokenizer, conversation, temperature=temperature, top_k=top_k,
                              max_tokens=max_tokens, seed=seed + turn, out=out)
        except ContextFullError as e:
            conversation.pop()
            out.write(f"[{e}: message not sent; type 'clear' to start a new conversation]\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the program
            conversation.pop()
            out.write("\n[interrupted]\n")
            continue
        conversation.append({"role": "assistant", "content": reply})
        turn += 1


def load_adapters(model, names, weights=None, root=None):
    """--adapter: the named adapters (under `root`, default $NANOCHAT_BASE_DIR/adapters), checked against this
    model's weights by nanochat.lora.storage, made one stack (each times its weight, default 1) and merged into
    the weights. Raises FileNotFoundError / ValueError naming the adapter that cannot be used."""
    lora = LoRA(model)
    for name in names:
        load_adapter(lora, adapter_path(name, root))
    lora.activate(list(names), weights, merge=True)
    return lora


def inference_numerics(flag, device_type):
    """--dtype -> (the dtype name the model computes in, whether to pack its Linears). compute_dtype decides; on a
    CPU bf16 is realised as packed bf16 Linears around an fp32 model (see the module docstring), and auto stays
    fp32 where packing cannot run (no oneDNN)."""
    name = dtype_name(compute_dtype(device_type, flag))
    if device_type != "cpu" or name != "bfloat16":
        return name, False
    return "float32", flag == "bfloat16" or packing_supported("cpu")[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, sources=["base", "mid", "sft", "rl", "dpo"], source="sft")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--index", default="",
                   help="search index for the search tool (default <base>/search_index if built)")
    p.add_argument("--unsafe-exec", action="store_true",
                   help="let the python tool run code without the bubblewrap sandbox")
    p.add_argument("--adapter", nargs="+", default=[], metavar="NAME",
                   help="LoRA adapter(s) to chat with; several: a stack, all applied together")
    p.add_argument("--adapter-weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per --adapter (default 1 each)")
    p.add_argument("--adapters-dir", default="", help="where adapters live (default $NANOCHAT_BASE_DIR/adapters)")
    args = p.parse_args(script_argv(argv))
    if args.adapter_weights is not None and len(args.adapter_weights) != len(args.adapter):
        p.error(f"{len(args.adapter)} --adapter names but {len(args.adapter_weights)} --adapter-weights: one each")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k < 0:
        p.error("--top-k must be >= 0")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.prompt is not None and not args.prompt.strip():
        p.error("-p/--prompt is empty")
    return args


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type or None)
    try:
        dtype, pack = inference_numerics(args.dtype, device.type)
        model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step,
                                            dtype=dtype)
    except (FileNotFoundError, ValueError) as e:  # no checkpoint; a $NANOCHAT_DTYPE that is not a dtype
        print(f"error: {e}", file=sys.stderr)
        return 1
    if pack and args.adapter:  # packed Linears cannot carry adapters
        if args.dtype == "bfloat16":
            print("error: --dtype bfloat16 on a CPU packs the Linears, which cannot carry adapters: use --dtype auto "
                  "or float32", file=sys.stderr)
            return 1
        pack = False
    if args.adapter:
        try:
            load_adapters(model, args.adapter, args.adapter_weights, args.adapters_dir or None)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if pack:
        try:
            pack_linears(model)
        except RuntimeError as e:  # --dtype bfloat16 on a CPU without native bf16
            print(f"error: {e}; run without --dtype bfloat16", file=sys.stderr)
            return 1
    if args.unsafe_exec:
        from nanochat.sandbox import boundary as sandbox
        sandbox.allow_unsafe_exec()
    try:
        tools, tools_line = make_registry(args.index)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = Engine(model, tokenizer, tools=tools)
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, max_tokens=args.max_tokens, seed=args.seed)
    if args.prompt is not None:
        try:
            chat_turn(engine, tokenizer, [{"role": "user", "content": args.prompt}], **kw)
        except ContextFullError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    numerics = "bf16 packed Linears" if pack else dtype
    with_adapters = f" with adapter(s) {', '.join(args.adapter)}" if args.adapter else ""
    print(f"loaded the {args.source} model (step {meta.get('step', '?')}){with_adapters} on {device} ({numerics}); "
          f"{tools_line}", file=sys.stderr)
    chat_loop(engine, tokenizer, **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
