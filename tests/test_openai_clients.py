"""chat_web's OpenAI surface against the clients people use (openai, langchain-openai, litellm) and what they send:
every optional field of OpenAI's request schemas, developer/tool roles and tool_calls in history, list-of-parts
content, model names (404 model_not_found, --served-model-name aliases, GET /v1/models/{id}), system_fingerprint
and error codes, logit_bias, and tool output that only ever comes from the tool: a scripted model that tries to
write its own is overridden in the API, the page's stream and the CLI. Servers are real uvicorn instances on
loopback ports serving EchoChatModel (conftest) and scripted variants of it."""
import io
import json
import logging
import os
from types import SimpleNamespace

import httpx
import pytest

from nanochat.engine import Engine
from nanochat.serve.app import create_app
from nanochat.serve.openai_messages import conversation
from nanochat.serve.openai_schema import ChatRequest, CompletionRequest
from nanochat.serve.replicas import Worker
from nanochat.tools.registry import UNAVAILABLE, ToolRegistry
from scripts.chat_cli import chat_turn

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e '.[dev]')")

USER = [{"role": "user", "content": "hi"}]
FINGERPRINT = "sft/nanochat-echo/step7/git-abc1234"


@pytest.fixture(scope="module")
def echo(byte_tokenizer, serve_app, echo_chat_model):
    app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "nanochat-echo",
                     fingerprint=FINGERPRINT, warm_up=False)
    with serve_app(app) as url:
        yield SimpleNamespace(url=url, tokenizer=byte_tokenizer,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0))


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=30)


# ---------------------------------------------------------------------------------------------
# the official openai client: chat, stream, completions, models, errors

