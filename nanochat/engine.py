"""Inference: batched sampling with a KV cache, tool use, and UTF-8-safe streaming.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...  # column[i] = the next token of row i, masks[i] = 1 if sampled, 0 if forced/padding
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

How a call runs:
1. The prompt is run through the model once, with batch size 1, into a KV cache (one batched forward).
2. That cache is copied (`KVCache.prefill`) into a cache with one row per sample (for one sample it already
   is that cache), and every row starts from the prompt's last logits. With Engine(compile=True) the
   decode cache is a StaticKVCache and the steps run through torch.compile (see Engine.__init__).
3. Each step samples one token per row (greedy argmax at temperature 0, otherwise softmax(logits / T),
   optionally restricted to the top k, drawn with a seeded torch.Generator so results are reproducible),
   yields the column, and feeds it back through the model as a (num_samples, 1) batch.

Tool use, per row: when the model writes <|python_start|>, the tokens up to <|python_end|> are decoded
and passed to the row's tool session (nanochat.tools.registry: `python: ...` goes to the REPL, `search: ...` to the
index, anything else to the calculator; each row has its own REPL state, started from the python calls
already in the prompt, i.e. the conversation's earlier replies). The row is then forced to continue with
<|output_start|> + encode(output) + <|output_end|>, one token per step, each with mask 0; the model's
own sample for those steps is discarded, but the forced tokens are fed back through the model like any
other token, so it reads the output. A registry's session answers every call (a tool that is off or
refuses the call answers an error saying so); with tools=None nothing is forced.
Tool output only ever comes from the tool: <|output_start|> and <|output_end|> are never sampled (Engine.ban
puts them at -inf before every sample), so a model that starts to write a tool's answer itself writes its
next most likely token instead, and nothing it writes can pass for a tool's output.

Stopping, per row: a row finishes on <|assistant_end|> or <|bos|>. The stop token itself is yielded
(with the mask of how it was produced). After that, until every row has finished, a finished row yields
its stop token again as padding, always with mask 0. The whole generation ends when every row has
finished, after max_tokens steps, or when prompt + generated tokens fill the model's context
(model.config.sequence_len) - whichever comes first.
"""
import codecs
import operator
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.kv_cache import KVCache, StaticKVCache

MIN_TEMPERATURE = 1e-6  # below this, logits / T overflows float32 (NaN probabilities): sample greedily instead


