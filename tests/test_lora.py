"""LoRA adapters: exact no-op at init, frozen base, exact merge/unmerge, switching, save/load, base check."""
import json
import os
import time

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.lora.adapter import DEFAULT_TARGETS, AdapterBaseMismatch, LoRA, model_state_hash
from nanochat.lora.storage import delete_adapter, list_adapters, load_adapter, read_adapter_meta, save_adapter
from nanochat.lora.router import route, set_centroid
from tests.conftest import unjam_fifos


def make_model(seed=0, n_layer=2):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=265, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(cfg)
    with torch.no_grad():  # the output projections start at zero; make every block do something
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    return model


def randomize(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in adapter.B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def x():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def test_targets_cover_every_block_linear():
    model = make_model()
    lora = LoRA(model)
    assert len(lora.modules) == 2 * 6
    for i, block in enumerate(model.transformer.h):
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == set(DEFAULT_TARGETS)
        for t in DEFAULT_TARGETS:
            assert lora.modules[f"h.{i}.{t}"] is block.get_submodule(t)


def test_new_adapter_is_exact_noop_and_counts(x):
    model = make_model()
    ref = model(x)
    lora = LoRA(model)
    ad = lora.add("a", rank=4, alpha=8)
    lora.activate("a")
    assert torch.equal(model(x), ref)  # B = 0
    assert all(torch.count_nonzero(a) > 0 for a in ad.A)  # A random
    # q: 64->64, k/v: 64->32 (one kv head of dim 32), o: 64->64, fc: 64->256, proj: 256->64
    per_block = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 256), (256, 64)])
    assert ad.num_params() == 2 * per_block
    assert ad.num_bytes() == 4 * ad.num_params()
    s = lora.summary("a")
    assert s["trainable_params"] == ad.num_params() and s["modules"] == 12


