"""Adapter stacks (several active, weighted, nested training) and merging adapters (linear, TIES, DARE)."""
import json

import pytest
import torch

from nanochat.continual.adapter_train import train_adapter
from nanochat.lora.adapter import LoRA
from nanochat.lora.merge import dare, low_rank, merge_adapters, ties
from nanochat.lora.storage import load_adapter, save_adapter
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


def five_adapters(model):
    lora = LoRA(model)
    for k in range(5):
        targets = None if k % 2 == 0 else ("attn.c_q", "mlp.c_fc", "mlp.c_proj")  # not every adapter everywhere
        randomize(lora.add(f"a{k}", rank=2 + k, alpha=4.0 + k, targets=targets), 10 + k)
    return lora


def test_fused_stack_equals_unfused_and_merging_each_in_turn(x):
    model = make_model()
    lora = five_adapters(model)
    names, weights = [f"a{k}" for k in range(5)], [1.0, 0.5, -0.3, 0.8, 0.25]
    lora.activate(names, weights)
    ref = merged_in_turn(lora, lora.stack, x)
    with torch.no_grad():  # frozen adapters under no_grad: all five packed into one A and one B per module
        fused = model(x)
    At, Bt, owner, _ = lora._packs["h.0.mlp.c_fc"]
    assert At.shape[1] == Bt.shape[0] == sum(2 + k for k in range(5)) and owner.tolist()[-6:] == [0] * 6
    assert lora._packs["h.0.attn.c_k"][0].shape[1] == 2 + 4 + 6  # only a0, a2, a4 target c_k
    with torch.enable_grad():  # trainable adapters under grad: each its own two matmuls, gradients flow
        unfused = model(x)
        unfused.sum().backward()
    assert all(ad.B[0].grad is not None for ad in lora.adapters.values())
    torch.testing.assert_close(fused, unfused.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert (fused - merged_in_turn(lora, lora.stack[:4], x)).abs().max() > 1e-3  # the fifth one counts


def test_fused_stack_is_rebuilt_when_an_adapter_changes(x):
    model = make_model()
    lora = five_adapters(model)
    lora.activate(["a0", "a1", "a2"])
    with torch.no_grad():
        before = model(x)
        packs = dict(lora._packs)
        assert torch.equal(model(x), before) and lora._packs["h.0.mlp.c_fc"] is packs["h.0.mlp.c_fc"]  # cached
        lora.adapters["a1"].B[0].mul_(3.0)  # an in-place change (as an optimizer step makes)
        after = model(x)
    torch.testing.assert_close(after, merged_in_turn(lora, lora.stack, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before, atol=1e-4)
    lora.activate(["a0", "a1", "a2"], [1.0, 1.0, 0.0])  # a new weight: a new pack
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged_in_turn(lora, (("a0", 1.0), ("a1", 1.0)), x), atol=1e-5, rtol=1e-5)


def test_nested_top_adapter_stays_separate_and_alone_gets_gradients(x):
    model = make_model()
    lora = five_adapters(model)
    for n in ("a0", "a1", "a2"):
        lora.freeze(n)
    lora.activate(["a0", "a1", "a2", "a3"])  # a3 trainable on top of a frozen three
    model(x).sum().backward()
    assert lora._packs["h.0.mlp.c_fc"][0].shape[1] == 2 + 3 + 4  # the frozen three, packed
    assert all(p.grad is None for n in ("a0", "a1", "a2") for p in lora.adapters[n].parameters())
    assert lora.adapters["a3"].B[0].grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged_in_turn(lora, lora.stack, x), atol=1e-5, rtol=1e-5)


def test_per_row_stacks_equal_each_row_alone(x):
    model = make_model()
    lora = five_adapters(model)
    ads = lora.adapters
    rows = [((ads["a0"], 1.0), (ads["a3"], 0.5)), None, ads["a1"], ((ads["a0"], 1.0), (ads["a3"], 0.5))]
    as_names = [(["a0", "a3"], [1.0, 0.5]), (None, None), ("a1", None), (["a0", "a3"], [1.0, 0.5])]
    xs = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = []
        for i, (names, weights) in enumerate(as_names):
            lora.activate(names, weights)
            want.append(model(xs[i:i + 1])[0])
        lora.activate("a4")  # per-row mode ignores what is active
        with lora.per_row(rows):
            got = model(xs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want[0], want[1], atol=1e-3) and not torch.allclose(want[0], want[2], atol=1e-3)
    packs = lora._packs
    with torch.no_grad():
        with lora.per_row([ads["a1"]]):  # another mix...
            model(xs[2:3])
        with lora.per_row(rows[::-1]):  # ...then the first mix again, rows in another order: its packs come back
            torch.testing.assert_close(model(xs.flip(0)), torch.stack(want[::-1]), atol=1e-5, rtol=1e-5)
    assert lora._packs is packs
    lora.remove("a3")  # its packs are dropped with it
    assert not any(ad.name == "a3" for sig in lora._pack_cache for st in sig[0] for ad, _ in st)
    with pytest.raises(RuntimeError, match="inference"), lora.per_row([ads["a0"]]):
        model(xs[:1])  # gradients on, adapters trainable: per_row refuses rather than dropping the gradients


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


def test_per_row_folds_a_lasting_stack_into_a_copy_of_the_weights(x):
    model = make_model()
    lora = five_adapters(model)
    ads = lora.adapters
    stack = ((ads["a0"], 1.0), (ads["a3"], 0.5))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        lora.activate(["a0", "a3"], [1.0, 0.5], merge=True)
        merged = model(x)
        lora.activate(None)
        hooked = []
        for _ in range(lora.fold_after + 1):
            with lora.per_row([stack, stack]):
                hooked.append(model(x))
        assert lora._fold is not None and lora._fold[1] == stack  # folded at the fold_after-th forward
        for out in hooked[:lora.fold_after - 1]:  # before: the hooks, equal up to rounding
            torch.testing.assert_close(out, merged, atol=1e-5, rtol=1e-5)
        for out in hooked[lora.fold_after - 1:]:  # folded: merge()'s arithmetic, bit for bit
            assert torch.equal(out, merged)
        # outside per_row, and in a mixed batch meanwhile, the base weights are back and untouched
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
        with lora.per_row([stack, None]):
            mixed = model(x)
        torch.testing.assert_close(mixed[0], merged[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[1], lora_off(lora, model, x)[1])
        fold = lora._fold
        ads["a3"].B[0].add_(1.0)  # an adapter changed in place: the old fold is not served again
        with lora.per_row([stack, stack]):
            changed = model(x)
        assert lora._fold is fold and not torch.allclose(changed, merged, atol=1e-3)
        lora.remove("a3")
        assert lora._fold is None  # a removed adapter's fold goes with it
        lora.fold_after = 0  # off: never folds
        for _ in range(6):
            with lora.per_row([ads["a1"]]):
                model(x)
        assert lora._fold is None


def lora_off(lora, model, x):
    with lora.base_only():
        return model(x)
