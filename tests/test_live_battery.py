"""What keeps a live adapter from breaking unrelated answers, piece by piece on tiny models: the general battery's
scoring (on a scripted model whose replies the test knows, and on a tiny GPT with a no-op and a harmful adapter),
the preserve term, route_auto on tiny data, router keys on disk, and what "auto" routes on."""
import os

import pytest
import torch

from nanochat.continual.adapter_train import preserve_loss, train_adapter
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora.adapter import LoRA
from nanochat.lora.router import route_auto, set_keys
from nanochat.lora.storage import load_adapter, read_examples, save_adapter
from nanochat.serve.battery import Battery, BatteryItem, answer_key, greedy_replies, reply_text, score
from nanochat.serve.live import facts_to_conversations, question_forms
from nanochat.serve.live_jobs import routing_ids
from nanochat.serve.scheduler import Scheduler
from nanochat.training import collate

pytestmark = pytest.mark.usefixtures("one_thread")


def user(text):
    return [{"role": "user", "content": text}]


def text(s):
    return {"type": "text", "text": s}


def call(s):
    return {"type": "python", "text": s}


def output(s):
    return {"type": "python_output", "text": s}


def test_answer_key_is_the_tool_calls_and_the_final_answer():
    assert answer_key([text("Let me calculate."), call("6*7"), output("42"), text("#### 42")]) == (("6*7",), "42")
    # the wording before "####" may change, the final answer may not
    assert answer_key([text("Sure thing!\n#### 42")]) == answer_key([text("Here it is: #### 42\n")])
    assert answer_key([text("#### 42")]) != answer_key([text("#### 41")])
    # a different tool call is a different answer, even with the same output
    assert answer_key([call("6*7"), output("42")]) != answer_key([call("7*6"), output("42")])
    # without "####" the whole reply counts, whitespace aside
    assert answer_key([text("Hello  there.\n")]) == answer_key([text("Hello there.")])
    assert answer_key([text("Hello there.")]) != answer_key([text("Hello there!")])
    # a special token out of place is shown to no user: not part of the answer, but kept in the text checks read
    stray = [text("Hello"), {"type": "special", "text": "<|user_start|>"}, text(" there.")]
    assert answer_key(stray) == answer_key([text("Hello there.")])
    assert reply_text(stray) == "Hello<|user_start|> there."
    marked = "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"
    assert reply_text([call("6*7"), output("42")]) == marked


def test_score_counts_unchanged_answers_accuracy_and_auto():
    items = [BatteryItem("calc/0", "calculator", user("What is 6*7?"), evaluate=lambda r: r.endswith("#### 42")),
             BatteryItem("calc/1", "calculator", user("What is 2+2?"), evaluate=lambda r: r.endswith("#### 4")),
             BatteryItem("chat/0", "chat", user("Hi!"))]
    base = [[call("6*7"), output("42"), text("#### 42")], [call("2+2"), output("4"), text("#### 4")], [text("Hello!")]]
    adapted = [[call("6*7"), output("42"), text("#### 42")], [text("A glimberry is teal.")], [text("Hello!")]]
    r = score(items, base, adapted, routed=[True, False, False])
    assert (r["unchanged"], r["total"], r["scored"]) == (2, 3, 2)
    assert (r["accuracy_base"], r["accuracy_adapter"]) == (1.0, 0.5)
    assert r["by_kind"] == {"calculator": {"unchanged": 1, "total": 2}, "chat": {"unchanged": 1, "total": 1}}
    assert [c["id"] for c in r["changed"]] == ["calc/1"] and "glimberry" in r["changed"][0]["adapter"]
    # auto sent the broken prompt to the base model: every answer is the base's
    assert r["auto"] == {"unchanged": 3, "to_base": 2, "accuracy": 1.0}
    assert r["summary"] == ("general battery: 2/3 answers unchanged; accuracy 2/2 base, 1/2 adapter; "
                            "auto: 3/3 unchanged, 2/3 routed to the base")
    r = score(items, base, adapted, routed=[True, True, True])
    assert r["auto"] == {"unchanged": 2, "to_base": 0, "accuracy": 0.5}


