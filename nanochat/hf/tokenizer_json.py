"""Our tokenizer as a Hugging Face tokenizer (tokenizer.json, our chat format as a chat template) and a
tokenizer.json back into ours; the model's weights and config are convert.py's business.

Exactness. Our ids come from tiktoken: split the text with our pattern, then inside each piece repeatedly
join the leftmost adjacent pair whose concatenation has the lowest rank. The `tokenizers` library's BPE joins
the adjacent pair that comes first in its merge list (leftmost on ties). Listing, for every token, the one pair
tiktoken itself joins last when it encodes that token's bytes (its "natural" split), in rank order, makes the
two agree on every text: a token tiktoken builds inside a longer piece is always built from its natural split
(the bytes under it evolve exactly as they do alone), so at each step both pick the same pair. A token that
tiktoken never builds from its own bytes gets no merge; it is still found whole (ignore_merges), as in tiktoken.
"""
import json
from functools import lru_cache

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# Our chat format (nanochat.tokenizer.render_conversation) for `apply_chat_template`: a system message is
# folded into the first user message, an assistant message is a string or a list of parts
# {"type": "text" | "python" | "python_output", "text": ...} (a tool call and the tool's output).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', turn=0) -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
    "{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- if message['role'] != ['user', 'assistant'][ns.turn % 2] -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') -}}"
    "{%- endif -%}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('an assistant part must be of type text, python or python_output') -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


class TokenizerConversionError(ValueError):
    """A tokenizer.json that cannot become our tokenizer (the message names the file and the reason)."""


@lru_cache(maxsize=1)
def byte_to_char():
    """GPT-2's byte-level alphabet (what the `tokenizers` ByteLevel pre-tokenizer writes): printable bytes stand
    for themselves, the other 68 are moved up to U+0100 and on so that every token is a printable string."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    moved = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}


def token_string(b):
    table = byte_to_char()
    return "".join(table[x] for x in b)


def natural_merges(ranks):
    """[(left, right)] in rank order: for every multi-byte token, the pair tiktoken joins last when it
    encodes the token's own bytes (see the module docstring); tokens tiktoken cannot build are left out."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts, last = [token[i:i + 1] for i in range(len(token))], None
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):  # strict: the leftmost of equal ranks
                    best, at = r, i
            if best is None:
                break
            last = (parts[at], parts[at + 1])
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if parts == [token]:
            merges.append(last)
    return merges


def to_tokenizers(tokenizer):
    """Our Tokenizer -> a `tokenizers.Tokenizer` that encodes every text to our ids; its post-processor puts
    <|bos|> first (as every document and conversation of ours starts), skipped with add_special_tokens=False."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    ranks = tokenizer.mergeable_ranks
    vocab = {token_string(b): r for b, r in ranks.items()}
    merges = [(token_string(a), token_string(b)) for a, b in natural_merges(ranks)]
    hf = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = tokenizer.get_bos_token_id()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1",
                                                      special_tokens=[("<|bos|>", bos)])
    return hf


def save_pretrained_tokenizer(tokenizer, out_dir, model_max_length):
    """tokenizer.json, tokenizer_config.json and the chat template, written by transformers itself so the
    files are what the installed version reads. -> the transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=to_tokenizers(tokenizer), bos_token="<|bos|>",
                                 eos_token="<|assistant_end|>", pad_token="<|bos|>", chat_template=CHAT_TEMPLATE,
                                 model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf.save_pretrained(out_dir)
    return hf


# --- tokenizer.json -> ours -----------------------------------------------------------------------

def _split_pattern(pre, path):
    """The split regex of a byte-level pre-tokenizer: Sequence[Split(Regex), ByteLevel(use_regex=False)]
    (what our export and transformers' tiktoken converter write)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True) or "Regex" not in steps[0].get("pattern", {}):
        raise TokenizerConversionError(
            f"{path}: the pre-tokenizer is {kinds or 'missing'}, not a regex split followed by byte-level "
            "(Split + ByteLevel without its own regex): this is not a nanochat/tiktoken-style tokenizer, and "
            "nanochat can only take a byte-level BPE it can re-encode exactly")
    return steps[0]["pattern"]["Regex"]


def from_tokenizer_json(path):
    """A tokenizer.json of a nanochat model -> our Tokenizer (ranks = the BPE vocab ids, our special tokens
    after them), checked: byte-level BPE, every byte a token, ids 0..N-1 with no gaps, exactly our special
    tokens in our order, and the same ids as the `tokenizers` library on a probe text."""
    from tokenizers import Tokenizer as HFTokenizer
    try:
        hf = HFTokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - whatever the library rejects, the file is unusable
        raise TokenizerConversionError(f"{path} is not a tokenizer.json the `tokenizers` library can read "
                                       f"({type(e).__name__}: {str(e)[:200]})") from None
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerConversionError(f"{path}: the model is {model.get('type')!r}, not BPE: nanochat's tokenizer "
                                       "is a byte-level BPE")
    pattern = _split_pattern(spec.get("pre_tokenizer"), path)
    chars = {c: b for b, c in byte_to_char().items()}
    ranks = {}
    for text, i in model["vocab"].items():
        if any(c not in chars for c in text):
            raise TokenizerConversionError(f"{path}: vocab entry {text!r} is not written in the byte-level "
                                           "alphabet: not a byte-level BPE")
        ranks[bytes(chars[c] for c in text)] = i
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or len(set(model["vocab"].values())) != n:
        raise TokenizerConversionError(f"{path}: the BPE ids are not 0..{n - 1} without gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerConversionError(f"{path}: {len(missing)} of the 256 single bytes have no token "
                                       f"(e.g. byte {missing[0]}): text with them could not be encoded")
    specials = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    want = [(n + i, t) for i, t in enumerate(SPECIAL_TOKENS)]
    if specials != want:
        raise TokenizerConversionError(
            f"{path}: the added tokens are {[t for _, t in specials][:12]} at ids "
            f"{[i for i, _ in specials][:12]}, but nanochat's chat format needs exactly {SPECIAL_TOKENS} at ids "
            f"{n}..{n + len(SPECIAL_TOKENS) - 1}: this tokenizer is not a nanochat one")
    try:
        ours = Tokenizer(ranks, pattern)
    except Exception as e:  # noqa: BLE001 - tiktoken rejects a pattern its regex engine cannot compile
        raise TokenizerConversionError(f"{path}: the split pattern does not compile for tiktoken "
                                       f"({type(e).__name__}: {e})") from None
    probe = "Hello, World! It's 2025: 3.14159 apples\n\n  and   spaces\tend. Grüße, 東京 — ok?"
    theirs = hf.encode(probe, add_special_tokens=False).ids
    if ours.encode(probe) != theirs:
        raise TokenizerConversionError(f"{path}: converted, it encodes a probe text differently from the "
                                       "`tokenizers` library; refusing a tokenizer that would not give the model "
                                       "the ids it was trained on")
    return ours


def check_same_tokenizer(a, b):
    """Whether two of our tokenizers give every text the same ids (same pattern, same ranks)."""
    return a.pattern == b.pattern and a.mergeable_ranks == b.mergeable_ranks


