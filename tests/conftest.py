"""Shared test fixtures: a tiny base dir (parquet shards + byte-level tokenizer) and a tiny GPT.

Everything is made locally and cheaply; nothing is downloaded.

    tiny_base_dir    (session) a read-only base dir: base_data/ (3 shards x 4 row groups; the last
                     shard is validation) and tokenizer/ (byte-level, 265 ids)
    base_dir         (function) a fresh, writable base dir sharing tiny_base_dir's data and tokenizer
                     (symlinks), with NANOCHAT_BASE_DIR pointing at it; checkpoints/report go here
    write_shards     a function write_shards(data_dir, shards) writing shards[i][j] = list of texts of
                     row group j of shard_0000i.parquet
    make_docs        a function make_docs(n, seed) -> n deterministic English-like documents
    make_base_dir    a function make_base_dir(root, shards, tokenizer=None): base_data/ + tokenizer/ at root
    byte_tokenizer   (session) Tokenizer.byte_level()
    tiny_config / tiny_model   a 1-layer, 64-wide GPT over the byte-level vocab, sequence_len 64
    one_thread       (module) torch.set_num_threads(1) for the module; use with pytest.mark.usefixtures
    echo_chat_model  (session) the EchoChatModel class: a scripted chat model with a known reply and tool call
    serve_app        (session) `with serve_app(app) as url:` runs an ASGI app with uvicorn on a loopback port
"""
import contextlib
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

# compute_dtype's auto choice follows the CPU (bf16 where it is native): pin fp32 so that the suite computes the
# same numbers on every machine (subprocesses inherit it); the tests of the choice itself unset it
os.environ["NANOCHAT_DTYPE"] = "float32"

_WORDS = ("the a one every some cat dog bird fish child teacher river city garden house tree sun moon "
          "runs sees finds eats likes makes takes gives sits walks big small red green old new happy quiet "
          "fast slow near over under with and but then because today always").split()


