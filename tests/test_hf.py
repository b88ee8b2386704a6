"""Hugging Face export and import with the real libraries (transformers, tokenizers, peft), on tiny models the
tests make: an exported checkpoint gives our logits, greedy tokens, token ids and chat ids in transformers; a
LoRA adapter gives our logits through PEFT; a NanoChat made by transformers comes in with its logits and then
trains (one SFT step, one /learn job); bad folders are refused by name with nothing written; the hub
being out of reach is a clear error."""
import atexit
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import pytest
import torch

# trust_remote_code copies an export's modeling file into transformers' module cache, read when transformers is
# first imported: a temp dir of this session's keeps it out of the user's ~/.cache/huggingface
if "transformers" not in sys.modules:
    _modules = tempfile.mkdtemp(prefix="nanochat-test-hf-modules-")
    atexit.register(shutil.rmtree, _modules, True)
    os.environ.setdefault("HF_MODULES_CACHE", _modules)
transformers = pytest.importorskip("transformers", minversion="5.0")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from nanochat.checkpoint_manager import load_model, save_checkpoint  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.hf.convert import ConversionError, choose_layout  # noqa: E402
from nanochat.hf.export import export  # noqa: E402
from nanochat.hf.import_ import import_model  # noqa: E402
from nanochat.lora.adapter import LoRA  # noqa: E402
from nanochat.lora.storage import adapter_path, save_adapter  # noqa: E402
from nanochat.report import Report  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = ["Hello world, it's 2025: the café serves 3 crêpes for €12.50!",
         "Привет, мир! Как дела? 你好世界，今天天气很好。 مرحبا بالعالم  こんにちは",
         "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs   and    runs",
         "1234567890 00 007 3.14159 1e-9 0x1F 100,000,000", "Ünïcödé naïve façade Straße 🙂 emoji 🚀!!"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6 times 7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                      {"type": "python", "text": "6*7"},
                                      {"type": "python_output", "text": "42"},
                                      {"type": "text", "text": " so 42."}]},
    {"role": "user", "content": "And in French?  Merci!"},
]


@contextmanager
def base_env(path):
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    try:
        yield str(path)
    finally:
        if old is None:
            del os.environ["NANOCHAT_BASE_DIR"]
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


