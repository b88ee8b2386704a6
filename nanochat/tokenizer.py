"""BPE tokenizer (trained by rustbpe, encoded by tiktoken) and the chat format that turns conversations into
token ids and loss masks; it knows nothing about models.

Vocabulary = 256 byte tokens + merges + the special tokens below (specials take the last ids).
"""
import copy
import os
import pickle
from functools import lru_cache

import tiktoken

from nanochat.common import atomic_write, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced back into the stream
]

# GPT-4's split pattern, except digits are grouped 1-2 (not 1-3): small vocabularies can't
# afford tokens for every 3-digit number.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

VALID_ROLES = ("system", "user", "assistant")


class Tokenizer:
    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN, name="nanochat"):
        ranks = dict(mergeable_ranks)
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..N-1 with no gaps")
        specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.pattern = pattern
        self.mergeable_ranks = ranks
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self._special_ids = specials
        self.bos_token_id = specials["<|bos|>"]

    # --- construction -------------------------------------------------------------------
    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        """Train BPE so that the final vocab (bytes + merges + specials) has exactly vocab_size ids."""
        import rustbpe
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small: need >= {min_vocab} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        # Two merges can in principle spell the same bytes ("a"+"bc", "ab"+"c"); keep the first and
        # renumber so ranks stay contiguous (the vocab is then that much smaller).
        ranks = {}
        for b, _ in sorted(trainer.get_mergeable_ranks(), key=lambda br: br[1]):
            ranks.setdefault(bytes(b), len(ranks))
        return cls(ranks, trainer.get_pattern())

    @classmethod
    def byte_level(cls):
        """No merges: 256 byte tokens + specials. Handy for tests and as a floor for comparisons."""
        return cls({bytes([i]): i for i in range(256)})

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m scripts.tok_train`")
        with open(path, "rb") as f:
            state = pickle.load(f)
        return cls(state["mergeable_ranks"], state["pattern"])

    def save(self, tokenizer_dir):
        """tokenizer.pkl (pattern + ranks) and token_bytes.pt (UTF-8 bytes per id, 0 for specials)."""
        import torch
        os.makedirs(tokenizer_dir, exist_ok=True)
        with atomic_write(os.path.join(tokenizer_dir, "tokenizer.pkl")) as f:
            pickle.dump({"pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks}, f)
        with atomic_write(os.path.join(tokenizer_dir, "token_bytes.pt")) as f:
            torch.save(self.token_bytes(), f)

    def token_bytes(self):
        """int32 tensor: how many bytes of text each token id stands for (specials count 0), for bits per byte."""
        import torch
        lengths = [0] * self.get_vocab_size()
        for b, r in self.mergeable_ranks.items():
            lengths[r] = len(b)
        return torch.tensor(lengths, dtype=torch.int32)

    # --- vocabulary ---------------------------------------------------------------------
    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, name):
        if name not in self._special_ids:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self._special_ids[name]

    # --- encode / decode ----------------------------------------------------------------
    def _as_id(self, tok):
        return tok if isinstance(tok, int) else self.encode_special(tok)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Plain text -> ids (special-token strings in text are encoded as ordinary text, never as specials).
        text may be a str or a list of str (encoded in parallel threads). prepend/append: a special token
        name or id added to each sequence."""
        pre = [self._as_id(prepend)] if prepend is not None else []
        post = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise TypeError(f"encode: item {i} is {type(t).__name__}, expected str")
            return [pre + ids + post for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]
        raise TypeError(f"encode: expected str or list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # --- chat format --------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens=2048):
        """Conversation -> (ids, mask). mask[i] = 1 where the model is trained to produce token i:
        the assistant's text, its tool calls and <|assistant_end|>. Prompts, tool outputs and the
        framing tokens around them are 0. System prompts are folded into the first user message."""
        messages = validate_messages(conversation)
        if messages[0]["role"] == "system":
            messages = copy.deepcopy(messages)
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        S = self.encode_special
        add(self.bos_token_id, 0)
        for msg in messages:
            content = msg["content"]
            if msg["role"] == "user":
                add([S("<|user_start|>"), *self.encode(content), S("<|user_end|>")], 0)
                continue
            add(S("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = part["type"], part["text"]
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add([S("<|python_start|>"), *self.encode(text), S("<|python_end|>")], 1)
                else:  # python_output: produced by the tool at inference time, so never a target
                    add([S("<|output_start|>"), *self.encode(text), S("<|output_end|>")], 0)
            add(S("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the next assistant turn: the conversation without its final
        assistant message (if any), then <|assistant_start|>."""
        messages = list(conversation["messages"] if isinstance(conversation, dict) else conversation)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        # a placeholder reply lets us reuse the renderer's validation; then drop it
        placeholder = {"role": "assistant", "content": ""}
        ids, _ = self.render_conversation({"messages": messages + [placeholder]}, max_tokens=10**9)
        assert ids[-1] == self.encode_special("<|assistant_end|>")
        return ids[:-1]


def validate_messages(conversation):
    """Check a conversation's structure; every error says what is wrong and where."""
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError("conversation dict has no 'messages' key")
        messages = conversation["messages"]
    else:
        messages = conversation
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("conversation must have a non-empty list of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in VALID_ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {VALID_ROLES}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if role in ("system", "user") and not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "assistant":
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") \
                            or not isinstance(part.get("text"), str):
                        raise ValueError(f"message {i} part {j} must be "
                                         "{'type': 'text'|'python'|'python_output', 'text': str}")
            elif not isinstance(content, str):
                raise ValueError(f"message {i} (assistant) content must be a string or a list of parts, "
                                 f"got {type(content).__name__}")
    start = 1 if messages[0]["role"] == "system" else 0
    if len(messages) <= start:
        raise ValueError("conversation has a system message but no user message")
    for k, msg in enumerate(messages[start:]):
        expected = "user" if k % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ValueError(f"message {start + k} has role {msg['role']!r} but {expected!r} was expected: "
                             "roles must alternate user, assistant, user, ... (after an optional system message)")
    return list(messages)


@lru_cache(maxsize=4)
def _load_cached(tokenizer_dir):
    return Tokenizer.from_directory(tokenizer_dir)


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    """The tokenizer trained by scripts.tok_train (cached per process)."""
    return _load_cached(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    import torch
    path = os.path.join(get_tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: train the tokenizer with `python -m scripts.tok_train`")
    return torch.load(path, map_location=device)
