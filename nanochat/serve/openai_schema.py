"""OpenAI's request bodies as this server takes them: every field of chat completions and of the legacy
completions, with what each one does here (honoured, nanochat's own, or accepted and ignored), and which
fields of one request were ignored. It checks shapes only; values are openai_api.py's and the routes'.

Lenient in what it accepts: the integrations people plug a local model into (LangChain, LiteLLM, Open WebUI,
editors) send more than the minimum, so every field of OpenAI's schema is accepted, and so is any field this
server has never heard of (OpenAI adds some every few months); a field of a known name must still have its
documented type. What a request sent but the server did not act on is named in the reply's
`x-nanochat-ignored-fields` header and in the log, never silently dropped from view.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# --------------------------------------------------------------------------------------------
# the field policy, for the header, the log and the docs (README "OpenAI API")

CHAT_IGNORED = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "store", "metadata",
                "service_tier", "modalities", "audio", "prediction", "reasoning_effort", "verbosity",
                "web_search_options", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
                "safety_identifier", "moderation")
TEXT_IGNORED = ("suffix", "best_of")
MESSAGE_IGNORED = ("name", "audio", "refusal", "function_call", "annotations")  # per message; `name` of a speaker


class Lenient(BaseModel):
    # unknown fields are kept (and reported as ignored); strict: a bool or a string is no number
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(Lenient):
    """One part of a message's content. Only text can be read by this model: an image_url, input_audio or
    file part is refused with a 400 naming it (openai_messages.message_text)."""
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal part: read as its text


class ToolFunction(Lenient):
    name: str
    arguments: str = ""  # JSON text, as OpenAI sends it


class ToolCall(Lenient):
    """An entry of an assistant message's `tool_calls` (a call the client ran; its answer is a tool message)."""
    id: str | None = None
    type: str = "function"
    function: ToolFunction | None = None
    custom: dict | None = None  # {"name", "input"}: a custom tool's call


class ServerToolCall(Lenient):
    """An entry of `nanochat_tool_calls`: a call a built-in tool ran on this server, as the reply gave it
    (openai_messages.py). `call` is the model's own text; without it the call is rebuilt from `function`."""
    id: str | None = None
    type: str = "function"
    function: ToolFunction | None = None
    call: str | None = None
    output: str | None = None
    offset: int | None = None  # where in the message's content the call was written (characters)


class ChatMessage(Lenient):
    """Any OpenAI message: system, developer (= system), user, assistant (with tool_calls and nanochat's
    nanochat_tool_calls), tool, function (the deprecated tool)."""
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    nanochat_tool_calls: list[ServerToolCall] | None = None
    refusal: str | None = None
    audio: dict | None = None
    function_call: dict | None = None


class StreamOptions(Lenient):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # ignored: there is nothing to obfuscate on a local server


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class SamplingFields(Lenient):
    """The fields chat and text completions share."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100, added to its logit
    user: str | None = None  # logged with the request
    # nanochat's own (the openai client sends them with extra_body={...})
    top_k: int | None = None
    adapter: str | list[str] | None = None
    adapter_weights: list[float] | None = None
    raw_content: bool | None = None  # the reply's text as the model wrote it, tool markers included


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None  # "text" only: json_object / json_schema get a 400
    # accepted and ignored (CHAT_IGNORED): a client may send them, nothing here acts on them
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    moderation: dict | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: plain text (or token ids) in, its continuation out (base models too)."""
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, a list of token ids, or a list of lists of token ids")
    logprobs: int | None = None  # the legacy API: how many alternatives per token (0: only the chosen one)
    echo: bool | None = None  # the prompt's text comes first in each choice's text
    suffix: str | None = None  # ignored: no fill-in-the-middle
    best_of: int | None = None  # ignored beyond n: every choice generated is returned


def _is_set(model, name):
    return name in model.model_fields_set and getattr(model, name) is not None  # null: as if not sent


def ignored_fields(body):
    """The names of what `body` (a ChatRequest or CompletionRequest) sent that nothing here acts on: the
    ignored fields of OpenAI's schema, fields unknown to it, and per-message ones as messages[].name."""
    policy = CHAT_IGNORED if isinstance(body, ChatRequest) else TEXT_IGNORED
    names = [n for n in policy if _is_set(body, n)] + list(body.model_extra or {})
    options = body.stream_options
    if options is not None:
        extra = list(options.model_extra or {})
        names += [f"stream_options.{n}"
                  for n in ["include_obfuscation"] * _is_set(options, "include_obfuscation") + extra]
    for m in getattr(body, "messages", []):
        for n in [x for x in MESSAGE_IGNORED if _is_set(m, x)] + list(m.model_extra or {}):
            if f"messages[].{n}" not in names:
                names.append(f"messages[].{n}")
    return names