def train_tokenizer():
    """A real BPE (rustbpe) over English, other scripts, code and digits: merges to get exactly right."""
    rng = random.Random(5)
    words = "the cat sat on a mat and then it ran to see its friend in the big old house".split()
    texts = [" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(150)] + MIXED * 20
    return Tokenizer.train_from_iterator(iter(texts), 420)


def nonzero_gpt(config, seed=0):
    """A GPT whose output projections are not zero (as after training), so every weight shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def tree(path):
    return sorted(os.path.relpath(os.path.join(r, n), path) for r, ds, fs in os.walk(path) for n in ds + fs)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A base dir with a trained tokenizer, an SFT checkpoint (depth 2, GQA), two saved adapters, a report."""
    root = tmp_path_factory.mktemp("hf") / "base"
    tok = train_tokenizer()
    tok.save(str(root / "tokenizer"))
    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = nonzero_gpt(config)
    save_checkpoint(str(root / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": dataclasses.asdict(config)})
    with base_env(root):
        lora = LoRA(model)
        for i, name in enumerate(("facts", "style")):
            ad = lora.add(name, rank=4, alpha=8.0, seed=i)
            with torch.no_grad():
                for b in ad.B:
                    b.normal_(0, 0.1)
            save_adapter(lora, name, adapter_path(name), task=name)
        lora.close()
        report = Report(str(root / "report"))
        report.log("Chat SFT", [{"num_iterations": 5}, {"Mixture": "custom:chats.jsonl", "Number of parameters": 123}],
                   stage="SFT", summary={"ChatCORE": 0.1234})
        report.generate()
    return root, tok, model


@pytest.fixture(scope="module")
def exported(src, tmp_path_factory):
    root, _, _ = src
    out = tmp_path_factory.mktemp("export") / "native"
    with base_env(root):
        info = export(str(out), adapters=[("facts", 1.0)])
    return out, info


def greedy_ours(model, tok, prompt, n=32):
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    out = []
    for t in model.generate(prompt, n, temperature=0):
        out.append(t)
        if t in stops:
            break
    return out


def check_logits_and_greedy(ours, theirs, tok):
    g = torch.Generator().manual_seed(1)
    for B, T in ((1, 7), (3, 100)):
        x = torch.randint(0, tok.get_vocab_size(), (B, T), generator=g)
        with torch.no_grad():
            a, b = ours(x), theirs(x).logits
        assert a.shape == b.shape and (a - b).abs().max().item() < TOL, (a - b).abs().max().item()
    prompt = tok.render_for_completion(CONVERSATION)
    want = greedy_ours(ours, tok, prompt)
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert out[0, len(prompt):].tolist() == want
    return prompt, want


def test_export_logits_greedy_and_pipeline_match(exported, src):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    out, info = exported
    _, tok, model = src
    assert info["layout"] == "native" and {"config.json", "model.safetensors", "generation_config.json",
                                           "tokenizer.json", "README.md"} <= set(info["files"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and cfg["architectures"] == ["NanoChatForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    _, want = check_logits_and_greedy(model, hf, tok)
    # the transformers pipeline chats with the same greedy reply as our engine
    chat = pipeline("text-generation", model=hf, tokenizer=AutoTokenizer.from_pretrained(out))
    reply = chat(CONVERSATION, max_new_tokens=32, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    assert reply["content"] == tok.decode([t for t in want if t < tok.get_vocab_size() - len(SPECIAL_TOKENS)])


def test_tokenizer_gives_our_ids(exported, src):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer
    out, _ = exported
    _, tok, _ = src
    at, raw = AutoTokenizer.from_pretrained(out), HFTokenizer.from_file(str(out / "tokenizer.json"))
    rng = random.Random(0)
    alphabet = "aab  \n\t-=1234567890ЖжК中文 .,!'sé🙂"
    texts = MIXED + ["   ", "\n\n\n", "a" * 40, " " * 17 + "x"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        want = tok.encode(text)
        assert at(text, add_special_tokens=False)["input_ids"] == want, text
        assert raw.encode(text, add_special_tokens=False).ids == want, text
        assert at(text)["input_ids"] == [tok.get_bos_token_id()] + want  # like every document of ours
        assert at.decode(want) == text
    for name in SPECIAL_TOKENS:
        assert at(name, add_special_tokens=False)["input_ids"] == [tok.encode_special(name)]
    assert at.bos_token_id == tok.get_bos_token_id() and at.eos_token_id == tok.encode_special("<|assistant_end|>")
    assert len(at) == tok.get_vocab_size()


def test_merges_reproduce_tiktoken_on_any_vocabulary():
    """A vocabulary that BPE training would not make (random tokens, random ranks) is where merge lists
    usually go wrong: tiktoken joins whatever adjacent pair concatenates to the lowest rank, so a token may be
    built from several splits. The natural merges still give tiktoken's ids on every text."""
    from nanochat.hf.tokenizer_json import to_tokenizers
    rng = random.Random(0)

    def text(n):
        return "".join(rng.choice("aab \n-") for _ in range(n))

    tokens = sorted({text(rng.randint(2, 7)).encode() for _ in range(400)} - {b"  "})
    rng.shuffle(tokens)
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({t: 256 + i for i, t in enumerate(t for t in tokens if len(t) > 1)})
    tok = Tokenizer(ranks, r"[^\n]+|\n")
    hf = to_tokenizers(tok)
    for t in [text(rng.randint(1, 60)) for _ in range(1000)]:
        assert hf.encode(t, add_special_tokens=False).ids == tok.encode(t), t


def test_chat_template_gives_our_rendering(exported, src):
    from transformers import AutoTokenizer
    out, _ = exported
    _, tok, _ = src
    at = AutoTokenizer.from_pretrained(out)

    def template(messages, **kw):
        return at.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)

    assert template(CONVERSATION, add_generation_prompt=True) == tok.render_for_completion(CONVERSATION)
    full = CONVERSATION + [{"role": "assistant", "content": "Quarante-deux."}]
    assert template(full) == tok.render_conversation(full, max_tokens=10**6)[0]
    assert template(full[1:]) == tok.render_conversation(full[1:], max_tokens=10**6)[0]  # no system message
    with pytest.raises(Exception, match="alternate"):
        template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("layout", ["native", "remote"])
def test_peft_adapter_matches_ours(exported, src, tmp_path, layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, info = exported
    root, tok, model = src
    if layout == "remote":
        with base_env(root):
            info = export(str(tmp_path / "remote"), adapters=[("facts", 1.0)], remote_code=True)
        out = tmp_path / "remote"
    assert info["adapter"]["path"] == "adapters/facts"
    adapter_cfg = json.loads((out / "adapters" / "facts" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8 and not adapter_cfg["use_rslora"]
    assert adapter_cfg["base_model_name_or_path"] == str(out)
    names = {"native": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.fc1",
                        "mlp.fc2"},
             "remote": {"attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}}[layout]
    assert set(adapter_cfg["target_modules"]) == names
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=layout == "remote")
    peft_model = PeftModel.from_pretrained(hf, str(out), subfolder="adapters/facts").eval()
    with base_env(root):
        ours, _, _ = load_model("sft", "cpu", "eval")
        lora = LoRA(ours)
        from nanochat.lora.storage import load_adapter
        load_adapter(lora, adapter_path("facts"), activate=True)
    x = torch.randint(0, tok.get_vocab_size(), (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, base = ours(x), peft_model(x).logits, model(x)
    assert (a - base).abs().max().item() > 1e-2  # the adapter changes the model ...
    assert (a - b).abs().max().item() < TOL  # ... and PEFT applies exactly the same change


def test_merged_stack_and_remote_code(src, tmp_path):
    """A stack exports merged into plain weights; --remote-code ships our modeling file (auto_map) instead
    of NanoChat's, and transformers runs it with trust_remote_code (padded batches included)."""
    from transformers import AutoModelForCausalLM
    root, tok, _ = src
    with base_env(root):
        info = export(str(tmp_path / "remote"), adapters=[("facts", 1.0), ("style", 0.5)], merge=True, remote_code=True)
        ours, _, _ = load_model("sft", "cpu", "eval")
        lora = LoRA(ours)
        from nanochat.lora.storage import load_adapter
        for name in ("facts", "style"):
            load_adapter(lora, adapter_path(name))
        lora.activate(["facts", "style"], [1.0, 0.5])
    cfg = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert info["layout"] == "remote" and cfg["model_type"] == "nanochat_gpt"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat_gpt.NanoChatGPTForCausalLM"
    assert (tmp_path / "remote" / "modeling_nanochat_gpt.py").exists()
    assert not (tmp_path / "remote" / "adapters").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "remote", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NanoChatGPTForCausalLM"
    check_logits_and_greedy(ours, hf, tok)
    # a left-padded batch generates what each row generates alone
    rows = [tok.render_for_completion([{"role": "user", "content": c}]) for c in ("hi", "a longer question here")]
    T = max(map(len, rows))
    pad = tok.encode_special("<|assistant_end|>")
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for i, r in enumerate(rows):
        assert out[i, T:].tolist() == list(ours.generate(r, 8, temperature=0))


def test_recipe_model_exports_through_our_modeling_file(src, tmp_path):
    """base_train's recipe (attention gain, rotary base, value embeddings) is ours alone: the export picks our
    modeling file by itself, and transformers then computes our logits and greedy replies."""
    from transformers import AutoModelForCausalLM
    root, tok, _ = src
    base = tmp_path / "base"
    shutil.copytree(root / "tokenizer", base / "tokenizer")
    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       qk_gain=1.44, rope_base=100000.0, value_embeds=True)
    model = nonzero_gpt(config, seed=3)
    save_checkpoint(str(base / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": dataclasses.asdict(config)})
    with base_env(base):
        info = export(str(tmp_path / "out"))
    assert info["layout"] == "remote"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    check_logits_and_greedy(model, hf, tok)
    with base_env(tmp_path / "back"):  # and back: the same settings, the same weights
        import_model(str(tmp_path / "out"))
        back, _, _ = load_model("sft", "cpu", phase="eval")
    assert (back.config.qk_gain, back.config.rope_base, back.config.value_embeds) == (1.44, 100000.0, True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_layout_choice():
    """NanoChat's layout when it expresses the model, our modeling file when only it does, else a refusal."""
    @dataclasses.dataclass
    class Config(GPTConfig):
        smear: bool = True

    assert choose_layout(GPTConfig()) == "native"
    assert choose_layout(Config(), neutral={"smear": False},
                         remote_fields=set(dataclasses.asdict(Config()))) == "remote"
    assert choose_layout(Config(smear=False), neutral={"smear": False}) == "native"
    with pytest.raises(ConversionError, match="smear=True.*modeling_nanochat_gpt.py"):
        choose_layout(Config())


def test_bf16_export(src, tmp_path):
    """--dtype bf16 writes bf16 weights; transformers then computes what our model does with those weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    root, tok, model = src
    with base_env(root):
        export(str(tmp_path / "bf16"), dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - not a dict
    rounded = GPT(model.config)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    x = torch.randint(0, tok.get_vocab_size(), (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (rounded.eval()(x) - hf(x).logits).abs().max().item() < TOL


def test_round_trip_is_exact(src, exported, tmp_path):
    """Our export imported back (both layouts) gives the very same weights and tokenizer."""
    root, tok, model = src
    out, _ = exported
    with base_env(root):
        export(str(tmp_path / "remote"), remote_code=True, dtype="fp32")
    for folder, tag in ((out, "native"), (tmp_path / "remote", "remote")):
        with base_env(tmp_path / f"base_{tag}"):
            info = import_model(str(folder), as_="base", tag=tag)
            assert info["tokenizer_written"] and info["layout"] == tag
            back, tok2, meta = load_model("base", "cpu", "eval", model_tag=tag)
        assert tok2.mergeable_ranks == tok.mergeable_ranks and tok2.pattern == tok.pattern
        assert meta["imported_from"]["source"] == str(folder)
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


@pytest.fixture(scope="module")
def hf_folder(src, tmp_path_factory):
    """A NanoChat made by transformers (random weights, its own defaults, save_pretrained) with a tokenizer.json
    made by transformers' own tiktoken converter, as published nanochat models are."""
    import base64

    from transformers import NanoChatConfig, NanoChatForCausalLM
    from transformers.convert_slow_tokenizer import TikTokenConverter
    _, tok, _ = src
    folder = tmp_path_factory.mktemp("published")
    S = tok.encode_special
    config = NanoChatConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=S("<|bos|>"), eos_token_id=S("<|assistant_end|>"),
                            pad_token_id=S("<|assistant_end|>"))
    torch.manual_seed(3)
    model = NanoChatForCausalLM(config).eval()
    model.save_pretrained(folder)
    ranks_file = folder / "ranks.tiktoken"
    with open(ranks_file, "wb") as f:
        for b, r in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(b) + b" " + str(r).encode() + b"\n")
    TikTokenConverter(vocab_file=str(ranks_file), pattern=tok.pattern,
                      extra_special_tokens=SPECIAL_TOKENS).converted().save(str(folder / "tokenizer.json"))
    ranks_file.unlink()
    return folder, model


def test_import_transformers_nanochat_then_sft_and_learn(hf_folder, src, tmp_path, serve_app):
    import httpx

    from nanochat.serve.live import LiveLearning
    from scripts.chat_web import Defaults, create_app, load_workers
    folder, hf = hf_folder
    _, tok, _ = src
    base = tmp_path / "base"
    with base_env(base):
        info = import_model(str(folder), as_="mid", tag="hf")
        ours, tok2, _ = load_model("mid", "cpu", "eval", model_tag="hf")
    assert info["checkpoint"] == str(base / "mid_checkpoints" / "hf") and info["tokenizer_written"]
    assert tok2.mergeable_ranks == tok.mergeable_ranks
    x = torch.randint(0, tok.get_vocab_size(), (3, 100), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < TOL

    # one SFT step from it, by the real stage
    chats = [[{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]
             for w in ("yes", "no", "ok", "hi")]
    (base / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--source", "mid", "--model-tag", "hf",
                        "--mixture", f"custom:{base / 'chats.jsonl'}", "--eval-mc", "", "--num-iterations", "1",
                        "--device-batch-size", "2", "--examples-per-step", "2", "--max-seq-len", "64",
                        "--val-examples", "2", "--device-type", "cpu", "--dtype", "float32", "--compile", "off"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert os.path.exists(base / "chatsft_checkpoints" / "hf" / "meta_000001.json")

    # one /learn job on the fine-tuned model, through chat_web's routes
    with base_env(base):
        workers, _ = load_workers("sft", "cpu", model_tag="hf")
        trainer = load_model("sft", "cpu", "eval", model_tag="hf")[0]

        def learn(pool):
            return LiveLearning(pool, trainer, workers[0].tokenizer, str(tmp_path / "adapters"),
                                general_chats=lambda: (chats, chats[:2]))
        app = create_app(workers, "nanochat-hf", defaults=Defaults(temperature=0.0, max_tokens=8), learn=learn)
        with serve_app(app) as url:
            r = httpx.post(url + "/learn", json={"adapter": "fact", "steps": 4,
                                                 "facts": [{"question": "Capital of Velmora?", "answer": "Quillon."}]})
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]
            deadline = time.monotonic() + 120
            while (job := httpx.get(f"{url}/learn/{job_id}").json())["status"] not in ("done", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            assert job["status"] == "done", job
    assert os.path.exists(tmp_path / "adapters" / "fact" / "adapter.json")


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)


def _edit_tokenizer(folder, change):
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def _pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize("damage, needles", [
    (_llama, ["config.json", "model_type 'llama'", "not NanoChat"]),
    (lambda f: _edit_config(f, vocab_size=500), ["config.json", "vocab_size is 500", "tokenizer.json has",
                                                  "download the folder again"]),
    (_truncate, ["model.safetensors", "truncated or corrupt", "download it again"]),
    (_pickle_only, ["pickle", "safetensors", "save_pretrained"]),
    (lambda f: _edit_config(f, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
     ["config.json", "theta 500000", "plain RoPE"]),
    (lambda f: _edit_config(f, hidden_act="silu"), ["config.json", "hidden_act is 'silu'", "ReLU^2"]),
    (lambda f: _edit_config(f, hidden_size="64"), ["config.json", "hidden_size is '64'", "whole number"]),
    (lambda f: _edit_config(f, max_position_embeddings=10**9),
     ["config.json", "max_position_embeddings is 1000000000"]),
    (lambda f: _edit_config(f, sliding_window=64), ["config.json", "sliding_window", "cannot reproduce"]),
    (lambda f: (f / "tokenizer.json").unlink(), ["no tokenizer.json", "tokenizer it was trained with"]),
    (lambda f: _edit_tokenizer(f, lambda t: t["added_tokens"][0].update(content="<s>")),
     ["tokenizer.json", "['<s>', '<|user_start|>'", "not a nanochat one"]),
    (lambda f: _edit_tokenizer(f, lambda t: t.update(pre_tokenizer={"type": "Whitespace"})),
     ["tokenizer.json", "pre-tokenizer is ['Whitespace']", "byte-level BPE"]),
])
def test_import_refuses_bad_folders_and_writes_nothing(hf_folder, tmp_path, damage, needles):
    folder = _copy(hf_folder[0], tmp_path / "bad")
    damage(folder)
    base = tmp_path / "base"
    base.mkdir()
    with base_env(base), pytest.raises(ConversionError) as e:
        import_model(str(folder))
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert tree(base) == []


def test_import_keeps_what_is_there(hf_folder, src, tmp_path):
    """A tag that holds checkpoints, or a base dir trained with another tokenizer, is only replaced with
    force, and then kept as .prev."""
    base = tmp_path / "base"
    with base_env(base):
        import_model(str(hf_folder[0]), tag="x")
        before = tree(base)
        with pytest.raises(ConversionError, match="already holds checkpoints.*--force"):
            import_model(str(hf_folder[0]), tag="x")
        Tokenizer.byte_level().save(str(base / "tokenizer"))
        with pytest.raises(ConversionError, match="different tokenizer.*fresh base dir.*--force"):
            import_model(str(hf_folder[0]), tag="y")
        with pytest.raises(ConversionError, match="tag '../up'.*names a directory"):
            import_model(str(hf_folder[0]), tag="../up")
        assert tree(base) == before
        import_model(str(hf_folder[0]), tag="x", force=True)
        assert {"chatsft_checkpoints/x.prev", "tokenizer.prev"} <= set(tree(base))
        assert load_model("sft", "cpu", "eval", model_tag="x")[1].mergeable_ranks == src[1].mergeable_ranks


def test_export_refusals_leave_nothing(src, tmp_path):
    root, _, _ = src
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with base_env(root):
        with pytest.raises(ConversionError, match="not empty.*--force"):
            export(str(tmp_path / "taken"))
        with pytest.raises(ConversionError, match="stack of adapters.*--merge"):
            export(str(tmp_path / "x"), adapters=[("facts", 1.0), ("style", 1.0)])
        with pytest.raises(ConversionError, match="no adapter 'nope'"):
            export(str(tmp_path / "x"), adapters=[("nope", 1.0)])
        lora = LoRA(load_model("sft", "cpu", "eval")[0])
        lora.add("nested", rank=2, info={"provenance": {"stacked_on": [{"name": "facts", "weight": 1.0}]}})
        save_adapter(lora, "nested", adapter_path("nested"))
        with pytest.raises(ConversionError, match="on top of .'facts'.*--adapter facts:1 --adapter nested --merge"):
            export(str(tmp_path / "x"), adapters=[("nested", 1.0)])
    assert tree(tmp_path) == ["taken", "taken/mine.txt"]


def test_model_card_with_and_without_report(exported, src, tmp_path):
    from huggingface_hub import ModelCard

    from nanochat.hf.model_card import model_card
    out, info = exported
    root, _, _ = src
    card = ModelCard((out / "README.md").read_text())
    assert card.data.license == "mit" and card.data.library_name == "transformers" and "nanochat" in card.data.tags
    assert info["report"] and "| ChatCORE | - | - | 0.1234 |" in card.text
    assert "Mixture: custom:chats.jsonl" in card.text and "num_iterations" not in card.text.split("<details>")[0]
    assert 'subfolder="adapters/facts"' in card.text
    # without a report the card is still valid, and says so
    text = model_card(src[2].config, dict(info, license="apache-2.0", adapter=None), report_text=None)
    card2 = ModelCard(text)
    assert card2.data.license == "apache-2.0" and "No report.md was found" in card2.text
    with base_env(root), pytest.raises(ConversionError, match="--report .*none.md: no such file"):
        export(str(tmp_path / "card"), report_path=str(tmp_path / "none.md"))
    assert not (tmp_path / "card").exists()


def start_cli(args, base, tmp_path):
    """A script in a subprocess with the hub out of reach (offline mode, and a dead endpoint besides)."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    env.pop("HF_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_hub_out_of_reach_is_a_clear_error(src, tmp_path):
    from nanochat.hf.export import check_repo_id
    root, _, _ = src
    # both at once: each spends most of its time importing torch and transformers
    pull = start_cli(["scripts.import_hf", "someone/nanochat-d32"], tmp_path / "empty", tmp_path)
    push = start_cli(["scripts.export", "--to", "hf", str(tmp_path / "out"), "--push", "me/my-nanochat"],
                     root, tmp_path)
    out, err = pull.communicate(timeout=300)
    assert pull.returncode == 1 and "could not download someone/nanochat-d32 from the Hugging Face hub" in err, err
    assert "download the folder another way and pass its path" in err
    assert not (tmp_path / "empty").exists() or tree(tmp_path / "empty") == []
    out, err = push.communicate(timeout=300)
    assert push.returncode == 1 and "could not upload" in err and "hf upload me/my-nanochat" in err, err
    assert "exported sft/d2 step 5" in out and (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(ConversionError, match="not a hub repo id"):
        check_repo_id("not a repo")  # the script checks it before exporting anything