def test_greedy_replies_through_the_scheduler(echo_chat_model, byte_tokenizer):
    """The scripted model answers "You said: <message>", calls the calculator (6*7, forced output 42), " ok"."""
    model = echo_chat_model(byte_tokenizer)
    sched = Scheduler(model, byte_tokenizer, max_batch=4)
    battery = Battery([BatteryItem(f"echo/{i}", "chat", user(m), max_tokens=64) for i, m in enumerate(["hi", "yo"])]
                      + [BatteryItem("long", "chat", user("x" * 2000))], byte_tokenizer, model.config.sequence_len)
    assert [it.id for it in battery.items] == ["echo/0", "echo/1"]  # a prompt that cannot fit is left out
    replies = battery.replies(sched, lambda item: None)
    assert replies == [[text("You said: hi"), call("6*7"), output("42"), text(" ok")],
                       [text("You said: yo"), call("6*7"), output("42"), text(" ok")]]
    short = greedy_replies(sched, [(battery.prompts[0][0], 5)], [None])  # max_tokens cuts the reply
    assert short == [[text("You s")]]


@pytest.fixture
def tiny_gpt(byte_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=byte_tokenizer.get_vocab_size(), n_layer=2, n_head=1,
                       n_kv_head=1, n_embd=64)
    model = GPT(config)
    with torch.no_grad():  # random weights everywhere (GPT starts its output projections at zero): every input counts
        for p in model.parameters():
            p.normal_(std=0.15)
    return model


def test_battery_on_a_tiny_gpt_sees_a_harmful_adapter(tiny_gpt, byte_tokenizer):
    lora = LoRA(tiny_gpt)
    noop = lora.add("noop", rank=2, seed=0)  # B = 0: the model is unchanged
    harm = lora.add("harm", rank=4, seed=1)
    with torch.no_grad():
        for b in harm.B:
            b.normal_(std=2.0)
    items = [BatteryItem(f"q/{i}", "chat", user(q), max_tokens=12, evaluate=lambda r, q=q: q[0] in r)
             for i, q in enumerate(["hello", "what is 2 plus 2?", "spell cat", "who are you?", "count to 3"])]
    battery = Battery(items, byte_tokenizer, 128)
    sched = Scheduler(tiny_gpt, byte_tokenizer, lora=lora, max_batch=8)
    same = battery.run(sched, lambda item: noop)
    assert (same["unchanged"], same["total"]) == (5, 5) and same["accuracy_adapter"] == same["accuracy_base"]
    broken = battery.run(sched, lambda item: harm, routed=[False] * 5)
    assert broken["unchanged"] < 5 and broken["changed"]
    assert broken["auto"]["unchanged"] == 5 and broken["auto"]["to_base"] == 5
    assert battery.run(sched, lambda item: None)["unchanged"] == 5  # the base model against itself