def make_docs(n, seed=0, min_words=20, max_words=80):
    """n deterministic documents of simple sentences: structured enough that a tiny model learns a bit."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words, sentence = [], []
        for _ in range(rng.randint(min_words, max_words)):
            sentence.append(rng.choice(_WORDS))
            if len(sentence) >= rng.randint(4, 10):
                words.append(" ".join(sentence).capitalize() + ".")
                sentence = []
        if sentence:
            words.append(" ".join(sentence).capitalize() + ".")
        docs.append(" ".join(words))
    return docs


def write_shards(data_dir, shards):
    """shards: list (one per shard) of lists (one per row group) of lists of texts."""
    os.makedirs(data_dir, exist_ok=True)
    for i, row_groups in enumerate(shards):
        path = os.path.join(data_dir, f"shard_{i:05d}.parquet")
        schema = pa.schema([("text", pa.string()), ("source", pa.string())])
        with pq.ParquetWriter(path, schema) as w:
            for texts in row_groups:
                w.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}, schema=schema))
    return data_dir


def make_base_dir(root, shards, tokenizer=None):
    """A base dir at root with base_data/ from `shards` and a saved tokenizer (byte-level by default)."""
    from nanochat.tokenizer import Tokenizer
    write_shards(os.path.join(root, "base_data"), shards)
    (tokenizer or Tokenizer.byte_level()).save(os.path.join(root, "tokenizer"))
    return str(root)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_base")
    docs = iter(make_docs(3 * 4 * 16, seed=1234))
    shards = [[[next(docs) for _ in range(16)] for _ in range(4)] for _ in range(3)]
    return make_base_dir(root, shards)


@pytest.fixture
def base_dir(tiny_base_dir, tmp_path, monkeypatch):
    root = tmp_path / "base"
    root.mkdir()
    for name in ("base_data", "tokenizer"):
        os.symlink(os.path.join(tiny_base_dir, name), root / name)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    return str(root)


@pytest.fixture(name="write_shards")
def write_shards_fixture():
    return write_shards


@pytest.fixture(name="make_base_dir")
def make_base_dir_fixture():
    return make_base_dir


@pytest.fixture(name="make_docs")
def make_docs_fixture():
    return make_docs


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: more only add contention, and on a shared
    2-core machine two OpenMP threads per process stall at every barrier (steps ran ~30x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def byte_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.byte_level()


@pytest.fixture
def tiny_config(byte_tokenizer):
    from nanochat.gpt import GPTConfig
    return GPTConfig(sequence_len=64, vocab_size=byte_tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                     n_kv_head=1, n_embd=64)


@pytest.fixture
def tiny_model(tiny_config):
    from nanochat.gpt import GPT
    torch.manual_seed(0)
    return GPT(tiny_config)


# --- serving (tests/test_chat_web.py, tests/test_browser.py) -------------------------------------

class EchoChatModel(torch.nn.Module):
    """A stand-in chat model for serving tests, used through the real Engine. Its reply to a conversation
    is "You said: <last user message>", a calculator call 6*7 (the engine forces the output, 42), " ok",
    then <|assistant_end|>. `delay` seconds per forward make streaming slow enough to watch; `calls`
    counts forwards. Under the scheduler it keeps one reply per KV-cache slot, so it serves a batch;
    under the Engine one sequence at a time. `step` is the reply position of the row it saw last."""

    def __init__(self, tokenizer, delay=0.0, seq_len=1024):
        super().__init__()
        from nanochat.gpt import GPTConfig
        self.tokenizer, self.delay = tokenizer, delay
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=8)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the model a device
        self.calls = 0
        self.script, self.step = [], 0
        self.scripts, self.steps = {}, {}  # per KV-cache slot, when batched by the scheduler

    def get_device(self):
        return self.anchor.device

    def reply_tokens(self, user_text):
        tok, S = self.tokenizer, self.tokenizer.encode_special
        return (tok.encode("You said: " + user_text) + [S("<|python_start|>")] + tok.encode("6*7")
                + [S("<|python_end|>"), S("<|output_start|>")] + tok.encode("42") + [S("<|output_end|>")]
                + tok.encode(" ok") + [S("<|assistant_end|>")])

    def _script_for(self, ids):
        S = self.tokenizer.encode_special
        start = len(ids) - ids[::-1].index(S("<|user_start|>"))
        return self.reply_tokens(self.tokenizer.decode(ids[start:ids.index(S("<|user_end|>"), start)]))

    def forward(self, idx, kv_cache=None, logits_at=None):
        import time
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        S = self.tokenizer.encode_special
        n, T = idx.shape
        logits = torch.full((n, T, self.config.vocab_size), -30.0)
        slots = getattr(kv_cache, "slots", None)
        if slots is None:  # the Engine: one sequence, prefill then one token per step
            if T > 1:
                self.script, self.step = self._script_for(idx[0].tolist()), 0
            else:
                self.step += 1
            nxt = self.script[self.step] if self.step < len(self.script) else S("<|assistant_end|>")
            logits[:, -1, nxt] = 30.0
            return at_positions(logits, logits_at)
        # the scheduler: rows continue their own slots of a ragged cache; keep its lengths right
        new = [kv_cache.cache.lengths[s] == 0 for s in slots]
        kv_cache.positions(T, idx.device)
        empty = torch.zeros(n, 1, T, 8)
        kv_cache.insert_kv(0, empty, empty)
        for i, (slot, count) in enumerate(zip(slots, kv_cache.counts)):
            if new[i]:  # a prompt (the tests' prompts fit in one prefill chunk)
                self.scripts[slot], self.steps[slot] = self._script_for(idx[i, :count].tolist()), 0
            else:
                self.steps[slot] += 1
            self.step = self.steps[slot]
            script = self.scripts[slot]
            nxt = script[self.step] if self.step < len(script) else S("<|assistant_end|>")
            logits[i, count - 1, nxt] = 30.0
        return at_positions(logits, logits_at)


@pytest.fixture(name="echo_chat_model", scope="session")
def echo_chat_model_fixture():
    return EchoChatModel


@pytest.fixture(scope="session")
def serve_app():
    """A context manager: `with serve_app(app) as url:` serves an ASGI app with uvicorn on a free loopback
    port in a background thread, and stops it on exit."""
    from nanochat.serve.app import serve_in_thread
    return serve_in_thread


@contextlib.contextmanager
def unjam_fifos(paths, after=20):
    """While inside: a FIFO opened for reading the ordinary way blocks until a writer comes, and from Rust
    (safetensors) it blocks holding the GIL, so no thread of the test can time it out. A separate process opens
    each FIFO for writing after `after` seconds, so such a reader gets EOF and the test fails instead of hanging."""
    opener = "import sys, time; time.sleep(float(sys.argv[1])); open(sys.argv[2], 'w').close()"
    procs = [subprocess.Popen([sys.executable, "-c", opener, str(after), str(p)]) for p in paths]  # one process each
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def at_positions(logits, logits_at):
    """What GPT.forward(..., logits_at=...) returns, for the test models here that compute every position."""
    from nanochat.gpt import take_positions
    return logits if logits_at is None else take_positions(logits, logits_at)