def train_on_frozen_base(model, adapter, x, steps):
    """A few AdamW steps on the adapter alone: the loss must fall and the base weights must not move."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_base_frozen_only_adapter_trains(x):
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA(model)
    ad = lora.add("a", rank=4, alpha=8)
    lora.activate("a")
    assert not any(p.requires_grad for p in model.parameters())
    train_on_frozen_base(model, ad, x, steps=5)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # base untouched
    assert any(torch.count_nonzero(b) > 0 for b in ad.B)
    lora.close()
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_merge_matches_hooks_and_unmerge_is_exact(x):
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA(model)
    randomize(lora.add("a", rank=4, alpha=8), 0)
    lora.activate("a")
    hooked = model(x)
    with lora.base_only():
        assert (model(x) - hooked).abs().max().item() > 1e-3  # the adapter really changes the output
    lora.merge()
    assert lora.merged == "a"
    merged = model(x)
    assert (merged - hooked).abs().max().item() < 1e-4
    assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items())
    lora.unmerge()
    diff = max((v - base[k]).abs().max().item() for k, v in model.state_dict().items())
    assert diff == 0.0
    assert torch.equal(model(x), hooked)


def test_several_adapters_switch_fast_and_exact(x):
    model = make_model()
    ref = model(x)
    lora = LoRA(model)
    for k, name in enumerate(["a", "b", "c"]):
        randomize(lora.add(name, rank=4, alpha=8), k)
    outs = {}
    for name in ["a", "b", "c"]:
        t0 = time.perf_counter()
        lora.activate(name)
        assert time.perf_counter() - t0 < 0.05
        outs[name] = model(x)
    assert not torch.equal(outs["a"], outs["b"]) and not torch.equal(outs["b"], outs["c"])
    lora.activate("a")
    assert torch.equal(model(x), outs["a"])  # switching back reproduces the adapter exactly
    lora.activate("b", merge=True)
    assert (model(x) - outs["b"]).abs().max().item() < 1e-4
    lora.activate("c")  # switching away from a merged adapter unmerges it first
    assert lora.merged is None and torch.equal(model(x), outs["c"])
    lora.deactivate()
    assert torch.equal(model(x), ref)
    with lora.base_only():
        lora.activate("a")
        assert torch.equal(model(x), ref)
    lora.remove("a")
    assert "a" not in lora.adapters and lora.active is None


def test_save_load_roundtrip(tmp_path, x):
    model = make_model()
    lora = LoRA(model)
    ad = lora.add("facts", rank=4, alpha=8)
    randomize(ad, 3)
    set_centroid(lora, "facts", [[1, 2, 3, 4], [5, 6, 7]])
    lora.activate("facts")
    out = model(x)
    d = tmp_path / "adapters" / "facts"
    meta = save_adapter(lora, "facts", str(d), task="facts", metrics={"loss": 1.5})
    assert sorted(os.listdir(d)) == ["adapter.json", "adapter.safetensors"]
    assert [n for n in os.listdir(d.parent) if n.startswith(".")] == []  # no temp dirs left behind
    on_disk = json.loads((d / "adapter.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for key in ("rank", "alpha", "targets", "base_hash", "task", "metrics", "created", "trainable_params", "bytes"):
        assert key in on_disk
    assert on_disk["rank"] == 4 and on_disk["alpha"] == 8 and on_disk["targets"] == list(DEFAULT_TARGETS)
    assert on_disk["task"] == "facts" and on_disk["metrics"] == {"loss": 1.5}
    assert on_disk["base_hash"] == model_state_hash(make_model())  # same weights, same hash

    fresh = make_model()  # a new process would rebuild the same base from its checkpoint
    lora2 = LoRA(fresh)
    assert load_adapter(lora2, str(d), activate=True) == "facts"
    assert torch.equal(fresh(x), out)
    assert torch.equal(lora2.adapters["facts"].centroid, lora.adapters["facts"].centroid)
    assert lora2.adapters["facts"].info["metrics"] == {"loss": 1.5}
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(lora2, str(d))

    # saving again replaces the directory in one piece
    randomize(ad, 4)
    save_adapter(lora, "facts", str(d))
    assert [m["name"] for m in list_adapters(str(d.parent))] == ["facts"]
    load_adapter(lora2, str(d), replace=True, activate=True)
    assert torch.equal(fresh(x), model(x))
    delete_adapter(str(d))
    assert not d.exists() and list_adapters(str(d.parent)) == []


def test_refuses_a_different_base(tmp_path):
    lora = LoRA(make_model(seed=0))
    lora.add("a", rank=2, alpha=2)
    save_adapter(lora, "a", str(tmp_path / "a"))
    other = LoRA(make_model(seed=1))
    with pytest.raises(AdapterBaseMismatch, match="trained on base model") as e:
        load_adapter(other, str(tmp_path / "a"))
    assert lora.base_hash in str(e.value) and other.base_hash in str(e.value)
    assert "a" not in other.adapters
    with pytest.raises(FileNotFoundError):
        read_adapter_meta(str(tmp_path / "missing"))



@pytest.mark.parametrize("value,why", [(float("nan"), "NaN or infinite"), (float("-inf"), "NaN or infinite"),
                                       (1e38, "far below")])
def test_an_adapter_with_nan_or_absurd_values_is_refused_at_load(tmp_path, value, why):
    """A well-formed adapter.safetensors holding NaN, inf or 1e38 (a corrupt file, a diverged run) is refused at
    load, naming the tensor, and nothing of it stays loaded."""
    lora = LoRA(make_model())
    ad = lora.add("bad", rank=2, alpha=4)
    randomize(ad, 5)
    with torch.no_grad():
        ad.B[3][0, 1] = value
    save_adapter(lora, "bad", str(tmp_path / "bad"))
    lora2 = LoRA(make_model())
    with pytest.raises(ValueError, match=why) as e:
        load_adapter(lora2, str(tmp_path / "bad"))
    assert f"{ad.modules_[3]}.lora_B" in str(e.value) and "bad" not in lora2.adapters
    with torch.no_grad():  # the router's centroid too
        ad.B[3][0, 1] = 0.0
    set_centroid(lora, "bad", [[1, 2, 3]])
    ad.centroid[0] = float("nan")
    save_adapter(lora, "bad", str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="router.centroid holds NaN"):
        load_adapter(lora2, str(tmp_path / "bad"))
    ad.centroid[0] = 1e6  # a hidden-state mean may be large: only NaN/inf refuse a centroid
    save_adapter(lora, "bad", str(tmp_path / "bad"))
    assert load_adapter(lora2, str(tmp_path / "bad")) == "bad"


def test_adapter_files_are_read_as_regular_files_only(tmp_path):
    """A FIFO (opened the ordinary way it blocks until a writer comes: forever), a symlink, a directory, an
    oversized or deeply nested adapter.json: each refused at once, saying what it is."""
    lora = LoRA(make_model())
    randomize(lora.add("a", rank=2, alpha=4), 1)
    d = tmp_path / "a"
    save_adapter(lora, "a", str(d))
    lora2 = LoRA(make_model())
    weights, meta = d / "adapter.safetensors", d / "adapter.json"
    good_meta = meta.read_text()
    os.replace(weights, tmp_path / "weights")
    os.mkfifo(weights)
    with unjam_fifos([weights]), pytest.raises(ValueError, match="FIFO, not a regular file"):
        load_adapter(lora2, str(d))
    os.remove(weights)
    os.symlink(tmp_path / "weights", weights)
    with pytest.raises(ValueError, match="symbolic link"):
        load_adapter(lora2, str(d))
    os.remove(weights)
    os.mkdir(weights)
    with pytest.raises(ValueError, match="a directory, not a regular file"):
        load_adapter(lora2, str(d))
    os.rmdir(weights)
    with open(tmp_path / "weights", "ab") as f:  # far more than rank 2 on these modules can hold
        f.write(b"\0" * (2 << 20))
    os.replace(tmp_path / "weights", weights)
    with pytest.raises(ValueError, match="the most it can be is"):
        load_adapter(lora2, str(d))
    meta.unlink()
    os.mkfifo(meta)
    with unjam_fifos([meta]), pytest.raises(ValueError, match="FIFO"):
        read_adapter_meta(str(d))
    meta.unlink()
    meta.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nests deeper than 32 levels"):
        read_adapter_meta(str(d))
    meta.write_text(good_meta[:-1] + ', "pad": "' + "x" * (1 << 20) + '"}')
    with pytest.raises(ValueError, match="bytes; the most it can be is"):
        read_adapter_meta(str(d))
    meta.write_text(good_meta[:-1] + ', "note": "' + "[" * 100 + '"}')  # brackets inside a string are no nesting
    assert read_adapter_meta(str(d))["note"] == "[" * 100
    assert not lora2.adapters


def test_hash_ignores_load_dtype_but_not_weights():
    a, b = make_model(0), make_model(0)
    assert model_state_hash(a) == model_state_hash(b)
    # a bf16 checkpoint kept in bf16 (GPU) or upcast to fp32 (CPU, as build_model does) is the same base
    half = make_model(0).to(torch.bfloat16)
    up = make_model(0).to(torch.bfloat16).float()
    assert model_state_hash(half) == model_state_hash(up) != model_state_hash(a)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3
    assert model_state_hash(a) != model_state_hash(b)


def test_router_picks_the_adapter_of_the_nearest_centroid():
    model = make_model()
    lora = LoRA(model)
    g = torch.Generator().manual_seed(0)
    low = [torch.randint(97, 110, (20,), generator=g).tolist() for _ in range(8)]  # letters a..m
    high = [torch.randint(48, 58, (20,), generator=g).tolist() for _ in range(8)]  # digits
    lora.add("letters", rank=2, alpha=2)
    lora.add("digits", rank=2, alpha=2)
    set_centroid(lora, "letters", low[:4])
    set_centroid(lora, "digits", high[:4])
    assert route(lora, low[4:] + high[4:]) == ["letters"] * 4 + ["digits"] * 4
    assert route(lora, high[4:], candidates=["letters"]) == ["letters"] * 4


def test_bad_names_and_targets():
    lora = LoRA(make_model())
    for bad in ["", "../x", "a/b", ".hidden", "x" * 65]:
        with pytest.raises(ValueError):
            lora.add(bad)
    with pytest.raises(ValueError):
        LoRA(make_model(), targets=("attn.c_x",))
    with pytest.raises(RuntimeError, match="already has a LoRA"):
        LoRA(lora.model)
