"""Adapter stacks (several active, weighted, nested training) and merging adapters (linear, TIES, DARE)."""
import json
import os

import pytest
import torch

from nanochat.lora import LoRA
from nanochat.lora_io import load_adapter, save_adapter
from nanochat.lora_merge import dare, low_rank, merge_adapters, ties
from nanochat.lora_train import train_adapter
from nanochat.tokenizer import Tokenizer
from tests.test_lora import make_model, randomize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def x():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def two_adapters(model):
    lora = LoRA(model)
    randomize(lora.add("domain", rank=4, alpha=8), 0)
    randomize(lora.add("facts", rank=2, alpha=2, targets=("attn.c_q", "attn.c_v", "mlp.c_fc")), 1)
    return lora


@torch.no_grad()
def merged_in_turn(lora, stack, x):
    """A fresh copy of the base with each adapter's weighted delta added to the weights in turn."""
    ref = make_model()
    mods = dict(ref.named_modules())
    for name, w in stack:
        ad = lora.adapters[name]
        for k, i in ad.index.items():
            mods[k.replace("h.", "transformer.h.", 1)].weight.add_(ad.weight_delta(i) * w)
    return ref(x)


def test_stack_equals_merging_each_adapter_in_turn(x):
    model = make_model()
    base_out = model(x)
    lora = two_adapters(model)
    lora.activate(["domain", "facts"], weights=[1.0, 0.5])
    assert lora.active == ["domain", "facts"] and lora.stack == (("domain", 1.0), ("facts", 0.5))
    stacked = model(x)
    ref = merged_in_turn(lora, lora.stack, x)
    assert (stacked - base_out).abs().max() > 1e-2  # both adapters really do something
    assert torch.allclose(stacked, ref, atol=1e-5)
    lora.activate("domain")
    assert not torch.allclose(model(x), stacked, atol=1e-3)  # the weight and the second adapter matter
    # merging the stack folds both in; unmerging restores the base bit for bit
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.activate(["domain", "facts"], weights=[1.0, 0.5], merge=True)
    assert lora.merged == ["domain", "facts"]
    assert torch.allclose(model(x), ref, atol=1e-5)
    lora.activate(None)
    assert lora.merged is None and all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), base_out)
    # removing one adapter of the active stack keeps the rest
    lora.activate(["domain", "facts"], weights=[1.0, 0.5])
    lora.remove("domain")
    assert lora.stack == (("facts", 0.5),)


def test_bad_stacks_are_refused():
    lora = two_adapters(make_model())
    with pytest.raises(KeyError, match="nope"):
        lora.activate(["domain", "nope"])
    with pytest.raises(ValueError, match="one weight per adapter"):
        lora.activate(["domain", "facts"], weights=[1.0])
    with pytest.raises(ValueError, match="twice"):
        lora.activate(["domain", "domain"])
    with pytest.raises(ValueError, match="finite"):
        lora.activate(["domain"], weights=[float("nan")])
    assert lora.stack == ()


def test_nested_adapter_trains_on_top_of_a_frozen_stack(tmp_path):
    tok = Tokenizer.byte_level()
    model = make_model()
    lora = two_adapters(model)
    under = {k: v.clone() for k, v in lora.adapters["domain"].state_dict().items()}
    lora.activate("facts")
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    ad = train_adapter(model, tok, convs, steps=6, name="nested", lora=lora, rank=2, alpha=4, lr=3e-2,
                       stack_under=["domain"], stack_weights=[0.5])
    assert all(torch.equal(v, under[k]) for k, v in lora.adapters["domain"].state_dict().items())  # frozen
    assert all(p.requires_grad for p in lora.adapters["domain"].parameters())  # ... only while training
    assert any(torch.count_nonzero(b) > 0 for b in ad.B)
    assert ad.info["metrics"]["loss_after"] < ad.info["metrics"]["loss_before"]  # measured on the stack
    assert lora.active == "facts"  # what was active before is back
    save_adapter(lora, "nested", str(tmp_path / "nested"))
    meta = json.loads((tmp_path / "nested" / "adapter.json").read_text())
    assert meta["provenance"] == {"stacked_on": [{"name": "domain", "weight": 0.5}]}
    lora.remove("nested")
    load_adapter(lora, str(tmp_path / "nested"))
    assert lora.adapters["nested"].info["provenance"]["stacked_on"][0]["name"] == "domain"
    with pytest.raises(ValueError, match="itself"):
        train_adapter(model, tok, convs, steps=1, name="domain", lora=lora, stack_under=["domain"])