def test_openai_client_chat_stream_completions_and_models(echo):
    c = echo.client
    resp = c.chat.completions.create(model="nanochat-echo", messages=USER)
    assert resp.model == "nanochat-echo" and resp.system_fingerprint == FINGERPRINT
    assert resp.choices[0].message.content == "You said: hi ok" and resp.choices[0].message.refusal is None
    chunks = list(c.chat.completions.create(model="nanochat-echo", messages=USER, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "You said: hi ok"
    assert {ch.system_fingerprint for ch in chunks} == {FINGERPRINT}
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    text = c.completions.create(model="nanochat-echo", prompt="Q", max_tokens=3, temperature=0)
    assert text.object == "text_completion" and text.system_fingerprint == FINGERPRINT and text.choices[0].text
    assert c.models.retrieve("nanochat-echo").id == "nanochat-echo"
    assert [m.id for m in c.models.list()] == ["nanochat-echo"]
    for call in (lambda: c.models.retrieve("gpt-4"), lambda: c.chat.completions.create(model="gpt-4", messages=USER),
                 lambda: c.completions.create(model="gpt-4", prompt="Q")):
        with pytest.raises(openai.NotFoundError, match="does not exist") as e:
            call()
        assert e.value.code == "model_not_found" and e.value.param == "model"


def test_served_model_name_aliases(byte_tokenizer, serve_app, echo_chat_model):
    """--served-model-name: more names the model answers to (replies carry the first); '*' answers to any."""
    for aliases, ok, missing in ((["gpt-4o", "org/local"], ["gpt-4o", "org/local"], "gpt-5"), (["*"], ["gpt-5"], None)):
        app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "nanochat-echo",
                         model_aliases=aliases, warm_up=False)
        with serve_app(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            for name in ok:
                resp = client.chat.completions.create(model=name, messages=USER, max_tokens=3)
                assert resp.model == "nanochat-echo" and resp.choices[0].message.content == "You"
            listed = [m.id for m in client.models.list()]
            assert listed == ["nanochat-echo"] + [a for a in aliases if a != "*"]
            if missing:
                assert client.models.retrieve("org/local").root == "nanochat-echo"
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model=missing, messages=USER)


def test_error_codes_are_filled(echo):
    cases = [({"messages": USER, "temperature": 9}, 400, "invalid_value", "temperature"),
             ({"messages": USER, "temperature": "hot"}, 400, "invalid_type", None),
             ({}, 400, "missing_required_parameter", None),
             ({"messages": [{"role": "user", "content": "y" * 1100}]}, 400, "context_length_exceeded", "messages"),
             ({"messages": USER, "model": "nope"}, 404, "model_not_found", "model")]
    with httpx.Client(base_url=echo.url, timeout=30) as http:
        for body, status, code, param in cases:
            r = http.post("/v1/chat/completions", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
            if param:
                assert r.json()["error"]["param"] == param
        r = http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
        assert r.json()["error"]["code"] == "invalid_json"
        assert http.get("/nope").json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------------------------------
# every optional field of OpenAI's request schemas

CHAT_EXAMPLES = {  # a valid value for each optional field of a chat completions request
    "audio": {"voice": "alloy", "format": "mp3"}, "frequency_penalty": 0.1, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "logit_bias": {"65": 1.0}, "logprobs": True,
    "max_completion_tokens": 4, "max_tokens": None, "metadata": {"k": "v"}, "modalities": ["text"],
    "moderation": {"model": "omni-moderation-latest"}, "n": 2, "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.1, "prompt_cache_key": "k",
    "prompt_cache_options": {"ttl": "5m"}, "prompt_cache_retention": "in_memory", "reasoning_effort": "low",
    "response_format": {"type": "text"}, "safety_identifier": "u1", "seed": 1, "service_tier": "auto",
    "stop": ["\n\n\n"], "store": False, "stream_options": {"include_usage": True, "include_obfuscation": False},
    "temperature": 0.5, "tool_choice": "auto", "top_logprobs": 2, "top_p": 0.9, "user": "alice",
    "verbosity": "low", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "web_search_options": {"search_context_size": "low"},
}
TEXT_EXAMPLES = {"best_of": 1, "echo": True, "frequency_penalty": 0.1, "logit_bias": {"65": 1.0}, "logprobs": 2,
                 "max_tokens": 4, "n": 2, "presence_penalty": 0.1, "seed": 1, "stop": ["\n\n\n"],
                 "stream_options": {"include_usage": True}, "suffix": "!", "temperature": 0.5, "top_p": 0.9,
                 "user": "alice"}


def every_field(params, examples, required):
    """One body with every field of the installed openai client's request type: ours from `examples`, and any
    field a newer client knows that this table does not yet (sent as an object: an unknown field is accepted)."""
    fields = [f for f in params.__annotations__ if f not in required]
    return {**required, **{f: examples.get(f, {"added_by_a_newer_client": True}) for f in fields}}


def test_a_request_with_every_optional_openai_field_gets_200(echo):
    from openai.types import completion_create_params as text_params
    from openai.types.chat import completion_create_params as chat_params
    chat = every_field(chat_params.CompletionCreateParamsBase, CHAT_EXAMPLES,
                       {"model": "nanochat-echo", "messages": USER})
    chat.pop("max_tokens")  # OpenAI takes one of max_tokens and max_completion_tokens
    for stream in (False, True):
        r = post(echo.url, "/v1/chat/completions", {**chat, "stream": stream})
        assert r.status_code == 200, r.text
        ignored = r.headers["x-nanochat-ignored-fields"].split(", ")
        assert ({"tools", "tool_choice", "store", "metadata", "audio", "stream_options.include_obfuscation"}
                <= set(ignored))
        assert not {"temperature", "logit_bias", "user", "n", "stop", "seed"} & set(ignored)  # honoured ones
    body = r.text if stream else r.json()
    assert "data: [DONE]" in body
    # through the client too (stream off), and the legacy completions' fields
    resp = echo.client.chat.completions.create(**{k: v for k, v in chat.items()
                                                 if k in chat_params.CompletionCreateParamsBase.__annotations__})
    assert len(resp.choices) == 2 and resp.choices[0].logprobs.content
    text = every_field(text_params.CompletionCreateParamsBase, TEXT_EXAMPLES, {"model": "nanochat-echo", "prompt": "Q"})
    r = post(echo.url, "/v1/completions", text)
    assert r.status_code == 200, r.text
    assert r.headers["x-nanochat-ignored-fields"].split(", ")[:2] == ["suffix", "best_of"]
    assert all(c["text"].startswith("Q") for c in r.json()["choices"])  # echo honoured


def test_every_schema_field_is_declared_and_the_docs_name_the_ignored_ones():
    """The bodies declare each field the installed client knows (so /openapi.json, which schemathesis fuzzes,
    has them all), and the README lists every ignored one."""
    from openai.types import completion_create_params as text_params
    from openai.types.chat import completion_create_params as chat_params

    from nanochat.serve.openai_schema import CHAT_IGNORED, TEXT_IGNORED
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    for params, model, ignored in ((chat_params, ChatRequest, CHAT_IGNORED),
                                   (text_params, CompletionRequest, TEXT_IGNORED)):
        missing = set(params.CompletionCreateParamsBase.__annotations__) - set(model.model_fields)
        assert not missing, f"fields of OpenAI's request that {model.__name__} does not declare: {sorted(missing)}"
        assert all(f"`{name}`" in readme for name in ignored), [n for n in ignored if f"`{n}`" not in readme]


def test_ignored_fields_are_named_in_a_header_and_logged_once(byte_tokenizer, echo_chat_model, serve_app, caplog):
    app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "nanochat-echo", warm_up=False)
    body = {"messages": USER, "max_tokens": 2, "tools": [{"type": "function"}], "store": True, "brand_new": 1,
            "x" * 300: 1, "naïve": 2, "messages_extra": None}
    body["messages"] = [{"role": "user", "content": "hi", "name": "bob", "annotations": []}]
    with caplog.at_level(logging.INFO, logger="nanochat.serve.routes"), serve_app(app) as url:
        for _ in range(2):
            r = post(url, "/v1/chat/completions", body)
            assert r.status_code == 200, r.text
        assert "x-nanochat-ignored-fields" not in post(url, "/v1/chat/completions", {"messages": USER}).headers
    header = r.headers["x-nanochat-ignored-fields"]
    assert header == "tools, store, brand_new, messages_extra, messages[].name, messages[].annotations, (+2 more)"
    logged = [rec.getMessage() for rec in caplog.records if "ignoring the request field" in rec.getMessage()]
    assert len(logged) == 8 and sum("'tools'" in m for m in logged) == 1  # each name once, however often sent


# ---------------------------------------------------------------------------------------------
# messages: developer, tool roles and tool_calls, parts

def rendered(tokenizer, messages):
    conv, continues = conversation(ChatRequest.model_validate({"messages": messages}).messages)
    return conv, continues


def test_developer_tool_roles_and_parts_render_into_the_conversation(echo):
    tok = echo.tokenizer
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "system", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": [{"type": "text", "text": "weather"},
                                             {"type": "text", "text": "in Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "c2", "type": "function",
                     "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}]},
                {"role": "tool", "tool_call_id": "c2", "content": "4"},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}]
    conv, continues = rendered(tok, messages)
    assert continues and conv == [
        {"role": "system", "content": "Be brief.\n\nUse tools."}, {"role": "user", "content": "weather\nin Paris?"},
        {"role": "assistant", "content": [{"type": "python", "text": 'get_weather: {"city": "Paris"}'},
                                          {"type": "python_output", "text": "sunny"},
                                          {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]}]
    # the reply continues the assistant's turn: the prompt is the conversation without its closing token
    want = tok.render_conversation(conv)[0][:-1]
    resp = echo.client.chat.completions.create(model="nanochat-echo", messages=messages, max_tokens=3)
    assert resp.usage.prompt_tokens == len(want) and resp.choices[0].message.content == "You"
    # the assistant's final words after the results join the same turn; consecutive user messages join too
    conv, continues = rendered(tok, messages + [{"role": "assistant", "content": "Sunny."},
                                                {"role": "user", "content": "a"},
                                                {"role": "user", "content": "b"}])
    assert not continues and conv[2]["content"][-1] == {"type": "text", "text": "Sunny."}
    assert conv[3] == {"role": "user", "content": "a\n\nb"}
    bad = [([{"role": "tool", "content": "x"}], "no assistant message with its call"),
           (USER + [{"role": "system", "content": "late"}], "move it before the first user message"),
           ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "reads text only"),
           ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message must be"),
           ([{"role": "wizard", "content": "hi"}], "messages[0].role")]
    for messages, needle in bad:
        r = post(echo.url, "/v1/chat/completions", {"messages": messages})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_response_format_json_is_refused_with_a_clear_message(echo):
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        r = post(echo.url, "/v1/chat/completions", {"messages": USER, "response_format": fmt})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "response_format" and err["code"] == "unsupported_value"
        assert "cannot constrain a reply to JSON" in err["message"]
    r = post(echo.url, "/v1/chat/completions", {"messages": USER, "response_format": {"type": "text"}})
    assert r.status_code == 200