def test_preserve_loss_is_zero_for_a_zero_adapter_and_positive_otherwise(tiny_gpt, byte_tokenizer):
    lora = LoRA(tiny_gpt)
    ad = lora.add("facts", rank=4, seed=0)
    lora.activate("facts")
    rows = [byte_tokenizer.render_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in (("Hi there", "Hello!"), ("What is 2 plus 3?", "2 plus 3 is 5."))]
    x, y = collate(rows, byte_tokenizer.get_bos_token_id())
    assert preserve_loss(tiny_gpt, lora, x, y).item() == 0.0  # B = 0: the same arithmetic as the base model
    with torch.no_grad():
        ad.B[0].normal_(std=0.5)
    loss = preserve_loss(tiny_gpt, lora, x, y)
    assert loss.item() > 0
    loss.backward()  # it trains the adapter: a gradient reaches B
    assert ad.B[0].grad is not None and ad.B[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no supervised position"):
        preserve_loss(tiny_gpt, lora, x, torch.full_like(y, -1))


def test_training_with_preserve_stays_closer_to_the_base(tiny_gpt, byte_tokenizer):
    """The same adapter trained with and without the preserve term: with it, general rows' distributions move less."""
    facts = [[{"role": "user", "content": f"Where is {w}?"}, {"role": "assistant", "content": f"{w} is in Quillon."}]
             for w in ("Velmora", "Zandor", "Orrin")]
    general = [[{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": n}]
               for n in ("Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal")]
    lora = LoRA(tiny_gpt)
    rows = [byte_tokenizer.render_conversation(c) for c in general]
    x, y = collate(rows, byte_tokenizer.get_bos_token_id())
    drift = {}
    for preserve in (0.0, 5.0):
        ad = train_adapter(tiny_gpt, byte_tokenizer, facts, general, steps=30, name=f"p{preserve}", lora=lora,
                           lr=3e-2, batch_size=4, replay_ratio=0.25, preserve=preserve, preserve_batch=4)
        assert ad.info["metrics"]["preserve_conversations"] == (4 if preserve else 0)  # half the replay
        lora.activate(ad.name)
        with torch.no_grad():
            drift[preserve] = preserve_loss(tiny_gpt, lora, x, y).item()
        lora.activate(None)
    assert drift[5.0] < drift[0.0], drift


def test_subspace_keeps_the_adapter_off_general_inputs(tiny_gpt, byte_tokenizer):
    """With subspace_energy, A reads next to nothing of the inputs general rows feed its layers (compared with the
    same adapter trained without it, whose random start reads them like any other direction)."""
    from nanochat.lora.subspace import InputSubspace
    facts = [[{"role": "user", "content": "Capital of Velmora?"}, {"role": "assistant", "content": "Quillon."}]]
    general = [[{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": n}]
               for n in ("Ann", "Bo", "Cy", "Dee")]
    lora = LoRA(tiny_gpt)
    rows = [byte_tokenizer.render_conversation(c) for c in general]
    x = collate(rows, byte_tokenizer.get_bos_token_id())[0]
    with lora.base_only():
        covs = InputSubspace(lora, 0.5).covariances(lambda: tiny_gpt(x))

    def reads(ad):  # the mean over modules of A's share of the general inputs' energy, 1 for an isotropic A
        shares = [(A @ C @ A.T).trace() / ((A @ A.T).trace() * C.trace() / C.size(0))
                  for A, C in ((ad.A[i].detach().double(), covs[key]) for key, i in ad.index.items())]
        return float(sum(shares) / len(shares))

    free = train_adapter(tiny_gpt, byte_tokenizer, facts, general, steps=5, name="free", lora=lora, lr=3e-2)
    confined = train_adapter(tiny_gpt, byte_tokenizer, facts, general, steps=5, name="confined", lora=lora, lr=3e-2,
                             subspace_energy=0.99)
    assert reads(confined) < 0.1 * reads(free), (reads(confined), reads(free))
    assert confined.info["metrics"]["loss_after"] < confined.info["metrics"]["loss_before"]  # it still learns


def test_route_auto_picks_the_adapter_whose_prompts_match(tiny_gpt, byte_tokenizer):
    def prompt(q):
        return byte_tokenizer.render_for_completion(user(q))

    lora = LoRA(tiny_gpt)
    general = [prompt(f"What is {a} plus {b}?") for a in range(4) for b in range(4)] + \
              [prompt(f"Say {n} twice.") for n in ("Ann", "Bo", "Cy", "Dee", "Eli")]
    for name, questions in (("velmora", ["Where is Velmora?", "Who rules Velmora?"]),
                            ("zephyr", ["Who captains the Zephyrstar?", "How fast is the Zephyrstar?"])):
        lora.add(name, rank=2, seed=0)
        set_keys(lora, name, [prompt(q) for q in questions], general)
    asked = ["Where is Velmora?", "Velmora: who rules it?", "Who captains the Zephyrstar?", "Zephyrstar captain?",
             "What is 7 plus 8?", "Say Gus twice."]
    assert route_auto(lora, [prompt(q) for q in asked]) == ["velmora", "velmora", "zephyr", "zephyr", None, None]
    assert route_auto(lora, [prompt("Where is Velmora?")], [lora.adapters["zephyr"]]) == [None]  # only candidates
    lora.add("keyless", rank=2, seed=0)  # an adapter without keys (trained before routing) is never picked
    assert route_auto(lora, [prompt("Where is Velmora?")], [lora.adapters["keyless"]]) == [None]


def test_anchors_keep_a_lookalike_question_about_another_name_with_the_base(tiny_gpt, byte_tokenizer):
    def prompt(q):
        return byte_tokenizer.render_for_completion(user(q))

    lora = LoRA(tiny_gpt)
    general_texts = ["What is the capital of France?", "Which city is the capital of Spain? Madrid is."]
    general = [prompt(t) for t in general_texts]
    taught = ["What is the capital of Velmora?", "Who captains the Zephyrstar?"]
    lora.add("facts", rank=2, seed=0)
    set_keys(lora, "facts", [prompt(q) for q in taught], general, taught, general_texts)
    assert lora.adapters["facts"].anchors == {"velmo", "zephy", "capta"}  # "capital", "what" are general words
    asked = ["What is the capital of Velmora?", "Velmora's capital city?", "What is the capital of Zuxgund?"]
    ids = [prompt(q) for q in asked]
    plain = route_auto(lora, ids)  # no texts: an adapter with anchors claims nothing
    assert plain == [None, None, None]
    routed = route_auto(lora, ids, texts=asked)
    assert routed[2] is None  # no anchor named: the base model, however close the question's shape
    assert routed[0] == "facts"  # its own taught question
    # one taught prompt made of general words only: no anchors, hidden states alone decide
    lora.add("common", rank=2, seed=0)
    set_keys(lora, "common", [prompt(q) for q in taught[:1] + general_texts[:1]], general,
             taught[:1] + general_texts[:1], general_texts)
    assert lora.adapters["common"].anchors is None


def test_router_keys_and_examples_survive_a_save_and_bad_ones_are_refused(tiny_gpt, byte_tokenizer, tmp_path):
    lora = LoRA(tiny_gpt)
    lora.add("facts", rank=2, seed=0)
    prompts = [byte_tokenizer.render_for_completion(user(q)) for q in ("Where is Velmora?", "Who is Mira?")]
    set_keys(lora, "facts", prompts, prompts[:1], ["Where is Velmora?", "Who is Mira?"], ["Where is Paris?"])
    examples = [[{"role": "user", "content": "Where is Velmora?"}, {"role": "assistant", "content": "North."}]]
    path = str(tmp_path / "facts")
    save_adapter(lora, "facts", path, examples=examples)
    other = LoRA(GPT(tiny_gpt.config))
    other.base_hash = lora.base_hash  # same shapes; the hash check is not what this test is about
    load_adapter(other, path)
    ad = other.adapters["facts"]
    assert torch.equal(ad.keys, lora.adapters["facts"].keys) and ad.general_keys.shape == (1, 64)
    assert ad.anchors == {"velmo", "mira"}  # "where" is a general word
    assert read_examples(path) == examples
    assert read_examples(str(tmp_path)) == []  # no examples.json: nothing saved to train on again
    import safetensors.torch
    tensors = safetensors.torch.load_file(os.path.join(path, "adapter.safetensors"))
    tensors["router.keys"] = torch.zeros(2, 63)
    safetensors.torch.save_file(tensors, os.path.join(path, "adapter.safetensors"))
    with pytest.raises(ValueError, match="router.keys has shape"):
        load_adapter(other, path, replace=True)
    tensors["router.keys"] = torch.full((2, 64), float("nan"))
    safetensors.torch.save_file(tensors, os.path.join(path, "adapter.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        load_adapter(other, path, replace=True)
    import json
    meta_path = os.path.join(path, "adapter.json")
    meta = json.load(open(meta_path))
    for bad in (["velmora-is-long"], "velmo", [], [1]):
        json.dump(meta | {"anchors": bad}, open(meta_path, "w"))
        with pytest.raises(ValueError, match="anchors must be null or a list"):
            load_adapter(other, path, replace=True)
    for bad, why in (({"a": 1}, "list of conversations"), ([[{"role": "user"}]], "conversation 0")):
        with open(os.path.join(path, "examples.json"), "w") as f:
            json.dump(bad, f)
        with pytest.raises(ValueError, match=why):
            read_examples(path)


def test_routing_ids_take_the_last_user_message(byte_tokenizer):
    tok = byte_tokenizer
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Where is Velmora?"}]
    assert routing_ids(tok, tok.render_for_completion(convo)) == tok.render_for_completion(convo[-1:])
    plain = [tok.get_bos_token_id()] + tok.encode("Once upon a time")
    assert routing_ids(tok, plain) == plain


def test_question_forms_reword_without_knowing_the_fact():
    forms = question_forms("What colour is a glimberry?")
    assert forms == ["What colour is a glimberry?", "what colour is a glimberry",
                     "Tell me, what colour is a glimberry?", "What colour is a glimberry? Answer in one sentence."]
    assert question_forms("?") == ["?"]  # nothing to reword: the question as asked
    convs = facts_to_conversations([{"question": "Who is Mira?", "answer": "A captain."}])
    assert [c[0]["content"] for c in convs] == question_forms("Who is Mira?")
    assert {c[1]["content"] for c in convs} == {"A captain."}