def test_linear_merge_is_exact_and_saved_with_provenance(x, tmp_path):
    model = make_model()
    lora = two_adapters(model)
    lora.activate(["domain", "facts"], weights=[1.0, 0.5])
    stacked = model(x)
    ad = merge_adapters(lora, ["domain", "facts"], "both", method="linear", weights=[1.0, 0.5])
    assert ad.rank == 6 and ad.scale == 1.0
    lora.activate("both")
    assert torch.allclose(model(x), stacked, atol=1e-5)
    # a lower rank goes through the SVD: close, not exact
    merge_adapters(lora, ["domain", "facts"], "both-r3", method="linear", weights=[1.0, 0.5], rank=3)
    lora.activate("both-r3")
    approx = model(x)
    assert approx.shape == stacked.shape and not torch.allclose(approx, stacked, atol=1e-6)
    meta = save_adapter(lora, "both", str(tmp_path / "both"))
    prov = json.loads((tmp_path / "both" / "adapter.json").read_text())["provenance"]
    assert prov["method"] == "linear" and [s["name"] for s in prov["merged_from"]] == ["domain", "facts"]
    assert [s["weight"] for s in prov["merged_from"]] == [1.0, 0.5] and meta["rank"] == 6
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_adapters(lora, ["domain"], "bad", method="mean")
    with pytest.raises(ValueError, match="density"):
        merge_adapters(lora, ["domain"], "bad", method="ties", density=0.0)
    assert "bad" not in lora.adapters


def test_ties_trims_elects_and_averages_disjointly():
    a = torch.tensor([[3.0, -1.0, 0.1, 2.0]])
    b = torch.tensor([[1.0, 2.0, -0.2, -4.0]])
    # density 0.5 keeps a: 3, 2 and b: 2, -4; signs by total mass: +, +, 0, - ; agreeing entries averaged
    assert torch.equal(ties([a, b], 0.5), torch.tensor([[3.0, 2.0, 0.0, -4.0]]))
    # no trimming: column 0 agrees (mean of 3 and 1); elsewhere only the elected sign's entry survives
    assert torch.allclose(ties([a, b], 1.0), torch.tensor([[2.0, 2.0, -0.2, -4.0]]))


def test_dare_keeps_the_expectation_and_low_rank_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    d = torch.ones(200, 200)
    out = dare([d, 2 * d], 0.3, g)
    assert torch.allclose(torch.unique(out), torch.tensor([0.0, 1 / 0.3, 2 / 0.3, 3 / 0.3]))  # kept ones rescaled
    assert abs(out.mean().item() - 3.0) < 0.1  # the expectation of the sum
    assert torch.equal(dare([d, 2 * d], 1.0, g), 3 * d)
    m = torch.randn(12, 3, generator=g) @ torch.randn(3, 20, generator=g)
    B, A = low_rank(m, 3)
    assert B.shape == (12, 3) and A.shape == (3, 20) and torch.allclose(B @ A, m, atol=1e-5)


def test_ties_and_dare_of_one_adapter_reproduce_it(x):
    model = make_model()
    lora = two_adapters(model)
    lora.activate("domain")
    ref = model(x)
    for method in ("ties", "dare"):
        merge_adapters(lora, ["domain"], method, method=method, density=1.0)
        lora.activate(method)
        assert torch.allclose(model(x), ref, atol=1e-4), method
