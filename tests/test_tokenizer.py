import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

AWKWARD = [
    "", "a", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\nCRLF\r\n\r\n",
    "digits 1 12 123 1234 12345 ٣٤٥ ④", "unicode: Ünïcödé naïve café", "emoji 👋🏽 👨‍👩‍👧 ✓",
    "CJK 東京 한국어 Русский", "it's we'll they've I'M", "   \n\n   \t\t  ", "a" * 1000,
    "<|bos|> <|user_start|> looks special but is text", "\x00\x01 control", "mixed 3.14e-10 + x**2",
]


def tok_with_merges():
    """Byte tokens plus a few merges, so tiktoken actually merges something."""
    ranks = {bytes([i]): i for i in range(256)}
    for m in [b"th", b"he", b"the", b" the", b"in", b"ing", b"12", b"  "]:
        ranks[m] = len(ranks)
    return Tokenizer(ranks)


@pytest.mark.parametrize("tok", [Tokenizer.byte_level(), tok_with_merges()], ids=["bytes", "merges"])
def test_round_trip_and_no_specials_from_text(tok):
    n_ordinary = tok.get_vocab_size() - len(SPECIAL_TOKENS)
    for text in AWKWARD:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i < n_ordinary for i in ids), f"special token produced from plain text: {text!r}"
    batch = tok.encode(AWKWARD, prepend="<|bos|>")
    assert [tok.decode(ids[1:]) for ids in batch] == AWKWARD
    assert all(ids[0] == tok.get_bos_token_id() for ids in batch)


def test_merges_are_used():
    tok = tok_with_merges()
    ids = tok.encode(" the thing")
    assert len(ids) < len(" the thing".encode())
    assert tok.decode(ids) == " the thing"


def test_vocab_layout_and_specials():
    tok = tok_with_merges()
    assert tok.get_vocab_size() == 256 + 8 + len(SPECIAL_TOKENS)
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(264, 264 + len(SPECIAL_TOKENS)))
    assert tok.get_bos_token_id() == 264
    with pytest.raises(KeyError, match="unknown special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(TypeError, match="item 1"):
        tok.encode(["ok", 3])


def test_save_load_and_token_bytes(tmp_path):
    tok = tok_with_merges()
    tok.save(tmp_path)
    again = Tokenizer.from_directory(tmp_path)
    for text in AWKWARD:
        assert again.encode(text) == tok.encode(text)
    tb = torch.load(tmp_path / "token_bytes.pt")
    assert tb.shape == (tok.get_vocab_size(),)
    assert tb[ord("a")] == 1 and tb[tok.encode(" the")[0]] == 4
    assert (tb[-len(SPECIAL_TOKENS):] == 0).all()
    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.from_directory(tmp_path / "missing")


def test_bad_ranks_rejected():
    with pytest.raises(ValueError, match="0..N-1"):
        Tokenizer({b"a": 0, b"b": 2})


def render(tok, messages):
    return tok.render_conversation({"messages": messages})


def test_render_conversation_masks():
    tok = Tokenizer.byte_level()
    S = tok.encode_special
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "ok"},
            {"type": "python", "text": "1+1"},
            {"type": "python_output", "text": "2"},
            {"type": "text", "text": "!"},
        ]},
    ]
    ids, mask = render(tok, msgs)
    expected = [
        (tok.get_bos_token_id(), 0), (S("<|user_start|>"), 0), *[(b, 0) for b in b"hi"], (S("<|user_end|>"), 0),
        (S("<|assistant_start|>"), 0), *[(b, 1) for b in b"ok"],
        (S("<|python_start|>"), 1), *[(b, 1) for b in b"1+1"], (S("<|python_end|>"), 1),
        (S("<|output_start|>"), 0), (ord("2"), 0), (S("<|output_end|>"), 0),
        (ord("!"), 1), (S("<|assistant_end|>"), 1),
    ]
    assert list(zip(ids, mask)) == expected


def test_system_message_folds_into_first_user_turn():
    tok = Tokenizer.byte_level()
    with_sys, _ = render(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                               {"role": "assistant", "content": "A"}])
    merged, _ = render(tok, [{"role": "user", "content": "S\n\nU"}, {"role": "assistant", "content": "A"}])
    assert with_sys == merged


def test_render_truncates_and_for_completion():
    tok = Tokenizer.byte_level()
    msgs = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "xyz"}]
    ids, mask = tok.render_conversation({"messages": msgs}, max_tokens=5)
    assert len(ids) == len(mask) == 5
    prompt = tok.render_for_completion({"messages": msgs})
    full, _ = render(tok, msgs)
    assert prompt == full[: full.index(tok.encode_special("<|assistant_start|>")) + 1]
    assert tok.render_for_completion({"messages": msgs[:1]}) == prompt


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "x"}], "'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": 5}], "must be a string"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}], "part 0"),
    ([{"content": "x"}], "'role' and 'content'"),
])
def test_render_errors_name_the_problem(messages, match):
    with pytest.raises(ValueError, match=match):
        render(Tokenizer.byte_level(), messages)
