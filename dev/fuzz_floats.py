"""A schemathesis hook that dev/fuzz_web.py loads (SCHEMATHESIS_HOOKS=dev.fuzz_floats): bodies of the generating
routes get their sampling floats (temperature, top_p, presence/frequency_penalty, adapter_weights) drawn, about
half the time, from values at the edges of float32 and float64, and about half of the valid bodies are cut down to
a short request the server accepts, with a temperature above 0, so that such a float really reaches the sampler.
The fuzzer's own draws rarely get there: a random body almost always breaks some limit first. A body that does
not validate (a negative case) is left as it is, so a case's validity never changes. Nothing else lives here."""
import jsonschema_rs
import schemathesis
from hypothesis import strategies as st

from nanochat.serve.openai_api import CompletionRequest, OpenAIRequest, PageRequest

EXTREMES = (5e-324, -5e-324, 1e-46, 7e-46, 1.4e-45, 1e-40, 1.1754943508222875e-38, 1e-300, -0.0, 0.0, 1e-6, 1.0,
            2.0, 1e38, 3.4028234663852886e38, 3.5e38, 1.7976931348623157e308, -1.7976931348623157e308)
FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
USER = [{"role": "user", "content": "hi"}]
# route -> (its body's model, the smallest body it accepts)
ROUTES = {"/v1/chat/completions": (OpenAIRequest, {"messages": USER}), "/v1/completions": (CompletionRequest,
          {"prompt": "hi"}), "/chat/completions": (PageRequest, {"messages": USER})}
# the JSON schema the OpenAPI document holds for each body (schemathesis's idea of a valid case)
VALIDATORS = {model: jsonschema_rs.validator_for(model.model_json_schema()) for model, _ in ROUTES.values()}


def _valid(model, body):
    try:
        return isinstance(body, dict) and VALIDATORS[model].is_valid(body)
    except ValueError:  # something JSON has no type for (a negative case's raw bytes)
        return False


def with_extremes(body, model, smallest):
    """A strategy for `body`, valid for `model`: kept with some floats swapped for extremes, or (half the time)
    cut down to `smallest`, max_tokens 2, a temperature above 0 and one float at an extreme: a reply that is
    sampled with it."""
    if not _valid(model, body):  # a negative case: its point stays as it is
        return st.just(body)
    names = [k for k in FLOATS if k in model.model_fields]
    swapped = st.fixed_dictionaries({k: st.one_of(st.just(body.get(k)), st.sampled_from(EXTREMES)) for k in names})
    weights = body.get("adapter_weights") or []
    swapped_weights = st.one_of(st.just(weights), st.lists(st.sampled_from(EXTREMES), min_size=len(weights),
                                                           max_size=len(weights)))
    kept = st.tuples(swapped, swapped_weights).map(lambda d: {
        **body, **{k: v for k, v in d[0].items() if v is not None}, **({"adapter_weights": d[1]} if weights else {})})
    cut = st.tuples(st.sampled_from((0.5, 1.0, 2.0, 1e-6)), st.sampled_from(names), st.sampled_from(EXTREMES)).map(
        lambda d: {**smallest, "max_tokens": 2, "temperature": d[0], d[1]: d[2]})
    return st.one_of(kept, cut)


@schemathesis.hook
def flatmap_body(context, body):
    route = ROUTES.get(getattr(context.operation, "path", None))
    return st.just(body) if route is None else with_extremes(body, *route)