def sample_next_token(logits, generator=None, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next ids (B,). temperature 0 = argmax; top_k None/0 = no restriction; top_p None/1 =
    no nucleus restriction, else only the most likely tokens whose probabilities (after temperature) add up
    to top_p are kept (the most likely one always)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _no_tool(call):
    return None


class RowState:
    """Tool-use and stopping state of one generated sequence (Engine.advance updates it)."""
    __slots__ = ("forced", "in_python", "expr_tokens", "done", "stop_token", "tools")

    def __init__(self, tools):
        self.forced = deque()  # tokens the tool forces into this row, fed one per step
        self.in_python = False  # inside <|python_start|> ... <|python_end|>
        self.expr_tokens = []
        self.done = False
        self.stop_token = None
        self.tools = tools  # this row's ToolSession: call text -> output or None


class Engine:
    def __init__(self, model, tokenizer, tools=None, compile=False):
        """tools: what runs the model's tool calls, anything with .session(history) -> a callable
        call text -> output or None (nanochat.tools.registry.ToolRegistry); None: no tools (calls get no output).
        compile: decode through torch.compile on a StaticKVCache (same shapes every step; on CUDA captured as
        a CUDA graph, mode="reduce-overhead"). The first call per (batch size, capacity) compiles."""
        self.model = model
        self.compile = compile
        self._step = None
        self.tools = tools
        self.tokenizer = tokenizer
        S = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = S("<|assistant_end|>")
        self.python_start, self.python_end = S("<|python_start|>"), S("<|python_end|>")
        self.output_start, self.output_end = S("<|output_start|>"), S("<|output_end|>")
        self.stop_tokens = {self.assistant_end, self.bos}
        self._banned = {}  # device -> ids of the tool-output markers, which only run_tool may write

    def ban(self, logits):
        """logits (B, V) -> a copy with <|output_start|> and <|output_end|> at -inf: they are only ever forced
        (run_tool), so a model that tries to write a tool's output itself writes its next best token instead."""
        ids = self._banned.get(logits.device)
        if ids is None:
            ids = self._banned[logits.device] = torch.tensor([self.output_start, self.output_end], device=logits.device)
        return logits.index_fill(-1, ids, float("-inf"))

    def device(self):
        get_device = getattr(self.model, "get_device", None)
        return get_device() if callable(get_device) else next(self.model.parameters()).device

    def _new_cache(self, batch_size, seq_len):
        c = self.model.config
        return KVCache(batch_size=batch_size, num_heads=c.n_kv_head, seq_len=seq_len,
                       head_dim=c.n_embd // c.n_head, num_layers=c.n_layer)

    def validate(self, tokens, num_samples, max_tokens, temperature, top_k):
        """Check generate's arguments (bad ones raise ValueError). -> (prompt as a list of ints, float temperature)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1:
                raise ValueError("prompt must be a 1-D sequence of token ids, "
                                 f"got a tensor of shape {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__"):
            raise ValueError(f"prompt must be a list of token ids, got {type(tokens).__name__}")
        try:
            tokens = [operator.index(t) for t in tokens]
        except TypeError:
            raise ValueError("prompt must contain only integer token ids") from None
        if not tokens:
            raise ValueError("prompt is empty: give at least one token (e.g. <|bos|>)")
        vocab = self.model.config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        context_len = self.model.config.sequence_len
        if len(tokens) >= context_len:
            raise ValueError(f"prompt has {len(tokens)} tokens but the model's context is {context_len}: "
                             f"it must be at most {context_len - 1} tokens to leave room for one new token")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 0):
            raise ValueError(f"max_tokens must be None or an integer >= 0, got {max_tokens!r}")
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}") from None
        if not temperature >= 0.0 or temperature == float("inf"):  # also rejects NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be None or an integer >= 0 (0 or None = no top-k), got {top_k!r}")
        return tokens, temperature

    def _prompt_calls(self, tokens):
        """(call text, output text or None) of every tool call already in the prompt: earlier turns of the
        conversation, whose python cells the REPL starts from."""
        calls, i = [], 0
        while self.python_start in tokens[i:]:
            start = tokens.index(self.python_start, i)
            if self.python_end not in tokens[start:]:
                break
            end = tokens.index(self.python_end, start)
            output, i = None, end + 1
            if tokens[i:i + 1] == [self.output_start] and self.output_end in tokens[i:]:
                out_end = tokens.index(self.output_end, i)
                output, i = self.tokenizer.decode(tokens[i + 1:out_end]), out_end + 1
            calls.append((self.tokenizer.decode(tokens[start + 1:end]), output))
        return calls

    def new_row(self, prompt):
        """A RowState for a sequence that continues `prompt` (a list of ids): its own tool session, whose
        python REPL starts from the python calls already in the prompt (the conversation's earlier turns)."""
        history = self._prompt_calls(prompt) if self.python_start in prompt else []
        return RowState(self.tools.session(history) if self.tools is not None else _no_tool)

    def advance(self, row, token):
        """Update a row's tool-use / stop state (a RowState) after it emitted `token`: a stop token ends it.
        -> the text of the tool call this token closes, else None; run_tool(row, call) runs it (the
        scheduler runs slow tools off its thread, so one row's call does not stall the batch)."""
        if token in self.stop_tokens:
            row.done, row.stop_token = True, token
        elif token == self.python_start:
            row.in_python, row.expr_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            return self.tokenizer.decode(row.expr_tokens)
        elif row.in_python:
            row.expr_tokens.append(token)
        return None

    def run_tool(self, row, call):
        """Run a finished call with the row's tools (nanochat.tools.registry picks the tool from the call's text);
        an output is queued in row.forced as <|output_start|> output <|output_end|>, None forces nothing."""
        result = row.tools(call)
        if result is not None:
            row.forced.append(self.output_start)
            row.forced.extend(self.tokenizer.encode(result))
            row.forced.append(self.output_end)

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Return a generator of (token_column, token_masks) per step: lists of num_samples ints (see the
        module docstring). Arguments are checked here, before anything runs: bad ones raise ValueError."""
        tokens, temperature = self.validate(tokens, num_samples, max_tokens, temperature, top_k)
        return self._generate(tokens, num_samples, max_tokens, temperature, top_k, seed)

    @torch.no_grad()  # on a generator function torch toggles grad mode around each resume only
    def _generate(self, tokens, num_samples, max_tokens, temperature, top_k, seed):
        device = self.device()
        context_len = self.model.config.sequence_len
        budget = context_len - len(tokens)  # steps until prompt + generated tokens fill the context
        if max_tokens is not None:
            budget = min(budget, max_tokens)
        if budget == 0:
            return
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

        # 1) prefill the prompt once, batch 1, in one forward
        capacity = len(tokens) + budget  # everything this call can feed
        reuse = num_samples == 1 and not self.compile  # the prefill cache becomes the decode cache
        prefill_cache = self._new_cache(1, capacity if reuse else len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill_cache, logits_at=-1)  # (1, V)
        # 2) the decode cache: one row per sample (a batch-1 prefill is already it)
        forward = self.model
        if self.compile:
            c = self.model.config
            capacity = min(-(-capacity // 256) * 256, c.sequence_len)  # few distinct shapes: few compilations
            cache = StaticKVCache(num_samples, c.n_kv_head, capacity, c.n_embd // c.n_head, c.n_layer,
                                  device, prefill_cache.kv.dtype)
            cache.load(prefill_cache)
            if self._step is None:
                mode = "reduce-overhead" if device.type == "cuda" else None
                self._step = torch.compile(self.model, dynamic=False, mode=mode)
            forward = self._step
        elif reuse:
            cache = prefill_cache
        else:
            cache = self._new_cache(num_samples, capacity)
            cache.prefill(prefill_cache)
        del prefill_cache
        logits = logits.expand(num_samples, -1).contiguous()

        rows = [self.new_row(tokens) for _ in range(num_samples)]  # each its own tool session
        for step in range(budget):
            sampled = sample_next_token(self.ban(logits), generator, temperature, top_k).tolist()
            column, masks = [], []
            for row, tok in zip(rows, sampled):
                if row.done:
                    column.append(row.stop_token)
                    masks.append(0)
                    continue
                tok, mask = (row.forced.popleft(), 0) if row.forced else (tok, 1)
                column.append(tok)
                masks.append(mask)
                call = self.advance(row, tok)
                if call is not None:
                    self.run_tool(row, call)
            yield column, masks
            if step == budget - 1 or all(row.done for row in rows):
                return
            # 3) feed the column back: one token per row
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = forward(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run `generate` to the end. Returns (results, masks): per row, the generated tokens (prompt not
        included) up to but EXCLUDING the stop token (<|assistant_end|> / <|bos|>), and their masks
        (1 sampled, 0 forced by the tool). Rows cut off by max_tokens or the context have no stop token."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if tok in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(m)
        return results, masks


def token_bytes(tokenizer, token_id):
    """The exact bytes of one token (special tokens: their names)."""
    enc = getattr(tokenizer, "enc", None)  # tiktoken Encoding: exact bytes, special tokens included
    if enc is not None:
        return enc.decode_single_token_bytes(token_id)
    return tokenizer.decode([token_id]).encode("utf-8")


class StreamDecoder:
    """Incremental UTF-8-safe decoding of a token stream.

    push(token_id) returns only the text completed by that token: bytes of a multi-byte character that
    is split across tokens are held back until the character is complete (never a U+FFFD mid-stream).
    Byte sequences that can never become valid UTF-8 are replaced by U+FFFD as soon as that is certain.
    flush() returns whatever is still held back (an incomplete tail becomes U+FFFD) and resets.
    Concatenating every push() and the final flush() equals tokenizer.decode(all ids).
    Special tokens decode to their names (e.g. "<|python_start|>"); filter them before pushing if unwanted.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._decoder.decode(token_bytes(self.tokenizer, token_id))

    def flush(self):
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# The model's tool markers: a calculator call is <|python_start|>expr<|python_end|>, its forced result
# <|output_start|>value<|output_end|>. Part kinds are those render_conversation takes.
TOOL_MARKERS = {"python": ("<|python_start|>", "<|python_end|>"),
                "python_output": ("<|output_start|>", "<|output_end|>")}


class ReplyParser:
    """An assistant reply's token stream -> events, as they complete: {"type": "text", "text"} deltas (UTF-8
    safe, never a special token's name), for a tool call the whole call ({"type": "python"}) and then its
    output ({"type": "python_output"}), and {"type": "special", "text": name} for a special token written
    where it means nothing (e.g. <|user_end|> in the middle of a reply). The one reader of tool calls for the
    CLI and the server. A tool part left unfinished (cut off, or interrupted by a new call) still comes out
    as its part, marked "open": True (no closing marker was written). So, written out with the markers, the
    events always add up to everything the model wrote. Feed it no stop tokens."""

    def __init__(self, tokenizer):
        S = tokenizer.encode_special
        self.tokenizer = tokenizer
        self.python_start, self.python_end = S("<|python_start|>"), S("<|python_end|>")
        self.output_start, self.output_end = S("<|output_start|>"), S("<|output_end|>")
        self.specials = {S(name) for name in tokenizer.get_special_tokens()}
        self.decoder = StreamDecoder(tokenizer)
        self.mode = "text"  # which part the next tokens belong to: text / python / python_output
        self.buf = []  # token ids of the current python or python_output part

    def _text(self, s):
        return [{"type": "text", "text": s}] if s else []

    def _flush(self):
        """Close the current part: held-back text bytes, or an unfinished tool part (open)."""
        if self.mode == "text":
            return self._text(self.decoder.flush())
        return [{"type": self.mode, "text": self.tokenizer.decode(self.buf), "open": True}]

    def push(self, tok):
        """One token -> a list of zero or more events."""
        if tok == self.python_start or (tok == self.output_start and self.mode == "text"):
            events = self._flush()
            self.mode, self.buf = ("python" if tok == self.python_start else "python_output"), []
            return events
        if ((tok == self.python_end and self.mode == "python")
                or (tok == self.output_end and self.mode == "python_output")):
            event = {"type": self.mode, "text": self.tokenizer.decode(self.buf)}
            self.mode = "text"
            return [event]
        if self.mode != "text":  # inside a call or an output: its text is what the tool read or wrote
            self.buf.append(tok)
            return []
        if tok in self.specials:
            return self._flush() + [{"type": "special", "text": self.tokenizer.decode([tok])}]
        return self._text(self.decoder.push(tok))

    def finish(self):
        """The end of the reply: whatever is still held back."""
        events = self._flush()
        self.mode = "text"
        return events


def event_as_raw_text(event):
    """A ReplyParser event as the model wrote it: tool parts between their markers (an open one without its
    closing marker), a special token by its name."""
    kind, text = event["type"], event["text"]
    if kind in TOOL_MARKERS:
        start, end = TOOL_MARKERS[kind]
        return start + text + ("" if event.get("open") else end)
    return text