def test_logit_bias_is_applied_in_the_sampler(echo):
    tok = echo.tokenizer
    z = tok.encode("Z")[0]
    forced = echo.client.chat.completions.create(model="nanochat-echo", messages=USER, max_tokens=4,
                                                 logit_bias={str(z): 100})
    assert forced.choices[0].message.content == "ZZZZ"  # +100 beats the model's +30 every step
    y = tok.encode("Y")[0]
    banned = echo.client.chat.completions.create(model="nanochat-echo", messages=USER, max_tokens=4, temperature=0.7,
                                                 seed=3, logit_bias={str(y): -100})
    assert not banned.choices[0].message.content.startswith("Y")
    text = echo.client.completions.create(model="nanochat-echo", prompt="Q", max_tokens=3, logit_bias={str(z): 100})
    assert text.choices[0].text == "ZZZ"
    for bias, needle in (({"abc": 1}, "token ids"), ({"999999": 1}, "token ids"),
                         ({"65": 101}, "between -100 and 100")):
        r = post(echo.url, "/v1/chat/completions", {"messages": USER, "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias" and needle in r.text


# ---------------------------------------------------------------------------------------------
# tool output is forced, never sampled; no special token in content

@pytest.fixture(scope="module")
def scripted(byte_tokenizer, echo_chat_model):
    """Scripted(script) -> a chat model that writes `script` (a list of token ids) whatever it is asked, with '?'
    its second choice at every step (what it writes where its first is not allowed)."""
    question = byte_tokenizer.encode("?")[0]

    class Scripted(echo_chat_model):
        def __init__(self, script):
            super().__init__(byte_tokenizer)
            self.script_ids = script

        def reply_tokens(self, user_text):
            return self.script_ids

        def forward(self, idx, kv_cache=None, logits_at=None):
            logits = super().forward(idx, kv_cache, logits_at)
            logits[..., question] = logits[..., question].clamp(min=0.0)
            return logits
    return Scripted


def liar_script(tok):
    """Searches with no index loaded, then writes the search's "result" itself, as the issue's model did."""
    S = tok.encode_special
    return (tok.encode("Sure") + [S("<|python_start|>")] + tok.encode("search: Klixdrou") + [S("<|python_end|>"),
            S("<|output_start|>")] + tok.encode("[1] Klixdrou is an island nation") + [S("<|output_end|>")]
            + tok.encode(" Done") + [S("<|assistant_end|>")])


def test_a_model_that_writes_its_own_tool_output_is_overridden_in_api_and_page(byte_tokenizer, scripted, serve_app):
    tok, S = byte_tokenizer, byte_tokenizer.encode_special
    fake_first = ([S("<|output_start|>")] + tok.encode("FAKE") + [S("<|output_end|>")] + tok.encode(" ok")
                  + [S("<|assistant_end|>")])
    workers = [Worker(0, scripted(liar_script(tok)), tok, tools=ToolRegistry()),  # no search index
               Worker(1, scripted(fake_first), tok, tools=ToolRegistry())]
    for w in workers:
        app = create_app([w], "liar", warm_up=False)
        with serve_app(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            msg = client.chat.completions.create(model="liar", messages=USER, max_tokens=300).choices[0].message
            raw = client.chat.completions.create(model="liar", messages=USER, max_tokens=300,
                                                 extra_body={"raw_content": True}).choices[0].message.content
            page = [e for e in httpx.post(url + "/chat/completions", json={"messages": USER, "max_tokens": 300},
                                          timeout=30).text.split("\n") if e.startswith("data: ")]
            events = [json.loads(e[6:]) for e in page]
        outputs = [e["text"] for e in events if e["type"] == "python_output"]
        assert "Klixdrou is an island" not in raw and "Klixdrou is an island" not in json.dumps(events)
        if w.index == 0:  # the search's real answer, forced, and nothing the model wrote in its place
            assert msg.content == "Sure" and outputs == [UNAVAILABLE["search"]]
            assert ([(c["call"], c["output"]) for c in msg.nanochat_tool_calls]
                    == [("search: Klixdrou", UNAVAILABLE["search"])])
            assert raw == ("Sure<|python_start|>search: Klixdrou<|python_end|><|output_start|>" + UNAVAILABLE["search"]
                           + "<|output_end|>")
        else:  # no call: the output markers it wanted became its next choice, its "output" plain words
            assert msg.content == raw == "?FAKE? ok" and outputs == []
            assert getattr(msg, "nanochat_tool_calls", None) is None


def test_the_cli_shows_the_tools_real_answer(byte_tokenizer, scripted):
    out = io.StringIO()
    engine = Engine(scripted(liar_script(byte_tokenizer)), byte_tokenizer, tools=ToolRegistry())
    reply = chat_turn(engine, byte_tokenizer, USER, temperature=0.0, max_tokens=300, out=out)
    assert out.getvalue() == f"Sure[search: Klixdrou → {UNAVAILABLE['search']}]\n"
    assert reply == [{"type": "text", "text": "Sure"}, {"type": "python", "text": "search: Klixdrou"},
                     {"type": "python_output", "text": UNAVAILABLE["search"]}]


def test_no_special_token_reaches_content(byte_tokenizer, scripted, serve_app):
    tok, S = byte_tokenizer, byte_tokenizer.encode_special
    script = (tok.encode("A") + [S("<|user_end|>"), S("<|assistant_start|>")] + tok.encode("B")
              + [S("<|python_end|>"), S("<|user_start|>"), S("<|python_start|>")] + tok.encode("1+"))
    app = create_app([Worker(0, scripted(script), tok)], "stray", warm_up=False)
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        kw = dict(model="stray", messages=USER, max_tokens=len(script))
        msg = client.chat.completions.create(**kw).choices[0].message
        assert msg.content == "AB"  # the call cut off by max_tokens is still a call, not words
        assert [(c["call"], c["output"]) for c in msg.nanochat_tool_calls] == [("1+", None)]
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "AB"
        raw = client.chat.completions.create(extra_body={"raw_content": True}, **kw).choices[0].message.content
        assert raw == tok.decode(script)  # everything the model wrote, for those who ask
        text = client.completions.create(model="stray", prompt="Q", max_tokens=len(script)).choices[0].text
        assert "<|" not in text
        page = httpx.post(url + "/chat/completions", json={"messages": USER, "max_tokens": len(script)},
                          timeout=30).text
        texts = [json.loads(e[6:]) for e in page.split("\n") if e.startswith("data: ")]
        assert "".join(e["text"] for e in texts if e["type"] == "text") == "AB"
        assert not any(e["type"] == "special" for e in texts)


# ---------------------------------------------------------------------------------------------
# LangChain and LiteLLM, with their default fields

def test_langchain_chat_openai_invoke_and_stream(echo):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is a dev dependency")
    from langchain_core.messages import HumanMessage, SystemMessage
    llm = lc.ChatOpenAI(base_url=echo.url + "/v1", api_key="x", model="nanochat-echo", max_retries=0)
    reply = llm.invoke([SystemMessage("Be brief."), HumanMessage("hi")])
    assert reply.content == "You said: Be brief.\n\nhi ok"  # the system prompt is folded into the first user message
    assert reply.response_metadata["model_name"] == "nanochat-echo"
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.response_metadata["system_fingerprint"] == FINGERPRINT and reply.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("hello"))
    assert len(chunks) > 5 and "".join(c.content for c in chunks) == "You said: hello ok"
    # the fields a tool-calling agent sends are accepted (and ignored: the model answers in words)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
    assert llm.bind_tools([tool]).invoke("weather?").content == "You said: weather? ok"
    tuned = lc.ChatOpenAI(base_url=echo.url + "/v1", api_key="x", model="nanochat-echo", temperature=0, max_tokens=3,
                          stop=["zzz"], seed=1, max_retries=0, stream_usage=True)
    assert tuned.invoke("hi").content == "You"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic on litellm's own TypedDicts, at import
def test_litellm_completion_with_the_openai_prefix(echo, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list at import
    litellm = pytest.importorskip("litellm", reason="litellm is a dev dependency")
    kw = dict(model="openai/nanochat-echo", api_base=echo.url + "/v1", api_key="x", messages=USER)
    resp = litellm.completion(**kw)
    assert resp.choices[0].message.content == "You said: hi ok" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens > 0
    streamed = list(litellm.completion(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "You said: hi ok"
    short = litellm.completion(temperature=0, max_tokens=3, user="alice", **kw)
    assert short.choices[0].message.content == "You" and short.choices[0].finish_reason == "length"
